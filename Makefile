# `make demo` and `make test` install into a project-local .venv first; the install is skipped
# while the stamp is newer than both requirement files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# The demo: phantom data, fbf denoising, MIM and full-image pretraining, three fine-tunes
# (from MIM, from full-image, from scratch), each evaluated on the test split.
DEMO_IMAGES ?= 200
DEMO_STUDY ?= --models unet --inits scratch mim fullimage --label-fractions 1 --seeds 0 \
	--img-height 128 --img-width 256 --base-channels 16 --batch-size 8 --pretrain-epochs 4 --finetune-epochs 25

.PHONY: install demo test clean
install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) prepare_sts2d.py --synthetic $(DEMO_IMAGES) --data-root $(DEMO_DIR)/data
	$(PY) fbf.py --input-dir $(DEMO_DIR)/data/processed_2d --output-dir $(DEMO_DIR)/data/processed_2d_fbf
	$(PY) run_study.py --images-dir $(DEMO_DIR)/data/processed_2d_fbf --out-dir $(DEMO_DIR) $(DEMO_STUDY)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
