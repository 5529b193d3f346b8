#!/usr/bin/env bash
# The GPU check: what runs when a machine with one CUDA GPU is lent. In under 8 minutes:
#   1. the demo on CUDA: training and adaptation in bf16 on a GPU Train worker (NCCL), the SAM
#      and LMM stages as GPU actor stages (num_gpus), evaluation on the GPU; fewer epochs than
#      the CPU demo (10 + 3) so that it fits, the rest of demo.yaml as it is;
#   2. the realsize tests on CUDA (tests/test_realsize.py: ViT-B-32 ZeRO-3, SAM vit_b, InstructBLIP);
#   3. bench/train_bench.py --gpu.
# Every figure (per-stage wall time, step time, samples/s, GPU memory peak) ends up in one file,
# OUTDIR/gpu_check.json (bench/gpu_report.py). Needs only the repo and its README install
# (.venv); nothing is downloaded. Each step has a time limit, so the script always ends with the
# JSON; a step that failed or ran out is marked there (rc, timed_out) and its log is in OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR          # on the GPU machine
#   bash bench/gpu_check.sh OUTDIR --cpu    # the same plumbing on CPU at toy sizes (no GPU needed)
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [--cpu]}
MODE=${2:-cuda}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -e "$OUT/steps.jsonl" ]; then
    echo "$OUT holds a previous check (steps.jsonl): give an empty or new folder" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 TOKENIZERS_PARALLELISM=false

if [ "$MODE" = "--cpu" ]; then
    GPU=false; HALF=0; DEVICE=cpu; SCALE=6  # a 2-CPU machine needs longer limits
    DEMO_SIZE=(--set synth.images_per_domain=24 --set train.epochs=1 --set adapt.epochs=1)
    REALSIZE_ONLY=(-k instructblip)  # the other two take minutes on a CPU
    BENCH_ARGS=(--images 16 --batch-size 8 --min-steps 2 --repeats 1)
else
    command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this check needs a CUDA GPU (or --cpu)" >&2; exit 2; }
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "torch sees no CUDA device" >&2; exit 2; }
    GPU=true; HALF=0.5; DEVICE=cuda; SCALE=1
    DEMO_SIZE=(--set train.epochs=10 --set adapt.epochs=3)
    REALSIZE_ONLY=()
    BENCH_ARGS=(--gpu --images 256 --batch-size 32 --min-steps 20 --repeats 1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/machine.txt"
    # the whole GPU's memory in use every 250 ms, from outside: the models run in Ray worker processes
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu_samples.csv" &
    SAMPLER=$!
    trap 'kill "$SAMPLER" 2>/dev/null' EXIT
fi

# step NAME LIMIT_S CMD...: run CMD with a time limit (its whole process group), log to OUT/NAME.log
step() {
    local name=$1 limit=$2; shift 2
    local start end rc
    echo "== $name (limit $((limit * SCALE))s)"
    start=$(date +%s.%N)
    nice -n 5 timeout --kill-after=10 $((limit * SCALE)) "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    "$PY" - "$OUT/steps.jsonl" "$name" "$start" "$end" "$rc" <<'EOF'
import json, sys
path, name, start, end, rc = sys.argv[1:]
record = {"step": name, "started": float(start), "seconds": round(float(end) - float(start), 1), "rc": int(rc),
          "timed_out": int(rc) in (124, 137), "log": f"{name}.log"}
open(path, "a").write(json.dumps(record) + "\n")
print(json.dumps(record))
EOF
}

# 0. a random tiny InstructBLIP (tests/tiny_lmm.py) for the demo's LMM stage
step lmm 60 "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from tiny_lmm import save_tiny_instructblip
words = open('urbancross/model/words_en.txt').read().split()
save_tiny_instructblip('$OUT/lmm', [' '.join(words[i:i + 12]) for i in range(0, len(words), 12)])"

# 1. the demo on CUDA
step demo 190 "$PY" -m urbancross.cli demo --out "$OUT/demo" "${DEMO_SIZE[@]}" \
    --set train.use_gpu=$GPU --set train.num_workers=1 --set train.precision=$([ $GPU = true ] && echo bf16 || echo fp32) \
    --set preprocess.sam.num_gpus=$HALF \
    --set preprocess.refine.kind=lmm --set "preprocess.refine.model_dir=$OUT/lmm" --set preprocess.refine.num_gpus=$HALF \
    --set preprocess.refine.batch_size=16 --set preprocess.refine.max_new_tokens=16 \
    --set evaluate.num_gpus=$HALF

# 2. the realsize tests on CUDA
export URBANCROSS_REALSIZE_REPORT="$OUT/realsize.jsonl"
step realsize 170 \
    "$PY" -m pytest -q -p no:cacheprovider -m realsize --realsize-device $DEVICE -s tests/test_realsize.py "${REALSIZE_ONLY[@]}"

# 3. Ray Train + DeepSpeed against a plain loop, on the GPU
step train_bench 90 "$PY" bench/train_bench.py "${BENCH_ARGS[@]}"

[ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null
"$PY" bench/gpu_report.py "$OUT"
