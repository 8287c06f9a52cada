PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test servers with their own dependencies (moto's S3 server; stac-fastapi-pgstac, pypgstac and
# uvicorn for the STAC API on PostgreSQL), kept out of the project's venv.
SERVERS_VENV ?= .venv-servers
SERVERS_REQS := tests/servers/requirements.txt
SERVERS_STAMP := $(SERVERS_VENV)/.installed
# `make demo` needs only rtsmap and onnxruntime (no torch, no CUDA libraries): its own small venv,
# unless the full one from `make install`/`make test` is already there.
DEMO_VENV ?= .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed

.PHONY: install servers test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[cpu,train,hpc,dev]'
	# GDAL's current GeoPackage validator (gdal-utils' validate_gpkg.py) for the tests: it needs
	# only sqlite3, so the GDAL Python bindings it names as a dependency (a C build) are skipped.
	$(BIN)/pip install --no-deps 'gdal-utils>=3.12'
	touch $(STAMP)

install: $(STAMP)

$(SERVERS_STAMP): $(SERVERS_REQS)
	$(PYTHON) -m venv $(SERVERS_VENV)
	$(SERVERS_VENV)/bin/pip install -q -r $(SERVERS_REQS)
	touch $(SERVERS_STAMP)

servers: $(SERVERS_STAMP)

test: $(STAMP) $(SERVERS_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip
	$(DEMO_VENV)/bin/pip install -q -e '.[cpu]'
	touch $(DEMO_STAMP)

demo:
	@if [ -f $(STAMP) ]; then $(BIN)/rtsmap demo; else $(MAKE) --no-print-directory $(DEMO_STAMP) && $(DEMO_VENV)/bin/rtsmap demo; fi

clean:
	rm -rf $(VENV) $(SERVERS_VENV) $(DEMO_VENV) build *.egg-info
