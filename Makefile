# `make test` and `make demo` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Exact CPU wheel for the set-up path; pyproject keeps a range so GPU users pick their own build.
TORCH_PIN := torch==2.13.0

.PHONY: install test demo lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[pipecat,livekit,dev]" "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: install
	@$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

demo: install
	$(PY) examples/pipecat_dialogue_to_wav.py --out demo_out

lint: install
	$(PY) -m ruff check core moss_pipecat moss_livekit examples tests benchmarks

bench: install
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/codec.py
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) demo_out
