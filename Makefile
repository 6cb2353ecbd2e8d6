# nncurv: `make demo` and `make test` create the environment themselves.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[lightning,examples,dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_curvature.py
	$(BIN)/python examples/train_with_curvature_monitor.py --out outputs/curvature_monitor
	$(BIN)/nncurv report --module examples.digits:DigitsClassifier \
		--ckpt outputs/curvature_monitor/digits_mlp.ckpt --data examples.digits:make_loader \
		--data-kwargs '{"shuffle": false, "batch_size": 2048}' --out outputs/report
	$(BIN)/python examples/observed_information.py
	$(BIN)/python examples/contractive_autoencoder.py --out outputs/contractive
	@echo
	@echo "Done. Report: outputs/report/report.html (open it in a browser)"
	@echo "TensorBoard:  $(BIN)/tensorboard --logdir outputs --host 127.0.0.1"

lint: $(STAMP)
	$(BIN)/ruff check nncurv callbacks tests examples benchmarks
	$(BIN)/ruff format --check nncurv callbacks tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy nncurv callbacks

pytest: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/hvp.py
	$(BIN)/python benchmarks/eigen.py
	$(BIN)/python benchmarks/estimators.py
	$(BIN)/python benchmarks/contractive.py
	$(BIN)/python benchmarks/information.py
	$(BIN)/python benchmarks/callback_overhead.py
	$(BIN)/python benchmarks/top_eig_tolerance.py
	$(BIN)/python benchmarks/landscape.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
