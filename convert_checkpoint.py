"""Converts BERT checkpoints between our TF2 format, HuggingFace/UER folders and Google's TF1 format.

    # HuggingFace / UER-converted folder (config.json, model.safetensors or pytorch_model.bin, vocab.txt)
    python convert_checkpoint.py --mode=hf_to_tf2 --input=chinese_roberta_hf/ --output_dir=imported/
    # Google / brightmart TF1 checkpoint -> ours (bert_config.json, vocab.txt found beside it)
    python convert_checkpoint.py --mode=google_to_tf2 --input=chinese_L-12_H-768_A-12/ --output_dir=imported/
    # ours -> Google TF1 (bert_model.ckpt.{index,data-*} + bert_config.json + vocab.txt)
    python convert_checkpoint.py --mode=tf2_to_google --input=pretrain_out/ --bert_config_file=... \
        --vocab_file=... --output_dir=google_export/

Our checkpoints are `output_dir/ckpt-N` written through `modeling.make_checkpoint`, plus
`bert_config.json` and `vocab.txt` beside them, so the output works as `--init_checkpoint=output_dir`.

Every name mapping comes from `modeling.name_table(model)`, the one table of
our variable <-> Google TF1 name <-> HuggingFace name. Outputs are written to a temporary folder
next to `--output_dir` and renamed at the end, so a failed conversion leaves nothing behind.

The safetensors reader is plain numpy (the format is an 8-byte header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then raw little-endian bytes; the writer is in
export_to_pytorch.py), so neither torch nor the safetensors package is needed, and tensors are read
one at a time to keep peak memory near one model. pytorch_model.bin needs torch.

Google folders also work without converting: --init_checkpoint reads bert_model.ckpt directly.
A pooler present in the source but absent from our model (MLM, NER, QA) is kept in the converted
checkpoint under its Google name, so a classifier initialised from it gets the pretrained pooler.
"""

import contextlib
import json
import os
import shutil
import struct
import tempfile

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import model_folder
import modeling
import train_utils

TASK_ARCHITECTURES = model_folder.TASK_ARCHITECTURES
ARCHITECTURE_TASKS = model_folder.ARCHITECTURE_TASKS

# ----------------------------------------------------------------------------------------------
# Output folders: write to a temp dir, rename at the end.
# ----------------------------------------------------------------------------------------------


def check_output_dir(output_dir, overwrite=False):
    """Fails early (before any work) if `output_dir` holds something and `overwrite` is off."""
    if os.path.exists(output_dir) and not overwrite:
        if not os.path.isdir(output_dir) or os.listdir(output_dir):
            raise ValueError(f"--output_dir {output_dir} already exists and is not empty; "
                             f"pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(output_dir, overwrite=False):
    """Yields a temp folder beside `output_dir`; on success it becomes `output_dir`.

    On any exception the temp folder is removed, so a failed run leaves no partial output. With
    `overwrite`, an existing `output_dir` is replaced only after the new one is complete.
    """
    output_dir = os.path.abspath(output_dir)
    check_output_dir(output_dir, overwrite)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.tmp-")
    try:
        yield tmp
        old = None
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.old-")
            os.rename(output_dir, os.path.join(old, "x"))
        os.rename(tmp, output_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    """A HuggingFace or UER-converted BERT folder: config.json, vocab.txt and weights.

    Weights: model.safetensors, pytorch_model.bin, or their sharded `*.index.json` forms.
    Attributes: path, config_path, hf_config (dict), bert_config (dict of Google fields),
    vocab_file, weights_path (the weights file or index), task (mlm|classifier|ner|qa),
    labels (list or None).
    """

    def __init__(self, path):
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
        self.labels = None
        if self.task in ("classifier", "ner"):
            id2label = self.hf_config.get("id2label") or {}
            n = self.hf_config.get("num_labels", len(id2label) or 2)
            self.labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
        self.vocab_file = os.path.join(path, "vocab.txt")
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
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{index}: not a valid weight index ({e})") from None
                for shard in sorted(set(weight_map.values())):
                    files[os.path.join(self.path, shard)] = reader_cls(os.path.join(self.path, shard))
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

# The pooler is trained by Google's/UER's pretraining (NSP/SOP) but absent from our MLM, NER and QA
# models; when a source has it we carry it in the checkpoint under its Google name, so that a
# classifier initialised from the converted checkpoint gets it, as from the original.
POOLER = {"bert/pooler/dense/kernel": "bert.pooler.dense.weight",
          "bert/pooler/dense/bias": "bert.pooler.dense.bias"}


def build_task_model(config, task, num_labels=None):
    """A built (variables created) model for task mlm | classifier | ner | qa."""
    if task in ("classifier", "ner") and not num_labels:
        raise ValueError(f"--task={task} needs the label set (--labels)")
    model = {"mlm": lambda: modeling.BertPretrainer(config),
             "classifier": lambda: modeling.BertClassifier(config, num_labels),
             "ner": lambda: modeling.BertTokenClassifier(config, num_labels),
             "qa": lambda: modeling.BertSpanQA(config)}[task]()
    return modeling.build_model(model)


def save_tf2_checkpoint(model, config, vocab_file, output_dir, extra_weights=None, labels=None):
    """Writes output_dir/ckpt-1 (Google-named weights) + bert_config.json + vocab.txt [+ labels.txt].

    extra_weights: {google_name: np.ndarray} saved beside the model's weights (the pooler of an
    MLM import), restored by modeling.load_pretrained into any model that has them.
    """
    extras = {name: tf.Variable(value, trainable=False) for name, value in (extra_weights or {}).items()}
    checkpoint = modeling.make_checkpoint(model, **extras)
    # Relative paths in the `checkpoint` state file, so the folder can be renamed and moved.
    tf.train.CheckpointManager(checkpoint, output_dir, max_to_keep=1).save(checkpoint_number=1)
    config.to_json_file(os.path.join(output_dir, "bert_config.json"))
    shutil.copyfile(vocab_file, os.path.join(output_dir, "vocab.txt"))
    if labels:
        with open(os.path.join(output_dir, "labels.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{label}\n" for label in labels))


def _read_extra_weights(path, names_and_shapes):
    """Reads weights the model does not hold (the pooler) from our TF2 or a TF1 checkpoint."""
    if os.path.isdir(path):  # as modeling.load_pretrained: the latest ckpt-N, else bert_model.ckpt
        prefix = tf.train.latest_checkpoint(path) or os.path.join(path, "bert_model.ckpt")
    else:
        prefix = path
    reader = tf.train.load_checkpoint(prefix)
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in reader.get_variable_to_shape_map():
        return {name: reader.get_tensor(name) for name in names_and_shapes}
    holders = {name: tf.Variable(tf.zeros(shape)) for name, shape in names_and_shapes.items()}
    tf.train.Checkpoint(**holders).read(prefix).expect_partial().assert_existing_objects_matched()
    return {name: v.numpy() for name, v in holders.items()}


def load_checkpoint_fully(path, config, task, num_labels=None):
    """Builds the `task` model and restores every weight from our or a TF1 checkpoint.

    Returns (model, extra_weights) where extra_weights holds a pooler the model lacks. Unlike
    modeling.load_pretrained (which may initialise heads afresh for fine-tuning), an exporter must
    not write random weights, so any weight absent from the checkpoint is an error naming it.
    """
    model = build_task_model(config, task, num_labels)
    report = modeling.load_pretrained(model, path)
    if report.newly_initialized:
        raise ValueError(f"{path}: has no value for {', '.join(report.newly_initialized)}; "
                         f"is it a --task={task} checkpoint?")
    extras = {}
    if set(POOLER) <= set(report.unused):
        h = config.hidden_size
        extras = _read_extra_weights(path, {"bert/pooler/dense/kernel": (h, h),
                                            "bert/pooler/dense/bias": (h,)})
    return model, extras


def _assign(weight, value, source, name):
    """Copies `value` (Google layout) into the model variable, checking the shape."""
    if tuple(value.shape) != tuple(weight.variable.shape):
        raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)}, but the config "
                         f"implies {tuple(weight.variable.shape)} for {weight.google_name}")
    weight.variable.assign(value.astype(np.float32, copy=False))


def assign_from_hf(model, folder):
    """Copies the tensors of an HFFolder into a built model; returns (extra_weights, unused names).

    A tensor the model needs and the folder lacks raises ValueError naming the weights file and the
    tensor. Only a folder that declares no head at all (architecture BertModel) may lack the MLM head,
    which then keeps its fresh initialisation (logged).
    """
    headless = (folder.hf_config.get("architectures") or ["BertModel"])[0] == "BertModel"
    table = modeling.name_table(model)
    used, fresh = set(), []
    for w in table:
        name = w.hf_name
        if name == "cls.predictions.bias" and "cls.predictions.decoder.bias" in folder:
            # transformers computes the logits with the decoder's own bias when a file has one.
            name = "cls.predictions.decoder.bias"
            used.add("cls.predictions.bias")
        if name not in folder:
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
    extras = {}
    if all(hf in folder for hf in POOLER.values()) and not any(w.hf_name in POOLER.values() for w in table):
        extras = {"bert/pooler/dense/kernel": folder.get(POOLER["bert/pooler/dense/kernel"]).T,
                  "bert/pooler/dense/bias": folder.get(POOLER["bert/pooler/dense/bias"])}
        used.update(POOLER.values())
    if fresh:
        logging.warning("%s declares no MLM head; left at random init: %s", folder.path, ", ".join(fresh))
    unused = sorted(set(folder.names()) - used)
    if unused:
        logging.info("Not used (no such weight in our %s model): %s", folder.task, ", ".join(unused))
    return extras, unused


# ----------------------------------------------------------------------------------------------
# The three conversions
# ----------------------------------------------------------------------------------------------


def hf_to_tf2(input_dir, output_dir, task=None, overwrite=False):
    """HuggingFace/UER folder -> our checkpoint folder (usable as --init_checkpoint)."""
    check_output_dir(output_dir, overwrite)
    folder = HFFolder(input_dir)
    config = modeling.BertConfig.from_dict(folder.bert_config, source=folder.config_path)
    if task and task != folder.task:
        raise ValueError(f"{folder.config_path}: holds a {folder.task} model "
                         f"({folder.hf_config.get('architectures')}), not --task={task}")
    task, labels = folder.task, folder.labels
    model = build_task_model(config, task, len(labels) if labels else None)
    extras, _ = assign_from_hf(model, folder)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        save_tf2_checkpoint(model, config, folder.vocab_file, tmp, extras, labels)
    logging.info("Wrote %s (%s, %d tensors)", output_dir, task, len(modeling.name_table(model)) + len(extras))
    return output_dir


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
                  overwrite=False):
    """Google/brightmart TF1 `bert_model.ckpt` -> our checkpoint folder."""
    check_output_dir(output_dir, overwrite)
    config = modeling.BertConfig.from_json_file(bert_config_file)
    check_vocab_size(vocab_file, config, bert_config_file)
    if os.path.isdir(prefix):  # a released folder like chinese_L-12_H-768_A-12/
        prefix = os.path.join(prefix, "bert_model.ckpt")
    if not os.path.exists(prefix + ".index"):
        raise ValueError(f"--input={prefix}: no TF1 checkpoint there (expected {prefix}.index)")
    task, num_labels = _google_task(prefix, task)
    if labels and num_labels and len(labels) != num_labels:
        raise ValueError(f"--labels has {len(labels)} labels, {prefix} has {num_labels} outputs")
    model, extras = load_checkpoint_fully(prefix, config, task, num_labels)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        save_tf2_checkpoint(model, config, vocab_file, tmp, extras, labels)
    return output_dir


def tf2_to_google(checkpoint, bert_config_file, vocab_file, output_dir, task="mlm", labels=None,
                  overwrite=False):
    """Our checkpoint -> Google TF1 folder: bert_model.ckpt.{index,data-*}, bert_config.json, vocab.txt.

    Tensors keep Google's names and layouts (kernels [in, out], output_weights [C, H]), so TF1-era
    code (`tf.train.init_from_checkpoint`, `load_tf_weights_in_bert`, UER's converters) reads it.
    """
    check_output_dir(output_dir, overwrite)
    config = modeling.BertConfig.from_json_file(bert_config_file)
    check_vocab_size(vocab_file, config, bert_config_file)
    model, extras = load_checkpoint_fully(checkpoint, config, task, len(labels) if labels else None)
    names = [w.google_name for w in modeling.name_table(model)] + list(extras)
    values = [w.variable for w in modeling.name_table(model)] + [tf.constant(v) for v in extras.values()]
    with atomic_output_dir(output_dir, overwrite) as tmp:
        # SaveV2 writes a plain name -> tensor bundle: the TF1 Saver format, no object graph.
        tf.raw_ops.SaveV2(prefix=os.path.join(tmp, "bert_model.ckpt"), tensor_names=names,
                          shape_and_slices=[""] * len(names), tensors=values)
        config.to_json_file(os.path.join(tmp, "bert_config.json"))
        shutil.copyfile(vocab_file, os.path.join(tmp, "vocab.txt"))
    return output_dir


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
    with train_utils.flag_group("Conversion"):
        flags.DEFINE_enum("mode", None, ["hf_to_tf2", "google_to_tf2", "tf2_to_google"], "Conversion.")
        flags.DEFINE_string("input", None, "hf_to_tf2: a HuggingFace/UER folder; google_to_tf2: a TF1 "
                            "prefix (.../bert_model.ckpt) or its folder; tf2_to_google: our checkpoint dir or prefix.")
        flags.DEFINE_string("output_dir", None, "Folder to create (written atomically).")
        flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --output_dir.")
    with train_utils.flag_group("Model (default: files beside --input)"):
        flags.DEFINE_string("bert_config_file", None, "bert_config.json (default: beside --input).")
        flags.DEFINE_string("vocab_file", None, "vocab.txt (default: beside --input).")
        flags.DEFINE_enum("task", None, list(TASK_ARCHITECTURES), "Model head. hf_to_tf2: checked "
                          "against config.json; google_to_tf2: read from the tensor names (use it to "
                          "tell ner from classifier); tf2_to_google: default mlm.")
        flags.DEFINE_string("labels", None, "classifier/ner label names in id order, comma-separated "
                            "or a file with one per line; written to labels.txt on import. "
                            "tf2_to_google default: labels.txt beside --input.")
    train_utils.require_flags("mode", "input", "output_dir")


def beside(path, name, flag):
    """`name` in the folder of checkpoint `path` (a folder or a prefix); UsageError if absent."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(folder, name)
    if not os.path.isfile(candidate):
        raise app.UsageError(f"--{flag} is needed: no {name} beside {path}")
    return candidate


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if FLAGS.mode == "hf_to_tf2":
            hf_to_tf2(FLAGS.input, FLAGS.output_dir, FLAGS.task, FLAGS.overwrite)
        else:
            config = FLAGS.bert_config_file or beside(FLAGS.input, "bert_config.json", "bert_config_file")
            vocab = FLAGS.vocab_file or beside(FLAGS.input, "vocab.txt", "vocab_file")
            labels = parse_labels(FLAGS.labels)
            if FLAGS.mode == "google_to_tf2":  # the number of labels is in the checkpoint
                google_to_tf2(FLAGS.input, config, vocab, FLAGS.output_dir, FLAGS.task, labels,
                              FLAGS.overwrite)
            else:
                if not labels and FLAGS.task in ("classifier", "ner"):
                    labels = parse_labels(beside(FLAGS.input, "labels.txt", "labels"))
                tf2_to_google(FLAGS.input, config, vocab, FLAGS.output_dir, FLAGS.task or "mlm",
                              labels, FLAGS.overwrite)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    train_utils.run_script(main, __doc__, "python convert_checkpoint.py --mode=hf_to_tf2 "
                           "--input=chinese_roberta_hf/ --output_dir=imported/")
