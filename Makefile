# The README's commands. Everything runs offline once `make setup` has installed the packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test reproduce utility bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m utils.tiktoken_cache

demo: setup
	$(PY) demo.py

test: setup
	$(PY) -m pytest

reproduce: setup
	$(PY) reproduce.py config/reproduce.py

utility: setup
	$(PY) bench/utility.py config/utility.py

bench: setup
	for b in train_generate dp_overhead patches synthesis; do $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf out results .pytest_cache
