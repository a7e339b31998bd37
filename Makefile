# Quickstart: `make demo` (whole pipeline offline on synthetic data) and `make test`.
# Both create .venv and install the project first; nothing needs to be installed beforehand
# but Python 3.11 with venv, and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# dvc runs each stage's `python -m ...` through the shell: make it find the venv's python
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

# The real competition run: these keys override params.yaml's demo values (see README). ZIP=path takes the
# competition zip downloaded in a browser (its home: downloads/) instead of the Kaggle API.
# only `make repro ZIP=...`: an environment variable ZIP (Info-ZIP's options) is not a path
ifneq ($(origin ZIP),command line)
ZIP :=
endif
# a zip inside the project (downloads/) is named relative to it, so params.yaml and dvc.lock stay portable
ZIP_PATH = $(if $(filter $(CURDIR)/%,$(abspath $(ZIP))),$(patsubst $(CURDIR)/%,%,$(abspath $(ZIP))),$(abspath $(ZIP)))
KAGGLE_PARAMS = fetch.source=$(if $(ZIP),$(ZIP_PATH),kaggle) prepare.valid_per_class=1000 \
	train.weights=imagenet train.image_size=224 train.lr=0.001 train.epochs=3
# the demo's values of the same keys (params.yaml as committed; tests/test_pipeline.py holds the two equal)
DEMO_PARAMS = fetch.source=demo prepare.valid_per_class=150 train.weights=none train.image_size=128 \
	train.lr=0.01 train.epochs=40

.PHONY: install demo test repro submit serve lint clean bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# params.yaml still on a real run's values (after `make repro`): the demo's values of those keys go back first
demo: install
	$(BIN)/python -m pipeline.setparams params.yaml $(DEMO_PARAMS) --unless fetch.source=demo
	$(BIN)/dvc repro
	$(BIN)/python -m serving.smoke data/prepared/test/unknown/1.jpg

test: install
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests, which counts as a failure" >&2; exit 1; fi; \
	exit $$rc

# `dvc exp run -S` writes the overrides into params.yaml: when the run fails or is interrupted, the file is put
# back as it was; `make demo` puts the demo's values back itself when params.yaml holds a real run's
repro: install
	@case "$(abspath $(ZIP))/" in "$(abspath data/raw)"/*) \
	  echo "make repro: ZIP=$(ZIP) is inside data/raw/, the fetch stage's output, which DVC empties before fetch runs: move it to downloads/ and run 'make repro ZIP=downloads/$(notdir $(ZIP))'" >&2; exit 2;; esac
	@if [ -n "$(ZIP)" ] && [ ! -e "$(ZIP)" ]; then echo "make repro: ZIP=$(ZIP) does not exist" >&2; exit 2; fi
	@if [ -e .params.yaml.before-repro ]; then mv -f .params.yaml.before-repro params.yaml; \
	  echo "make repro: params.yaml put back as it was before an interrupted make repro" >&2; fi
	@cp params.yaml .params.yaml.before-repro
	@trap 'mv -f .params.yaml.before-repro params.yaml; echo "make repro interrupted; params.yaml is back as it was before" >&2; exit 130' INT TERM; \
	if $(BIN)/dvc exp run $(addprefix -S ,$(KAGGLE_PARAMS)); then rm -f .params.yaml.before-repro; else \
	  mv -f .params.yaml.before-repro params.yaml; \
	  echo "make repro failed (see above); params.yaml is back as it was before, and 'make demo' runs the demo" >&2; \
	  exit 1; fi

# Upload submissions/submission.csv (made by `make repro`) to Kaggle; MESSAGE="..." adds a note to the
# message, which always names the git commit and the validation metrics. Not a DVC stage: it is not repeatable.
submit: install
	$(BIN)/python -m pipeline.submit --submission submissions/submission.csv --prepared data/prepared \
		--metrics metrics/evaluate.json --predict-metrics metrics/predict.json $(if $(MESSAGE),--message "$(MESSAGE)")

# The service on the latest model in the BentoML store (dvc repro package), in the foreground; Ctrl-C or
# SIGTERM stops it. HOST and PORT come from the environment.
HOST ?= 127.0.0.1
PORT ?= 3000
serve: install
	$(BIN)/bentoml serve serving.service:DogsVsCats --host $(HOST) --port $(PORT)

bench: install  # CPU always; CUDA too where PyTorch sees a GPU
	$(BIN)/python bench/train_bench.py --device cpu
	$(BIN)/python bench/infer_bench.py --device cpu
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(BIN)/python bench/train_bench.py --device cuda && $(BIN)/python bench/infer_bench.py --device cuda; fi

lint: install
	$(BIN)/ruff check pipeline serving tests bench

clean:
	rm -rf $(VENV)
