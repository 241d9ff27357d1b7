# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch and torchvision are pinned as a matching pair: a torchvision from PyPI beside another
# torch build fails to import (operator torchvision::nms does not exist).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# The optional features are installed too, so that their tests run rather than skip.
EXTRAS ?= dev,serve,ray,geoclip

.PHONY: demo test lint install clean bench-quick docs-examples

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# The README's transcripts and the page's screenshot, regenerated from this code (needs indexes/demo).
docs-examples: $(STAMP)
	test -f indexes/demo/manifest.json || $(PY) -m pipelines.demo
	$(PY) -m pipelines.docs_examples

bench-quick: $(STAMP)
	for s in latency scale build_throughput codecs; do $(PY) benchmarks/$$s.py --quick || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check geoindex pipelines tests benchmarks
	$(PY) -m mypy geoindex pipelines

clean:
	rm -rf $(VENV) indexes/demo
