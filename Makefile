# expflow-flows — every target installs what it needs first, so each one works as
# the first command on a fresh machine.
#
#   make demo    generate data, start/reuse a local Prefect server, run the pipeline
#   make test    install the dev extras and run the test suite
#   make bench   PIN guess cost; HPO and sweep overhead; metric capture; checkpoints
#   make lint    ruff check + format check + import contracts (lint-imports)
#   make server  local Prefect server with UI (background; `make server-stop`)
#   make deploy  register prefect.yaml's deployments on that server
#   make worker  serve the local process work pool
#   make clean   remove the virtualenv and caches (not your ~/.expflow)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
EXPFLOW := $(VENV)/bin/expflow
PREFECT := $(VENV)/bin/prefect
PORT ?= 4200
POOL ?= expflow-local
SLURM_POOL ?= expflow-slurm
CLEARML_POOL ?= expflow-clearml

export EXPFLOW_HOME ?= $(HOME)/.expflow
export PREFECT_HOME ?= $(EXPFLOW_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_CLI_PROMPT ?= false
# Flow runs started by the workers below send a heartbeat; the automation `make deploy`
# creates marks a run Crashed when its heartbeats stop (expflow server automations).
HEARTBEAT_S ?= 60
API_URL := http://127.0.0.1:$(PORT)/api

.PHONY: install install-dev demo test bench lint format server server-stop deploy worker worker-slurm worker-clearml slurm-up slurm-down clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip install --quiet 'uv>=0.9,<1'

# uv with an override file: prefect 3.9 asks for a certifi release that some
# indexes lack (constraints/overrides.txt says why). --compile-bytecode because
# without .pyc files `import prefect` costs twice as long.
$(VENV)/.installed: pyproject.toml constraints/overrides.txt | $(UV)
	$(UV) pip install --quiet --python $(PY) --compile-bytecode \
		--override constraints/overrides.txt -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml constraints/overrides.txt | $(UV)
	$(UV) pip install --quiet --python $(PY) --compile-bytecode \
		--override constraints/overrides.txt -e '.[dev]'
	# hpo.sampler=gp needs torch; pip, since it finds a CPU build where one lies on disk
	$(PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.0' 'setuptools<82'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(EXPFLOW) demo --port $(PORT)

# Headless Chromium (Debian's package) checks the HTML reports; the script installs it
# when it is missing and this is root with apt, and otherwise lets those tests skip.
# A real single-node Slurm (Debian's slurmctld/slurmd/munge on loopback) for the
# Slurm tests: installed and started idempotently; the tests stop it afterwards.
test: $(VENV)/.installed-dev
	$(VENV)/bin/lint-imports
	./scripts/ensure-chromium.sh
	./scripts/slurm-up.sh
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_cli.py
	$(PY) benchmarks/bench_pin.py
	$(PY) benchmarks/bench_hpo.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_checkpoint.py
	$(PY) benchmarks/bench_hpo_algorithms.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check expflow_flows tests benchmarks
	$(VENV)/bin/ruff format --check expflow_flows tests benchmarks
	$(VENV)/bin/lint-imports

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format expflow_flows tests benchmarks
	$(VENV)/bin/ruff check --fix expflow_flows tests benchmarks

# DB_URL=postgresql+asyncpg://user@host/prefect puts the server on PostgreSQL.
server: $(VENV)/.installed
	$(EXPFLOW) server start --port $(PORT) $(if $(DB_URL),--database-url $(DB_URL))

server-stop: $(VENV)/.installed
	$(EXPFLOW) server stop --port $(PORT)

deploy: server
	PREFECT_API_URL=$(API_URL) $(PREFECT) work-pool inspect $(POOL) >/dev/null 2>&1 || \
		PREFECT_API_URL=$(API_URL) $(PREFECT) work-pool create $(POOL) --type process
	PREFECT_API_URL=$(API_URL) $(PREFECT) work-pool inspect $(SLURM_POOL) >/dev/null 2>&1 || \
		PREFECT_API_URL=$(API_URL) $(PREFECT) work-pool create $(SLURM_POOL) --type slurm
	PREFECT_API_URL=$(API_URL) $(PREFECT) work-pool inspect $(CLEARML_POOL) >/dev/null 2>&1 || \
		PREFECT_API_URL=$(API_URL) $(PREFECT) work-pool create $(CLEARML_POOL) --type clearml
	PREFECT_API_URL=$(API_URL) $(PREFECT) deploy --all
	PREFECT_API_URL=$(API_URL) $(VENV)/bin/expflow server automations

worker: server
	PREFECT_API_URL=$(API_URL) PREFECT_FLOWS_HEARTBEAT_FREQUENCY=$(HEARTBEAT_S) $(PREFECT) worker start --pool $(POOL) --type process

# Serves the `expflow-slurm` pool: each flow run becomes an sbatch job. Run it where
# sbatch/scontrol/scancel work (a login node); SLURM_CONF as your cluster needs.
worker-slurm: server
	PREFECT_API_URL=$(API_URL) PREFECT_FLOWS_HEARTBEAT_FREQUENCY=$(HEARTBEAT_S) $(PREFECT) worker start --pool $(SLURM_POOL) --type slurm

# Serves the `expflow-clearml` pool: each flow run becomes a ClearML task on a queue that
# clearml-agent serves. Needs ~/clearml.conf (or CLEARML_API_HOST and CLEARML_API_*_KEY).
worker-clearml: server
	PREFECT_API_URL=$(API_URL) PREFECT_FLOWS_HEARTBEAT_FREQUENCY=$(HEARTBEAT_S) $(PREFECT) worker start --pool $(CLEARML_POOL) --type clearml

slurm-up:
	./scripts/slurm-up.sh

slurm-down:
	./scripts/slurm-down.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
