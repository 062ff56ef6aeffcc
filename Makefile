# make demo | make study | make accel_study | make test | make bench: each reuses .venv and reinstalls the project only when pyproject.toml changed.
VENV := .venv
PY := $(VENV)/bin/python
# make bench BENCH=benchmarks/bench_dn.py runs one of them
BENCH ?= $(wildcard benchmarks/bench_*.py)

.PHONY: demo study accel_study test bench

# The instability study (docs/instability.md, "The study"): DETR, DAB-DETR, DN-DAB-DETR and DN-DAB-DETR without the
# attention mask at the cpu_study scale, where every run reaches its AP plateau, then the analysis with the paper's
# claims (claims.md), convergence measured against DAB-DETR's final AP. The study configs train on one thread, so
# the arms are split over two sweeps of equal size that run side by side on 2 cores. `make study` runs 5 seeds,
# `make demo` 2 at half the schedule.
ARMS_A := experiment=study_detr,study_dn_dab
ARMS_B := experiment=study_dab,study_dn_dab_nomask
STAMP := $(shell date +%Y%m%d_%H%M%S)
DEMO_DIR := multirun/demo_$(STAMP)
STUDY_DIR := multirun/study_$(STAMP)
# $(call study,FOLDER,ARMS OF THE FIRST SWEEP,ARMS OF THE SECOND,SEEDS,CLAIMS FILE[,MORE OVERRIDES[,MORE RUNS]]):
# fails if either sweep fails; MORE RUNS are run folders the analysis reads beside FOLDER.
define study
	$(PY) train.py -m $(2) trainer.seed=$(4) trainer.progress=false hydra.sweep.dir=$(1)/a $(6) & first=$$!; \
	$(PY) train.py -m $(3) trainer.seed=$(4) trainer.progress=false hydra.sweep.dir=$(1)/b $(6); second=$$?; \
	wait $$first && test $$second -eq 0
	$(PY) analysis/instability.py $(1) $(7) --out $(1)/instability_report --claims $(5) --reference experiment=study_dab
endef
# The demo also halves the schedule (24 epochs, lr drop after 18) to stay within 10 minutes with the install.
DEMO_SCHEDULE := trainer.epochs=24 optim.lr_drop=18
SEEDS := 1,2,3,4,5
comma := ,

demo: $(VENV)/.installed-base
	$(call study,$(DEMO_DIR),$(ARMS_A),$(ARMS_B),1$(comma)2,conf/study/dn_study.yaml,$(DEMO_SCHEDULE))

# STUDY_EXTRA: more overrides for every study run, e.g. trainer.precision=auto (bf16 here: 20 % faster, the same
# AP within the seed spread; the recorded study is fp32)
STUDY_EXTRA ?=
study: $(VENV)/.installed-base
	$(call study,$(STUDY_DIR),$(ARMS_A),$(ARMS_B),$(SEEDS),conf/study/dn_study.yaml,$(STUDY_EXTRA))

# The accelerator study (docs/accelerators.md): contrastive DN, Group DETR (with and without DN), hybrid matching
# and Stable-DINO on DAB-DETR at the same scale, 3 seeds, analysed beside the DAB-DETR and DN-DAB-DETR runs of a
# finished `make study` (BASELINE, default: the newest multirun/study_*).
BASELINE ?= $(lastword $(sort $(wildcard multirun/study_*)))
ACCEL_DIR := multirun/accel_$(STAMP)
ACCEL_ARMS_A := experiment=study_cdn_dab,study_hybrid_dab,study_stable_dn_dab
ACCEL_ARMS_B := experiment=study_group_dab,study_group_dn_dab
ACCEL_SEEDS := 1,2,3

accel_study: $(VENV)/.installed-base
	@test -n "$(BASELINE)" || { echo "error: no multirun/study_* to compare with: run make study first or set BASELINE=<folder>"; exit 2; }
	$(call study,$(ACCEL_DIR),$(ACCEL_ARMS_A),$(ACCEL_ARMS_B),$(ACCEL_SEEDS),conf/study/accel_study.yaml,,$(BASELINE))

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
