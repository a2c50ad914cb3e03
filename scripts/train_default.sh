#!/usr/bin/env bash
# Rebuild the built-in model (vqdiffusion/assets/shapes) from nothing, on a CPU.
#
#   bash scripts/train_default.sh [WORK_DIR]        (default WORK_DIR: runs/default)
#
# Stages: the shapes data set -> the VQ tokenizer -> tokens -> the denoiser with a jointly trained text
# model -> export (float16 weights, the recommended sampling defaults) into the package.  Each stage
# checkpoints; run the script again after an interruption and it resumes where it stopped.  Measured on
# the project's 2-core CPU: see "The built-in model" in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/default}
ASSET=vqdiffusion/assets/shapes
mkdir -p "$WORK"

# --resume when a stage already has a checkpoint
resume() { compgen -G "$1/checkpoints/step_*.safetensors" > /dev/null && echo --resume || true; }
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "1/5 data set"
[ -f "$WORK/data.done" ] || { vqdiffusion make-shapes "$WORK/data" --n 20000 --seed 0 && touch "$WORK/data.done"; }

stamp "2/5 tokenizer"
[ -f "$WORK/vq.done" ] || {
  vqdiffusion train-vqvae "$WORK/data" --out "$WORK/vq" $(resume "$WORK/vq") \
    --image-size 64 --channels 32,64,128,128 --layers-per-block 1 --latent-channels 64 --embed-dim 32 \
    --codebook-size 1024 --norm-groups 16 --batch-size 16 --steps 3000 --lr 4e-4 --lr-warmup 100 \
    --lr-schedule cosine --mixed-precision bf16 --save-every 250 --sample-every 500 --log-every 50
  touch "$WORK/vq.done"
}

stamp "3/5 tokens"
[ -f "$WORK/tokens.done" ] || {
  vqdiffusion tokenize "$WORK/data" --vqvae "$WORK/vq/vqvae" --out "$WORK/tokens" --overwrite && touch "$WORK/tokens.done"
}

stamp "4/5 denoiser"
[ -f "$WORK/dm.done" ] || {
  vqdiffusion train "$WORK/tokens" --out "$WORK/dm" $(resume "$WORK/dm") \
    --preset small --layers 6 --dim 192 --heads 4 --cond-dim 192 --train-text-model --text-vocab words \
    --text-layers 2 --text-heads 4 --text-max-length 32 --batch-size 64 --lr 8e-4 --lr-warmup 200 \
    --lr-schedule cosine --min-lr 1e-5 --aux-weight 0.05 --ema-decay 0.998 --mixed-precision bf16 \
    --steps 3000 --save-every 200 --sample-every 1000 --log-every 50 --seed 0
  touch "$WORK/dm.done"
}

stamp "5/5 export"
rm -rf "$ASSET.tmp"
vqdiffusion export "$WORK/dm" "$ASSET.tmp" --half --steps 50 --guidance 3 --truncation 1 --sampler ancestral
rm -rf "$ASSET" && mv "$ASSET.tmp" "$ASSET"
du -sh "$ASSET"
stamp "done: vqdiffusion generate \"a large red circle in the top left\" now uses it"
