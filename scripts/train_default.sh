#!/usr/bin/env bash
# Rebuild the built-in model (vqdiffusion/assets/shapes) from nothing.
#
#   bash scripts/train_default.sh [--device DEVICE] [--tokenizer VQVAE_DIR] [WORK_DIR]
#                                    (defaults: --device cpu, a newly trained tokenizer, runs/default)
#
# Stages: the shapes data set -> the VQ tokenizer (K = 256, k-means init, distance restart, padding
# consistency: docs/tokenizer_experiments.md)
# -> tokens -> the denoiser with a jointly trained text model (docs/recipe_shapes.md) -> export (float16
# weights, the recommended sampling defaults) into the package.  Each stage checkpoints; run the script again
# after an interruption and it resumes where it stopped.  DEVICE is cpu (the recipe's machine: a 2-core CPU),
# cuda or cuda:N; the same flags train the same model on either (up to floating-point differences).
# --tokenizer reuses an exported VQ-VAE folder (e.g. the shipped vqdiffusion/assets/shapes/vqvae) instead
# of training stage 2 again; the denoiser is then trained on that tokenizer's tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cpu
WORK=runs/default
TOKENIZER=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs a value: cpu, cuda or cuda:N}; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --tokenizer) TOKENIZER=${2:?--tokenizer needs an exported VQ-VAE folder}; shift 2 ;;
    --tokenizer=*) TOKENIZER=${1#--tokenizer=}; shift ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (use --device DEVICE, --tokenizer VQVAE_DIR and an optional WORK_DIR)" >&2
        exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
ASSET=vqdiffusion/assets/shapes
if [ -n "$TOKENIZER" ] && [ ! -f "$TOKENIZER/config.json" ]; then
  echo "error: --tokenizer $TOKENIZER is not an exported VQ-VAE folder (no config.json); pass e.g. $ASSET/vqvae" >&2
  exit 2
fi
mkdir -p "$WORK"

# --resume when a stage already has a checkpoint
resume() { compgen -G "$1/checkpoints/step_*.safetensors" > /dev/null && echo --resume || true; }
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "1/5 data set"
[ -f "$WORK/data.done" ] || { vqdiffusion make-shapes "$WORK/data" --n 20000 --seed 0 && touch "$WORK/data.done"; }

stamp "2/5 tokenizer"
if [ -n "$TOKENIZER" ] && [ ! -f "$WORK/vq.done" ]; then
  mkdir -p "$WORK/vq" && rm -rf "$WORK/vq/vqvae" && cp -r "$TOKENIZER" "$WORK/vq/vqvae" && touch "$WORK/vq.done"
fi
[ -f "$WORK/vq.done" ] || {
  vqdiffusion train-vqvae "$WORK/data" --out "$WORK/vq" $(resume "$WORK/vq") --device "$DEVICE" \
    --image-size 64 --channels 32,64,128,128 --layers-per-block 1 --latent-channels 64 --embed-dim 32 \
    --codebook-size 256 --norm-groups 16 --batch-size 16 --steps 3000 --lr 4e-4 --lr-warmup 100 \
    --lr-schedule cosine --mixed-precision bf16 --codebook-init kmeans --code-restart distance \
    --pad-consistency 0.1 --save-every 250 --sample-every 500 --log-every 50
  touch "$WORK/vq.done"
}

stamp "3/5 tokens"
[ -f "$WORK/tokens.done" ] || {
  vqdiffusion tokenize "$WORK/data" --vqvae "$WORK/vq/vqvae" --out "$WORK/tokens" --overwrite --device "$DEVICE" \
    && touch "$WORK/tokens.done"
}

stamp "4/5 denoiser"
[ -f "$WORK/dm.done" ] || {
  vqdiffusion train "$WORK/tokens" --out "$WORK/dm" $(resume "$WORK/dm") --device "$DEVICE" \
    --preset small --layers 4 --dim 256 --heads 4 --cond-dim 256 --train-text-model --text-vocab words \
    --text-layers 2 --text-heads 4 --text-max-length 32 --batch-size 64 --lr 8e-4 --lr-warmup 200 \
    --lr-schedule cosine --min-lr 1e-5 --aux-weight 0.05 --ema-decay 0.998 --cond-drop-prob 0.1 \
    --mixed-precision bf16 --steps 8000 --save-every 500 --keep-checkpoints 17 --sample-every 1000 \
    --log-every 50 --seed 0
  touch "$WORK/dm.done"
}

stamp "5/5 export"
rm -rf "$ASSET.tmp"
vqdiffusion export "$WORK/dm" "$ASSET.tmp" --half --steps 50 --guidance 1 --truncation 0.7 --sampler ancestral
rm -rf "$ASSET" && mv "$ASSET.tmp" "$ASSET"
du -sh "$ASSET"
stamp "done: vqdiffusion generate \"a large red circle in the top left\" now uses it"
