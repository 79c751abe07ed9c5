# Towerco AIOps platform. `make run` starts everything; `make test` runs the suite.
# Both work on a fresh machine with only Python 3.11+: they create .venv and install first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GEN    := gen
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := $(GEN)/.stamp

export DATA_DIR ?= $(CURDIR)/.data

.PHONY: help install proto keys migrate run stop token test lint bench clean

help:
	@echo "make run      start PostgreSQL, Redis and every service (Ctrl-C stops all)"
	@echo "make test     run the whole test suite against real servers"
	@echo "make token    print a dev JWT: TENANT=tenant_a ROLE=admin PERMS=a,b TTL=3600"
	@echo "make proto | migrate | lint | bench | stop | clean"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'towerco_gen.pth').write_text('$(CURDIR)/$(GEN)\n')"
	touch $@

install: $(STAMP)

# Generated code is never edited by hand: it is rebuilt from protos/ into gen/ (git-ignored).
$(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=$(GEN) --mypy_out=$(GEN) \
		--grpc_python_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTOS)
	find $(GEN) -mindepth 1 -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(GEN_STAMP)

keys: $(STAMP)
	@$(PY) -m deploy.local keys

migrate: $(GEN_STAMP)
	$(PY) -m deploy.local migrate

run: $(GEN_STAMP)
	$(PY) -m deploy.local run

stop: $(STAMP)
	$(PY) -m deploy.local stop

token: $(GEN_STAMP)
	@$(PY) -m deploy.local token --tenant "$(TENANT)" --role "$(or $(ROLE),admin)" --perms "$(PERMS)" --ttl "$(or $(TTL),3600)"

test: $(GEN_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(GEN_STAMP)
	$(PY) -m ruff check services deploy gateway tests
	$(PY) -m ruff format --check services deploy gateway tests
	$(PY) -m mypy services deploy gateway tests
	cd protos && npx --yes @bufbuild/buf@1.75.0 lint

bench: $(GEN_STAMP)
	$(PY) -m tests.bench

clean:
	rm -rf $(GEN) $(VENV)
