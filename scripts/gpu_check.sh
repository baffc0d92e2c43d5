#!/usr/bin/env bash
# make gpu-check: the gpu-marked tests and the GPU speed table (inference and training, bf16, real Cityscapes
# samples) on one H100/H200, everything under one folder (first argument; default outputs/gpu-check/<time>).
# Each step has its own time limit and the next one runs whatever happened: the logs say what failed.
# QUICK=1 DEVICE=cpu PRECISION=fp32 runs the same steps with tiny settings (to try the script without a GPU).
set -uo pipefail
PY=${PY:-python}
out=${1:-outputs/gpu-check/$(date +%Y%m%d-%H%M%S)}
data=${DATA:-../shared/realdata/cityscapes}
device=${DEVICE:-cuda}
precision=${PRECISION:-bf16}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
budget=${BUDGET:-520}  # seconds for the whole check: a step that would end past it is skipped
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$out/steps.txt"; }
fits() { [ $((SECONDS - start + $1)) -le "$budget" ] || { log "skipped $2: it could end past the ${budget} s budget"; false; }; }

{ nvidia-smi || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} > "$out/environment.txt" 2>&1

if [ "$device" = cuda ]; then
  log "gpu tests"
  timeout 100 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x --timeout 60 >"$out/gpu_tests.log" 2>&1 \
    || timeout 100 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider >"$out/gpu_tests.log" 2>&1
  log "gpu tests rc=$? $(tail -1 "$out/gpu_tests.log")"
fi

# One benchmark: name, time limit, then overrides.
bench() {
  local name=$1 limit=$2; shift 2
  fits "$limit" "$name" || return 0
  log "benchmark $name"
  timeout "$limit" $PY -m step_lightning.benchmark hydra.run.dir="$out/$name" device="$device" \
    precision="$precision" data=cityscapes data.root="$data" data.split=train crop=center components=false "$@" \
    >"$out/$name.log" 2>&1
  log "benchmark $name rc=$?"
}

BUDGETS="{name: step_budget, method: step, budget: 0.5, halt_budget: 0.3, force_halt: null}"
if [ "${QUICK:-0}" = 1 ]; then
  size="backbone=vit_t backbone.depth=4 backbone.taps=[2,3,4] backbone.dtop_heads=[2,3] resolution=128"
  runs="num_images=2 warmup=1 repeats=2"
  bench infer_tiny 300 $size $runs batch_size=2 engines=[packed,fast] force_halt=0.4 profile=true \
    "methods=[segvit,dcts,step,{name: step_net, method: step, policy: random},$BUDGETS]"
  bench train_tiny 300 $size $runs batch_size=2 mode=train force_halt=0.4 profile=true "methods=[segvit,dcts,step,$BUDGETS]"
  $PY scripts/gpu_table.py "$out" --out "$out/summary.md" >/dev/null
  exit 0
fi

# Budget rows next to their threshold rows (the same method at about the same GFLOPs): every exit halts
# halt_budget of its tokens, so step_single (one exit) compares with force_halt=0.4 at that exit.
budgets() { echo "{name: dcts_budget, method: dcts, budget: $1},{name: step_single_budget, method: step_single, \
budget: $1, halt_budget: 0.4, force_halt: null}"; }
oracle="segvit,cts,dcts,dtop,step,step_single"
net="{name: dcts_net, method: dcts, policy: random},{name: step_net, method: step, policy: random}"
runs="warmup=1 repeats=3 force_halt=0.4 num_images=8"
# Most telling first: batch 1 (where the fixed cost per forward shows) with components and a profile, then the
# training step with its parts, then the large batches.
bench vit_b_512_b1 120 backbone=vit_b resolution=512 $runs batch_size=1 engines=[packed,fast] components=true \
  profile=true "methods=[$oracle,$net,$(budgets 0.5)]"
bench train_vit_l_1024_b2 110 backbone=vit_l resolution=1024 $runs batch_size=2 mode=train profile=true \
  profile_batches=1 "methods=[segvit,dcts,step,$(budgets 0.3)]"
bench vit_l_1024_b8 110 backbone=vit_l resolution=1024 $runs batch_size=8 engines=[packed,fast] \
  "methods=[$oracle,$(budgets 0.3)]"
bench vit_l_1024_b1 150 backbone=vit_l resolution=1024 $runs batch_size=1 engines=[packed,fast] profile=true \
  "methods=[$oracle,$(budgets 0.3)]"
bench vit_b_1024_b8 70 backbone=vit_b resolution=1024 $runs batch_size=8 engines=[packed,fast] \
  "methods=[$oracle,$(budgets 0.3)]"
bench train_vit_b_512_b8 60 backbone=vit_b resolution=512 $runs batch_size=8 mode=train \
  "methods=[segvit,dcts,step,$(budgets 0.5)]"
# The remaining cells of the table, if the budget still has room.
bench vit_b_512_b8 70 backbone=vit_b resolution=512 $runs batch_size=8 engines=[packed,fast] \
  "methods=[$oracle,$(budgets 0.5)]"
bench vit_b_1024_b1 90 backbone=vit_b resolution=1024 $runs batch_size=1 engines=[packed,fast] \
  "methods=[$oracle,$(budgets 0.3)]"
bench vit_l_512_b8 90 backbone=vit_l resolution=512 $runs batch_size=8 engines=[packed,fast] \
  "methods=[$oracle,$(budgets 0.5)]"
bench vit_l_512_b1 100 backbone=vit_l resolution=512 $runs batch_size=1 engines=[packed,fast] \
  "methods=[$oracle,$(budgets 0.5)]"
$PY scripts/gpu_table.py "$out" --out "$out/summary.md" >/dev/null  # the tables and the targets' verdicts
log "done"
