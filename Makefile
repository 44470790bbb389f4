# `make run` opens the app on the demo; `make test` runs the suite.
# Each creates .venv if missing and installs the project first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data
PORT ?= 8501

.PHONY: run test install demo browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins torch/torchvision to the wheels this build farm has on
# disk; pyproject keeps open ranges for everyone else.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@ls $(DATA)/*.duckdb >/dev/null 2>&1 || $(VENV)/bin/visionlens demo --out $(DATA)

# The demo's explanation sample is computed in the background while the app runs
# (resumable: what is stored is skipped, so a later `make run` finishes it); it stops
# with the app.
run: demo
	@if ls $(DATA)/demo-*.duckdb >/dev/null 2>&1; then \
	  $(VENV)/bin/visionlens demo --explain --out $(DATA) >$(DATA)/.demo-explain.log 2>&1 & \
	fi; explain=$$!; trap 'kill $$explain 2>/dev/null' EXIT INT TERM; \
	VISIONLENS_DATA=$(DATA) $(VENV)/bin/streamlit run streamlit_app.py --server.port $(PORT)

# Debian's chromium drives the browser tests (no browser download at test time);
# poppler-utils turns the PDF scorecard into text and PNG; DejaVu renders chart text.
SYSTEM_TOOLS := chromium pdftoppm
SYSTEM_PACKAGES := chromium poppler-utils fonts-dejavu-core
browser:
	@missing=0; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing=1; done; \
	[ -d /usr/share/fonts/truetype/dejavu ] || missing=1; \
	if [ $$missing = 1 ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null) \
	      || echo "system packages could not be installed: browser and PDF image tests will be skipped"; \
	  else echo "no apt-get: browser and PDF image tests will be skipped"; fi; fi

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: install browser
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
