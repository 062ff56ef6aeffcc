#!/usr/bin/env bash
# The speed benchmarks on a CUDA GPU, as one run that fits a lent GPU's time (docs/benchmarks.md, "On a GPU"):
# every model against transformers with autocast on both sides (fp32 and bf16, dropout matched, each backbone as
# shipped; images per second and the GPU's name in the JSON), DN's cost at 1, 5 and 10 groups (bf16), and
# multi-scale deformable attention's time and peak memory against image size. The JSON files go to the folder
# given as the first argument (default: $OUT where it is set, else gpu_results/).
#
#   bash benchmarks/gpu.sh results/
#
# Settings by environment: PYTHON (python3), BENCH_DEVICE (cuda; cpu only to try the script), BENCH_SIZE (640),
# BENCH_BATCH (8), BENCH_REPEATS (10), BENCH_WARMUP (3), BENCH_DEFORMABLE_SIZES (512,800,1333). Python packages the
# machine lacks (hydra-core, omegaconf, antlr4-python3-runtime) are installed from wheels in .whl/ when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
python=${PYTHON:-python3}
device=${BENCH_DEVICE:-cuda}
size=${BENCH_SIZE:-640}
batch=${BENCH_BATCH:-8}
repeats=${BENCH_REPEATS:-10}
warmup=${BENCH_WARMUP:-3}
deformable_sizes=${BENCH_DEFORMABLE_SIZES:-512,800,1333}

if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$python" -c "import torch" 2>/dev/null; then
    echo "gpu.sh: $python cannot import torch; set PYTHON to the interpreter that has it" >&2
    exit 2
fi
if [ "$device" = cuda ] && ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: $python sees no CUDA device (torch.cuda.is_available() is False); BENCH_DEVICE=cpu tries the" \
        "script on the CPU" >&2
    exit 2
fi
mkdir -p "$out"
timing=(--device "$device" --repeats "$repeats" --warmup "$warmup")
"$python" benchmarks/bench_step.py "${timing[@]}" --size "$size" --batch "$batch" --precision fp32,bf16 \
    --dropout matched --layout shipped --json "$out/step.json"
"$python" benchmarks/bench_dn.py "${timing[@]}" --size "$size" --batch "$batch" --precision bf16 --json "$out/dn.json"
"$python" benchmarks/bench_deformable_attention.py "${timing[@]}" --sizes "$deformable_sizes" \
    --json "$out/deformable_attention.json"
echo "gpu.sh: results in $out/ (step.json, dn.json, deformable_attention.json)"
