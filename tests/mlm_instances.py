"""Small masked-LM instances from real text, written with pretraining_records, for the trainer tests.

Deliberately simpler than create_pretraining_data.py (character-level random masking, no jieba,
no dupe factor), so the training tests do not depend on the data generator: they need records
that are valid, deterministic and made from real text, not the generator's exact masking.
"""

import glob
import lzma
import os
import random

import numpy as np

import tokenization


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
        "segmenter": "none (tests/mlm_instances.py)",
        "input_files": [],
    }
    meta.update(meta_overrides)
    serialized = [pretraining_records.encode_example(
        {name: ("float32" if v.dtype == np.float32 else "int64", v.tolist()) for name, v in instance.items()})
        for instance in instances]
    return pretraining_records.write_records(path, serialized, meta)
