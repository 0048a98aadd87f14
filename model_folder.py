"""The run-folder contract: every folder that holds a model says what it holds.

A model folder (pretraining `output_dir`, fine-tuning `best/`, an import or a conversion) holds

    ckpt-N.* + checkpoint     our TF2 checkpoint (or bert_model.ckpt.* from Google / brightmart)
    bert_config.json          Google's config fields
    vocab.txt                 the WordPiece vocabulary, one token per line
    model_info.json           {"do_lower_case": true, "task": "classifier", "labels": ["0", "1"]}

so that every consumer (`--init_checkpoint` of every script, `export_to_pytorch.py --checkpoint`,
`fill_mask.py --checkpoint`, `convert_checkpoint.py --input`) needs the folder alone:

    >>> model_folder.write("out/lcqmc/best", config=config, vocab_file="vocab.txt",
    ...                    do_lower_case=True, task="classifier", labels=["0", "1"])
    >>> folder = model_folder.resolve("out/lcqmc/best")
    >>> folder.checkpoint, folder.bert_config_file, folder.vocab_file, folder.task, folder.labels

`resolve` also reads Google's released folders (`bert_model.ckpt` + `bert_config.json` + `vocab.txt`),
HuggingFace folders (`config.json` + weights; the vocab from `vocab.txt`, else from the WordPiece
model in transformers 5's `tokenizer.json`), and folders written before this contract (fine-tuning
wrote `bert_config.json` and `labels.json` / `ner_tags.json` one level above `best/`). Explicit
flags win over what the folder says; anything still missing is a `train_utils.UsageError` naming the
file and the flag that supplies it. Remote paths (`gs://`) go through `tf.io.gfile`; local ones need no
TensorFlow, so this module also serves the JAX backend (whose run folders hold
`ckpt-N.weights.safetensors` instead of TF checkpoints).
"""

import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np
from absl import logging

import train_utils

INFO_FILE = "model_info.json"
CONFIG_FILE = "bert_config.json"
VOCAB_FILE = "vocab.txt"
HF_CONFIG_FILE = "config.json"
# The weights file of a save by modeling.save_weights (JAX runs): ckpt-N.weights.safetensors.
SAFETENSORS_SUFFIX = ".weights.safetensors"
TASKS = ("mlm", "classifier", "ner", "qa")
# Weight files of a HuggingFace folder (single or sharded), in the order transformers prefers them.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
# The HF task class each of our task names maps to (config.json "architectures").
TASK_ARCHITECTURES = {
    "mlm": "BertForMaskedLM",
    "classifier": "BertForSequenceClassification",
    "ner": "BertForTokenClassification",
    "qa": "BertForQuestionAnswering",
}
# HF architectures we import, and the task whose model receives them. BertModel / BertForPreTraining
# folders (e.g. UER or the original bert-base-chinese) carry the encoder, and maybe the MLM head.
ARCHITECTURE_TASKS = {
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",
    "BertLMHeadModel": "mlm",
    "BertModel": "mlm",
    "BertForSequenceClassification": "classifier",
    "BertForTokenClassification": "ner",
    "BertForQuestionAnswering": "qa",
}
# Label files written by fine-tuning before model_info.json existed (JSON lists, beside best/).
_OLD_LABEL_FILES = (("labels.json", "classifier"), ("ner_tags.json", "ner"))


@dataclasses.dataclass
class ModelFolder:
    """What `resolve` found. `kind` is "tf2" (ours), "tf1" (Google's name-based) or "hf".

    checkpoint: a checkpoint prefix (tf2/tf1) or the HF folder itself (hf).
    bert_config_file: Google's bert_config.json, or an HF config.json (modeling.BertConfig reads both).
    do_lower_case: from model_info.json / tokenizer files; True (Google's Chinese setting) if unknown.
    task: mlm | classifier | ner | qa, or None if the folder does not say (Google TF1 folders).
    labels: label names in id order (classifier, ner), else None.
    """
    checkpoint: str
    kind: str
    folder: str
    bert_config_file: str
    vocab_file: str
    do_lower_case: bool = True
    task: str = None
    labels: list = None


# ------------------------------------------------------------------------------------------------
# Files: local paths through the standard library, remote ones (gs://) through tf.io.gfile
# ------------------------------------------------------------------------------------------------

def _is_remote(path):
    return "://" in os.fspath(path)


class _LocalFiles:
    """The tf.io.gfile calls this module makes, for local paths (no TensorFlow import)."""
    exists, isdir, listdir, glob = os.path.exists, os.path.isdir, os.listdir, glob.glob
    rmtree, remove = shutil.rmtree, os.remove

    @staticmethod
    def GFile(path, mode="r"):  # pylint: disable=invalid-name  (gfile's name)
        return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))

    @staticmethod
    def rename(src, dst, overwrite=False):
        del overwrite  # os.replace always replaces, as every caller here wants
        os.replace(src, dst)

    @staticmethod
    def makedirs(path):
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def copy(src, dst, overwrite=False):
        del overwrite
        shutil.copyfile(src, dst)


def import_tensorflow(what):
    """TensorFlow, for `what` (a path that needs it); without it (a JAX-only machine) a ValueError
    naming the path rather than an ImportError from deep inside."""
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError(f"{what}: reading it needs TensorFlow, which is not installed here") from None
    return tf


def _fs(path):
    """tf.io.gfile for a remote path (TensorFlow imported on first use), else _LocalFiles."""
    return import_tensorflow(path).io.gfile if _is_remote(path) else _LocalFiles


def _read_errors(path):
    """The exceptions a failed read of `path` raises (TF's own for remote paths)."""
    if _is_remote(path):
        tf = import_tensorflow(path)
        return (OSError, tf.errors.NotFoundError, tf.errors.FailedPreconditionError)
    return (OSError,)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def atomic_write(path, data):
    """Writes bytes or text to `path` via a temp name in the same folder and a rename, so a reader
    (or a failing run) never leaves half a file (gfile: gs:// works)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with _fs(path).GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    _fs(path).rename(tmp, path, overwrite=True)


def _read_bytes(path, flag):
    try:
        with _fs(path).GFile(path, "rb") as f:
            return f.read()
    except _read_errors(path):
        raise train_utils.UsageError(f"{flag}={path}: not a readable file") from None


def remove_if_exists(path):
    if _fs(path).exists(path):
        _fs(path).remove(path)


def write(folder, *, config, vocab_file, do_lower_case, task=None, labels=None):
    """Makes `folder` self-describing: writes bert_config.json, vocab.txt and model_info.json.

    Args:
      folder: the folder that holds (or will hold) the checkpoint; created if absent.
      config: a modeling.BertConfig (anything with `to_json_string()` and `vocab_size`) or the path
        of a bert_config.json.
      vocab_file: the vocab the model was trained with (copied; skipped if it already is the file).
      do_lower_case: the tokenizer setting the model was trained with.
      task: mlm | classifier | ner | qa (None: an encoder whose head is not meant for use).
      labels: label names in id order, for classifier and ner.
    Each file is written under a temp name and renamed, so a reader never sees half a file.
    """
    if task not in (None,) + TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    if task in ("classifier", "ner") and not labels:
        raise ValueError(f"task {task} needs its labels")
    if isinstance(config, (str, os.PathLike)):
        config_json = _read_bytes(os.fspath(config), "--bert_config_file").decode("utf-8")
        vocab_size = json.loads(config_json).get("vocab_size")
    else:
        config_json, vocab_size = config.to_json_string(), config.vocab_size
    vocab = _read_bytes(os.fspath(vocab_file), "--vocab_file")
    # Lines end at "\n" only: Google's vocab holds tokens that str.splitlines() would split (\x1c, \x85).
    n_tokens = len(vocab.decode("utf-8").rstrip("\n").split("\n"))
    if vocab_size is not None and n_tokens != vocab_size:
        raise train_utils.UsageError(f"--vocab_file={vocab_file}: {n_tokens} tokens, but the bert "
                                     f"config says vocab_size={vocab_size}")
    folder = os.fspath(folder)
    _fs(folder).makedirs(folder)
    atomic_write(os.path.join(folder, CONFIG_FILE), config_json.encode("utf-8"))
    target = os.path.join(folder, VOCAB_FILE)
    if not (_fs(target).exists(target) and _read_bytes(target, "vocab") == vocab):
        atomic_write(target, vocab)
    info = {"do_lower_case": bool(do_lower_case), "task": task,
            "labels": [str(label) for label in labels] if labels else None}
    atomic_write(os.path.join(folder, INFO_FILE),
                  (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return folder


# ------------------------------------------------------------------------------------------------
# Resolving
# ------------------------------------------------------------------------------------------------

def _is_file(path):
    return _fs(path).exists(path) and not _fs(path).isdir(path)


def _load_json(path):
    try:
        with _fs(path).GFile(path, "r") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise train_utils.UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _latest_tf2(folder):
    """The newest ckpt-N prefix in `folder`, or None. An unreadable `checkpoint` state file is an
    error (it must never read as "no checkpoint"): the caller would otherwise start afresh."""
    state_file = os.path.join(folder, "checkpoint")
    fs = _fs(folder)
    if fs.exists(state_file):
        tf = import_tensorflow(state_file)
        try:
            state = tf.train.get_checkpoint_state(folder)
        except Exception:  # pylint: disable=broad-except  (a text-proto parse error of several types)
            state = None
        named = state and state.model_checkpoint_path  # TF already joined a relative one to `folder`
        # A folder moved or copied after its run keeps an absolute path to the old place: look beside.
        for prefix in ([named, os.path.join(folder, os.path.basename(named))] if named else []):
            if fs.exists(prefix + ".index"):
                return prefix
        raise train_utils.UsageError(
            f"{state_file}: unreadable or names a missing checkpoint ({named!r}); point at a "
            f"ckpt-N prefix in {folder} instead, or restore the file")
    numbers = [int(m.group(1)) for m in (re.search(r"ckpt-(\d+)\.index$", p)
               for p in fs.glob(os.path.join(folder, "ckpt-*.index"))) if m]
    return os.path.join(folder, f"ckpt-{max(numbers)}") if numbers else None


def safetensors_complete(path):
    """Whether the weights file `path` (or its sharded form: the index JSON, written last) exists."""
    return _is_file(path) or _is_file(path + ".index.json")


def _latest_safetensors(folder):
    """The newest complete ckpt-N.weights.safetensors in `folder` (a JAX run's save), or None."""
    pattern = re.compile(r"ckpt-(\d+)\.weights\.safetensors(\.index\.json)?$")
    numbers = [int(m.group(1)) for m in (pattern.search(p) for p in _fs(folder).glob(
        os.path.join(folder, "ckpt-*.weights.safetensors*"))) if m]
    return os.path.join(folder, f"ckpt-{max(numbers)}{SAFETENSORS_SUFFIX}") if numbers else None


def find_checkpoint(path, flag="--checkpoint"):
    """(kind, checkpoint, folder) for a folder or a checkpoint path; UsageError if none.

    kind: "tf2" | "tf1" (checkpoint: a prefix), "safetensors" (the weights file of a JAX run or of
    modeling.save_weights), "hf" (checkpoint: the folder). `flag` names where `path` came from in
    the error (None: the path alone, for library callers).
    """
    where = f"{flag}={path}" if flag else path
    fs = _fs(path)
    if fs.isdir(path):
        latest = _latest_tf2(path)
        if latest:
            return "tf2", latest, path
        if fs.exists(os.path.join(path, "bert_model.ckpt.index")):
            return "tf1", os.path.join(path, "bert_model.ckpt"), path
        latest = _latest_safetensors(path)
        if latest:
            return "safetensors", latest, path
        if _is_file(os.path.join(path, HF_CONFIG_FILE)):
            return "hf", path, path
        raise train_utils.UsageError(
            f"{where}: holds no model (no ckpt-N, no bert_model.ckpt, no HuggingFace config.json)")
    if path.endswith(".safetensors") and safetensors_complete(path):
        return "safetensors", path, os.path.dirname(path) or "."
    if fs.exists(path + ".index"):
        tf = import_tensorflow(path + ".index")
        folder = os.path.dirname(path) or "."
        try:
            names = dict(tf.train.list_variables(path))
        except (tf.errors.OpError, ValueError) as e:
            raise train_utils.UsageError(f"{path}.index: unreadable checkpoint index "
                                         f"({type(e).__name__})") from None
        kind = "tf2" if "_CHECKPOINTABLE_OBJECT_GRAPH" in names else "tf1"
        return kind, path, folder
    raise train_utils.UsageError(
        f"{where}: no checkpoint there (expected a model folder, a prefix like out/ckpt-1000 or "
        f".../bert_model.ckpt, a .safetensors file, or a HuggingFace folder)")


# ------------------------------------------------------------------------------------------------
# Weights files without TensorFlow: safetensors keyed by Google names (modeling.save_weights)
# ------------------------------------------------------------------------------------------------

# A tensor larger than one shard (the word embeddings, for small shards) is stored as row blocks.
_ROW_BLOCK = re.compile(r"^(.+):rows(\d+)of(\d+)$")
_ST_METADATA = {"format": "np"}
_FILE_BYTES, _ENTRY_BYTES = 8 + 256, 256  # per file (length + metadata), per tensor header entry


def write_safetensors(path, tensors, max_shard_bytes=None):
    """Writes {name: numpy array} to `path` (*.safetensors) -> the paths written.

    With max_shard_bytes, files of at most that size: `<stem>-00001-of-0000K.safetensors`, then
    `<path>.index.json` = {"metadata": {"total_size"}, "weight_map": {name: file}} (HuggingFace's
    layout), written last so that its presence means the save is complete; a tensor larger than a
    file is split into row blocks `<name>:rows<i>of<n>`. Each file: temp name, then rename.
    """
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: a weights file name must end in .safetensors")
    total = sum(v.nbytes for v in tensors.values())
    index = path + ".index.json"
    if not max_shard_bytes or _FILE_BYTES + total + _ENTRY_BYTES * len(tensors) <= max_shard_bytes:
        atomic_write(path, save(tensors, metadata=_ST_METADATA))
        remove_if_exists(index)  # from an earlier sharded save under this name
        return [path]
    shards = _shards(tensors, max_shard_bytes)
    written, weight_map = [], {}
    for i, shard in enumerate(shards):
        data = save(shard, metadata=_ST_METADATA)
        if len(data) > max_shard_bytes:  # _ENTRY_BYTES too small for some name: a bug here
            raise AssertionError(f"a shard of {len(data)} bytes > max_shard_bytes={max_shard_bytes}")
        written.append(f"{path[:-len('.safetensors')]}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        atomic_write(written[-1], data)
        weight_map.update(dict.fromkeys(shard, os.path.basename(written[-1])))
    atomic_write(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                   indent=1) + "\n")
    remove_if_exists(path)  # from an earlier one-file save under this name
    return written + [index]


def _shards(tensors, max_shard_bytes):
    """[{key: array}], in the order given, each file's data and header <= max_shard_bytes."""
    room = max_shard_bytes - _FILE_BYTES - _ENTRY_BYTES  # for one tensor alone in a file
    items = []
    for name, value in tensors.items():
        if value.nbytes <= room:
            items.append((name, value))
            continue
        rows = room // (value.nbytes // value.shape[0]) if value.ndim else 0
        if rows < 1:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} is too small for one row of "
                             f"'{name}' {value.shape}")
        n = -(-value.shape[0] // rows)
        items += [(f"{name}:rows{i}of{n}", value[i * rows:(i + 1) * rows]) for i in range(n)]
    shards, size = [{}], _FILE_BYTES
    for key, value in items:
        if shards[-1] and size + value.nbytes + _ENTRY_BYTES > max_shard_bytes:
            shards.append({})
            size = _FILE_BYTES
        shards[-1][key] = value
        size += value.nbytes + _ENTRY_BYTES
    return shards


def _safetensors_file(path):
    from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel

    try:
        if _is_remote(path):  # safe_open maps local files only
            from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
            return {k: (lambda v=v: v) for k, v in load(_read_bytes(path, "weights")).items()}
        f = safe_open(path, framework="numpy")
        return {k: functools.partial(f.get_tensor, k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from None


def read_safetensors(path):
    """{name: get()} of a file of write_safetensors, or of its shards through `<path>.index.json`;
    get() reads one tensor (row blocks are joined again)."""
    path, index = os.fspath(path), os.fspath(path) + ".index.json"
    if not _is_file(index):
        return _safetensors_file(path)
    try:
        weight_map = _load_json(index)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a weights index ({type(e).__name__}: {e})") from None
    tensors = {}
    for name in files:
        tensors.update(_safetensors_file(os.path.join(os.path.dirname(path), name)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index}: names tensors its shards do not hold: {', '.join(missing[:3])}")
    blocks = collections.defaultdict(dict)  # (name, n) -> {i: get}
    for key in [k for k in tensors if _ROW_BLOCK.match(k)]:
        name, i, n = _ROW_BLOCK.match(key).groups()
        blocks[name, int(n)][int(i)] = tensors.pop(key)
    for (name, n), parts in blocks.items():
        if sorted(parts) != list(range(n)):
            raise ValueError(f"{index}: tensor '{name}' lacks row blocks "
                             f"{sorted(set(range(n)) - set(parts))}")
        tensors[name] = lambda gets=[parts[i] for i in range(n)]: np.concatenate([g() for g in gets])
    return tensors


def _old_labels(folder):
    """(task, labels) from files written before model_info.json, beside or one level up; else None."""
    for where in (folder, os.path.dirname(folder.rstrip("/"))):
        path = os.path.join(where, "labels.txt")
        if where == folder and _is_file(path):
            with _fs(path).GFile(path, "r") as f:
                return None, [line.strip() for line in f.read().splitlines() if line.strip()]
        for name, task in _OLD_LABEL_FILES:
            path = os.path.join(where, name)
            if _is_file(path):
                labels = _load_json(path)
                if not isinstance(labels, list):
                    raise train_utils.UsageError(f"{path}: expected a JSON list of labels")
                return task, [str(label) for label in labels]
    return None, None


def vocab_from_tokenizer_json(path):
    """vocab.txt of the WordPiece model in a transformers `tokenizer.json`, written once to a temp
    file keyed by the content (the user's folder is never written to). Returns its path."""
    data = _read_bytes(path, "tokenizer.json")
    model = json.loads(data).get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "WordPiece" or not isinstance(vocab, dict):
        raise train_utils.UsageError(f"{path}: not a WordPiece (BERT) tokenizer; pass --vocab_file")
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise train_utils.UsageError(f"{path}: vocabulary ids are not 0..{len(tokens) - 1}; pass --vocab_file")
    out = os.path.join(tempfile.gettempdir(), f"vocab-{hashlib.sha256(data).hexdigest()[:16]}.txt")
    if not os.path.isfile(out):
        atomic_write(out, "".join(t + "\n" for t in tokens).encode("utf-8"))
    return out


def _hf_lower_case(folder):
    """do_lower_case of an HF folder: tokenizer_config.json, else tokenizer.json's normalizer."""
    config = os.path.join(folder, "tokenizer_config.json")
    if _is_file(config) and "do_lower_case" in _load_json(config):
        return bool(_load_json(config)["do_lower_case"])
    tokenizer = os.path.join(folder, "tokenizer.json")
    if _is_file(tokenizer):
        normalizer = _load_json(tokenizer).get("normalizer") or {}
        if "lowercase" in normalizer:
            return bool(normalizer["lowercase"])
    return True


def _resolve_hf(folder, bert_config_file, vocab_file):
    config_path = os.path.join(folder, HF_CONFIG_FILE)
    hf = _load_json(config_path)
    if not any(_is_file(os.path.join(folder, name)) for name in HF_WEIGHTS):
        raise train_utils.UsageError(f"{folder}: HuggingFace folder without weights (none of "
                                     f"{', '.join(HF_WEIGHTS)})")
    architecture = (hf.get("architectures") or ["BertModel"])[0]
    if architecture not in ARCHITECTURE_TASKS:
        raise train_utils.UsageError(f"{config_path}: architecture {architecture!r} is not supported; "
                                     f"expected one of {', '.join(sorted(ARCHITECTURE_TASKS))}")
    task, labels = ARCHITECTURE_TASKS[architecture], None
    if task in ("classifier", "ner"):
        id2label = hf.get("id2label") or {}
        n = hf.get("num_labels", len(id2label) or 2)
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    if not vocab_file:
        if _is_file(os.path.join(folder, VOCAB_FILE)):
            vocab_file = os.path.join(folder, VOCAB_FILE)
        elif _is_file(os.path.join(folder, "tokenizer.json")):
            vocab_file = vocab_from_tokenizer_json(os.path.join(folder, "tokenizer.json"))
        else:
            raise train_utils.UsageError(f"{folder}: no vocab.txt and no tokenizer.json; pass --vocab_file")
    return ModelFolder(folder, "hf", folder, bert_config_file or config_path, vocab_file,
                       _hf_lower_case(folder), task, labels)


def resolve(path, bert_config_file=None, vocab_file=None, flag="--checkpoint"):
    """Finds the checkpoint, config, vocab, lower-casing, task and labels of a model -> ModelFolder.

    Args:
      path: a model folder (ours: its latest ckpt-N; Google's: bert_model.ckpt; or a HuggingFace
        folder), or a checkpoint prefix (out/ckpt-1000, .../bert_model.ckpt).
      bert_config_file, vocab_file: explicit flags; they win over the folder's files.
      flag: the flag `path` came from, for messages (--init_checkpoint, --input, ...).
    Raises train_utils.UsageError naming what is missing and the flag that supplies it.
    """
    path = os.fspath(path).rstrip("/") or "/"
    for name, value in (("--bert_config_file", bert_config_file), ("--vocab_file", vocab_file)):
        if value and not _is_file(value):
            raise train_utils.UsageError(f"{name}={value}: not a file")
    kind, checkpoint, folder = find_checkpoint(path, flag)
    if kind == "hf":
        return _resolve_hf(folder, bert_config_file, vocab_file)
    parent = os.path.dirname(folder)
    if not bert_config_file:
        # Fine-tuning wrote bert_config.json beside best/ before this contract.
        for where in (folder, parent):
            if _is_file(os.path.join(where, CONFIG_FILE)):
                bert_config_file = os.path.join(where, CONFIG_FILE)
                break
        else:
            raise train_utils.UsageError(f"{path}: no {CONFIG_FILE} beside the checkpoint; "
                                         f"pass --bert_config_file")
    if not vocab_file:
        vocab_file = os.path.join(folder, VOCAB_FILE)
        if not _is_file(vocab_file):
            raise train_utils.UsageError(f"{path}: no {VOCAB_FILE} beside the checkpoint; pass --vocab_file")
    info_path = os.path.join(folder, INFO_FILE)
    if _is_file(info_path):
        info = _load_json(info_path)
        if not isinstance(info, dict) or info.get("task") not in (None,) + TASKS:
            raise train_utils.UsageError(f"{info_path}: expected {{\"do_lower_case\", \"task\" (one of "
                                         f"{', '.join(TASKS)}), \"labels\"}}")
        return ModelFolder(checkpoint, kind, folder, bert_config_file, vocab_file,
                           bool(info.get("do_lower_case", True)), info.get("task"), info.get("labels"))
    task, labels = _old_labels(folder)
    return ModelFolder(checkpoint, kind, folder, bert_config_file, vocab_file, True, task, labels)


# ------------------------------------------------------------------------------------------------
# Output folders of converters and exporters: a temp folder beside the target, renamed at the end
# ------------------------------------------------------------------------------------------------

def check_output_dir(output_dir, overwrite=False, sources=()):
    """Fails early (before any work) if `output_dir` holds something and `overwrite` is off, or if
    replacing it would delete one of `sources` (the model being converted)."""
    real = (lambda p: p.rstrip("/")) if _is_remote(output_dir) else os.path.realpath
    out = real(output_dir)
    for source in sources:
        src = real(source)
        if src == out or src.startswith(out.rstrip("/" if _is_remote(output_dir) else os.sep) + "/"):
            raise ValueError(f"--output_dir={output_dir} holds the input {source}; writing there "
                             f"would replace it: choose another --output_dir")
    fs = _fs(output_dir)
    if fs.exists(output_dir):
        if not fs.isdir(output_dir):
            raise ValueError(f"--output_dir={output_dir} is an existing file, not a folder")
        if fs.listdir(output_dir) and not overwrite:
            raise ValueError(f"--output_dir={output_dir} already exists and is not empty; "
                             f"pass --overwrite to replace it")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temp_dirs(output_dir):
    """Removes `.NAME.tmp-PID-*` folders that a killed run left beside `output_dir`.

    Only our own naming pattern, and only for processes that no longer exist on this machine. A
    `.NAME.old-PID-*` folder holds the previous output, moved aside during --overwrite: if the run
    died before the new output took its place, it is moved back rather than deleted.
    """
    parent, base = os.path.split(os.path.abspath(output_dir))
    if not os.path.isdir(parent):
        return
    pattern = re.compile(rf"^\.{re.escape(base)}\.(tmp|old)-(\d+)-")
    for name in sorted(os.listdir(parent)):
        m = pattern.match(name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, name)
        previous = os.path.join(path, "x")
        if m.group(1) == "old" and os.path.isdir(previous) and not os.path.exists(output_dir):
            os.rename(previous, output_dir)
            logging.warning("restored %s from %s (a run was killed while replacing it)", output_dir, path)
        logging.info("removing %s, left by a killed run (pid %s)", path, m.group(2))
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(output_dir, overwrite=False, sources=()):
    """Yields a temp folder beside `output_dir`; on success it becomes `output_dir`.

    On any exception the temp folder is removed, so a failed run leaves no partial output; what a
    killed run left is removed by the next run (clean_stale_temp_dirs). With `overwrite`, an existing
    `output_dir` is replaced only after the new one is complete. The folder gets the user's umask
    (mkdtemp alone makes it 0700).
    """
    if _is_remote(output_dir):
        with _remote_output_dir(output_dir, overwrite, sources) as tmp:
            yield tmp
        return
    output_dir = os.path.abspath(output_dir)
    check_output_dir(output_dir, overwrite, sources)
    parent, base = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temp_dirs(output_dir)
    umask = os.umask(0)
    os.umask(umask)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.tmp-{os.getpid()}-")
    try:
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        old = None
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-{os.getpid()}-")
            os.rename(output_dir, os.path.join(old, "x"))
        os.rename(tmp, output_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _remote_output_dir(output_dir, overwrite, sources):
    """gs:// (any tf.io.gfile scheme): the output is made in a local temp folder and copied up only
    when complete, so a failed run writes nothing there. (Cloud storage has no atomic folder
    rename: with --overwrite the old files are deleted just before the copy.)"""
    check_output_dir(output_dir, overwrite, sources)
    gfile = _fs(output_dir)
    with tempfile.TemporaryDirectory(prefix="roberta_zh-export-") as tmp:
        yield tmp
        if gfile.exists(output_dir):
            gfile.rmtree(output_dir)
        for root, _, files in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            target = output_dir.rstrip("/") + ("" if rel == "." else "/" + rel)
            gfile.makedirs(target)
            for name in files:
                gfile.copy(os.path.join(root, name), f"{target.rstrip('/')}/{name}", overwrite=True)
