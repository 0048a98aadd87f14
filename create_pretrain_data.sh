#!/usr/bin/env bash
# Converts numbered corpus files into pretraining TFRecords, several at a time.
#
#   bash create_pretrain_data.sh START END [-j N] [-- extra create_pretraining_data.py flags]
#
# Input file i is $INPUT_DIR/$(printf "$INPUT_PATTERN" i), output $OUTPUT_DIR/$(printf "$OUTPUT_PATTERN" i),
# log $LOG_DIR/<output name>.log (each run appends to it; the default $OUTPUT_DIR/.logs is hidden, so
# --input_file='$OUTPUT_DIR/*' still means the records). Files whose output is already complete
# (record + .meta.json written with the same settings) are skipped by create_pretraining_data.py itself,
# so re-running after a crash only redoes what is missing. Exit status: 0 if every file succeeded or
# was skipped, 1 if any failed, 2 for bad arguments.
#
# Settings (environment variables, defaults in brackets):
#   INPUT_DIR [./raw_text_data]          INPUT_PATTERN [news_zh_%d.txt]   (printf pattern, e.g. zhwiki_%02d.txt.xz)
#   OUTPUT_DIR [./tf_records]            OUTPUT_PATTERN [news_zh_%d.tfrecord]
#   LOG_DIR [$OUTPUT_DIR/.logs]          PARALLEL [number of CPUs]  (files converted at the same time; -j N)
#   VOCAB_FILE [resources/vocab.txt beside this script: the demo's 9,339-token vocab; give your model's,
#              e.g. Google's 21,128-token chinese_L-12_H-768_A-12/vocab.txt]   DO_LOWER_CASE [true]
#   MAX_SEQ_LENGTH [256]  MAX_PREDICTIONS_PER_SEQ [26]  MASKED_LM_PROB [0.10]  DUPE_FACTOR [5]
#   SHORT_SEQ_PROB [0.1]  RANDOM_SEED [12345]  SEGMENTER [jieba]  WORKERS_PER_FILE [1]
#   PYTHON [the project's .venv/bin/python beside this script if there is one, else python3]
#   DYNAMIC_MASKING [false]  (true: each instance once, unmasked; run_pretraining.py masks every epoch
#                             afresh, DUPE_FACTOR is ignored)
#
# Example:
#   INPUT_DIR=../shared/data/corpus/zhwiki INPUT_PATTERN=zhwiki_%02d.txt.xz OUTPUT_PATTERN=zhwiki_%02d.tfrecord \
#     VOCAB_FILE=vocab.txt bash create_pretrain_data.sh 0 9 -j 4 -- --max_seq_length=128 --max_predictions_per_seq=20
set -u -o pipefail

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INPUT_DIR="${INPUT_DIR:-./raw_text_data}"
INPUT_PATTERN="${INPUT_PATTERN:-news_zh_%d.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-./tf_records}"
OUTPUT_PATTERN="${OUTPUT_PATTERN:-news_zh_%d.tfrecord}"
LOG_DIR="${LOG_DIR:-$OUTPUT_DIR/.logs}"
PARALLEL="${PARALLEL:-$(nproc 2>/dev/null || echo 2)}"
DEMO_VOCAB="$SCRIPT_DIR/resources/vocab.txt"
VOCAB_FILE="${VOCAB_FILE:-$DEMO_VOCAB}"
# The project's interpreter: a plain python3 outside the venv lacks absl, TensorFlow, jieba.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$SCRIPT_DIR/.venv/bin/python" ]]; then PYTHON="$SCRIPT_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi

positional=()
extra=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -j) PARALLEL="${2:?-j needs a number}"; shift 2 ;;
    -j*) PARALLEL="${1#-j}"; shift ;;
    --) shift; extra=("$@"); break ;;
    *) positional+=("$1"); shift ;;
  esac
done
if ((${#positional[@]} != 2)) || ! [[ "${positional[0]}" =~ ^[0-9]+$ && "${positional[1]}" =~ ^[0-9]+$ ]]; then
  echo "error: expected START END (numbers), got: ${positional[*]:-nothing}; see --help" >&2
  exit 2
fi
START=$((10#${positional[0]}))
END=$((10#${positional[1]}))
if ((START > END)); then
  echo "error: START ($START) is after END ($END): nothing to convert; give START <= END" >&2
  exit 2
fi
if ! [[ "$PARALLEL" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: PARALLEL/-j must be a positive number, got '$PARALLEL'" >&2
  exit 2
fi
if ! "$PYTHON" -c "import absl" 2>/dev/null; then
  echo "error: $PYTHON cannot import absl: run 'make install' in $SCRIPT_DIR (it creates .venv, which this" \
    "script then uses), or set PYTHON=<the python of an environment with this project installed>" >&2
  exit 2
fi
for arg in "${extra[@]}"; do  # a --vocab_file after -- wins (the last flag does)
  [[ "$arg" == --vocab_file=* ]] && VOCAB_FILE="${arg#--vocab_file=}"
done
if [[ "$VOCAB_FILE" != gs://* && ! -f "$VOCAB_FILE" ]]; then
  echo "error: vocab file not found: $VOCAB_FILE (set VOCAB_FILE=...)" >&2
  exit 2
fi
mkdir -p "$OUTPUT_DIR" "$LOG_DIR" || { echo "error: cannot create $OUTPUT_DIR or $LOG_DIR" >&2; exit 2; }
STATUS_DIR="$(mktemp -d "$LOG_DIR/.status.XXXXXX")"
trap 'rm -rf "$STATUS_DIR"' EXIT

convert() {  # convert INDEX: runs one file, records its exit status, prints one line
  local i=$1 input output log rc
  input="$INPUT_DIR/$(printf "$INPUT_PATTERN" "$i")"
  output="$OUTPUT_DIR/$(printf "$OUTPUT_PATTERN" "$i")"
  log="$LOG_DIR/$(basename "$output").log"
  echo "=== $(date '+%F %T') file $i: $input -> $output" >>"$log"
  "$PYTHON" "$SCRIPT_DIR/create_pretraining_data.py" \
    --input_file="$input" --output_file="$output" --vocab_file="$VOCAB_FILE" \
    --do_lower_case="${DO_LOWER_CASE:-true}" --do_whole_word_mask=true \
    --max_seq_length="${MAX_SEQ_LENGTH:-256}" --max_predictions_per_seq="${MAX_PREDICTIONS_PER_SEQ:-26}" \
    --masked_lm_prob="${MASKED_LM_PROB:-0.10}" --dupe_factor="${DUPE_FACTOR:-5}" \
    --short_seq_prob="${SHORT_SEQ_PROB:-0.1}" --random_seed="${RANDOM_SEED:-12345}" \
    --segmenter="${SEGMENTER:-jieba}" --num_workers="${WORKERS_PER_FILE:-1}" \
    --dynamic_masking="${DYNAMIC_MASKING:-false}" \
    "${extra[@]}" >>"$log" 2>&1
  rc=$?
  echo "$rc" >"$STATUS_DIR/$i"
  if ((rc != 0)); then
    echo "[$i] FAILED (exit $rc): $(grep -v '^\s*$' "$log" | tail -n 1)  (log: $log)"
  elif tail -n 1 "$log" | grep -q "already complete"; then
    echo "[$i] skipped, already complete: $output"
  else
    echo "[$i] done: $(grep -o 'wrote [0-9]* instances' "$log" | tail -n 1) -> $output"
  fi
}

echo "converting files $START..$END, $PARALLEL at a time with $PYTHON; logs in $LOG_DIR"
if [[ "$VOCAB_FILE" -ef "$DEMO_VOCAB" ]]; then
  echo "vocab: $VOCAB_FILE, the demo's own $(wc -l <"$VOCAB_FILE")-token vocab; for a model with another" \
    "vocab (Google's Chinese BERT: 21128 tokens) set VOCAB_FILE=its vocab.txt"
else
  echo "vocab: $VOCAB_FILE$([[ -f "$VOCAB_FILE" ]] && echo " ($(wc -l <"$VOCAB_FILE") tokens)")"
fi
for ((i = START; i <= END; i++)); do
  while (($(jobs -rp | wc -l) >= PARALLEL)); do
    wait -n 2>/dev/null || sleep 0.2
  done
  convert "$i" &
done
wait

failed=()
for ((i = START; i <= END; i++)); do
  [[ "$(cat "$STATUS_DIR/$i" 2>/dev/null)" == "0" ]] || failed+=("$i")
done
if ((${#failed[@]})); then
  echo "${#failed[@]} of $((END - START + 1)) files failed: ${failed[*]}" >&2
  exit 1
fi
echo "all $((END - START + 1)) files complete"
