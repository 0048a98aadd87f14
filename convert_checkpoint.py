"""Converts BERT checkpoints between our TF2 format, HuggingFace/UER folders and Google's TF1 format.

    # HuggingFace / UER-converted folder (config.json, model.safetensors or pytorch_model.bin, vocab.txt)
    python convert_checkpoint.py --mode=hf_to_tf2 --checkpoint=chinese_roberta_hf/ --output_dir=imported/
    # Google / brightmart TF1 checkpoint -> ours (bert_config.json, vocab.txt found beside it)
    python convert_checkpoint.py --mode=google_to_tf2 --checkpoint=chinese_L-12_H-768_A-12/ --output_dir=imported/
    # ours -> Google TF1 (bert_model.ckpt.{index,data-*} + bert_config.json + vocab.txt)
    python convert_checkpoint.py --mode=tf2_to_google --checkpoint=pretrain_out/ --output_dir=google_export/

Every output is a self-describing model folder (model_folder.py: the checkpoint, bert_config.json,
vocab.txt, model_info.json), so it works alone as `--init_checkpoint=output_dir`, and every --input
may be such a folder. A transformers 5 folder (tokenizer.json, no vocab.txt) imports too.

Every name mapping comes from `modeling.name_table(model)`, the one table of
our variable <-> Google TF1 name <-> HuggingFace name. Outputs are written to a temporary folder
next to `--output_dir` and renamed at the end, so a failed conversion leaves nothing behind.

The safetensors reader is plain numpy (the format is an 8-byte header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then raw little-endian bytes; the writer is in
export_to_pytorch.py), so neither torch nor the safetensors package is needed, and tensors are read
one at a time to keep peak memory near one model. pytorch_model.bin needs torch.

Google folders also work without converting: --init_checkpoint reads bert_model.ckpt directly.
Every model holds a pooler (modeling.BertEncoder), so a source's pooler is always carried over; a
source without one (transformers' BertForMaskedLM, token classification, QA) gets a deterministic,
untrained one. An erf-GELU model (transformers' "gelu") cannot be named in Google's config; it is
refused by --mode=tf2_to_google unless --approximate_gelu writes Google's tanh "gelu" instead.
"""

import json
import os
import struct

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

import file_output
import model_folder
import modeling

TASK_ARCHITECTURES = model_folder.TASK_ARCHITECTURES
ARCHITECTURE_TASKS = model_folder.ARCHITECTURE_TASKS

# ----------------------------------------------------------------------------------------------
# safetensors and pytorch_model.bin readers (the writer is in export_to_pytorch.py)
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """Reads a safetensors file tensor by tensor, validating the header against the file size.

    A corrupt file (bad header, truncated data, sizes that disagree) raises ValueError naming the
    file and, where one is at fault, the tensor.
    """

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: corrupt safetensors file: {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"{path}: corrupt safetensors file: header length {n} does not fit "
                                 f"in a {size}-byte file")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors file: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors file: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
                itemsize = np.dtype(_ST_DTYPES[dtype]).itemsize
                ok = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{path}: corrupt safetensors file: bad header entry for tensor "
                                 f"{name}: {entry}")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
                raise ValueError(f"{path}: corrupt safetensors file: tensor {name} {dtype}{shape} "
                                 f"needs {int(np.prod(shape)) * itemsize} bytes, offsets give {end - begin}")
            if end > data_size:
                raise ValueError(f"{path}: corrupt safetensors file: tensor {name} ends at byte {end} "
                                 f"of the data but the file holds only {data_size} (truncated?)")
            self._entries[name] = (dtype, tuple(shape), begin)

    def keys(self):
        return list(self._entries)

    def shape(self, name):
        return self._entries[name][1]

    def get(self, name):
        """Returns tensor `name` as a numpy array (bf16 widened to float32)."""
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            array = np.fromfile(f, dtype=_ST_DTYPES[dtype], count=count)
        if array.size != count:
            raise ValueError(f"{self.path}: corrupt safetensors file: tensor {name} is truncated")
        if dtype == "BF16":  # bf16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.reshape(shape)


class TorchBinFile:
    """Reads a `pytorch_model.bin` (needs torch; loaded with weights_only=True, so no code runs)."""

    def __init__(self, path):
        self.path = path
        try:
            import torch  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise ValueError(f"{path}: reading pytorch_model.bin needs torch "
                             f"(pip install torch==2.13.0), or convert the folder to model.safetensors") from None
        try:
            try:
                self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # pre-1.6 non-zip files cannot be memory-mapped
                self._state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pylint: disable=broad-except  (torch raises many types for bad files)
            raise ValueError(f"{path}: cannot read PyTorch checkpoint: {e}") from None
        if not isinstance(self._state, dict):
            raise ValueError(f"{path}: expected a state dict of tensors, got {type(self._state).__name__}")
        self.metadata = {}

    def keys(self):
        return list(self._state)

    def shape(self, name):
        return tuple(self._state[name].shape)

    def get(self, name):
        tensor = self._state[name]
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


# ----------------------------------------------------------------------------------------------
# Vocab and labels
# ----------------------------------------------------------------------------------------------


def count_vocab_lines(vocab_file):
    """Number of tokens (lines) in a vocab file: the id space the embedding table must cover."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        raise ValueError(f"vocab file not found: {vocab_file}") from None
    except IsADirectoryError:
        raise ValueError(f"--vocab_file={vocab_file} is a directory, not a vocab.txt") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{vocab_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_vocab_size(vocab_file, config, config_path):
    n = count_vocab_lines(vocab_file)
    if n != config.vocab_size:
        raise ValueError(f"{vocab_file}: {n} tokens, but {config_path} says vocab_size="
                         f"{config.vocab_size}; the vocab and the checkpoint do not belong together")


def parse_labels(value):
    """--labels: a file with one label per line, or a comma-separated list."""
    if not value:
        return []
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
    else:
        labels = [v.strip() for v in value.split(",") if v.strip()]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels has duplicates: {labels}")
    return labels


# ----------------------------------------------------------------------------------------------
# HuggingFace / UER folders
# ----------------------------------------------------------------------------------------------


def _normalize_hf_name(name, add_bert_prefix):
    """Maps old/UER spellings onto transformers' current names."""
    if add_bert_prefix and name.split(".")[0] in ("embeddings", "encoder", "pooler"):
        name = "bert." + name
    if ".LayerNorm." in name:  # pre-2019 pytorch-pretrained-bert called them gamma/beta
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return name


class HFFolder:
    """A HuggingFace or UER-converted BERT folder: config.json, vocab and weights.

    Weights: model.safetensors, pytorch_model.bin, or their sharded `*.index.json` forms.
    Attributes: path, config_path, hf_config (dict), bert_config (dict of Google fields),
    vocab_file (vocab.txt, tokenizer.json's WordPiece vocab or the `vocab_file` given),
    do_lower_case, weights_path (the weights file or index), task (mlm|classifier|ner|qa),
    labels (list or None).
    """

    def __init__(self, path, vocab_file=None):
        self.path = path
        if not os.path.isdir(path):
            raise ValueError(f"{path}: not a folder")
        self.config_path = os.path.join(path, "config.json")
        try:
            with open(self.config_path, encoding="utf-8") as f:
                self.hf_config = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{self.config_path}: missing (a HuggingFace folder needs config.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.config_path}: not valid JSON ({e})") from None
        self.config = modeling.BertConfig.from_dict(self.hf_config, source=self.config_path)
        for arch in self.hf_config.get("architectures") or []:
            if arch not in ARCHITECTURE_TASKS:
                raise ValueError(f"{self.config_path}: architecture {arch!r} is not supported; "
                                 f"expected one of {sorted(ARCHITECTURE_TASKS)}")
        self.bert_config = self.config.to_dict()
        architectures = self.hf_config.get("architectures") or ["BertModel"]
        self.task = ARCHITECTURE_TASKS[architectures[0]]
        # vocab.txt, else transformers 5's tokenizer.json, else --vocab_file (which wins).
        found = model_folder.resolve(path, vocab_file=vocab_file, flag="--checkpoint")
        self.labels, self.vocab_file, self.do_lower_case = found.labels, found.vocab_file, found.do_lower_case
        n = count_vocab_lines(self.vocab_file)
        if n != self.bert_config["vocab_size"]:
            raise ValueError(f"{self.vocab_file}: {n} tokens, but {self.config_path} says vocab_size="
                             f"{self.bert_config['vocab_size']}")
        self._open_weights()

    def _open_weights(self):
        files = {}  # weight file -> reader
        names = {}  # original name -> weight file
        for base, reader_cls in (("model.safetensors", SafetensorsFile), ("pytorch_model.bin", TorchBinFile)):
            single, index = os.path.join(self.path, base), os.path.join(self.path, base + ".index.json")
            if os.path.isfile(single):
                files[single] = reader_cls(single)
                names = {n: single for n in files[single].keys()}
                self.weights_path = single
            elif os.path.isfile(index):
                self.weights_path = index
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{index}: not a valid weight index ({e})") from None
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError(f"{index}: weight_map is not a JSON object of file names")
                for shard in sorted(set(weight_map.values())):
                    shard_path = os.path.join(self.path, shard)
                    if not os.path.isfile(shard_path):
                        raise ValueError(f"{index}: names shard {shard}, which is missing from {self.path}")
                    files[shard_path] = reader_cls(shard_path)
                names = {n: os.path.join(self.path, s) for n, s in weight_map.items()}
            if names:
                break
        if not names:
            raise ValueError(f"{self.path}: no weights found (model.safetensors, pytorch_model.bin "
                             f"or a sharded *.index.json)")
        add_prefix = not any(n.startswith("bert.") for n in names)
        self._tensors = {}  # normalized name -> (reader, original name)
        for name, file in names.items():
            self._tensors[_normalize_hf_name(name, add_prefix)] = (files[file], name)

    def names(self):
        return list(self._tensors)

    def __contains__(self, name):
        return name in self._tensors

    def file_of(self, name):
        return self._tensors[name][0].path

    def get(self, name):
        reader, original = self._tensors[name]
        if original not in reader.keys():
            raise ValueError(f"{reader.path}: tensor {original} listed in the index is not in the file")
        return reader.get(original)


# ----------------------------------------------------------------------------------------------
# Models and our TF2 checkpoints
# ----------------------------------------------------------------------------------------------

POOLER_NAMES = ("bert/pooler/dense/kernel", "bert/pooler/dense/bias")


def save_tf2_checkpoint(model, config, vocab_file, output_dir, labels=None, task=None,
                        do_lower_case=True):
    """Writes output_dir/ckpt-1 (Google-named weights) and the model_folder files beside it."""
    checkpoint = modeling.make_checkpoint(model)
    # Relative paths in the `checkpoint` state file, so the folder can be renamed and moved.
    tf.train.CheckpointManager(checkpoint, output_dir, max_to_keep=1).save(checkpoint_number=1)
    model_folder.write(output_dir, config=config, vocab_file=vocab_file, do_lower_case=do_lower_case,
                       task=task or model_task(model), labels=labels)


def model_task(model):
    """mlm | classifier | ner | qa of a built model (modeling.TASK_MODELS read backwards)."""
    return next(task for task, cls in modeling.TASK_MODELS.items() if type(model) is cls)


def init_pooler_deterministically(model, seed=0):
    """Gives a pooler that no checkpoint supplied the values of Keras' initialiser under a fixed seed,
    so an export of the same checkpoint is the same file every time (never a fresh random draw)."""
    pooler, stddev = model.bert.pooler, model.config.initializer_range
    pooler.kernel.assign(keras.initializers.TruncatedNormal(stddev=stddev, seed=seed)(pooler.kernel.shape))
    pooler.bias.assign(tf.zeros_like(pooler.bias))


def load_checkpoint_fully(path, config, task, num_labels=None):
    """Builds the `task` model and restores every weight from our or a TF1 checkpoint -> model.

    Unlike modeling.load_pretrained (which may initialise heads afresh for fine-tuning), an exporter
    must not write random weights, so any weight absent from the checkpoint is an error naming it.
    The one exception is the pooler of a checkpoint written before every model held one (or of an
    MLM-only import): it gets a deterministic initialisation, and a warning says so.
    """
    model = modeling.make_task_model(config, task, num_labels)
    report = modeling.load_pretrained(model, path)
    missing = [name for name in report.newly_initialized if name not in POOLER_NAMES]
    if missing:
        raise ValueError(f"{path}: has no value for {', '.join(missing)}; "
                         f"is it a --task={task} checkpoint?")
    if report.newly_initialized:
        init_pooler_deterministically(model)
        logging.warning("%s has no pooler: using an initialised, untrained one (seed 0)", path)
    return model


def _assign(weight, value, source, name):
    """Copies `value` (Google layout) into the model variable, checking the shape."""
    if tuple(value.shape) != tuple(weight.variable.shape):
        raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)}, but the config "
                         f"implies {tuple(weight.variable.shape)} for {weight.google_name}")
    weight.variable.assign(value.astype(np.float32, copy=False))


def assign_from_hf(model, folder):
    """Copies the tensors of an HFFolder into a built model; returns the names not used.

    A tensor the model needs and the folder lacks raises ValueError naming the weights file and the
    tensor. Two exceptions: a folder that declares no head at all (architecture BertModel) may lack
    the MLM head, which keeps its fresh initialisation (logged); a folder without a pooler (what
    transformers writes for BertForMaskedLM, token classification and QA) gets a deterministic one.
    """
    headless = (folder.hf_config.get("architectures") or ["BertModel"])[0] == "BertModel"
    used, fresh, no_pooler = set(), [], False
    for w in modeling.name_table(model):
        name = w.hf_name
        if name == "cls.predictions.bias" and "cls.predictions.decoder.bias" in folder:
            # transformers computes the logits with the decoder's own bias when a file has one.
            name = "cls.predictions.decoder.bias"
            used.add("cls.predictions.bias")
        if name not in folder:
            if w.google_name in POOLER_NAMES:
                no_pooler = True
                continue
            if headless and not name.startswith("bert."):
                fresh.append(w.google_name)
                continue
            raise ValueError(f"{folder.weights_path}: tensor {name} is missing (needed for "
                             f"{w.google_name}); the folder does not hold a complete {folder.task} BERT")
        value = folder.get(name)
        _assign(w, value.T if w.transpose else value, folder.file_of(name), name)
        used.add(name)
    if "cls.predictions.decoder.weight" in folder and isinstance(model, modeling.BertPretrainer):
        decoder = folder.get("cls.predictions.decoder.weight")
        if not np.array_equal(decoder, model.bert.word_embeddings.numpy()):
            raise ValueError(f"{folder.file_of('cls.predictions.decoder.weight')}: tensor "
                             f"cls.predictions.decoder.weight differs from the word embeddings; "
                             f"untied MLM decoders are not supported")
        used.add("cls.predictions.decoder.weight")
    if no_pooler:
        init_pooler_deterministically(model)
        logging.warning("%s has no pooler: using an initialised, untrained one (seed 0)", folder.path)
    if fresh:
        logging.warning("%s declares no MLM head; left at random init: %s", folder.path, ", ".join(fresh))
    unused = sorted(set(folder.names()) - used)
    if unused:
        logging.info("Not used (no such weight in our %s model): %s", folder.task, ", ".join(unused))
    return unused


def _approximate_gelu_config(model, config):
    """The config with tanh "gelu" for an erf-GELU model, and the measured max |difference| of the
    encoder output (a fixed random batch of 2 x 64 tokens) between the two activations."""
    approx = modeling.BertConfig.from_dict(dict(config.to_dict(), hidden_act="gelu"))
    twin = modeling.build_model(modeling.BertPretrainer(approx))
    exact_table = {w.google_name: w.variable for w in modeling.name_table(model)}
    for w in modeling.name_table(twin):  # the encoder's weights (a task head has none of the MLM's)
        if w.google_name.startswith("bert/"):
            w.variable.assign(exact_table[w.google_name])
    seq = min(64, config.max_position_embeddings)
    batch = {"input_ids": tf.random.stateless_uniform([2, seq], [1, 2], 0, config.vocab_size, tf.int32)}
    diff = tf.reduce_max(tf.abs(model.bert(batch)["sequence_output"] - twin.bert(batch)["sequence_output"]))
    return approx, float(diff)


def load_model(path, task, bert_config_file=None, vocab_file=None, flag="--checkpoint"):
    """The `task` model of any model folder, every weight restored -> (model, model_folder.ModelFolder).

    path: what model_folder.resolve reads (our folders and ckpt-N prefixes, Google's bert_model.ckpt,
    HuggingFace folders); bert_config_file, vocab_file override what the folder says. The one loader
    behind fill_mask.py, answer_question.py and the conversions: a folder that holds another task's
    model, or an HF BertModel folder asked for its (absent) masked-LM head, is a ValueError naming it.
    """
    found = model_folder.resolve(path, bert_config_file, vocab_file, flag=flag)
    if found.task not in (None, task):
        raise ValueError(f"{flag}={path}: holds a {found.task} model, not a {task} model")
    num_labels = len(found.labels) if found.labels else None
    if found.kind == "hf":
        folder = HFFolder(found.checkpoint, found.vocab_file)
        if task == "mlm" and (folder.hf_config.get("architectures") or ["BertModel"])[0] == "BertModel":
            raise ValueError(f"{folder.config_path}: a BertModel folder has no masked-LM head")
        model = modeling.make_task_model(folder.config, task, num_labels)
        assign_from_hf(model, folder)
        return model, found
    config = modeling.BertConfig.from_json_file(found.bert_config_file)
    check_vocab_size(found.vocab_file, config, found.bert_config_file)
    return load_checkpoint_fully(found.checkpoint, config, task, num_labels), found


# ----------------------------------------------------------------------------------------------
# The three conversions
# ----------------------------------------------------------------------------------------------


def hf_to_tf2(input_dir, output_dir, task=None, overwrite=False, vocab_file=None, labels=None):
    """HuggingFace/UER folder -> our checkpoint folder (usable as --init_checkpoint).

    vocab_file: needed only when the folder has neither vocab.txt nor tokenizer.json.
    labels: names for the head's outputs in id order; they replace config.json's id2label (a model
    fine-tuned in transformers without id2label has only LABEL_0, LABEL_1, ...).
    """
    file_output.check_output_dir(output_dir, overwrite, sources=[input_dir])
    folder = HFFolder(input_dir, vocab_file)
    if task and task != folder.task:
        raise ValueError(f"{folder.config_path}: holds a {folder.task} model "
                         f"({folder.hf_config.get('architectures')}), not --task={task}")
    if labels:
        check_labels_fit(labels, folder.task, folder.labels, folder.config_path)
        folder.labels = list(labels)
    model = modeling.make_task_model(folder.config, folder.task, len(folder.labels) if folder.labels else None)
    assign_from_hf(model, folder)
    with file_output.atomic_output_dir(output_dir, overwrite, sources=[input_dir]) as tmp:
        save_tf2_checkpoint(model, folder.config, folder.vocab_file, tmp, folder.labels,
                            do_lower_case=folder.do_lower_case)
    logging.info("Wrote %s (%s, %d tensors)", output_dir, folder.task, len(modeling.name_table(model)))
    return output_dir


def check_labels_fit(labels, task, known, where):
    """--labels must name every output of a classifier/ner head; other heads have no labels."""
    if task not in ("classifier", "ner"):
        raise ValueError(f"--labels: {where} holds a {task} model, which has no labels")
    if known and len(labels) != len(known):
        raise ValueError(f"--labels names {len(labels)} labels but {where} has {len(known)} "
                         f"({','.join(known)})")


def _google_task(prefix, task):
    """(task, num_labels) of a TF1 checkpoint, from its variable names (`task` picks classifier/ner)."""
    shapes = dict(tf.train.list_variables(prefix))
    if "cls/squad/output_weights" in shapes:
        detected, num_labels = "qa", None
    elif "output_weights" in shapes:
        detected, num_labels = task if task in ("classifier", "ner") else "classifier", shapes["output_weights"][0]
    else:
        detected, num_labels = "mlm", None
    if task and task != detected:
        raise ValueError(f"{prefix}: holds a {detected} model's weights, not --task={task}")
    return detected, num_labels


def google_to_tf2(prefix, bert_config_file, vocab_file, output_dir, task=None, labels=None,
                  overwrite=False, do_lower_case=True):
    """Google/brightmart TF1 `bert_model.ckpt` -> our checkpoint folder."""
    file_output.check_output_dir(output_dir, overwrite, sources=[prefix])
    config = modeling.BertConfig.from_json_file(bert_config_file)
    check_vocab_size(vocab_file, config, bert_config_file)
    if os.path.isdir(prefix):  # a released folder like chinese_L-12_H-768_A-12/
        prefix = os.path.join(prefix, "bert_model.ckpt")
    if not os.path.exists(prefix + ".index"):
        raise ValueError(f"--checkpoint={prefix}: no TF1 checkpoint there (expected {prefix}.index)")
    task, num_labels = _google_task(prefix, task)
    if labels and task not in ("classifier", "ner"):
        raise ValueError(f"--labels: {prefix} holds a {task} model, which has no labels")
    if labels and num_labels and len(labels) != num_labels:
        raise ValueError(f"--labels has {len(labels)} labels, {prefix} has {num_labels} outputs")
    if task in ("classifier", "ner") and not labels:
        labels = [str(i) for i in range(num_labels)]
        logging.warning("no --labels: naming the %d labels %s", num_labels, ", ".join(labels))
    model = load_checkpoint_fully(prefix, config, task, num_labels)
    with file_output.atomic_output_dir(output_dir, overwrite, sources=[prefix]) as tmp:
        save_tf2_checkpoint(model, config, vocab_file, tmp, labels, task, do_lower_case)
    return output_dir


def tf2_to_google(checkpoint, bert_config_file, vocab_file, output_dir, task="mlm", labels=None,
                  overwrite=False, approximate_gelu=False, do_lower_case=True):
    """Our checkpoint -> Google TF1 folder: bert_model.ckpt.{index,data-*}, bert_config.json, vocab.txt.

    Tensors keep Google's names and layouts (kernels [in, out], output_weights [C, H]), so TF1-era
    code (`tf.train.init_from_checkpoint`, `load_tf_weights_in_bert`, UER's converters) reads it.
    Google's modeling.py knows only the tanh GELU ("gelu"): an erf-GELU model ("gelu_exact", e.g.
    imported from transformers) is refused unless `approximate_gelu`, which writes "gelu" and logs
    the measured difference.
    """
    file_output.check_output_dir(output_dir, overwrite, sources=[checkpoint])
    config = modeling.BertConfig.from_json_file(bert_config_file)
    check_vocab_size(vocab_file, config, bert_config_file)
    if config.hidden_act not in ("gelu", "gelu_new", "relu"):
        if not approximate_gelu:
            raise ValueError(f"{bert_config_file}: hidden_act {config.hidden_act!r} (erf GELU) has no "
                             f"name in Google's bert_config.json, whose \"gelu\" is the tanh "
                             f"approximation; pass --approximate_gelu to write it as \"gelu\"")
    model = load_checkpoint_fully(checkpoint, config, task, len(labels) if labels else None)
    if config.hidden_act not in ("gelu", "gelu_new", "relu"):
        config, diff = _approximate_gelu_config(model, config)
        logging.warning("--approximate_gelu: wrote hidden_act \"gelu\" (tanh); the encoder output "
                        "moves by up to %.2e on a random batch", diff)
    table = modeling.name_table(model)
    with file_output.atomic_output_dir(output_dir, overwrite, sources=[checkpoint]) as tmp:
        # SaveV2 writes a plain name -> tensor bundle: the TF1 Saver format, no object graph.
        tf.raw_ops.SaveV2(prefix=os.path.join(tmp, "bert_model.ckpt"),
                          tensor_names=[w.google_name for w in table],
                          shape_and_slices=[""] * len(table), tensors=[w.variable for w in table])
        model_folder.write(tmp, config=config, vocab_file=vocab_file, do_lower_case=do_lower_case,
                           task=task, labels=labels)
    return output_dir


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

EXAMPLE = "python convert_checkpoint.py --mode=hf_to_tf2 --checkpoint=chinese_roberta_hf/ --output_dir=imported/"


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Conversion", fv):
        flags.DEFINE_enum("mode", None, ["hf_to_tf2", "google_to_tf2", "tf2_to_google"], "Conversion.",
                          flag_values=fv)
        flags.DEFINE_string("checkpoint", None, "The model folder to convert, as --checkpoint means in "
                            "every script: hf_to_tf2 a HuggingFace/UER folder; google_to_tf2 a TF1 folder "
                            "or its bert_model.ckpt prefix; tf2_to_google our run folder (its latest "
                            "ckpt-N) or a ckpt-N prefix.", flag_values=fv)
        flags.DEFINE_alias("input", "checkpoint", flag_values=fv)  # its earlier name
        flags.DEFINE_string("output_dir", None, "Folder to create (written atomically).", flag_values=fv)
        flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --output_dir.", flag_values=fv)
    with train_utils.flag_group("Model (default: what the --input folder says)", fv):
        flags.DEFINE_string("bert_config_file", None, "bert_config.json (default: the folder's).",
                            flag_values=fv)
        flags.DEFINE_string("vocab_file", None, "vocab.txt (default: the folder's vocab.txt, or the "
                            "vocab in a transformers 5 tokenizer.json).", flag_values=fv)
        flags.DEFINE_enum("task", None, list(TASK_ARCHITECTURES), "Model head. hf_to_tf2: checked "
                          "against config.json; google_to_tf2: read from the tensor names (use it to "
                          "tell ner from classifier); tf2_to_google: default the folder's task, else mlm.",
                          flag_values=fv)
        flags.DEFINE_string("labels", None, "classifier/ner label names in id order, comma-separated "
                            "or a file with one per line (default: the folder's model_info.json).",
                            flag_values=fv)
        flags.DEFINE_bool("approximate_gelu", False, "tf2_to_google: write an erf-GELU model "
                          "(hidden_act gelu_exact) as Google's tanh \"gelu\" (the difference is logged).",
                          flag_values=fv)
    train_utils.require_flags("mode", "checkpoint", "output_dir")


def run(fv):
    """Runs the conversion the flags ask for; returns --output_dir."""
    if fv.mode == "hf_to_tf2":
        return hf_to_tf2(fv.checkpoint, fv.output_dir, fv.task, fv.overwrite, fv.vocab_file, parse_labels(fv.labels))
    found = model_folder.resolve(fv.checkpoint, fv.bert_config_file, fv.vocab_file, flag="--checkpoint")
    labels = parse_labels(fv.labels) or found.labels
    if fv.mode == "google_to_tf2":  # the number of labels is in the checkpoint
        return google_to_tf2(found.checkpoint, found.bert_config_file, found.vocab_file, fv.output_dir,
                             fv.task, labels, fv.overwrite, found.do_lower_case)
    task = fv.task or found.task or "mlm"
    if fv.labels:  # explicit names win over the folder's, but must fit its head
        check_labels_fit(labels, task, found.labels if task == found.task else None, fv.checkpoint)
    if task in ("classifier", "ner") and not labels:
        raise train_utils.UsageError(f"--task={task} needs --labels: {fv.checkpoint} does not list them")
    return tf2_to_google(found.checkpoint, found.bert_config_file, found.vocab_file, fv.output_dir,
                         task, labels, fv.overwrite, fv.approximate_gelu, found.do_lower_case)


def main(argv):
    del argv
    print(run(flags.FLAGS))


if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags, input_errors=(ValueError,))
