#!/usr/bin/env bash
# The one prepared call for a session lent a GPU (the device tool, 15 minutes of device time in all): a GPU
# stage of the built-in model, CUDA checks while the data is made, the stage's evaluation, then GPU timings
# against diffusers.  Every phase has its own time budget and failing phases do not stop the others; what it
# measures is printed and written under $OUT (at most 8 files: the tool's limit).  Two plans:
#
#   PLAN=continue (default): one GPU stage that continues the package's model (train_default.sh --stage gpu
#       --init-from vqdiffusion/assets/shapes, TIME_LIMIT 270 s), evaluated on two prompt seeds; then the
#       truncation-alone table (the sort path that CUDA takes since 2026-12-06, not yet timed on a GPU).
#   PLAN=scratch: the shipped model's recipe from nothing, with round 4's tokenizer (FSQ, replicate padding:
#       one blank-image code): the tokenizer trained in the call, then one from-scratch stage (TIME_LIMIT 240 s).
#   PLAN=compare: the call of 2026-12-06 that made the fourth model: the same from-scratch stage on two
#       tokenizers at once (the package's and TOKENIZER_B, carried in .carry), then the ITHQ-36 table.
#
#   bash benchmarks/gpu.sh                       # on the device machine (about 9.5 minutes: CALL_LIMIT=570 s)
#   DRY=1 bash benchmarks/gpu.sh                 # the same phases on this CPU, tiny sizes (a rehearsal)
#
# On the device machine: diffusers is not installed there, so its wheel travels in .whl (see
# docs/results.md, "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vqdiffusion_gpu}
mkdir -p "$OUT"
START=$SECONDS
LOG=$OUT/log.txt
stamp() { echo "[$(( SECONDS - START )) s] $*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
vqdiffusion() { python -m vqdiffusion.cli "$@"; }
export -f vqdiffusion

PLAN=${PLAN:-continue}
case "$PLAN" in
  continue) RUNS=(c) DEFAULT_LIMIT=270 BENCH=(--truncation-only --repeats 5) ;;
  scratch) RUNS=(c) DEFAULT_LIMIT=240 BENCH=(--truncation-only --repeats 5) ;;
  compare) RUNS=(a b) DEFAULT_LIMIT=180
    BENCH=(--configs ithq --dtypes float32,float16 --batches 1 4 --truncations 1 0.86 --repeats 2) ;;
  *) echo "error: PLAN=$PLAN is not continue or compare" >&2; exit 2 ;;
esac
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu TIME_LIMIT=20 BENCH_LIMIT=60
  export GPU_SHARDS=2 GPU_SHARD_N=300 GPU_BATCH=16 GPU_WORKERS=1 OMP_NUM_THREADS=1
  [ "$PLAN" = compare ] && BENCH=(--configs tiny --batches 1 --truncations 1 0.86 --repeats 1)
  [ "$PLAN" != compare ] && BENCH=(--truncation-only --repeats 1)
  export VQ_STEPS=20
else
  DEVICE=cuda TIME_LIMIT=${TIME_LIMIT:-$DEFAULT_LIMIT} BENCH_LIMIT=${BENCH_LIMIT:-$(( ${CALL_LIMIT:-570} ))}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
fi
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available(), 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
TOKENIZER_A=vqdiffusion/assets/shapes/vqvae              # the shipped VQ, K = 256
TOKENIZER_B=${TOKENIZER_B:-.carry/fsq_vqvae}              # FSQ 8,5,5,5 (docs/tokenizer_experiments.md, round 3)
W=/tmp/gpu_stage
rm -rf "$W" && mkdir -p "$W/a" "$W/b" "$W/c"

if [ "$PLAN" = continue ]; then
  stamp "1. GPU stage continuing the package's model (time limit $TIME_LIMIT s)"
  bash scripts/train_default.sh --stage gpu --device "$DEVICE" --init-from vqdiffusion/assets/shapes \
    --time-limit "$TIME_LIMIT" "$W/c" > "$W/c.log" 2>&1 &
  PIDS=($!)
elif [ "$PLAN" = scratch ]; then
  stamp "1. tokenizer (FSQ, replicate padding) and a from-scratch GPU stage (time limit $TIME_LIMIT s)"
  TOKENIZER_PADDING=replicate bash scripts/train_default.sh --stage gpu --device "$DEVICE" \
    --time-limit "$TIME_LIMIT" "$W/c" > "$W/c.log" 2>&1 &
  PIDS=($!)
else
  stamp "1. GPU stage on both tokenizers (time limit $TIME_LIMIT s each, the two runs share the GPU)"
  bash scripts/train_default.sh --stage gpu --device "$DEVICE" --tokenizer "$TOKENIZER_A" \
    --time-limit "$TIME_LIMIT" "$W/a" > "$W/a.log" 2>&1 &
  PID_A=$!
  (
    while [ ! -f "$W/a/data_gpu.done" ] && kill -0 "$PID_A" 2> /dev/null; do sleep 1; done
    ln -s "$W/a/data_gpu" "$W/b/data_gpu" && touch "$W/b/data_gpu.done"
    bash scripts/train_default.sh --stage gpu --device "$DEVICE" --tokenizer "$TOKENIZER_B" \
      --time-limit "$TIME_LIMIT" "$W/b"
  ) > "$W/b.log" 2>&1 &
  PIDS=("$PID_A" $!)
fi

stamp "2. CUDA checks (while the data is made)"
{
  vqdiffusion generate "a large red circle in the top left" --device "$DEVICE" --num-images 4 \
    --output "$W/gen.png" --quiet \
  && vqdiffusion generate "a large red circle in the top left" --device "$DEVICE" --bf16 --num-images 4 \
    --output "$W/gen_bf16.png" --quiet \
  && vqdiffusion inpaint "a blue square in the bottom right" --image "$W/gen.png" --resize --box 32,32,64,64 \
    --device "$DEVICE" --output "$W/inpaint.png" --quiet \
  && echo "generate / inpaint on $DEVICE: ok"
  timeout 120 python -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/test_half_precision.py \
    tests/test_bad_inputs.py -k "cuda or half or overflow or upcast" 2>&1 | tail -4
} 2>&1 | tee -a "$LOG"

for pid in "${PIDS[@]}"; do wait "$pid"; echo "stage process $pid exit $?" | tee -a "$LOG"; done
for r in "${RUNS[@]}"; do
  stamp "run $r:"; tail -4 "$W/$r.log" | tee -a "$LOG"
  tail -2 "$W/$r/stagegpu/metrics.csv" 2>/dev/null | tee -a "$LOG"
done

stamp "3. evaluation of the exports (vqdiffusion eval --n 256, the shipped sampling defaults; continue, scratch: seeds 0, 1)"
for r in "${RUNS[@]}"; do
  [ -d "$W/$r/stagegpu/export" ] || continue
  timeout 150 python -m vqdiffusion.cli eval --model "$W/$r/stagegpu/export" --n "${EVAL_N:-256}" --batch-size 256 \
    --device "$DEVICE" --out "$W/$r/eval" --quiet > "$W/$r/eval.txt" 2>&1 &
  [ "$PLAN" != compare ] && timeout 150 python -m vqdiffusion.cli eval --model "$W/$r/stagegpu/export" \
    --n "${EVAL_N:-256}" --batch-size 256 --seed 1 --device "$DEVICE" --out "$W/$r/eval_seed1" --quiet \
    > "$W/$r/eval_seed1.txt" 2>&1 &
done
wait
for r in "${RUNS[@]}"; do
  for e in eval eval_seed1; do
    [ -f "$W/$r/$e.txt" ] && { stamp "$e $r:"; tail -12 "$W/$r/$e.txt" | tee -a "$LOG"; }
  done
  # two files per run (the tool returns files of at most 16 MiB) and, for a new tokenizer, a third
  [ "$PLAN" = scratch ] && [ -d "$W/$r/stagegpu/export/vqvae" ] \
    && tar -cf "$OUT/model_${r}_vqvae.tar" -C "$W/$r" stagegpu/export/vqvae
  [ -d "$W/$r/stagegpu/export" ] && tar -cf "$OUT/model_${r}_denoiser.tar" -C "$W/$r" stagegpu/export/denoiser \
    && tar -cf "$OUT/model_${r}_rest.tar" -C "$W/$r" --exclude=stagegpu/export/denoiser \
      --exclude=stagegpu/export/vqvae stagegpu/export stagegpu/metrics.csv stagegpu/train_config.json \
      $(cd "$W/$r" && ls -d eval eval.txt eval_seed1 eval_seed1.txt 2>/dev/null) \
    && cp "$W/$r.log" "$OUT/run_$r.log"
done

LEFT=$(( BENCH_LIMIT - (SECONDS - START) )); [ "$LEFT" -ge 60 ] || LEFT=60  # the rest of the call
stamp "4. sampling speed against diffusers (${BENCH[*]}; $LEFT s at most)"
timeout "$LEFT" python benchmarks/sampling_vs_diffusers.py --device "$DEVICE" "${BENCH[@]}" 2>&1 \
  | tee "$OUT/sampling_vs_diffusers.txt"
stamp "done"
