"""Exports one of our checkpoints as a HuggingFace transformers (PyTorch) BERT folder.

    python export_to_pytorch.py --checkpoint=out/lcqmc/best --output_dir=hf_lcqmc/

--checkpoint is a model folder (model_folder.py): its bert_config.json, vocab.txt, lower-casing,
task and labels are read from it; --bert_config_file, --vocab_file, --task, --labels and
--do_lower_case override them. The output folder holds `config.json` (model_type bert, the task's
`architectures`, id2label/label2id, the hidden_act that computes our GELU), `model.safetensors`
(written with numpy: torch is not needed), `vocab.txt`, `tokenizer_config.json` and
`special_tokens_map.json`, so that offline

    transformers.pipeline("fill-mask" | "text-classification" | "token-classification", model="hf_lcqmc/")

runs and gives our logits (transformers 4.x also has "question-answering"; transformers 5 removed
that pipeline: use `AutoModelForQuestionAnswering`, or `answer_question.py` here, on a --task=qa export).

Every export carries the model's pooler (`bert.pooler.dense.*`, which keras-hub's BertBackbone and
transformers' BertModel need): trained for a classifier, inherited unchanged from the init checkpoint
otherwise (Google's checkpoints carry a trained one), and for a model pretrained here (MLM only, no
loss reaches it) an initialised, untrained one. transformers 5's BertForMaskedLM, ...ForTokenClassification
and ...ForQuestionAnswering have no pooler and, unlike transformers 4, list it as UNEXPECTED in a
load report (a logging warning; `transformers.logging.set_verbosity_error()` hides it); the weights
load the same. No layout avoids it: keras-hub reads the pooler under exactly that name from the
same files (it follows model.safetensors.index.json when there is one, transformers prefers a lone
model.safetensors), so leaving it out of what transformers reads would leave AutoModel/BertModel
with a random pooler. `--pytorch_bin` also writes `pytorch_model.bin`
(needs torch) as transformers 4 writes it: with the tied MLM decoder keys
`cls.predictions.decoder.weight` (= the word embeddings) and `cls.predictions.decoder.bias`
(= `cls.predictions.bias`), which UER-py's converter reads.
"""

import json
import os
import shutil
import struct

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import numpy as np
from absl import flags, logging

import convert_checkpoint
import file_output
import model_folder
import modeling
import tokenization

# safetensors dtype codes of the numpy dtypes we write.
_NP_TO_ST = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64",
             np.dtype("int32"): "I32"}


def write_safetensors(path, tensors, metadata=None):
    """Writes a safetensors file, pulling one tensor at a time.

    The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} (+ "__metadata__"), then the tensors' raw little-endian bytes back to back.

    Args:
      path: output file.
      tensors: list of (name, shape, numpy dtype, fetch) with fetch() -> np.ndarray of that shape;
        each fetch is called once while writing, so at most one extra tensor is in memory.
      metadata: str -> str dict for "__metadata__" (transformers expects {"format": "pt"}).
    """
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NP_TO_ST[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, fetch in tensors:
            array = np.ascontiguousarray(fetch(), dtype=np.dtype(dtype).newbyteorder("<"))
            if array.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name} has shape {array.shape}, header says {shape}")
            f.write(array.data)


def hf_config_dict(config, task, labels=None, pad_token_id=0):
    """config.json for transformers' BERT class of `task`, computing what our model computes.

    Args:
      config: a modeling.BertConfig.
      task: mlm | classifier | ner | qa.
      labels: label names in id order (classifier, ner).
    """
    hf = {
        "architectures": [model_folder.TASK_ARCHITECTURES[task]],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        # Our "gelu" is Google's tanh approximation = HF "gelu_new"; HF "gelu" is exact erf.
        "hidden_act": modeling.HF_HIDDEN_ACT[config.hidden_act],
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": modeling.LAYER_NORM_EPS,
        "position_embedding_type": "absolute",
        "pad_token_id": pad_token_id,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    if labels:
        hf["id2label"] = {str(i): label for i, label in enumerate(labels)}
        hf["label2id"] = {label: i for i, label in enumerate(labels)}
    return hf


def write_tokenizer_files(vocab_file, output_dir, do_lower_case, model_max_length):
    """vocab.txt + tokenizer_config.json + special_tokens_map.json for transformers' BertTokenizer.

    transformers 5's BertTokenizer writes no vocab.txt from save_pretrained, so we copy ours; it
    builds the same WordPiece tokenizer as tokenization.FullTokenizer from it.
    """
    shutil.copyfile(vocab_file, os.path.join(output_dir, "vocab.txt"))
    special = {"unk_token": tokenization.UNK, "sep_token": tokenization.SEP,
               "pad_token": tokenization.PAD, "cls_token": tokenization.CLS,
               "mask_token": tokenization.MASK}
    tokenizer_config = dict(special, tokenizer_class="BertTokenizer", do_lower_case=do_lower_case,
                            tokenize_chinese_chars=True, strip_accents=None,
                            model_max_length=model_max_length)
    for name, content in (("tokenizer_config.json", tokenizer_config),
                          ("special_tokens_map.json", special)):
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)


def hf_tensors(model):
    """[(hf_name, shape, dtype, fetch)] of `model` in transformers' names and layouts, sorted."""
    entries = []
    for w in modeling.name_table(model):
        shape = tuple(w.variable.shape)[::-1] if w.transpose else tuple(w.variable.shape)

        def fetch(w=w):
            value = w.variable.numpy()                 # Google layout, e.g. kernel [in, out]
            return value.T if w.transpose else value   # torch Linear weight [out, in]

        entries.append((w.hf_name, shape, np.float32, fetch))
    return sorted(entries)


def export_model(model, task, vocab_file, output_dir, labels=None, do_lower_case=True,
                 pytorch_bin=False, overwrite=False, sources=()):
    """Writes the HF folder for a built, loaded `model` (see the module docstring).

    sources: paths the export must not replace (the checkpoint it came from).
    """
    config = model.config
    convert_checkpoint.check_vocab_size(vocab_file, config, "the bert config")
    if task in ("classifier", "ner") and len(labels or ()) != model.num_labels:
        raise ValueError(f"--labels has {len(labels or ())} labels, the model has {model.num_labels}")
    vocab = tokenization.load_vocab(vocab_file)
    entries = hf_tensors(model)
    with file_output.atomic_output_dir(output_dir, overwrite, sources) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_dict(config, task, labels, vocab.get(tokenization.PAD, 0)), f,
                      indent=2, ensure_ascii=False)
        write_safetensors(os.path.join(tmp, "model.safetensors"), entries, {"format": "pt"})
        if pytorch_bin:
            write_pytorch_bin(os.path.join(tmp, "pytorch_model.bin"), entries)
        write_tokenizer_files(vocab_file, tmp, do_lower_case, config.max_position_embeddings)
    logging.info("Wrote %s: %d tensors, %s", output_dir, len(entries), task)
    return output_dir


# The tied MLM decoder: transformers 4's save_pretrained(safe_serialization=False) writes these keys
# as views of the tensors they are tied to (stored once); safetensors files leave them out.
TIED_DECODER = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}


def write_pytorch_bin(path, entries):
    """torch.save of the state dict, with the tied decoder keys when there is an MLM head."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError("--pytorch_bin needs torch (pip install torch==2.13.0)") from None
    state = {name: torch.from_numpy(np.ascontiguousarray(fetch())) for name, _, _, fetch in entries}
    for tied, source in TIED_DECODER.items():
        if "cls.predictions.bias" in state:
            state[tied] = state[source]  # the same tensor: torch.save stores it once
    torch.save(dict(sorted(state.items())), path)


def export_checkpoint(checkpoint, bert_config_file, vocab_file, output_dir, task="mlm",
                      labels=None, do_lower_case=True, pytorch_bin=False, overwrite=False):
    """Loads our (or a TF1) checkpoint fully for `task` and exports it; returns output_dir."""
    file_output.check_output_dir(output_dir, overwrite, sources=[checkpoint])
    config = modeling.BertConfig.from_json_file(bert_config_file)
    convert_checkpoint.check_vocab_size(vocab_file, config, bert_config_file)
    if task in ("classifier", "ner") and not labels:
        raise ValueError(f"--task={task} needs --labels (the label names in id order)")
    model = convert_checkpoint.load_checkpoint_fully(
        checkpoint, config, task, len(labels) if labels else None)
    return export_model(model, task, vocab_file, output_dir, labels, do_lower_case, pytorch_bin,
                        overwrite, sources=[checkpoint, os.path.dirname(checkpoint)])


EXAMPLE = "python export_to_pytorch.py --checkpoint=demo_output/pretrain --output_dir=/tmp/hf_mlm"


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Checkpoint to export", fv):
        flags.DEFINE_string("checkpoint", None, "A model folder (ours: its latest ckpt-N; Google's: "
                            "bert_model.ckpt) or a checkpoint prefix like out/ckpt-1000.", flag_values=fv)
        flags.DEFINE_string("bert_config_file", None, "bert_config.json (default: the folder's).",
                            flag_values=fv)
        flags.DEFINE_string("vocab_file", None, "vocab.txt (default: the folder's).", flag_values=fv)
    with train_utils.flag_group("Task head", fv):
        flags.DEFINE_enum("task", None, list(model_folder.TASK_ARCHITECTURES),
                          "Head to export: mlm (fill-mask), classifier (text-classification), "
                          "ner (token-classification), qa (question answering) (default: the "
                          "folder's task, else mlm).", flag_values=fv)
        flags.DEFINE_string("labels", None, "classifier/ner: label names in id order, comma-separated "
                            "or a file with one per line (default: the folder's).", flag_values=fv)
    with train_utils.flag_group("Output", fv):
        flags.DEFINE_string("output_dir", None, "HuggingFace folder to create (written atomically).",
                            flag_values=fv)
        flags.DEFINE_bool("do_lower_case", None, "Written to tokenizer_config.json (default: the "
                          "folder's setting, else true).", flag_values=fv)
        flags.DEFINE_bool("pytorch_bin", False, "Also write pytorch_model.bin (needs torch).", flag_values=fv)
        flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --output_dir.", flag_values=fv)
    train_utils.require_flags("checkpoint", "output_dir")


def run(fv):
    found = model_folder.resolve(fv.checkpoint, fv.bert_config_file, fv.vocab_file, flag="--checkpoint")
    if found.kind == "hf":
        raise train_utils.UsageError(f"--checkpoint={fv.checkpoint} is already a HuggingFace folder")
    if fv.task and found.task and fv.task != found.task:  # the other heads are not in the checkpoint
        raise train_utils.UsageError(f"--task={fv.task}, but {fv.checkpoint} holds a {found.task} model "
                                     f"(model_info.json); drop --task or give a {fv.task} model")
    task = fv.task or found.task or "mlm"
    labels = convert_checkpoint.parse_labels(fv.labels) or found.labels
    if task in ("classifier", "ner") and not labels:
        raise train_utils.UsageError(f"--task={task} needs --labels: {fv.checkpoint} does not list them")
    do_lower_case = found.do_lower_case if fv.do_lower_case is None else fv.do_lower_case
    return export_checkpoint(found.checkpoint, found.bert_config_file, found.vocab_file, fv.output_dir,
                             task, labels, do_lower_case, fv.pytorch_bin, fv.overwrite)


def main(argv):
    del argv
    print(run(flags.FLAGS))


if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags, input_errors=(ValueError,))
