#!/usr/bin/env bash
# One-GPU check of the speed paths (issue 7), under 10 minutes on an A100/H100: a bf16 `mode: fast` smoke run of
# Pretrain.py under torchrun on the synthetic world, the loss-equivalence check, then the benchmarks (pretraining
# at full size, batch 64, 256 px; retrieval re-ranking; data pipeline; compile) and the bf16-vs-fp32 loss curves. The
# step limits add up to 10 minutes; a step that fails or runs out of time is recorded and skipped, so the results
# file is always written.
#   bash scripts/gpu_check.sh [results file, default output/gpu_check/results.md]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-output/gpu_check}
RESULTS=${1:-$OUT/results.md}
DATA=data/synthetic   # the path configs/*_synthetic.yaml read
mkdir -p "$OUT" "$(dirname "$RESULTS")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# a torchrun restart must not reuse a stale rendezvous store (docs/README_robustness.md)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
FAILED=()
STEP=0

BUDGET=${GPU_CHECK_BUDGET:-570}   # seconds for everything; later steps get what is left, or are skipped
step() {  # step NAME SECONDS COMMAND...: run with a limit, append its output to the results file
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$RESULTS"
    FAILED+=("$name (skipped: out of time)")
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s)"
  { echo; echo "## $name"; echo; echo '```'; echo "\$ $*"; } >> "$RESULTS"
  local start=$SECONDS log
  STEP=$((STEP + 1))
  log="$OUT/step$STEP.log"   # the full output; the results file keeps its last 40 lines
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 40 "$log" | tr '\r' '\n' | tail -n 40 | tee -a "$RESULTS"
  { echo "exit $rc after $((SECONDS - start)) s"; echo '```'; } >> "$RESULTS"
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', \
torch.cuda.is_available(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
} > "$RESULTS" 2>&1
cat "$RESULTS"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to check (results: $RESULTS)"
  exit 1
fi

if [ ! -f "$DATA/manifest.json" ]; then
  step "generate the synthetic world" 40 $PY -m synthetic.world --root "$DATA"
fi

step "bf16 fast-mode smoke run: torchrun Pretrain.py, 1 epoch of 40 steps" 90 \
  $PY -m torch.distributed.run --nproc_per_node=1 --master_port=29517 Pretrain.py \
  --config configs/Pretrain_synthetic.yaml --output_dir "$OUT/smoke" --text_encoder none --precision bf16 \
  --opt mode=fast --opt schedular.epochs=1 --opt max_steps_per_epoch=40 --opt num_workers=4 --opt init_deit=false
step "loss equivalence, fp32, reference vs fast, 100 steps" 60 \
  $PY benchmarks/loss_equivalence.py --device cuda --steps 100 --every 20
step "pretraining throughput, ViT-B/16 + BERT-base, 256 px, batch 64, bf16" 90 \
  $PY benchmarks/bench_pretrain.py --config configs/Pretrain.yaml --batch 64 --device cuda --precision bf16 \
  --steps 10 --warmup 3
step "pretraining throughput, ViT-B/16 + BERT-base, 256 px, batch 64, fp32/TF32" 90 \
  $PY benchmarks/bench_pretrain.py --config configs/Pretrain.yaml --batch 64 --device cuda --steps 10 --warmup 3
step "retrieval re-ranking, 384 px, 200 images x 5 captions, k 64" 60 \
  $PY benchmarks/bench_retrieval_eval.py --config configs/Retrieval_coco.yaml --device cuda --images 200 \
  --captions 5 --k_test 64
step "data pipeline, 256 px, one worker" 30 $PY benchmarks/bench_data.py --items 500
step "torch.compile of the encoder layers (fast mode), bf16, batch 64" 90 \
  $PY benchmarks/bench_pretrain.py --config configs/Pretrain.yaml --batch 64 --device cuda --precision bf16 \
  --steps 10 --warmup 3 --modes fast --compile
step "bf16 vs fp32 loss curves, tiny model, batch 32, 1000 steps" 50 \
  $PY benchmarks/bf16_curves.py --device cuda --batch 32 --steps 1000

{ echo; echo "## summary"; echo; } >> "$RESULTS"
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "all steps passed" | tee -a "$RESULTS"
else
  printf 'failed: %s\n' "${FAILED[@]}" | tee -a "$RESULTS"
fi
echo "results: $RESULTS (copy the tables into docs/PERFORMANCE.md)"
[ ${#FAILED[@]} -eq 0 ]
