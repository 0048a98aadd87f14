"""What several test files share: small models and folders for the interop tests, pretraining
records and runs, and file snapshots. Plain functions; the fixtures built on them are in conftest.py.
"""

import glob
import hashlib
import json
import lzma
import os
import random
import subprocess
import sys

import numpy as np
from conftest import REPO_ROOT, RESOURCES, SHARED_DATA

import convert_checkpoint
import modeling
import tokenization

# ------------------------------------------------------------------------------------------------
# Interop: tiny models with random weights, and their folders (export, conversion, fill-mask, QA)
# ------------------------------------------------------------------------------------------------

VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + list("中国的首都是北京。上海南天津我爱你他们好人大学生问题答案") + ["a", "b", "##c", "hello"])
LABELS = {"classifier": ["negative", "positive", "neutral"], "ner": ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]}


def write_vocab(folder, tokens=VOCAB):
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in tokens))
    return path


def tiny_config(hidden_act="gelu", vocab_size=None):
    vocab_size = vocab_size or len(VOCAB)
    return modeling.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=40, hidden_act=hidden_act)


def randomize(model, seed):
    """Random values for every weight (LayerNorm gammas around 1), so no tensor can be skipped."""
    rng = np.random.default_rng(seed)
    for w in modeling.name_table(model):
        value = rng.normal(0.0, 0.2, tuple(w.variable.shape))
        w.variable.assign((value + 1.0 if w.google_name.endswith("gamma") else value).astype(np.float32))
    return model


def make_checkpoint_dir(folder, task, seed=0, hidden_act="gelu"):
    """Our checkpoint folder (ckpt-1 + bert_config.json + vocab.txt [+ labels.txt]) with random weights."""
    os.makedirs(folder, exist_ok=True)
    config = tiny_config(hidden_act)
    labels = LABELS.get(task)
    model = randomize(modeling.make_task_model(config, task, len(labels) if labels else None), seed)
    vocab = write_vocab(os.path.dirname(os.path.abspath(folder)))
    convert_checkpoint.save_tf2_checkpoint(model, config, vocab, folder, labels=labels)
    return model


def padded_batch():
    """Two sequences, the second padded: ids [2, 12], mask, segments (a sentence pair in row 0)."""
    ids = np.zeros([2, 12], np.int32)
    ids[0, :10] = [2, 5, 6, 7, 4, 3, 12, 13, 14, 3]
    ids[1, :6] = [2, 21, 22, 23, 24, 3]
    mask = (ids > 0).astype(np.int32)
    segments = np.zeros_like(ids)
    segments[0, 6:10] = 1
    return ids, mask, segments


def our_logits(model, task, ids, mask, segments):
    """Our model's outputs in transformers' layout: mlm [B,S,V] (all positions), classifier [B,C],
    ner [B,S,C], qa [2,B,S]."""
    inputs = {"input_ids": ids, "input_mask": mask, "segment_ids": segments}
    if task == "mlm":
        positions = np.tile(np.arange(ids.shape[1], dtype=np.int32), [ids.shape[0], 1])
        return model(dict(inputs, masked_lm_positions=positions)).numpy()
    if task == "qa":
        return np.stack([t.numpy() for t in model(inputs)])
    return model(inputs).numpy()


def hf_logits(hf_model, task, ids, mask, segments):
    """A transformers model's outputs in the layout of `our_logits`."""
    import torch
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                       token_type_ids=torch.from_numpy(segments).long())
    if task == "qa":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()])
    return out.logits.numpy()


def leftovers(parent, name):
    """Temp folders a conversion left beside `parent/name`."""
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.")]


def run_export(*args):
    """export_to_pytorch.py's command line, as a user runs it -> CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "export_to_pytorch.py"), *args],
                          capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)


def write_tf1_checkpoint(config, prefix):
    """A name-based checkpoint as Google's TF1 code saves it (bert/..., no object graph)."""
    import tensorflow as tf

    model = modeling.build_model(modeling.BertPretrainer(config), seq_len=8)
    values = {w.google_name: w.variable.numpy() for w in modeling.name_table(model)}
    with tf.compat.v1.Graph().as_default(), tf.compat.v1.Session() as session:
        variables = [tf.compat.v1.Variable(value, name=name) for name, value in values.items()]
        session.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.train.Saver(variables).save(session, prefix, write_meta_graph=False)


# ------------------------------------------------------------------------------------------------
# Pretraining: records from real text, a tiny config, run_pretraining.py in-process
# ------------------------------------------------------------------------------------------------

SEQ, PRED = 64, 10


def pretraining_vocab_file():
    google = SHARED_DATA / "vocab" / "vocab.txt"
    return str(google if google.is_file() else RESOURCES / "vocab.txt")


def pretraining_config(vocab_size, dropout=0.0, **overrides):
    config = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=256, hidden_act="gelu", hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, max_position_embeddings=SEQ,
                  type_vocab_size=2, initializer_range=0.02)
    config.update(overrides)
    return config


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def pretraining_argv(data, output_dir, *extra, config=None):
    return [f"--input_file={data['train']}", f"--eval_input_file={data['eval']}",
            f"--output_dir={output_dir}", f"--bert_config_file={config or data['config']}",
            f"--max_seq_length={SEQ}", f"--max_predictions_per_seq={PRED}",
            "--train_batch_size=16", "--eval_batch_size=32", "--learning_rate=2e-3",
            "--num_warmup_steps=2", "--shuffle_buffer_size=200", *extra]


def pretrain(data, output_dir, *extra, config=None):
    import run_pretraining
    argv = pretraining_argv(data, output_dir, *extra, config=config)
    return run_pretraining.run(run_pretraining.parse_flags(argv))


def make_pretraining_data(root):
    """train/eval records in `root`, configs (with and without dropout) and the vocab size."""
    vocab_file = pretraining_vocab_file()
    tokenizer = tokenization.FullTokenizer(vocab_file)
    lines = corpus_sentences(str(SHARED_DATA), str(RESOURCES), max_chars=70_000)
    instances = make_instances(tokenizer, lines, SEQ, PRED, seed=1)
    assert len(instances) > 100, "too little text for the training tests"
    train, evaluation = str(root / "train.tfrecord"), str(root / "eval.tfrecord")
    write_records(train, instances[:-32], vocab_file, SEQ, PRED)
    write_records(evaluation, instances[-32:], vocab_file, SEQ, PRED)
    vocab_size = len(tokenizer.vocab)
    return {
        "root": root, "train": train, "eval": evaluation, "vocab_file": vocab_file,
        "vocab_size": vocab_size, "instances": instances,
        "config": write_json(root / "config.json", pretraining_config(vocab_size)),
        "config_dropout": write_json(root / "config_dropout.json", pretraining_config(vocab_size, dropout=0.1)),
    }


def snapshot(directory):
    """Every file under `directory` -> (size, mtime, sha256); None if it does not exist."""
    if not os.path.exists(directory):
        return None
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns,
                             hashlib.sha256(f.read()).hexdigest())
    return out


# ------------------------------------------------------------------------------------------------
# Masked-LM instances made by hand (formerly tests/mlm_instances.py)
# ------------------------------------------------------------------------------------------------
# Small masked-LM instances from real text, written with pretraining_records, for the trainer tests.
#
# Deliberately simpler than create_pretraining_data.py (character-level random masking, no jieba,
# no dupe factor), so the training tests do not depend on the data generator: they need records
# that are valid, deterministic and made from real text, not the generator's exact masking.

def corpus_sentences(shared_data_dir, resources_dir, max_chars=200_000):
    """Returns up to `max_chars` characters of real text as a list of non-empty lines.

    Prefers the shared zhwiki corpus (Google's one-sentence-per-line format), falling back to the
    small corpus in resources/ (its .txt files, the vocab excepted).
    """
    shard = os.path.join(shared_data_dir, "corpus", "zhwiki", "zhwiki_00.txt.xz")
    if os.path.isfile(shard):
        sources = [(lzma.open, shard)]
    else:
        sources = [(open, p) for p in sorted(glob.glob(os.path.join(resources_dir, "*.txt")) +
                                             glob.glob(os.path.join(resources_dir, "corpus", "*.txt")))
                   if "vocab" not in os.path.basename(p)]
        if not sources:
            raise FileNotFoundError(f"no corpus: neither {shard} nor text files in {resources_dir}")
    lines, total = [], 0
    for opener, path in sources:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    lines.append(line)
                    total += len(line)
                    if total >= max_chars:
                        return lines
    return lines


def make_instances(tokenizer, lines, max_seq_length, max_predictions_per_seq,
                   masked_lm_prob=0.15, seed=0, mask_prob=0.8, random_prob=0.1):
    """Packs tokenized lines into `[CLS] ... [SEP]` sequences and picks 15% of the tokens to predict:
    `mask_prob` of them become [MASK], `random_prob` a random token, the rest stay as they are.

    Returns a list of dicts of numpy arrays with the record features (zero padded).
    """
    rng = random.Random(seed)
    vocab = tokenizer.vocab
    cls_id, sep_id, mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
    # Random replacements from ordinary tokens only (ids after [MASK], no ## pieces, no [unused]).
    ordinary = [i for t, i in vocab.items() if i > mask_id and not t.startswith(("##", "[")) ]

    sequences, current = [], []
    budget = max_seq_length - 2
    for line in lines:
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(line))
        while ids:
            room = budget - len(current)
            current.extend(ids[:room])
            ids = ids[room:]
            if len(current) == budget:
                sequences.append(current)
                current = []
    if current:
        sequences.append(current)

    instances = []
    for body in sequences:
        tokens = [cls_id] + body + [sep_id]
        n = len(tokens)
        candidates = list(range(1, n - 1))
        rng.shuffle(candidates)
        num_to_predict = min(max_predictions_per_seq, max(1, round(len(body) * masked_lm_prob)))
        positions = sorted(candidates[:num_to_predict])
        input_ids = list(tokens)
        for p in positions:
            r = rng.random()
            if r < mask_prob:
                input_ids[p] = mask_id
            elif r < mask_prob + random_prob:
                input_ids[p] = rng.choice(ordinary)
        pad = max_seq_length - n
        pad_p = max_predictions_per_seq - len(positions)
        instances.append({
            "input_ids": np.array(input_ids + [0] * pad, np.int64),
            "input_mask": np.array([1] * n + [0] * pad, np.int64),
            "segment_ids": np.zeros(max_seq_length, np.int64),
            "masked_lm_positions": np.array(positions + [0] * pad_p, np.int64),
            "masked_lm_ids": np.array([tokens[p] for p in positions] + [0] * pad_p, np.int64),
            "masked_lm_weights": np.array([1.0] * len(positions) + [0.0] * pad_p, np.float32),
            "next_sentence_labels": np.zeros(1, np.int64),
        })
    return instances


def write_records(path, instances, vocab_file, max_seq_length, max_predictions_per_seq,
                  **meta_overrides):
    """Writes `path` and its sidecar with pretraining_records; returns the sidecar dict.

    `meta_overrides` replace sidecar fields, to build records that disagree with a config.
    """
    import pretraining_records

    meta = {
        "max_seq_length": max_seq_length,
        "max_predictions_per_seq": max_predictions_per_seq,
        "vocab_size": len(tokenization.load_vocab(vocab_file)),
        "vocab_sha256": tokenization.vocab_sha256(vocab_file),
        "do_lower_case": True,
        "do_whole_word_mask": False,
        "masked_lm_prob": 0.15,
        "segmenter": "none (tests/helpers.py)",
        "input_files": [],
    }
    meta.update(meta_overrides)
    serialized = [pretraining_records.encode_example(
        {name: ("float32" if v.dtype == np.float32 else "int64", v.tolist()) for name, v in instance.items()})
        for instance in instances]
    return pretraining_records.write_records(path, serialized, meta)


def tensorboard_scalars(output_dir):
    """TensorBoard scalars -> {name: [(step, value), ...]} (sorted by step)."""
    import tensorflow as tf
    out = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "train", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return {k: sorted(v) for k, v in out.items()}


def checkpoint_weights(checkpoint_prefix):
    """Model weights (Google names) of one of our checkpoints -> {name: array}."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(checkpoint_prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith(("bert", "cls")) and "OPTIMIZER_SLOT" not in k}


# Fine-tuning: a tiny classifier config and a pair task it learns in one epoch

TINY_CLASSIFIER = {"vocab_size": 21128, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64}


def write_text(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def classifier_config(tmp_path, **overrides):
    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps(dict(TINY_CLASSIFIER, **overrides)), encoding="utf-8")
    return str(path)


def write_pair_data(folder, n=64, seed=0):
    """A pair task a tiny random-init model learns within one epoch: label 1 iff the texts are made
    of 好 (else of 坏), with a few noise characters."""
    rng = np.random.default_rng(seed)
    chars = list("我你他天地人山水风雨花草书车")
    rows = []
    for i in range(n):
        label = i % 2
        a, b = ("".join(rng.choice(chars + ["好坏"[1 - label]] * 8, 6)) for _ in range(2))
        rows.append(f"{a}\t{b}\t{label}")
    write_text(folder, "train.txt", "\n".join(rows) + "\n")
    write_text(folder, "dev.txt", "\n".join(rows[: n // 2]) + "\n")
    write_text(folder, "test.txt", "\n".join(r.rsplit("\t", 1)[0] for r in rows[:5]) + "\n")


def generate_demo_records(path, **options):
    """Records of `create_pretraining_data.py` from the embedded corpus and vocab (seq 64, 10
    predictions, dupe 1, seed 7); `options` override any Options field (e.g. dynamic_masking=True)."""
    import create_pretraining_data as cpd
    corpus = ",".join(sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt")))
    settings = dict(input_file=corpus, output_file=str(path), vocab_file=str(RESOURCES / "vocab.txt"),
                    max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1, random_seed=7)
    settings.update(options)
    cpd.generate(cpd.Options(**settings), log=lambda line: None)
    return str(path)
