# make demo | make test | make bench: each reuses .venv and reinstalls the project only when pyproject.toml changed.
VENV := .venv
PY := $(VENV)/bin/python
# make bench BENCH=benchmarks/bench_dn.py runs one of them
BENCH ?= $(wildcard benchmarks/bench_*.py)

.PHONY: demo test bench

# The instability study at its smallest useful size: 4 arms x 2 seeds, 5 short epochs each, then the analysis
# with the paper's claims (claims.md) and convergence measured against DAB-DETR's final AP.
STUDY := experiment=study_detr,study_dab,study_dn_dab,study_dn_dab_nomask
DEMO_SIZE := trainer.seed=1,2 trainer.epochs=5 data.max_train_images=160 data.max_val_images=64 trainer.progress=false
DEMO_DIR := multirun/demo_$(shell date +%Y%m%d_%H%M%S)

demo: $(VENV)/.installed-base
	$(PY) train.py -m $(STUDY) $(DEMO_SIZE) hydra.sweep.dir=$(DEMO_DIR)
	$(PY) analysis/instability.py $(DEMO_DIR) --claims conf/study/dn_study.yaml --reference experiment=study_dab

test: $(VENV)/.installed-test
	$(PY) -m pytest

bench: $(VENV)/.installed-bench
	set -e; for script in $(BENCH); do echo "== $$script"; $(PY) $$script; done

$(PY):
	python3 -m venv $(VENV)

# One stamp per extra ("base" = no extra); torch is a large wheel from local disk, so the first install takes minutes.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e "$(if $(filter base,$*),.,.[$*])"
	touch $@
