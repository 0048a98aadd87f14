"""Checks that keras-hub loads our HuggingFace exports, and how close its tokenizer is to ours.

keras-hub is not a dependency of this project (it pulls tensorflow-text); run this in a virtualenv
that sees the system packages, so nothing they hold changes:

    python3 -m venv --system-site-packages /tmp/khvenv && /tmp/khvenv/bin/pip install keras-hub
    /tmp/khvenv/bin/python benchmarks/check_keras_hub.py [--vocab_file=../shared/data/vocab/vocab.txt \
        --text_file=../shared/data/lcqmc/dev.tsv]

1. For each head (mlm, classifier, ner, qa) a tiny model with random weights (tanh GELU, Google's
   and keras-hub's activation) is exported with export_to_pytorch.export_model, loaded with
   `keras_hub.models.BertBackbone.from_preset(<folder>)`, and its sequence and pooled outputs are
   compared with ours on a padded batch (max |difference| printed; the check wants <= 1e-5).
2. With --vocab_file and --text_file: `keras_hub.models.BertTokenizer(vocabulary=...)` against
   tokenization.FullTokenizer(do_lower_case=True) (Google's tokenizer) on each line's first field
   (first 2,000 lines), for lowercase=True, lowercase=False, and lowercase=False on text already
   lower-cased with str.lower(): the share of lines with identical ids and a first difference.
Prints one line per check; exits 1 if an export does not load or differs by more than 1e-5.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras_hub  # noqa: E402  (not a project dependency: see the docstring)

import export_to_pytorch  # noqa: E402
import modeling  # noqa: E402
import tokenization  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("中国的首都是北京上海天津我爱你他们好人大学生") + ["a", "##b"]


def check_exports(work):
    vocab = os.path.join(work, "vocab.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    config = modeling.BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=40,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rng = np.random.default_rng(0)
    ids = np.zeros([2, 12], np.int32)
    ids[0, :10] = [2, 5, 6, 7, 8, 3, 12, 13, 14, 3]
    ids[1, :6] = [2, 21, 22, 23, 24, 3]
    mask, segments = (ids > 0).astype(np.int32), np.zeros_like(ids)
    segments[0, 6:10] = 1
    worst = 0.0
    for task in ("mlm", "classifier", "ner", "qa"):
        labels = ["a", "b", "c"] if task in ("classifier", "ner") else None
        model = modeling.make_task_model(config, task, len(labels) if labels else None)
        for w in modeling.name_table(model):
            w.variable.assign(rng.normal(0, 0.2, tuple(w.variable.shape)).astype(np.float32)
                              + (1.0 if w.google_name.endswith("gamma") else 0.0))
        folder = export_to_pytorch.export_model(model, task, vocab, os.path.join(work, f"hf_{task}"), labels)
        backbone = keras_hub.models.BertBackbone.from_preset(folder)
        theirs = backbone({"token_ids": ids, "padding_mask": mask, "segment_ids": segments})
        ours = model.bert({"input_ids": ids, "input_mask": mask, "segment_ids": segments})
        real = mask.astype(bool)
        seq = float(np.abs(np.asarray(theirs["sequence_output"])[real] - ours["sequence_output"].numpy()[real]).max())
        pooled = float(np.abs(np.asarray(theirs["pooled_output"]) - ours["pooled_output"].numpy()).max())
        worst = max(worst, seq, pooled)
        print(f"keras-hub {keras_hub.__version__} BertBackbone.from_preset({task} export): loads; max |diff| "
              f"sequence_output {seq:.2e}, pooled_output {pooled:.2e}")
    return worst


def check_tokenizer(vocab_file, text_file, limit=2000):
    """Share of lines whose ids equal ours, for three keras-hub settings (see the module docstring)."""
    ours = tokenization.FullTokenizer(vocab_file, do_lower_case=True)
    with open(text_file, encoding="utf-8") as f:
        texts = [t for t in (line.rstrip("\n").split("\t")[0] for line in f) if t][:limit]
    expected = [ours.convert_tokens_to_ids(ours.tokenize(t)) for t in texts]
    settings = [("lowercase=True", True, False), ("lowercase=False", False, False),
                ("lowercase=False on str.lower() text", False, True)]
    for name, lowercase, lower_first in settings:
        theirs = keras_hub.models.BertTokenizer(vocabulary=vocab_file, lowercase=lowercase)
        same, first = 0, None
        for text, ids in zip(texts, expected):
            got = [int(i) for i in np.asarray(theirs(text.lower() if lower_first else text))]
            same += got == ids
            if got != ids and first is None:
                at = next((i for i, (a, b) in enumerate(zip(ids, got)) if a != b), min(len(ids), len(got)))
                first = (f"; e.g. {text[:24]!r}: ours {ours.convert_ids_to_tokens(ids[at:at + 1])} "
                         f"keras-hub {[theirs.id_to_token(i) for i in got[at:at + 1]]}")
        print(f"keras-hub BertTokenizer({name}) vs ours (do_lower_case=True), {len(texts)} lines of "
              f"{os.path.basename(text_file)}: {same}/{len(texts)} identical ({100.0 * same / len(texts):.2f}%)"
              f"{first or ''}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_file")
    parser.add_argument("--text_file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        worst = check_exports(work)
    if args.vocab_file and args.text_file:
        check_tokenizer(args.vocab_file, args.text_file)
    if worst > 1e-5:
        print(f"FAIL: keras-hub's outputs differ from ours by {worst:.2e} > 1e-5")
        sys.exit(1)


if __name__ == "__main__":
    main()
