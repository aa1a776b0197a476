# `make test` and `make demo` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Exact CPU wheel for the set-up path; pyproject keeps a range so GPU users pick their own build.
TORCH_PIN := torch==2.13.0

# The framework ranges pyproject.toml allows (moss_pipecat/compat.py and moss_livekit/compat.py
# name the same ranges and check, at import, the framework internals the plugins use). A fresh
# .venv resolves to the newest releases in range, so `make test` runs on those; `make test-compat`
# runs the plugin tests on the oldest and on the newest release of each range, each end in a venv
# of its own (.venv-compat/oldest, .venv-compat/newest).
PIPECAT_RANGE := >=1.13,<1.15
PIPECAT_OLDEST := 1.13.0
LIVEKIT_RANGE := >=1.7,<1.9
LIVEKIT_OLDEST := 1.7.0
COMPAT := .venv-compat
PLUGIN_TESTS := tests/pipecat_plugin tests/livekit_plugin
FRAMEWORKS_oldest := "pipecat-ai[webrtc,websocket]==$(PIPECAT_OLDEST)" "livekit-agents==$(LIVEKIT_OLDEST)"
FRAMEWORKS_newest := "pipecat-ai[webrtc,websocket]$(PIPECAT_RANGE)" "livekit-agents$(LIVEKIT_RANGE)"

.PHONY: install test test-compat demo lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[pipecat,livekit,server,ray,dev]" "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: install
	@$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

$(COMPAT)/%/.installed: pyproject.toml Makefile
	rm -rf $(COMPAT)/$*
	$(PYTHON) -m venv $(COMPAT)/$*
	$(COMPAT)/$*/bin/python -m pip install -q --upgrade pip
	$(COMPAT)/$*/bin/python -m pip install -q "$(TORCH_PIN)"
	$(COMPAT)/$*/bin/python -m pip install -q -e ".[pipecat,livekit,server,dev]" "$(TORCH_PIN)" $(FRAMEWORKS_$*)
	touch $@

# The newest end is upgraded first (a release may have come out since the venv was built); each
# end prints the versions it runs on, and fails like `make test` when no test ran.
test-compat: $(COMPAT)/oldest/.installed $(COMPAT)/newest/.installed
	@set -e; $(COMPAT)/newest/bin/python -m pip install -q --upgrade $(FRAMEWORKS_newest) "$(TORCH_PIN)"
	@for end in oldest newest; do \
	  py=$(COMPAT)/$$end/bin/python; \
	  $$py -c 'import sys; from importlib.metadata import version as v; print("test-compat", \
	    sys.argv[1] + ":", *(f"{d} {v(d)}" for d in ("pipecat-ai", "livekit-agents")))' $$end \
	    || exit 1; \
	  $$py -m pytest -q -p no:cacheprovider $(PLUGIN_TESTS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test-compat: no tests ran ($$end)" >&2; exit 1; fi; \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	done

demo: install
	$(PY) examples/pipecat_dialogue_to_wav.py --out demo_out

# Style, then the layer contracts of pyproject.toml ([tool.importlinter]): no cycles in core/,
# plugins -> engine -> model/codec -> helpers, and no framework import in the core.
lint: install
	$(PY) -m ruff check core moss_pipecat moss_livekit examples tests benchmarks
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/codec.py
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) $(COMPAT) demo_out
