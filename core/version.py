"""Single source of the package version, read by pyproject and both plugins."""

__version__ = "0.1.0"
