#!/usr/bin/env bash
# One prepared run for a GPU machine with Python 3.12 and JAX but no TensorFlow and no network
# (the H200 of issue 19), in under 10 minutes, everything it needs travelling beside it:
#   1. installs the wheels in gpu_carry/wheels (keras and what we import that the machine lacks)
#   2. makes dynamic-masking records of every zhwiki shard (create_pretraining_data.py, 16
#      processes, rjieba, seq 128)
#   3. benchmarks/bench_gpu.py: BERT-base/large, seq 128/512, bf16, largest batch, MFU
#   4. pretrains L4/H512 (resources/bert_config_L4_H512.json) with
#      `KERAS_BACKEND=jax python3 run_pretraining.py ...` for about five minutes (the step count
#      from a timing of that model's step), bf16
#   5. leaves under $OUT (at most 8 files of 16 MiB come back): weights/, the newest checkpoint's
#      weights in safetensors files of at most 16 MiB and their index (modeling.
#      weights_by_google_name -> model_folder.write_safetensors; float16 when float32 would pass
#      the 64 MiB that come back: L4/H512 is 92 MiB in float32), and run_folder.tar.gz: the run
#      folder's small files (bert_config.json, vocab.txt, model_info.json, TensorBoard scalars),
#      the benchmark's JSON and every log.
#
# Usage:
#   benchmarks/gpu_run.sh --prepare   here, with network and ../shared/data: fills gpu_carry/
#                                     (git-ignored: ~6 MB of wheels, ~28 MB of zhwiki shards, vocab)
#   benchmarks/gpu_run.sh             there (the device tool: carry ["gpu_carry"], timeout 600);
#                                     results under $OUT
#   benchmarks/gpu_run.sh --smoke     anywhere with JAX, on the CPU: the same steps on tiny data and
#                                     a tiny model, in a few minutes (checks the script end to end)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CARRY=$REPO/gpu_carry
MODE=${1:-run}
PY=${PYTHON:-python3}
WHEELS="keras==3.15.1 namex==0.1.0 optree==0.20.0 google-crc32c==1.9.0 rjieba==0.2.2"

if [[ $MODE == --prepare ]]; then
  SHARED=${SHARED_DATA:-$REPO/../shared/data}
  mkdir -p "$CARRY/wheels" "$CARRY/data/corpus/zhwiki" "$CARRY/data/vocab"
  # shellcheck disable=SC2086
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" $WHEELS
  cp "$SHARED"/corpus/zhwiki/zhwiki_[0-9]*.txt.xz "$CARRY/data/corpus/zhwiki/"
  cp "$SHARED/vocab/vocab.txt" "$CARRY/data/vocab/"
  du -sh "$CARRY"/*
  echo "gpu_carry/ is ready: run 'bash benchmarks/gpu_run.sh' there with carry [\"gpu_carry\"]"
  exit 0
fi

START=$SECONDS
OUT=${OUT:-/tmp/gpu_run_out}
WORK=$(mktemp -d /tmp/gpu_run.XXXXXX)
mkdir -p "$OUT" "$WORK/logs"
LOGS=$WORK/logs
exec > >(tee -a "$LOGS/gpu_run.log") 2>&1
stamp() { echo "[gpu_run +$((SECONDS - START))s] $*"; }
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if [[ $MODE == --smoke ]]; then
  # Tiny everything, on the CPU, with this machine's packages (the wheels are for Python 3.12),
  # and TensorFlow blocked in every Python process, as on the GPU machine that has none.
  export JAX_PLATFORMS=cpu
  mkdir -p "$WORK/no_tf"
  echo 'import sys; sys.modules["tensorflow"] = None' > "$WORK/no_tf/sitecustomize.py"
  export PYTHONPATH=$WORK/no_tf${PYTHONPATH:+:$PYTHONPATH}
  CORPUS=$(ls "$REPO"/resources/corpus/*.txt | paste -sd,)
  VOCAB=$REPO/resources/vocab.txt
  CONFIG=$REPO/resources/bert_config_tiny.json
  WORKERS=2 BATCH=16 PRETRAIN_SECONDS=20 BENCH=(--smoke) BENCH_SECONDS=400 SHARD_BYTES=$((2 << 20))
  CALIBRATE=()  # a fixed 20 steps: the CPU's compile time would dominate a timing
elif [[ $MODE == run ]]; then
  DATA=$CARRY/data
  [[ -d $DATA ]] || DATA=$REPO/../shared/data  # a checkout with the shared data beside it
  if [[ ! -d $CARRY/wheels || ! -d $DATA/corpus/zhwiki ]]; then
    echo "gpu_run.sh: $CARRY is missing: run 'benchmarks/gpu_run.sh --prepare' on a machine with" \
         "network first, and carry gpu_carry" >&2
    exit 2
  fi
  stamp "installing $(ls "$CARRY"/wheels | wc -l) wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  CORPUS=$(ls "$DATA"/corpus/zhwiki/zhwiki_[0-9]*.txt.xz | paste -sd,)
  VOCAB=$DATA/vocab/vocab.txt
  CONFIG=$REPO/resources/bert_config_L4_H512.json
  WORKERS=16 BATCH=256 PRETRAIN_SECONDS=300 BENCH=(--time_budget=120) BENCH_SECONDS=200 SHARD_BYTES=$((16 << 20))
  CALIBRATE=(--models=small --seqs=128 --max_batch=256 --steps=20 --matmul_n=2048)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92  # JAX takes 75% of the card by default
else
  echo "usage: benchmarks/gpu_run.sh [--prepare | --smoke]" >&2
  exit 2
fi
$PY - <<'EOF'
import sys
sys.modules["tensorflow"] = None  # what follows must run without it; say so early if it cannot
import jax, keras, google_crc32c  # noqa: F401
import modeling, pretraining_jax, record_reader, jax_masking  # noqa: F401
print("python", sys.version.split()[0], "jax", jax.__version__, "keras", keras.__version__,
      "backend", keras.backend.backend(), "devices", jax.devices())
EOF

# 2. Records: every shard, unmasked (masks drawn on the device), 16 processes.
stamp "records from $(echo "$CORPUS" | tr , '\n' | wc -l) corpus file(s)"
mkdir -p "$WORK/records"
$PY create_pretraining_data.py --input_file="$CORPUS" --output_file="$WORK/records/train.tfrecord" \
  --vocab_file="$VOCAB" --dynamic_masking --segmenter=rjieba --num_workers=$WORKERS \
  --num_output_shards=$WORKERS --max_seq_length=128 --max_predictions_per_seq=20 \
  --progress_every_secs=30 2>&1 | tail -3

# 3. The benchmark (configurations not started within its budget are skipped, and said so).
stamp "bench_gpu.py"
timeout --signal=KILL "$BENCH_SECONDS" $PY benchmarks/bench_gpu.py "${BENCH[@]}" --json "$LOGS/bench_gpu.json" \
  || stamp "bench_gpu.py stopped (rc $?): the figures so far are in bench_gpu.json"

# 4. Pretraining for about PRETRAIN_SECONDS: steps from this model's own step time.
# The whole script ends by 575 s: the run gets what is left after the export (~25 s); its
# start-up, record check and compile (~45 s) come out of that before the timed steps.
STEPS=20
if (( ${#CALIBRATE[@]} )); then
  $PY benchmarks/bench_gpu.py "${CALIBRATE[@]}" --json "$LOGS/calibrate.json" > "$LOGS/calibrate.log" 2>&1 \
    || { tail -5 "$LOGS/calibrate.log"; exit 1; }
  RUN_LIMIT=$((575 - (SECONDS - START) - 25))
  SECS=$(( RUN_LIMIT - 45 < PRETRAIN_SECONDS ? RUN_LIMIT - 45 : PRETRAIN_SECONDS ))
  STEPS=$($PY -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][0]; \
print(max(20, int(0.85 * r['seq_per_s'] * $SECS / r['batch'])))" "$LOGS/calibrate.json")
else
  RUN_LIMIT=600 SECS=$PRETRAIN_SECONDS
fi
SAVE=$(( STEPS / 4 > 10 ? STEPS / 4 : 10 ))
RUN=$WORK/run
stamp "pretraining $(basename "$CONFIG"), batch $BATCH, $STEPS steps (~${SECS}s), saves every $SAVE"
timeout --signal=KILL "$RUN_LIMIT" \
  $PY run_pretraining.py --do_train --input_file="$WORK/records/train.tfrecord-*" \
    --bert_config_file="$CONFIG" --vocab_file="$VOCAB" --output_dir="$RUN" \
    --train_batch_size=$BATCH --max_seq_length=128 --max_predictions_per_seq=20 \
    --num_train_steps=$STEPS --num_warmup_steps=$(( STEPS / 10 )) --learning_rate=5e-4 \
    --save_checkpoints_steps=$SAVE --keep_checkpoint_max=2 --mixed_precision \
  > "$LOGS/pretraining.log" 2>&1 || stamp "run_pretraining.py stopped early (rc $?): the newest complete checkpoint is kept"
grep -v "^\s*$" "$LOGS/pretraining.log" | tail -4

# 5. Weights (<= SHARD_BYTES per file) and the run folder's small files -> $OUT.
stamp "exporting the weights"
$PY - "$RUN" "$OUT/weights" "$SHARD_BYTES" <<'EOF'
import json, os, sys
import numpy as np
import model_folder, modeling
run, out, shard_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = modeling.BertConfig.from_json_file(os.path.join(run, "bert_config.json"))
model = modeling.build_model(modeling.BertPretrainer(config), seq_len=8)
modeling.load_pretrained(model, run)  # the newest complete ckpt-N
_, source, _ = model_folder.find_checkpoint(run, flag=None)
weights = modeling.weights_by_google_name(model)
# What comes back is at most 64 MiB in 8 files: float16 when float32 would not fit.
dtype = np.float32 if sum(w.nbytes for w in weights.values()) <= 56 << 20 else np.float16
os.makedirs(out, exist_ok=True)
written = model_folder.write_safetensors(os.path.join(out, "model.safetensors"),
                                         {k: v.astype(dtype) for k, v in weights.items()}, shard_bytes)
print(f"{source} -> {len(written)} file(s) in {out}, {np.dtype(dtype).name}, largest "
      f"{max(os.path.getsize(p) for p in written)} bytes")
EOF
cp "$LOGS/calibrate.json" "$LOGS/bench_gpu.json" "$RUN" 2>/dev/null || true
stamp "done in $((SECONDS - START))s"
cp "$LOGS"/*.log "$RUN"/ 2>/dev/null || true
tar -czf "$OUT/run_folder.tar.gz" -C "$WORK" --exclude="ckpt-*" run
ls -la "$OUT" "$OUT/weights"
