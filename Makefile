# make demo | make study | make test | make bench: each reuses .venv and reinstalls the project only when pyproject.toml changed.
VENV := .venv
PY := $(VENV)/bin/python
# make bench BENCH=benchmarks/bench_dn.py runs one of them
BENCH ?= $(wildcard benchmarks/bench_*.py)

.PHONY: demo study test bench

# The instability study (docs/instability.md, "The study"): DETR, DAB-DETR, DN-DAB-DETR and DN-DAB-DETR without the
# attention mask at the cpu_study scale, where every run reaches its AP plateau, then the analysis with the paper's
# claims (claims.md), convergence measured against DAB-DETR's final AP. The study configs train on one thread, so
# the seeds are split over two sweeps that run side by side on 2 cores. `make study` runs 5 seeds, `make demo` 2.
STUDY := experiment=study_detr,study_dab,study_dn_dab,study_dn_dab_nomask
STAMP := $(shell date +%Y%m%d_%H%M%S)
DEMO_DIR := multirun/demo_$(STAMP)
STUDY_DIR := multirun/study_$(STAMP)
# $(call study,FOLDER,SEEDS OF THE FIRST SWEEP,SEEDS OF THE SECOND): fails if either sweep fails
define study
	$(PY) train.py -m $(STUDY) trainer.seed=$(2) trainer.progress=false hydra.sweep.dir=$(1)/a & first=$$!; \
	$(PY) train.py -m $(STUDY) trainer.seed=$(3) trainer.progress=false hydra.sweep.dir=$(1)/b; second=$$?; \
	wait $$first && test $$second -eq 0
	$(PY) analysis/instability.py $(1) --claims conf/study/dn_study.yaml --reference experiment=study_dab
endef
SEEDS_A := 1,3,5
SEEDS_B := 2,4

demo: $(VENV)/.installed-base
	$(call study,$(DEMO_DIR),1,2)

study: $(VENV)/.installed-base
	$(call study,$(STUDY_DIR),$(SEEDS_A),$(SEEDS_B))

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
