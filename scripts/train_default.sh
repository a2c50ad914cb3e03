#!/usr/bin/env bash
# Build the built-in model (vqdiffusion/assets/shapes) in session-sized stages, each at most ~90 minutes on
# the project's 2-core CPU machine (docs/built-in-model.md):
#
#   bash scripts/train_default.sh [--device DEVICE] [--stage N|next|all|gpu] [--tokenizer VQVAE_DIR]
#                                 [--time-limit SECONDS] [--init-from MODEL] [WORK_DIR]
#       defaults: --device cpu, --stage all, a newly trained tokenizer, --time-limit 300, WORK_DIR runs/default
#
#   stage 1  data set (make-shapes) -> FSQ tokenizer (levels 8,5,5,5: K = 1000, padding consistency;
#            docs/tokenizer_experiments.md, round 3) -> tokens -> a fresh 4 x 256 denoiser with a jointly
#            trained text model (DENOISER_STEPS_1 steps) -> export into the package
#   stage k  (k >= 2) the data and tokens again if WORK_DIR lacks them (same seed: the same set; tokens of
#            the model's own tokenizer), then CONTINUE_STEPS steps of the denoiser started with
#            `vqdiffusion train --init-from` the model of stage k - 1 -> export into the package
#
# --stage all runs stage 1 and then every continuation of STAGE_OBJECTIVES, each from the previous export in
# WORK_DIR: that rebuilds the model from nothing.  --stage N (N >= 2) continues the model the package holds
# now (builtin:shapes, committed after stage N - 1); --stage next picks N from that model's history.json.
# A session runs one stage, evaluates it (vqdiffusion eval --model WORK_DIR/stageN/model) and ships it only if
# it beats the shipped model; the export goes to WORK_DIR/stageN/model and, with --ship, into the package.
# --stage gpu (one GPU, e.g. the device tool's 8-minute call: --device cuda) trains a denoiser from scratch on
# a larger data set (GPU_SHARDS x GPU_SHARD_N images, made in parallel) tokenized with --tokenizer (default:
# stage 1's tokenizer, trained first), batch GPU_BATCH, for --time-limit seconds: a 150-step probe measures
# samples/s and the cosine schedule is sized to end at the limit.  Export into WORK_DIR/stagegpu/export (and
# the package with --ship).  The shipped model (v3) is this stage, run on one H100 with --time-limit 180 and
# --tokenizer the FSQ tokenizer of stage 1's recipe (docs/built-in-model.md).  With --init-from MODEL (e.g.
# vqdiffusion/assets/shapes) the GPU stage continues that model instead (its tokenizer, fresh images from
# make-shapes seeds 8 .., lr GPU_CONT_LR): the next GPU session's stage.
# Each stage checkpoints; run the same command again after an interruption and it resumes.  DEVICE is cpu,
# cuda or cuda:N (the same flags train the same model on either, up to floating-point differences).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cpu
WORK=runs/default
TOKENIZER=
STAGE=all
SHIP=0
TIME_LIMIT=300
INIT_FROM=
usage="use --device DEVICE, --stage N|next|all|gpu, --tokenizer VQVAE_DIR, --time-limit SECONDS, --ship and an optional WORK_DIR"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs a value: cpu, cuda or cuda:N}; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --stage) STAGE=${2:?--stage needs a value: a number, next or all}; shift 2 ;;
    --stage=*) STAGE=${1#--stage=}; shift ;;
    --tokenizer) TOKENIZER=${2:?--tokenizer needs an exported VQ-VAE folder}; shift 2 ;;
    --tokenizer=*) TOKENIZER=${1#--tokenizer=}; shift ;;
    --time-limit) TIME_LIMIT=${2:?--time-limit needs a number of seconds}; shift 2 ;;
    --time-limit=*) TIME_LIMIT=${1#--time-limit=}; shift ;;
    --init-from) INIT_FROM=${2:?--init-from needs a model folder}; shift 2 ;;
    --init-from=*) INIT_FROM=${1#--init-from=}; shift ;;
    --ship) SHIP=1; shift ;;
    -h|--help) sed -n 2,32p "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 ($usage)" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
ASSET=vqdiffusion/assets/shapes
if [ -n "$TOKENIZER" ] && [ ! -f "$TOKENIZER/config.json" ]; then
  echo "error: --tokenizer $TOKENIZER is not an exported VQ-VAE folder (no config.json); pass e.g. $ASSET/vqvae" >&2
  exit 2
fi
if [ "$STAGE" = next ]; then
  STAGE=$(python -c "from vqdiffusion.formats.ours import read_history; print(len(read_history('$ASSET')) + 1)")
fi
case "$STAGE" in
  all|gpu|[1-9]|[1-9][0-9]) ;;
  *) echo "error: --stage $STAGE is not a stage number, next, all or gpu" >&2; exit 2 ;;
esac
if [ -n "$INIT_FROM" ] && [ "$STAGE" != gpu ]; then
  echo "error: --init-from is for --stage gpu (stages N >= 2 continue the package's model by themselves)" >&2
  exit 2
fi
case "$TIME_LIMIT" in
  ''|*[!0-9]*|0) echo "error: --time-limit $TIME_LIMIT is not a whole number of seconds > 0" >&2; exit 2 ;;
esac
mkdir -p "$WORK"

# The denoiser: architecture and optimiser flags shared by every stage (docs/recipe_shapes.md).
DENOISER_FLAGS=(--preset small --layers 4 --dim 256 --heads 4 --cond-dim 256 --train-text-model --text-vocab words
  --text-layers 2 --text-heads 4 --text-max-length 32 --batch-size 64 --lr-schedule cosine --min-lr 1e-5
  --aux-weight 0.05 --ema-decay 0.998 --cond-drop-prob 0.1 --mixed-precision bf16 --save-every 250
  --keep-checkpoints 3 --sample-every 1000 --log-every 50)
DENOISER_STEPS_1=4000     # stage 1: 256k samples from scratch (lr 8e-4, warm-up 200)
CONTINUE_STEPS=3000       # stage k >= 2: 192k samples (lr 3e-4, warm-up 100)
# The objective of each continuation stage 2, 3, ... (the last one repeats): docs/built-in-model.md.
STAGE_OBJECTIVES=(vlb vlb vlb)
# Stage 1's tokenizer: its steps and the encoder's padding.  The shipped (fourth) model's FSQ tokenizer used
# zeros; replicate padding gives the blank image 1 code instead of 14 (docs/tokenizer_experiments.md, round 4).
VQ_STEPS=${VQ_STEPS:-3000}
TOKENIZER_PADDING=${TOKENIZER_PADDING:-zeros}
# --stage gpu: data set size, batch and optimiser of a from-scratch GPU stage (overridable for a dry run).
GPU_SHARDS=${GPU_SHARDS:-8}        # make-shapes processes (seeds 0 .. GPU_SHARDS - 1; shard 0 begins with stage 1's set)
GPU_SHARD_N=${GPU_SHARD_N:-25000}  # images per shard: 200k in all
GPU_BATCH=${GPU_BATCH:-512}
GPU_LR=${GPU_LR:-1e-3}
GPU_WARMUP=${GPU_WARMUP:-500}
GPU_WORKERS=${GPU_WORKERS:-4}      # data loader processes of the denoiser run
GPU_CONT_LR=${GPU_CONT_LR:-5e-4}   # --init-from: a continuation's peak learning rate (warm-up GPU_WARMUP)
EXPORT_FLAGS=(--half --steps 50 --guidance 1 --truncation 0.7 --sampler ancestral)

resume() { compgen -G "$1/checkpoints/step_*.safetensors" > /dev/null && echo --resume || true; }
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stage1_data() {  # stage 1's data set (WORK/data)
  [ -f "$WORK/data.done" ] || { vqdiffusion make-shapes "$WORK/data" --n 20000 --seed 0 && touch "$WORK/data.done"; }
}

stage1_tokenizer() {  # stage 1's data set and tokenizer (WORK/vq/vqvae)
  stage1_data
  [ -f "$WORK/vq.done" ] || {
    vqdiffusion train-vqvae "$WORK/data" --out "$WORK/vq" $(resume "$WORK/vq") --device "$DEVICE" \
      --image-size 64 --channels 32,64,128,128 --layers-per-block 1 --latent-channels 64 --norm-groups 16 \
      --batch-size 16 --steps "$VQ_STEPS" --lr 4e-4 --lr-warmup 100 --lr-schedule cosine --mixed-precision bf16 \
      --quantizer fsq --fsq-levels 8,5,5,5 --pad-consistency 0.1 --encoder-padding "$TOKENIZER_PADDING" \
      --save-every 250 --sample-every 1000 --log-every 100 --seed 0
    touch "$WORK/vq.done"
  }
}

data_and_tokens() {  # $1: the VQ-VAE folder to tokenize with ("" = train stage 1's tokenizer)
  stage1_data
  local vq=$1
  if [ -z "$vq" ]; then
    stage1_tokenizer
    vq=$WORK/vq/vqvae
  fi
  [ -f "$WORK/tokens.done" ] && [ "$(cat "$WORK/tokens.done")" = "$vq" ] || {
    vqdiffusion tokenize "$WORK/data" --vqvae "$vq" --out "$WORK/tokens" --overwrite --device "$DEVICE" \
      && echo "$vq" > "$WORK/tokens.done"
  }
}

export_stage() {  # $1: stage number
  local out=$WORK/stage$1
  [ -d "$out/model" ] || { echo "error: $out/model missing: stage $1 did not finish" >&2; exit 1; }
  rm -rf "$out/export"
  vqdiffusion export "$out" "$out/export" "${EXPORT_FLAGS[@]}"
  if [ "$SHIP" = 1 ]; then
    rm -rf "$ASSET.tmp" && cp -r "$out/export" "$ASSET.tmp" && rm -rf "$ASSET" && mv "$ASSET.tmp" "$ASSET"
    du -sh "$ASSET"
  fi
}

run_stage_1() {
  stamp "stage 1: data, tokenizer, tokens"
  data_and_tokens "$TOKENIZER"
  stamp "stage 1: denoiser from scratch"
  vqdiffusion train "$WORK/tokens" --out "$WORK/stage1" $(resume "$WORK/stage1") --device "$DEVICE" \
    "${DENOISER_FLAGS[@]}" --lr 8e-4 --lr-warmup 200 --steps "$DENOISER_STEPS_1" --seed 0
  export_stage 1
}

run_stage_k() {  # $1: stage number, $2: the model it continues
  local k=$1 from=$2 i=$(( $1 - 2 ))
  [ "$i" -lt "${#STAGE_OBJECTIVES[@]}" ] || i=$(( ${#STAGE_OBJECTIVES[@]} - 1 ))
  stamp "stage $k: tokens of the model's tokenizer"
  data_and_tokens "$from/vqvae"
  stamp "stage $k: denoiser from $from (objective ${STAGE_OBJECTIVES[$i]})"
  vqdiffusion train "$WORK/tokens" --out "$WORK/stage$k" $(resume "$WORK/stage$k") --device "$DEVICE" \
    --init-from "$from" --objective "${STAGE_OBJECTIVES[$i]}" "${DENOISER_FLAGS[@]}" --lr 3e-4 --lr-warmup 100 \
    --steps "$CONTINUE_STEPS" --seed "$k"
  export_stage "$k"
}

SEED_BASE=0  # make-shapes seeds of the GPU data set: SEED_BASE .. SEED_BASE + GPU_SHARDS - 1
gpu_data() {  # GPU_SHARDS make-shapes processes in parallel into WORK/data_gpu/shardI (a recursive image folder)
  [ -f "$WORK/data_gpu.done" ] && return
  local pids=() i
  for i in $(seq 0 $(( GPU_SHARDS - 1 ))); do
    vqdiffusion make-shapes "$WORK/data_gpu/shard$i" --n "$GPU_SHARD_N" --seed "$(( SEED_BASE + i ))" --overwrite \
      > /dev/null 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i"; done
  touch "$WORK/data_gpu.done"
}

run_stage_gpu() {
  local vq=$TOKENIZER out=$WORK/stagegpu lr=$GPU_LR init=() what="from scratch" seed=0
  if [ -n "$INIT_FROM" ]; then
    [ -f "$INIT_FROM/vqdiffusion.json" ] || { echo "error: --init-from $INIT_FROM is not a model folder" >&2; exit 2; }
    vq=${vq:-$INIT_FROM/vqvae} lr=$GPU_CONT_LR init=(--init-from "$INIT_FROM") what="from $INIT_FROM" seed=1
    SEED_BASE=8
  fi
  if [ -z "$vq" ]; then
    stamp "stage gpu: stage 1's tokenizer"
    stage1_tokenizer
    vq=$WORK/vq/vqvae
  fi
  stamp "stage gpu: $(( GPU_SHARDS * GPU_SHARD_N )) images"
  gpu_data
  stamp "stage gpu: tokens of $vq"
  [ -f "$WORK/tokens_gpu.done" ] && [ "$(cat "$WORK/tokens_gpu.done")" = "$vq" ] || {
    vqdiffusion tokenize "$WORK/data_gpu" --vqvae "$vq" --out "$WORK/tokens_gpu" --overwrite --device "$DEVICE" \
      --batch-size 512 --num-workers "$GPU_WORKERS" --quiet && echo "$vq" > "$WORK/tokens_gpu.done"
  }
  local flags=("${DENOISER_FLAGS[@]}" --batch-size "$GPU_BATCH" --ema-decay 0.999 --log-every 50
    --sample-every 1000000 --num-workers "$GPU_WORKERS" --device "$DEVICE" --quiet)
  local steps
  if [ -d "$out/checkpoints" ]; then  # resuming: keep the schedule the run started with
    steps=$(python -c "import json; print(json.load(open('$out/train_config.json'))['steps'])")
  else
    stamp "stage gpu: a 150-step probe of samples/s"
    rm -rf "$WORK/gpu_probe"
    vqdiffusion train "$WORK/tokens_gpu" --out "$WORK/gpu_probe" "${flags[@]}" "${init[@]}" --lr "$lr" \
      --lr-warmup "$GPU_WARMUP" --steps 150 --save-every 1000000 > /dev/null
    steps=$(python -c "import csv; rows = list(csv.DictReader(open('$WORK/gpu_probe/metrics.csv'))); \
print(max(200, int(float(rows[-1]['samples_per_s']) * $TIME_LIMIT / $GPU_BATCH)))")
  fi
  stamp "stage gpu: denoiser $what, $steps steps of $GPU_BATCH (time limit $TIME_LIMIT s)"
  vqdiffusion train "$WORK/tokens_gpu" --out "$out" $(resume "$out") "${flags[@]}" "${init[@]}" --lr "$lr" \
    --lr-warmup "$GPU_WARMUP" --steps "$steps" --save-every 1000 --time-limit "$TIME_LIMIT" --seed "$seed"
  export_stage gpu
}

if [ "$STAGE" = gpu ]; then
  run_stage_gpu
elif [ "$STAGE" = all ]; then
  run_stage_1
  for k in $(seq 2 $(( ${#STAGE_OBJECTIVES[@]} + 1 ))); do
    run_stage_k "$k" "$WORK/stage$(( k - 1 ))/export"
  done
elif [ "$STAGE" = 1 ]; then
  run_stage_1
else
  # continue the committed model; copied so that shipping this stage cannot change the model being continued
  rm -rf "$WORK/from$STAGE" && cp -r "$ASSET" "$WORK/from$STAGE"
  run_stage_k "$STAGE" "$WORK/from$STAGE"
fi
stamp "done: evaluate with vqdiffusion eval --model $WORK/stage${STAGE/all/$(( ${#STAGE_OBJECTIVES[@]} + 1 ))}/export"
