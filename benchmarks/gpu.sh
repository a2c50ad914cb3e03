#!/usr/bin/env bash
# One prepared run for a session that has a GPU (the device tool): CUDA checks, GPU timings, and optionally
# the built-in model's recipe on the GPU.  Everything it measures is printed; $OUT (if set) gets the files.
#
#   bash benchmarks/gpu.sh                 # checks + timings (about 5 minutes on one H200)
#   TRAIN=1 bash benchmarks/gpu.sh         # also scripts/train_default.sh --device cuda into $OUT/default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vqdiffusion_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

echo "== CUDA checks: generate, inpaint, variation on the built-in model (float32 and bfloat16)"
vqdiffusion generate "a large red circle in the top left" --device cuda --num-images 4 --output "$OUT/gen.png" --quiet
vqdiffusion generate "a large red circle in the top left" --device cuda --bf16 --num-images 4 --output "$OUT/gen_bf16.png" --quiet
vqdiffusion inpaint "a blue square in the bottom right" --image "$OUT/gen.png" --resize --box 32,32,64,64 --device cuda \
  --output "$OUT/inpaint.png" --quiet
vqdiffusion variation "a green triangle" --image "$OUT/gen.png" --resize --strength 0.6 --device cuda \
  --output "$OUT/variation.png" --quiet

echo "== the test suite's CUDA-only cases"
python -m pytest -q tests -k cuda -x || true

echo "== sampling speed against diffusers on the GPU (truncation 1 and 0.86, batch 1 and 4)"
python benchmarks/sampling_vs_diffusers.py --device cuda --repeats 5 | tee "$OUT/sampling_vs_diffusers.txt"

echo "== aMUSEd: ours against diffusers' AmusedPipeline at the amused-256 shape (fp32, then fp16)"
python benchmarks/amused_vs_diffusers.py --device cuda --batches 1 8 --repeats 3 | tee "$OUT/amused_vs_diffusers.txt"
python benchmarks/amused_vs_diffusers.py --device cuda --dtype float16 --batches 1 8 --repeats 3 \
  | tee -a "$OUT/amused_vs_diffusers.txt"

echo "== training throughput on the GPU"
python benchmarks/train_throughput.py --device cuda --precisions no,bf16 | tee "$OUT/train_throughput.txt"

if [ "${TRAIN:-0}" = 1 ]; then
  echo "== the built-in model's recipe on the GPU"
  /usr/bin/time -f "train_default.sh: %e s" bash scripts/train_default.sh --device cuda "$OUT/default"
fi
