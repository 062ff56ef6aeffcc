# make demo | make test | make bench: each reuses .venv and reinstalls the project only when pyproject.toml changed.
VENV := .venv
PY := $(VENV)/bin/python
# make bench BENCH=benchmarks/bench_dn.py runs one of them
BENCH ?= $(wildcard benchmarks/bench_*.py)

.PHONY: demo test bench

demo: $(VENV)/.installed-base
	$(PY) train.py

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
