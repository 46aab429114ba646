#!/usr/bin/env bash
# The GPU benchmark matrix in one call, on a machine with one CUDA GPU:
#
#     bash tools/gpu_bench.sh                 # the matrix, within a 10-minute device slot (see "Fitting" below)
#     PART=sd bash tools/gpu_bench.sh         # only SD 1.5 + SDXL;  PART=flux: only FLUX.1 [dev]; PART=wan: Wan
#     DRY_RUN=1 bash tools/gpu_bench.sh       # print every run's recipe, run nothing (any machine)
#     TINY=1 bash tools/gpu_bench.sh          # the same matrix on the CPU stand-ins (toy, tiny FLUX): checks the
#                                             # script end to end in a few minutes without a GPU
#
# Real-shaped models with random weights (timing needs the shapes, not trained weights; finetune/models/
# reference.py builds them from the published configs, FLUX on the GPU in bf16), LoRA rank 16, latent + text
# caches, each configuration in its own process, after a warm-up. Rows: SD 1.5 (512 px) and SDXL (1024 px)
# bf16; FLUX.1 [dev] (512 px, the diffusers QLoRA blog's size) bf16 and nf4, with and without regional compile
# (train.compile: blocks), bf16 with block swap, bf16 with token routing; each model's bare denoiser forward +
# backward + optimizer step on ready tensors is the floor the loop is divided by ("x bare"). Wan 2.1 1.3B (480 x
# 480 px x 81 frames, bf16, with and without regional compile) comes last: its random base is the largest to
# build (UMT5-XXL), so a first call may leave it to a second one (PART=wan).
#
# Fitting a 10-minute slot: 3 warm-up + 6 measured steps per row (a compiled row compiles in its warm-up), rows
# in priority order, and a budget (BUDGET, default 510 s from the script's start, bases' build included): a row
# is only started while the budget lasts, and a started row is stopped at the budget + 60 s; rows left out are
# printed as skipped, so the call always ends inside the slot with every finished row in OUT. Estimated on an
# H100 (not yet measured): building the bases ~2 min (the first call on a fresh machine), SD rows ~2.5 min,
# FLUX rows ~5 min; if the budget cuts rows, run PART=sd and PART=flux in two calls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-output/gpu_bench}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-3}
BUDGET=${BUDGET:-510}
PART=${PART:-all}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore

SD15=sd15 SDXL=sdxl FLUX=flux-dev WAN=wan-1.3b PREC=bf16 NF4=nf4 SWAP=28
if [ -n "${TINY:-}" ]; then  # CPU stand-ins: the toy for the U-Nets, the tiny FLUX and Wan; fp32; no code generation
  SD15=toy SDXL=toy FLUX=flux-tiny WAN=wan-tiny PREC=no NF4=fp8 SWAP=2 STEPS=2 WARMUP=1
  export FINETUNE_COMPILE_BACKEND=eager OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
elif [ -z "${DRY_RUN:-}" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible to torch; this script measures GPU numbers (TINY=1 checks it on a CPU)')"
fi
[ -n "${DRY_RUN:-}" ] || { rm -rf "$OUT" && mkdir -p "$OUT"; }

# one tools/bench.py call per row group; --budget is what is left of the script's budget
bench() {
  local name=$1; shift
  local left=$((BUDGET - SECONDS))
  if [ -n "${DRY_RUN:-}" ]; then
    echo "== $name"; "$PY" tools/bench.py --dry-run --precision "$PREC" --rank 16 --steps "$STEPS" --warmup "$WARMUP" "$@"
  elif [ "$left" -le 0 ]; then
    echo "skipped: $name (the ${BUDGET} s budget is spent)" | tee -a "$OUT/skipped.txt"
  else
    "$PY" tools/bench.py --precision "$PREC" --rank 16 --steps "$STEPS" --warmup "$WARMUP" --budget "$left" \
      --out "$OUT/$name" "$@"
  fi
}

if [ "$PART" = all ] || [ "$PART" = sd ]; then
  bench sd15 --model "$SD15" --batch 1 --variants latent+text-cache compile-blocks
  bench sdxl --model "$SDXL" --batch 1 --variants latent+text-cache
fi
if [ "$PART" = all ] || [ "$PART" = flux ]; then
  bench flux-bf16 --model "$FLUX" --batch 1 --variants latent+text-cache compile-blocks
  bench flux-nf4 --model "$FLUX" --batch 1 --quantize "$NF4" --no-bare --variants latent+text-cache compile-blocks
  bench flux-bf16-swap --model "$FLUX" --batch 1 --block-swap "$SWAP" --no-bare --variants latent+text-cache compile-blocks
  bench flux-bf16-routing --model "$FLUX" --batch 1 --no-bare --variants routing
fi
if [ "$PART" = all ] || [ "$PART" = wan ]; then
  bench wan-bf16 --model "$WAN" --batch 1 --variants latent+text-cache compile-blocks
fi
[ -z "${DRY_RUN:-}" ] || exit 0

{
  "$PY" tools/bench.py --collect "$OUT"
  echo
  cat "$OUT/skipped.txt" 2>/dev/null || true
  echo
  echo "published figures (other cards and settings; for scale, not a like-for-like comparison):"
  echo "- SimpleTuner, SD 1.5 LoRA r16 512 px batch 1, H100: 0.181 s/step, 2.87 GiB"
  echo "- diffusers QLoRA blog (2025-06-19), FLUX.1 [dev] LoRA 512 px batch 1, 8-bit AdamW, checkpointing, cached"
  echo "  latents: nf4 on an RTX 4090 ~9 GB peak, 700 steps in ~41 min (~3.5 s/step); bf16 LoRA ~26 GB peak;"
  echo "  fp8 (torchao) on an H100 700 steps in ~20 min (~1.7 s/step), 36.6 GB"
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU', '| torch', torch.__version__)"
  echo "elapsed: ${SECONDS} s of the ${BUDGET} s budget"
} | tee "$OUT/table.md"
