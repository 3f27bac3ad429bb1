# digits: `make install` once, then `make train` / `make test`. Extra arguments go in ARGS="...".
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data
DATA_DIR ?= data

.PHONY: install data train test test-fast lint format tensorboard dashboard bench results clean

install: $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e ".[sweep,dev]"

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Offline copies of the official files, where this checkout sits beside them; otherwise the
# first training run downloads them (torchvision, md5-checked).
data:
	@if [ -d "$(SHARED_DATA)/MNIST/raw" ]; then \
		for d in MNIST FashionMNIST; do mkdir -p $(DATA_DIR)/$$d/raw && cp -n $(SHARED_DATA)/$$d/raw/*.gz $(DATA_DIR)/$$d/raw/; done; \
		chmod -R u+w $(DATA_DIR); echo "copied the MNIST and Fashion-MNIST files into $(DATA_DIR)/"; \
	else echo "no $(SHARED_DATA): the datasets download on first use"; fi

train:
	$(PY) train.py $(ARGS)

# two workers (pytest-xdist), each test file on one of them: a file's tests share its cluster, server or mount
PYTEST := $(PY) -m pytest -n 2 --dist loadfile

test:
	$(PYTEST) $(ARGS)

test-fast:
	$(PYTEST) -m "not slow and not slurm" $(ARGS)

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench:
	$(PY) scripts/benchmark.py $(ARGS)

# Every preset and lab study to full length, 3 seeds where the issue asks for a spread, then
# docs/results.md from the runs (hours on 2 CPU cores; add ARGS=trainer=gpu on a GPU machine)
RESULTS ?= logs/results
RESULTS_NOTE ?=
results:
	$(PY) train.py -m paths.log_dir=$(RESULTS) experiment=mnist_best,fashion_best seed=0,1,2 $(ARGS)
	$(PY) train.py -m paths.log_dir=$(RESULTS) experiment=lenet5 data=mnist,fashion seed=0,1,2 $(ARGS)
	$(PY) train.py -m paths.log_dir=$(RESULTS) experiment=mlp_500_300,mlp_300,mlp_64_64,mlp_512_256,mlp_8,mnist_fast,lab_cnn seed=0,1,2 $(ARGS)
	$(PY) train.py -m paths.log_dir=$(RESULTS) experiment=keras_cnn,bn_cnn,elu_cnn seed=0,1,2 $(ARGS)
	for study in hidden batch optimizers kernel epochs dense l2; do \
		$(PY) train.py -m paths.log_dir=$(RESULTS) experiment=study_$$study $(ARGS) || exit 1; done
	$(PY) scripts/report.py $(RESULTS) --results docs/results.md --note "$(RESULTS_NOTE)"

tensorboard:
	$(PY) scripts/board.py logs

# the Optuna dashboard on a sweep's study: make dashboard STUDY=cnn_optuna_mnist (or STORAGE=<url or journal file>)
STUDY ?= cnn_optuna_mnist
STORAGE ?= sqlite:///logs/sweeps/$(STUDY)/optuna.db
dashboard:
	$(VENV)/bin/optuna-dashboard $(patsubst journal:%,%,$(STORAGE))

clean:
	rm -rf logs .pytest_cache .ruff_cache
