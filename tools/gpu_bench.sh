#!/usr/bin/env bash
# The standard GPU benchmark matrix in one command, on a machine with one CUDA GPU:
#
#     bash tools/gpu_bench.sh                 # ~5-10 min on an H100-class card (the first run also builds
#                                             # the random-weight SD 1.5 / SDXL bases under output/bench/)
#     STEPS=40 OUT=output/gpu_bench bash tools/gpu_bench.sh
#
# Real-shaped models with random weights (timing needs no trained weights), LoRA/LoKr rank 16, bf16, latent +
# text caches (what a real run uses), each configuration in its own process after a warm-up. Prints one
# table (also OUT/table.md) next to the published reference; paste it into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-output/gpu_bench}
STEPS=${STEPS:-20}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible to torch; this script measures GPU numbers')"
rm -rf "$OUT" && mkdir -p "$OUT"
bench() { "$PY" tools/bench.py --precision bf16 --rank 16 --variants latent+text-cache --steps "$STEPS" --warmup 5 "$@"; }

# SD 1.5 LoRA r16 512 px: batch 1 and 4, against the bare U-Net fwd+bwd+opt (the floor)
bench --model sd15 --batch 1 4 --out "$OUT/sd15-lora"
# the same at batch 1 under torch.profiler: host syncs per step (set_sync_debug_mode) and a Chrome trace
bench --model sd15 --batch 1 --profile --no-bare --steps 10 --out "$OUT/sd15-lora-profile"
# SDXL 1024 px: LoRA (with its bare floor) and LoKr
bench --model sdxl --batch 1 --adapter lora --out "$OUT/sdxl-lora"
bench --model sdxl --batch 1 --adapter lokr --no-bare --out "$OUT/sdxl-lokr"
echo "FLUX-dev LoRA 1024 px (bf16, nf4): skipped - no real-shaped random-weight FLUX base builder yet" \
     "(finetune/models/reference.py builds sd15, sd21, sdxl, sd35m)" | tee "$OUT/flux-skipped.txt"

# per-example noise: drawn on the CPU + pinned non-blocking copy (the trainer's path) vs a GPU generator
"$PY" tools/bench.py --noise | tee "$OUT/noise.jsonl"

{
  "$PY" tools/bench.py --collect "$OUT"
  echo
  echo "published reference: SimpleTuner, SD 1.5 LoRA r16 512 px batch 1 on an H100: 0.181 s/step, 2.87 GiB" \
       "(target here: <= 0.18 s/step, <= 2.9 GiB, loop <= 1.05x the bare U-Net step)"
  echo "noise paths (ms per batch):"
  cat "$OUT/noise.jsonl"
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
} | tee "$OUT/table.md"
