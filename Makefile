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
# grpcio (1.81 and later, grpc/grpc#43055) restarts its poller in a forked child before exec;
# when subprocess closes the child's descriptors that poller aborts the child (initdb exited
# with SIGABRT in one CI run). Nothing here forks to keep using gRPC (workers are spawned), so
# the fork handlers are off for every process make starts: 0 of 400 forks failed, against 24.
export GRPC_ENABLE_FORK_SUPPORT ?= false

.PHONY: help install proto keys certs migrate run stop token test test-unit lint bench clean web gateway-config settings-doc usage-report lock tenant-export tenant-import

help:
	@echo "make run      start PostgreSQL, Redis, every service and the Envoy gateway (Ctrl-C stops all)"
	@echo "make test     run the whole test suite against real servers"
	@echo "make test-unit  only the tests that start no server or process (seconds)"
	@echo "make token    print a dev JWT: TENANT=tenant_a ROLE=admin PERMS=a,b TTL=3600"
	@echo "make usage-report MONTH=2026-11 [OUT=usage.csv]  a month's usage per tenant as CSV (billing)"
	@echo "make tenant-export TENANT=x [FILE=x.tenant-export.jsonl]  one tenant's rows of every service, one file"
	@echo "make tenant-import FILE=... [TENANT=newid] [CELL=cell2]  restore an export into an unused tenant id (all or nothing)"
	@echo "make lock     requirements*.lock from pyproject.toml, hashes pinned (UPGRADE=1: newest versions)"
	@echo "make certs    a self-signed CA and server pair in DATA_DIR/tls: make run then serves the gateway over TLS"
	@echo "make proto | web | gateway-config | settings-doc | migrate | lint | bench | stop | clean"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'towerco_gen.pth').write_text('$(CURDIR)/$(GEN)\n')"
	touch $@

install: $(STAMP)

# Generated code is never edited by hand: it is rebuilt from protos/ into gen/ (git-ignored).
# The protos import google/api/field_behavior.proto, and the protoset adds
# google/rpc/error_details.proto: both come from googleapis-common-protos in the venv
# (GOOGLEAPIS_PROTOS), as does the Python module google.api.field_behavior_pb2.
# gen/towerco.protoset is every proto with its imports and its comments: what grpcurl
# reads through the gateway (no server reflection there; ErrorInfo, BadRequest and
# RetryInfo come out decoded), the image `make lint` lints and the web page's TypeScript
# is generated from.
GOOGLEAPIS_PROTOS = $(shell $(PY) -c 'import google.rpc.error_details_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])')
$(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos -I $(GOOGLEAPIS_PROTOS) \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=$(GEN) --mypy_out=$(GEN) \
		--grpc_python_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTOS)
	$(PY) -m grpc_tools.protoc -I protos -I $(GOOGLEAPIS_PROTOS) --include_imports --include_source_info \
		--descriptor_set_out=$(GEN)/towerco.protoset $(PROTOS) google/rpc/error_details.proto
	find $(GEN) -mindepth 1 -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(GEN_STAMP)

# The browser page under gateway/web: a gRPC-web client from npm, built with the machine's
# Node.js from gen/towerco.protoset. Without npm it is left out with a note; the gateway
# then serves the API only.
WEB := gateway/web
WEB_STAMP := $(WEB)/dist/.stamp
WEB_SOURCES := $(WEB)/package.json $(WEB)/package-lock.json $(WEB)/.npmrc $(WEB)/buf.gen.yaml $(WEB)/tsconfig.json $(WEB)/index.html $(WEB)/app.css \
	$(shell find $(WEB)/src $(WEB)/e2e -type f -not -path '*/gen/*' 2>/dev/null)

$(WEB_STAMP): $(WEB_SOURCES) $(GEN_STAMP)
	@if command -v npm >/dev/null 2>&1; then \
		cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build && touch dist/.stamp; \
	else \
		echo "npm not found: the web page under $(WEB) is not built (the gateway serves the API only)"; \
	fi

web: $(WEB_STAMP)

# Each kustomize overlay's gateway configuration, rendered from the same template as dev
# with the overlay's platform.env (its towerco-gateway ConfigMap is generated from it).
OVERLAYS := dev prod
gateway-config: $(GEN_STAMP)
	$(foreach o,$(OVERLAYS),$(PY) -m gateway render --overlay $(o) --out deploy/kubernetes/overlays/$(o)/gateway-envoy.json \
		--template-out deploy/kubernetes/overlays/$(o)/gateway-routes-template.json &&) true

# README.md's configuration table, from the environment variables each process declares.
settings-doc: $(GEN_STAMP)
	$(PY) -m deploy.local.settings_doc

keys: $(STAMP)
	@$(PY) -m deploy.local keys

# For trying TLS on one machine (deploy/local/certs.py): a self-signed CA and a server pair
# for localhost, 127.0.0.1 and *.$BASE_DOMAIN under $(DATA_DIR)/tls. `make run` then serves
# the gateway over TLS; remove the folder to go back to plaintext.
certs: $(GEN_STAMP)
	@$(PY) -m deploy.local certs

migrate: $(GEN_STAMP)
	$(PY) -m deploy.local migrate

run: $(GEN_STAMP) web
	$(PY) -m deploy.local run

stop: $(STAMP)
	$(PY) -m deploy.local stop

token: $(GEN_STAMP)
	@$(PY) -m deploy.local token --tenant "$(TENANT)" --role "$(or $(ROLE),admin)" --perms "$(PERMS)" --ttl "$(or $(TTL),3600)"

test: $(GEN_STAMP) web
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests that start no server and no process (tests/conftest.py marks the others
# `stack` by reading them): seconds, no PostgreSQL, no web build.
test-unit: $(GEN_STAMP)
	$(PY) -m pytest -m "not stack and not slow" $(PYTEST_ARGS)

lint: $(GEN_STAMP)
	$(PY) -m ruff check services deploy gateway tests
	$(PY) -m ruff format --check services deploy gateway tests
	$(PY) -m mypy services deploy gateway tests
	cd protos && npx --yes @bufbuild/buf@1.75.0 lint '../$(GEN)/towerco.protoset#format=binpb' --path towerco
	@$(PY) -m deploy.local keys >/dev/null
	$(PY) -m gateway validate
	promtool check rules deploy/prometheus/rules/*.yml
	$(PY) -m deploy.kubernetes.render --out test-output/kubernetes
	$(VENV)/bin/kubernetes-validate --strict --quiet --kubernetes-version 1.32.0 $(foreach o,$(OVERLAYS),test-output/kubernetes/$(o).yaml)
	$(PY) -m deploy.requirements_lock check
	$(VENV)/bin/hadolint deploy/Dockerfile

# The image's lock files (deploy/Dockerfile installs them with --require-hashes): uv resolves
# pyproject.toml for Linux and Python 3.11, keeping the pins already there unless UPGRADE=1.
# make lint (and tests/test_dependencies.py) fail when pyproject.toml and the locks disagree.
lock: $(STAMP)
	$(PY) -m deploy.requirements_lock compile $(if $(UPGRADE),--upgrade)

# BENCH_ARGS: e.g. '--quick --only isolation' while developing the bench (python -m tests.bench --help).
bench: $(GEN_STAMP)
	$(PY) -m tests.bench $(BENCH_ARGS)

# The billing export from the running platform's ListTenantUsage (see deploy/local/usage_report.py).
usage-report: $(GEN_STAMP)
	@$(PY) -m deploy.local usage-report --month "$(MONTH)" --out "$(or $(OUT),-)"

# One tenant to a file and back (deploy/local/tenant_transfer.py, tenant_import.py): the dev stack's database unless
# DATABASE_URL names another; an import refuses a damaged file, a broken audit chain, a used tenant id.
tenant-export: $(GEN_STAMP)
	@$(PY) -m deploy.local tenant-export --tenant "$(TENANT)" $(if $(FILE),--out "$(FILE)")

tenant-import: $(GEN_STAMP)
	@$(PY) -m deploy.local tenant-import --file "$(FILE)" $(if $(TENANT),--tenant "$(TENANT)") $(if $(CELL),--cell "$(CELL)")

clean:
	rm -rf $(GEN) $(VENV)
