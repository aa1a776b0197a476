"""The plugin's logger, named like LiveKit's own plugins so log filters can select it."""

from __future__ import annotations

import logging

logger = logging.getLogger("moss_livekit")
