r"""Fine-tunes BERT/RoBERTa on sentence(-pair) classification: LCQMC, BQ, XNLI/OCNLI/CMNLI, AFQMC,
ChnSentiCorp, TNEWS, IFLYTEK, THUCNews titles, any TSV/CSV/JSON-lines file whose header names the
text and label columns, or a TFDS dataset (--tfds_name=xnli).

    python run_classifier.py --task_name=lcqmc --do_train=true --do_eval=true --data_dir=$LCQMC \
      --init_checkpoint=chinese_L-12_H-768_A-12 --max_seq_length=128 --train_batch_size=32 \
      --learning_rate=2e-5 --num_train_epochs=3 --output_dir=out/lcqmc

Google's and roberta_zh's command lines work as written (`--task_name=lcqmc_pair`, `--do_train=true`,
`--init_checkpoint=.../bert_model.ckpt` with --vocab_file/--bert_config_file, or a model folder alone).
With --data_dir and no file flags, each task's files are found by their usual names (LCQMC:
train.txt/dev.txt/test.txt or train.tsv/...; XNLI: dev.tsv or Google's xnli.dev.tsv layout; CLUE's
train.json/dev.json/test.json). Dev never falls back to test. The best model on dev is kept in
output_dir/best/, a model folder export_to_pytorch.py reads alone (its model_info.json names the task
and the labels). --do_predict writes output_dir/test_predictions.tsv (`id  label  prob_<label>...`).

A row whose label is empty or null (or OCNLI's "-": no gold label) is not a class: it is skipped,
counted, and reported in the log and in the metrics JSON ("skipped").
"""

import csv
import dataclasses
import io
import os
from collections import Counter

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import numpy as np
from absl import flags

import finetuning
from train_utils import UsageError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where the text and label are in a task's files. Columns are header names (header=True), JSON
    keys (.json/.jsonl files) or 0-based column numbers (header=False)."""
    text_a: object
    text_b: object
    label: object
    header: bool
    labels: tuple | None = None  # None: the sorted labels of the train file
    skip_labels: tuple = ()  # rows with these labels have no gold label: skipped and counted
    files: tuple = ("train", "dev", "test"), (".tsv",)  # (split stems, extensions) in --data_dir
    layouts: tuple = ()  # ((file name, {field: value}), ...): files with their own columns


NLI_LABELS = ("contradiction", "entailment", "neutral")
CLUE_FILES = ("train", "dev", "test"), (".json",)
# Google's XNLI release: the zh training file and the all-language dev/test files have own columns.
XNLI_LAYOUTS = (
    ("multinli.train.zh.tsv", {"text_a": "premise", "text_b": "hypo", "label": "label"}),
    ("xnli.dev.tsv", {"text_a": "sentence1", "text_b": "sentence2", "label": "gold_label"}),
    ("xnli.test.tsv", {"text_a": "sentence1", "text_b": "sentence2", "label": "gold_label"}),
)
TASKS = {
    "lcqmc": TaskSpec(0, 1, 2, header=False, labels=("0", "1"),
                      files=(("train", "dev", "test"), (".txt", ".tsv"))),
    "bq": TaskSpec(0, 1, 2, header=False, labels=("0", "1"), files=(("train", "dev", "test"), (".tsv", ".txt"))),
    "xnli": TaskSpec("text_a", "text_b", "label", header=True, labels=NLI_LABELS, layouts=XNLI_LAYOUTS),
    "ocnli": TaskSpec("sentence1", "sentence2", "label", header=True, labels=NLI_LABELS,
                      skip_labels=("-",), files=CLUE_FILES),
    "afqmc": TaskSpec("sentence1", "sentence2", "label", header=True, labels=("0", "1"), files=CLUE_FILES),
    "chnsenticorp": TaskSpec("text_a", None, "label", header=True, labels=("0", "1")),
    "tnews": TaskSpec("sentence", None, "label", header=True, files=CLUE_FILES),
    "iflytek": TaskSpec("sentence", None, "label", header=True, files=CLUE_FILES),
    "thucnews": TaskSpec(0, None, 1, header=False, files=(("train", "dev", "test"), (".txt", ".tsv"))),
    # roberta_zh's internal pair task: label, text_a, text_b (its header line is skipped).
    "sentence_pair": TaskSpec(1, 2, 0, header=False, labels=("0", "1")),
    "generic": TaskSpec("text_a", None, "label", header=True,
                        files=(("train", "dev", "test"), (".tsv", ".csv", ".json", ".jsonl"))),
}
# Names other run_classifier.py versions give the same tasks (roberta_zh, CLUE, ChineseGLUE).
ALIASES = {"lcqmc_pair": "lcqmc", "bq_corpus": "bq", "cmnli": "ocnli", "chnsenti": "chnsenticorp",
           "thucnews_title": "thucnews", "xnli_zh": "xnli"}
# TFDS datasets and their (text_a, text_b, label) features.
TFDS_COLUMNS = {"xnli": ("premise", "hypothesis", "label")}
XNLI_FILES = {"train": ("train.tsv", "multinli/multinli.train.zh.tsv"),
              "dev": ("dev.tsv", "xnli.dev.tsv"), "test": ("test.tsv", "xnli.test.tsv")}


@dataclasses.dataclass
class Example:
    guid: str  # the row's "id" field if it has one, else its 0-based row number
    text_a: str
    text_b: str | None
    label: str | None  # None when the (test) file has no label
    where: str = ""  # "path:line", for messages


def define_flags(fv=flags.FLAGS):
    finetuning.define_flags(fv, max_seq_length=128)
    names = ", ".join(list(TASKS) + [f"{a} (= {t})" for a, t in ALIASES.items()])
    with train_utils.flag_group("Task and columns", fv):
        flags.DEFINE_string("task_name", "generic", f"One of: {names}.", flag_values=fv)
        flags.DEFINE_string("text_a_column", "", "Column (header name / JSON key / 0-based index) of "
                            "text_a.", flag_values=fv)
        flags.DEFINE_string("text_b_column", "", "Column of text_b; 'none' for single-sentence data.",
                            flag_values=fv)
        flags.DEFINE_string("label_column", "", "Column of the label.", flag_values=fv)
        flags.DEFINE_string("has_header", "", "true/false; default: the task's.", flag_values=fv)
        flags.DEFINE_string("labels", "", "Comma-separated labels in id order; default: the task's or "
                            "the train file's, and without --do_train the model folder's (--labels "
                            "renames them, e.g. transformers' LABEL_0,LABEL_1).", flag_values=fv)
        flags.DEFINE_string("tfds_name", None, "Read train/dev/test from this TensorFlow Datasets "
                            "dataset (e.g. xnli) instead of files.", flag_values=fv)
        flags.DEFINE_string("tfds_splits", "train,validation,test", "TFDS splits used as train,dev,test.",
                            flag_values=fv)
        flags.DEFINE_string("tfds_language", "zh", "Language picked from multilingual TFDS text features.",
                            flag_values=fv)
        flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir (default: ~/tensorflow_datasets).",
                            flag_values=fv)


def task_spec(opts):
    """The TaskSpec for --task_name (or an alias) with the column flags applied."""
    name = ALIASES.get(opts.task_name.lower(), opts.task_name.lower())
    if name not in TASKS:
        raise UsageError(f"--task_name={opts.task_name!r} is not one of "
                         f"{', '.join(list(TASKS) + list(ALIASES))}")
    spec = TASKS[name]
    if opts.tfds_name:
        tfds_cols = TFDS_COLUMNS.get(opts.tfds_name.split(":")[0].split("/")[0], ("text", None, "label"))
        spec = TaskSpec(*tfds_cols, header=True)
    header = spec.header if not opts.has_header else opts.has_header.lower() in ("true", "1", "yes")

    def column(flag, default):
        value = opts[flag].value
        if value == "":
            return default
        if value.lower() == "none":
            return None
        if header:
            return value
        if not value.isdigit():
            raise UsageError(f"--{flag}={value!r}: files without a header take 0-based column numbers")
        return int(value)

    labels = tuple(opts.labels.split(",")) if opts.labels else spec.labels
    columns = {f: column(f"{f}_column", getattr(spec, f)) for f in ("text_a", "text_b", "label")}
    given = any(opts[f"{f}_column"].value for f in ("text_a", "text_b", "label"))
    return dataclasses.replace(spec, header=header, labels=labels, **columns,
                               layouts=() if given or opts.has_header else spec.layouts)


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def _rows(path, spec):
    """Yields (line_number, row) with row a dict (header/JSON) or a list (no header)."""
    if path.lower().endswith((".json", ".jsonl")):
        yield from finetuning.json_lines(path)
        return
    text = finetuning.read_text(path)
    if path.lower().endswith(".csv"):
        reader = csv.reader(io.StringIO(text, newline=""))
        lines = ((reader.line_num, r) for r in reader)
    else:  # TSV: no quoting, a tab always separates (Google's reader does the same)
        lines = ((n, line.split("\t")) for n, line in enumerate(text.splitlines(), 1))
    header = None
    for n, row in lines:
        if not any(cell.strip() for cell in row):
            continue
        if spec.header and header is None:
            header = [c.strip() for c in row]
            continue
        if header is not None:
            if len(row) != len(header):
                raise UsageError(f"{path}:{n}: {len(row)} columns, the header has {len(header)}")
            row = dict(zip(header, row))
        yield n, row


def _get(row, key, path, n, required=True):
    if isinstance(row, dict):
        if key in row:
            value = row[key]
            if isinstance(value, (dict, list)):
                raise UsageError(f"{path}:{n}: {key!r} is a {type(value).__name__}, a text was expected")
            return "" if value is None else str(value)
        where = "JSON keys" if path.endswith((".json", ".jsonl")) else "header"
    else:
        if key < len(row):
            return row[key]
        where = f"{len(row)} columns"
    if required:
        raise UsageError(f"{path}:{n}: missing column {key!r} ({where}: "
                         f"{list(row) if isinstance(row, dict) else len(row)})")
    return None


def read_examples(path, spec, require_label=True):
    """Reads one split -> (list[Example], Counter of skipped rows by reason).

    UsageError naming path:line on a missing column or a file with no examples. Rows without a gold
    label (empty, null, or one of spec.skip_labels) are skipped and counted. A headerless file whose
    first row is a header (its label cell reads "label") has that row skipped.
    """
    spec = dataclasses.replace(spec, **dict(spec.layouts).get(os.path.basename(path), {}))
    if dict(spec.layouts).get(os.path.basename(path)):
        spec = dataclasses.replace(spec, header=True)
    is_xnli_all_languages = os.path.basename(path) in ("xnli.dev.tsv", "xnli.test.tsv")
    examples, skipped = [], Counter()
    for n, row in _rows(path, spec):
        if is_xnli_all_languages and row.get("language") != "zh":
            continue
        label = _get(row, spec.label, path, n, required=require_label)
        if label is not None:
            label = label.strip()
            if label == "contradictory":  # Google's XNLI training file
                label = "contradiction"
            if not spec.header and not examples and not skipped and label == "label":
                continue  # a header line in a file of a headerless task
            if label == "" or label in spec.skip_labels:
                skipped["rows without a gold label (empty/null" +
                        "".join(f"/{x!r}" for x in spec.skip_labels) + ")"] += 1
                continue
        text_b = None if spec.text_b is None else _get(row, spec.text_b, path, n)
        guid = str(row["id"]) if isinstance(row, dict) and "id" in row else str(len(examples) + sum(skipped.values()))
        examples.append(Example(guid, _get(row, spec.text_a, path, n), text_b, label, f"{path}:{n}"))
    if not examples:
        raise UsageError(f"{path}: no examples (empty file?)")
    return examples, skipped


def _tfds_text(value, language, feature, name):
    """A TFDS text feature -> str; multilingual features give their `language` text."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict) and language in value:
        return _tfds_text(value[language], language, feature, name)
    if isinstance(value, dict) and "language" in value:  # TranslationVariableLanguages
        langs = [v.decode("utf-8") for v in value["language"]]
        if language in langs:
            return value["translation"][langs.index(language)].decode("utf-8")
    raise UsageError(f"--tfds_name={name}: feature {feature!r} has no {language!r} text "
                     f"(set --tfds_language or --text_a_column/--text_b_column)")


def read_tfds(name, split, spec, language, data_dir=None):
    """Reads a TFDS split -> (examples, skipped, label names of its ClassLabel feature)."""
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(name, split=split, with_info=True, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; the user needs its first line
        raise UsageError(f"--tfds_name={name} split {split!r}: {str(e).splitlines()[0]}") from None
    label_feature = info.features[spec.label]
    names = list(getattr(label_feature, "names", []) or [])
    examples, skipped = [], Counter()
    for i, ex in enumerate(tfds.as_numpy(ds)):
        label_id = int(ex[spec.label])
        label = None
        if label_id >= 0:
            label = names[label_id] if names else str(label_id)
        elif split != "test":  # TFDS marks unlabelled rows with -1
            skipped["rows without a gold label (-1)"] += 1
            continue
        text_b = None if spec.text_b is None else _tfds_text(ex[spec.text_b], language, spec.text_b, name)
        examples.append(Example(str(i), _tfds_text(ex[spec.text_a], language, spec.text_a, name), text_b,
                                label, f"{name}/{split}:{i}"))
    if not examples:
        raise UsageError(f"--tfds_name={name}: split {split!r} is empty")
    return examples, skipped, names


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
    return finetuning.pad_features(rows, max_seq_length), labels


# ---------------------------------------------------------------------------------------------------
# Metrics and predictions
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


def format_predictions(examples, probs, labels):
    """`id  label  prob_<label>...` TSV text, one row per example in input order. probs: [N, C]."""
    lines = ["\t".join(["id", "label"] + [f"prob_{x}" for x in labels])]
    for ex, p in zip(examples, probs):
        lines.append("\t".join([ex.guid, labels[int(np.argmax(p))]] + [f"{x:.6f}" for x in p]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# The task for the shared driver
# ---------------------------------------------------------------------------------------------------


class ClassifierTask(finetuning.Task):
    kind, key = "classifier", "accuracy"
    prediction_files = ("test_predictions.tsv",)

    def check(self):
        self.spec = task_spec(self.opts)
        stems, exts = self.spec.files
        self.file_names = {split: tuple(stem + ext for ext in exts) for split, stem in
                           zip(("train", "dev", "test"), stems)}
        if self.spec.layouts:
            self.file_names = XNLI_FILES
        self.tfds_labels = None

    def find_files(self):
        if not self.opts.tfds_name:
            return super().find_files()
        splits = self.opts.tfds_splits.split(",")
        if len(splits) != 3:
            raise UsageError(f"--tfds_splits={self.opts.tfds_splits!r}: name three splits (train,dev,test)")
        return {split: name for (split, action), name in zip(finetuning.SPLITS, splits)
                if self.opts[action].value}

    def read(self, path, split):
        if self.opts.tfds_name:
            examples, skipped, self.tfds_labels = read_tfds(
                self.opts.tfds_name, path, self.spec, self.opts.tfds_language, self.opts.tfds_data_dir)
            return examples, skipped
        return read_examples(path, self.spec, require_label=split != "test")

    def label_list(self, train):
        if self.tfds_labels and not self.spec.labels:
            return self.tfds_labels
        return label_list(self.spec, train)

    def validate(self, data):
        known = set(self.labels)
        for split in ("train", "dev"):
            for ex in data.get(split, ()):
                if ex.label not in known:
                    hint = ""
                    if all(label == f"LABEL_{i}" for i, label in enumerate(self.labels)):
                        # transformers' placeholder names: a model fine-tuned there without id2label
                        hint = ("; the model folder has transformers' placeholder names: pass --labels "
                                "with the real names in id order")
                    raise UsageError(f"{ex.where}: unknown label {ex.label!r} "
                                     f"(known: {', '.join(self.labels)}){hint}")
        self.label_map = {label: i for i, label in enumerate(self.labels)}
        counts = Counter(ex.label for ex in data.get("train") or data.get("dev", ()))
        self.majority = counts.most_common(1)[0][0] if counts else None

    def train_data(self, examples):
        return convert_examples(examples, self.label_map, self.opts.max_seq_length, self.tokenizer)

    def _probs(self, examples, batch_size):
        features, gold = convert_examples(examples, self.label_map, self.opts.max_seq_length, self.tokenizer)
        logits = finetuning.predict_batches(self.model, features, batch_size)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return probs / probs.sum(-1, keepdims=True), gold

    def evaluate(self, examples, output_dir=None):
        probs, gold = self._probs(examples, self.opts.eval_batch_size)
        metrics = classification_metrics(gold, np.argmax(probs, axis=-1))
        metrics["majority_baseline_accuracy"] = float(np.mean([e.label == self.majority for e in examples]))
        return dict(metrics, task=self.opts.task_name)

    def predict(self, examples, output_dir):
        probs, _ = self._probs(examples, self.opts.predict_batch_size)
        out = os.path.join(output_dir, "test_predictions.tsv")
        finetuning.write_text(out, format_predictions(examples, probs, self.labels))
        return out


def run(opts):
    """Runs train/eval/predict as the parsed flags `opts` ask. Returns the dev metrics dict."""
    return finetuning.run(opts, ClassifierTask(opts))


EXAMPLE = ("python run_classifier.py --task_name=chnsenticorp --data_dir=../shared/data/chnsenticorp "
           "--vocab_file=../shared/data/vocab/vocab.txt --bert_config_file=resources/bert_config_L2_H128.json "
           "--do_train=true --do_eval=true --output_dir=/tmp/chnsenticorp")

if __name__ == "__main__":
    train_utils.run_script(finetuning.main(ClassifierTask), __doc__, EXAMPLE, define_flags)
