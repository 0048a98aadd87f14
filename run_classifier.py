"""Fine-tunes BERT/RoBERTa on sentence(-pair) classification: LCQMC, XNLI/OCNLI, BQ, ChnSentiCorp,
TNEWS, THUCNews titles, or any TSV/CSV/JSON-lines file whose header names the text and label columns.

    python run_classifier.py --task_name=lcqmc --data_dir=../shared/data/lcqmc \
      --train_file=train.tsv --dev_file=dev.tsv --vocab_file=vocab.txt \
      --bert_config_file=bert_config.json --init_checkpoint=chinese_L-12_H-768_A-12/bert_model.ckpt \
      --do_train --do_eval --max_seq_length=128 --train_batch_size=32 --learning_rate=2e-5 \
      --num_train_epochs=3 --output_dir=/tmp/lcqmc

Train, dev and test are separate files and dev never falls back to test. After each epoch the model
is evaluated on dev and the best one is kept in output_dir/best/. --do_predict writes
output_dir/test_predictions.tsv (`id  label  prob_<label>...`, one row per test row, in order). One
metrics JSON line (accuracy, macro-F1) is printed.
"""

import csv
import dataclasses
import json
import os
from typing import Optional

import numpy as np
from absl import flags, logging

import finetune_utils
import modeling
import tokenization
import train_utils


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where the text and label are in a task's files. Columns are header names (header=True), JSON
    keys (.json/.jsonl files) or 0-based column numbers (header=False)."""
    text_a: object
    text_b: object
    label: object
    header: bool
    labels: Optional[tuple] = None  # None: the sorted labels of the train file
    skip_labels: tuple = ()  # rows with these labels are dropped (and counted), e.g. OCNLI's "-"


NLI_LABELS = ("contradiction", "entailment", "neutral")
TASKS = {
    "lcqmc": TaskSpec(0, 1, 2, header=False, labels=("0", "1")),
    "bq": TaskSpec(0, 1, 2, header=False, labels=("0", "1")),
    "xnli": TaskSpec("text_a", "text_b", "label", header=True, labels=NLI_LABELS),
    "ocnli": TaskSpec("sentence1", "sentence2", "label", header=True, labels=NLI_LABELS,
                      skip_labels=("-",)),
    "afqmc": TaskSpec("sentence1", "sentence2", "label", header=True, labels=("0", "1")),
    "chnsenticorp": TaskSpec("text_a", None, "label", header=True, labels=("0", "1")),
    "tnews": TaskSpec("sentence", None, "label", header=True),
    "iflytek": TaskSpec("sentence", None, "label", header=True),
    "thucnews": TaskSpec(0, None, 1, header=False),
    "generic": TaskSpec("text_a", None, "label", header=True),  # pairs: --text_b_column=text_b
}


@dataclasses.dataclass
class Example:
    guid: str  # the row's "id" field if it has one, else its 0-based row number
    text_a: str
    text_b: Optional[str]
    label: Optional[str]  # None when the (test) file has no label


@dataclasses.dataclass
class ClassifierOptions(finetune_utils.FinetuneOptions):
    task_name: str = "generic"
    text_a_column: str = ""
    text_b_column: str = ""
    label_column: str = ""
    has_header: str = ""  # "", "true" or "false"; "" = the task's default
    labels: str = ""  # comma-separated label list; "" = the task's / the train file's


def task_spec(opts):
    """The TaskSpec for --task_name with the column flags applied."""
    if opts.task_name not in TASKS:
        raise ValueError(f"--task_name={opts.task_name!r} is not one of {', '.join(TASKS)}")
    spec = TASKS[opts.task_name]
    header = spec.header if not opts.has_header else opts.has_header.lower() in ("true", "1", "yes")

    def column(flag, default):
        value = getattr(opts, flag)
        if value == "":
            return default
        if value.lower() == "none":
            return None
        if header:
            return value
        if not value.isdigit():
            raise ValueError(f"--{flag}={value!r}: files without a header take 0-based column numbers")
        return int(value)

    labels = tuple(opts.labels.split(",")) if opts.labels else spec.labels
    return dataclasses.replace(
        spec, header=header, labels=labels, text_a=column("text_a_column", spec.text_a),
        text_b=column("text_b_column", spec.text_b), label=column("label_column", spec.label))


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def _rows(path, spec):
    """Yields (line_number, row) with row a dict (header/JSON) or a list (no header)."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        if ext in (".json", ".jsonl"):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            return
        if ext == ".csv":
            reader = csv.reader(f)
            lines = ((reader.line_num, r) for r in reader)
        else:  # TSV: no quoting, a tab always separates (Google's reader does the same)
            lines = ((n, line.rstrip("\r\n").split("\t")) for n, line in enumerate(f, 1))
        header = None
        for n, row in lines:
            if not any(cell.strip() for cell in row):
                continue
            if spec.header and header is None:
                header = [c.strip() for c in row]
                continue
            if header is not None:
                if len(row) != len(header):
                    raise ValueError(f"{path}:{n}: {len(row)} columns, the header has {len(header)}")
                row = dict(zip(header, row))
            yield n, row


def _get(row, key, path, n, required=True):
    if isinstance(row, dict):
        if key in row:
            return "" if row[key] is None else str(row[key])
        where = "header" if not path.endswith((".json", ".jsonl")) else "JSON keys"
    else:
        if key < len(row):
            return row[key]
        where = f"{len(row)} columns"
    if required:
        raise ValueError(f"{path}:{n}: missing column {key!r} ({where}: "
                         f"{list(row) if isinstance(row, dict) else len(row)})")
    return None


def read_examples(path, spec, labels=None, require_label=True):
    """Reads one split. Raises ValueError naming path:line on a missing column, a label outside
    `labels`, or a file with no examples. Rows whose label is in spec.skip_labels are dropped (logged).

    Returns list[Example].
    """
    examples, skipped = [], 0
    for n, row in _rows(path, spec):
        label = _get(row, spec.label, path, n, required=require_label)
        if label is not None:
            label = label.strip()
            if label in spec.skip_labels:
                skipped += 1
                continue
            if labels is not None and label not in labels:
                raise ValueError(f"{path}:{n}: unknown label {label!r} (known: {', '.join(labels)})")
        text_b = None if spec.text_b is None else _get(row, spec.text_b, path, n)
        guid = str(row["id"]) if isinstance(row, dict) and "id" in row else str(len(examples) + skipped)
        examples.append(Example(guid, _get(row, spec.text_a, path, n), text_b, label))
    if skipped:
        logging.info("%s: dropped %d rows labelled %s", path, skipped, "/".join(spec.skip_labels))
    if not examples:
        raise ValueError(f"{path}: no examples (empty file?)")
    return examples


def label_list(spec, train_examples):
    """The task's labels, else the train file's sorted (numerically when all are integers)."""
    if spec.labels:
        return list(spec.labels)
    found = {e.label for e in train_examples}
    return sorted(found, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))


def convert_examples(examples, label_map, max_seq_length, tokenizer):
    """Tokenizes to `[CLS] a [SEP] (b [SEP])`, truncating the longer text first.

    Returns (features dict of [N, S] int32, labels [N] int32 with -1 for unlabelled rows).
    """
    rows, labels = [], np.full(len(examples), -1, np.int32)
    for i, ex in enumerate(examples):
        tokens_a = tokenizer.tokenize(ex.text_a)
        tokens_b = tokenizer.tokenize(ex.text_b) if ex.text_b is not None else None
        budget = max_seq_length - (3 if tokens_b is not None else 2)
        if tokens_b is None:
            tokens_a = tokens_a[:budget]
        else:
            while len(tokens_a) + len(tokens_b) > budget:
                (tokens_a if len(tokens_a) > len(tokens_b) else tokens_b).pop()
        tokens = ["[CLS]"] + tokens_a + ["[SEP]"]
        segments = [0] * len(tokens)
        if tokens_b is not None:
            tokens += tokens_b + ["[SEP]"]
            segments += [1] * (len(tokens_b) + 1)
        rows.append((tokenizer.convert_tokens_to_ids(tokens), segments))
        if ex.label is not None and ex.label in label_map:
            labels[i] = label_map[ex.label]
    return finetune_utils.pad_features(rows, max_seq_length), labels


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def classification_metrics(gold, pred):
    """Accuracy and macro-F1 of integer label arrays.

    Macro-F1 averages per-class F1 over the classes that occur in gold or in pred (sklearn's default);
    a class with no true positives has F1 0.
    """
    gold, pred = np.asarray(gold), np.asarray(pred)
    if len(gold) == 0:
        raise ValueError("no examples to score")
    f1s = []
    for c in np.union1d(gold, pred):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(gold == pred)), "macro_f1": float(np.mean(f1s)), "n": int(len(gold))}


def write_predictions(path, examples, probs, labels):
    """`id  label  prob_<label>...` TSV, one row per example in input order. probs: [N, num_labels]."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(["id", "label"] + [f"prob_{l}" for l in labels]) + "\n")
        for ex, p in zip(examples, probs):
            f.write("\t".join([ex.guid, labels[int(np.argmax(p))]] + [f"{x:.6f}" for x in p]) + "\n")


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def run(opts):
    """Runs train/eval/predict as asked by `opts` (ClassifierOptions). Returns the dev metrics dict."""
    finetune_utils.check_options(opts)
    spec = task_spec(opts)
    paths = {name: finetune_utils.resolve_path(opts, name) for name in ("train_file", "dev_file", "test_file")}
    os.makedirs(opts.output_dir, exist_ok=True)
    tokenizer = tokenization.FullTokenizer(opts.vocab_file, do_lower_case=opts.do_lower_case)

    labels_path = os.path.join(opts.output_dir, "labels.json")
    train = None
    if opts.do_train:
        train = read_examples(paths["train_file"], spec, spec.labels)
        labels = label_list(spec, train)
        with open(labels_path, "w", encoding="utf-8") as f:
            json.dump(labels, f, ensure_ascii=False)
    elif spec.labels:
        labels = list(spec.labels)
    elif os.path.isfile(labels_path):
        with open(labels_path, encoding="utf-8") as f:
            labels = json.load(f)
    else:
        raise ValueError(f"no label list: pass --labels, or train first so {labels_path} exists")
    label_map = {l: i for i, l in enumerate(labels)}
    dev = read_examples(paths["dev_file"], spec, labels) if opts.do_eval else None
    test = read_examples(paths["test_file"], spec, require_label=False) if opts.do_predict else None

    strategy = finetune_utils.setup_runtime(opts)
    model = finetune_utils.build_task_model(
        opts, strategy, lambda config: modeling.BertClassifier(config, num_labels=len(labels)))

    def evaluate():
        features, gold = convert_examples(dev, label_map, opts.max_seq_length, tokenizer)
        logits = finetune_utils.predict_batches(model, features, opts.eval_batch_size)
        return classification_metrics(gold, np.argmax(logits, axis=-1))

    metrics = {}
    if opts.do_train:
        features, y = convert_examples(train, label_map, opts.max_seq_length, tokenizer)
        ds = finetune_utils.make_dataset(features, y, opts.train_batch_size, shuffle=True, seed=opts.seed,
                                         drop_remainder=len(y) >= opts.train_batch_size)
        finetune_utils.train_and_keep_best(model, opts, strategy, ds, len(y), finetune_utils.masked_sparse_ce,
                                           evaluate if dev else None, key="accuracy")
    if dev:
        metrics = evaluate()
        counts = np.bincount([label_map[e.label] for e in (train or dev)], minlength=len(labels))
        majority = int(np.argmax(counts))
        metrics["majority_baseline_accuracy"] = float(np.mean([label_map[e.label] == majority for e in dev]))
        metrics.update(task=opts.task_name, split=os.path.basename(paths["dev_file"]))
        finetune_utils.write_metrics(opts, metrics)
    if test:
        features, _ = convert_examples(test, label_map, opts.max_seq_length, tokenizer)
        logits = finetune_utils.predict_batches(model, features, opts.eval_batch_size)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = os.path.join(opts.output_dir, "test_predictions.tsv")
        write_predictions(out, test, probs, labels)
        logging.info("wrote %d predictions to %s", len(test), out)
    return metrics


def main(argv):
    del argv
    try:
        run(finetune_utils.options_from_flags(ClassifierOptions))
    except ValueError as e:
        raise SystemExit(f"run_classifier.py: error: {e}") from None


if __name__ == "__main__":
    finetune_utils.define_common_flags()
    with train_utils.flag_group("Task and columns"):
        flags.DEFINE_string("task_name", "generic", f"One of: {', '.join(TASKS)}.")
        flags.DEFINE_string("text_a_column", "", "Column (header name / JSON key / 0-based index) of text_a.")
        flags.DEFINE_string("text_b_column", "", "Column of text_b; 'none' for single-sentence data.")
        flags.DEFINE_string("label_column", "", "Column of the label.")
        flags.DEFINE_string("has_header", "", "true/false; default: the task's.")
        flags.DEFINE_string("labels", "", "Comma-separated labels; default: the task's or the train file's.")
    train_utils.run_script(main, __doc__, ("python run_classifier.py --task_name=chnsenticorp "
                           "--data_dir=../shared/data/chnsenticorp --train_file=train.tsv --dev_file=dev.tsv "
                           "--vocab_file=../shared/data/vocab/vocab.txt "
                           "--bert_config_file=resources/bert_config_L2_H128.json --do_train --do_eval "
                           "--output_dir=/tmp/chnsenticorp"))
