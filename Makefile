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

.PHONY: demo test lint install clean bench-quick docs-examples vendor

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
	$(PY) benchmarks/page_screenshot.py --index indexes/demo --out benchmarks/results/service-page.png

bench-quick: $(STAMP)
	for s in latency scale build_throughput codecs; do $(PY) benchmarks/$$s.py --quick || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check geoindex pipelines tests benchmarks
	$(PY) -m mypy geoindex pipelines

# The web page's map library, committed under geoindex/static/vendor/ so that neither CI nor `serve` needs
# node or a network; `make vendor` (needs npm) fetches it again and records its version and sha256 sums.
LEAFLET ?= 1.9.4
VENDOR  := geoindex/static/vendor/leaflet

vendor:
	rm -rf $(VENDOR).tmp && mkdir -p $(VENDOR).tmp/images
	cd $(VENDOR).tmp && npm pack --silent leaflet@$(LEAFLET) >/dev/null && tar xzf leaflet-$(LEAFLET).tgz
	cp $(VENDOR).tmp/package/dist/leaflet.js $(VENDOR).tmp/package/dist/leaflet.css $(VENDOR).tmp/package/LICENSE $(VENDOR).tmp/
	cp $(VENDOR).tmp/package/dist/images/*.png $(VENDOR).tmp/images/
	rm -rf $(VENDOR).tmp/package $(VENDOR).tmp/leaflet-$(LEAFLET).tgz
	echo "leaflet $(LEAFLET) (npm pack leaflet@$(LEAFLET): dist/leaflet.js, dist/leaflet.css, dist/images, LICENSE)" > $(VENDOR).tmp/VERSION
	cd $(VENDOR).tmp && sha256sum leaflet.js leaflet.css LICENSE images/*.png > SHA256SUMS
	rm -rf $(VENDOR) && mv $(VENDOR).tmp $(VENDOR)

clean:
	rm -rf $(VENV) indexes/demo
