# The two commands: `make run` (set up, then the default sweep) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The default sweep: real offline weights x real offline text.
SWEEP  ?= model=smollm2,minilm data=wiki-vital,medical-hpo

.PHONY: install run test test-fast ui server lint bench bench-sweep bench-report screenshots docs clean

$(STAMP): pyproject.toml offline-assets.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m lw.offline --quiet
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m lw.run -m $(SWEEP)

# Two workers, one test module at a time each (a module's services start once), the modules
# with the most slow tests first (tests/conftest.py); the 15 slowest tests printed.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/lint-imports  # the layers contract (pyproject.toml [tool.importlinter])
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# While working: the tests that start no service and run no whole sweep (marker `slow`), on
# the same workers (tests are independent: spread one by one)
test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --durations=5

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench docs

# Speed and memory side by side (bench/bench.py); docs/development.md shows the latest table.
bench: $(STAMP)
	$(PY) bench/bench.py

# A soak: 500 small jobs (joblib) into lw.server on a throwaway PostgreSQL (bench/bench_sweep.py)
bench-sweep: $(STAMP)
	$(PY) -m pip install --quiet -e '.[server]'
	$(PY) bench/bench_sweep.py

# `lw.report --all` on a 2,000-job sweep: SQLite and lw.server on PostgreSQL (bench/bench_report.py)
bench-report: $(STAMP)
	$(PY) -m pip install --quiet -e '.[server]'
	$(PY) bench/bench_report.py

# The team's tracking server: LW_SERVER_ADMIN_PASSWORD (required), LW_SERVER_DB,
# LW_SERVER_ARTIFACTS from the environment; e.g. make server SERVER_ARGS='--host 0.0.0.0'
SERVER_ARGS ?=
server: $(STAMP)
	$(PY) -m pip install --quiet -e '.[server]'
	$(PY) -m lw.server $(SERVER_ARGS)

# The MLflow UI on the local store, opening experiments on their runs as lw.server does
# (lw.server_app's lw-ui: MLflow 3.17's own opens a fresh browser on its GenAI overview).
ui: $(STAMP)
	mkdir -p mlruns
	@$(PY) -c 'import os, sqlite3; db = "mlruns/mlflow.db"; \
	rows = sqlite3.connect(db).execute("select experiment_id, name from experiments where lifecycle_stage = ?", ("active",)).fetchall() if os.path.exists(db) else []; \
	print("[lw] the runs of each experiment:"); \
	[print(f"    http://127.0.0.1:5000/#/experiments/{i}?workflowType=machine_learning   {n}") for i, n in rows]'
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} $(PY) -m lw.server_app server --app-name lw-ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

# docs/ui/*.png from a small real sweep served as `make ui` serves it, in headless chromium
screenshots: $(STAMP)
	$(PY) docs/ui/screenshots.py

# The documentation site (mkdocs.yml): built strict from docs/ and the code (reference pages are
# generated: docs/gen_reference.py), then served on http://127.0.0.1:8000 as you edit
DOCS_ADDR ?= 127.0.0.1:8000
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict
	$(VENV)/bin/mkdocs serve --strict --dev-addr $(DOCS_ADDR)

clean:
	rm -rf multirun outputs .pytest_cache
