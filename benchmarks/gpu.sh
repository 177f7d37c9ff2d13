#!/usr/bin/env bash
# GPU check, <= 5 minutes on one CUDA device:
#   1. the SAE step benchmark (benchmarks/sae_step.py) on the GPU, fp32 and bf16, for TopK,
#      BatchTopK and Matryoshka at 768 x 12288, k 32, batch 1024; a grouped sweep of 4 TopK SAEs
#      (benchmarks/grouped.py) against 4 solo steps;
#   2. a 2-minute training through `train.py trainer=gpu` on a generated store
#      (dataset=dictionary, 768 dims), printing samples/s and the loader's share of step time.
# Without CUDA it says so and exits 0. Usage: bash benchmarks/gpu.sh   (PYTHON=<interpreter>)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: no CUDA device here (torch.cuda.is_available() is False); nothing to measure."
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. SAE step vs encoder matmul on the GPU (fp32 and bf16)"
"$PY" benchmarks/sae_step.py --device cuda --bf16 --reps 20
echo "== 1b. a grouped sweep of 4 SAEs (one fit, shared batches) vs 4 solo steps, fp32 and bf16"
"$PY" benchmarks/grouped.py --device gpu --members 4 --steps 10 --rounds 2
"$PY" benchmarks/grouped.py --device gpu --members 4 --steps 10 --rounds 2 --precision bf16-mixed

echo "== 2. 2-minute training through train.py trainer=gpu on a generated store"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" extract.py dataset=dictionary dataset.d_model=768 dataset.n_features=4096 \
  'dataset.images={train: 2048, test: 16}' dataset.truth_images=16 \
  paths.activations_dir="$work/acts" hydra.run.dir="$work/gen" extract.progress=false
"$PY" train.py trainer=gpu dataset=dictionary dataset.d_model=768 dataset.n_features=4096 \
  paths.activations_dir="$work/acts" sae.d_sae=12288 sae.k=32 data.batch_size=4096 \
  data.num_workers=4 trainer.max_steps=1000000 +trainer.max_time=00:00:02:00 \
  trainer.val_check_interval=1000000 trainer.enable_progress_bar=false export=false \
  +callbacks.share._target_=loader_share.LoaderShare hydra.run.dir="$work/run" 2>&1 \
  | grep -E "training:|Error|error" || true
