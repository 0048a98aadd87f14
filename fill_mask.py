"""Fills [MASK] tokens with a masked language model and prints the best candidates.

    python fill_mask.py --checkpoint=pretrain_out/ --bert_config_file=bert_config.json \
        --vocab_file=vocab.txt --top_k=5 "中国的首都是[MASK]京。"
    北	0.9731
    南	0.0102
    ...

For each run of [MASK]s, one line per candidate, `token<TAB>score`, best first; runs are separated
by a blank line (also across several input texts). A run of k [MASK]s in a row is filled with a
whole k-token word ("[MASK][MASK]" -> "北京"): a left-to-right beam search of width top_k that puts
each chosen token into the input before predicting the next, scoring a word by the product of its
tokens' conditional probabilities. Special tokens are never proposed inside such a word. A single
[MASK] gets the plain softmax over the vocabulary, as transformers' fill-mask pipeline does.

--checkpoint: one of our checkpoints (a folder means its latest ckpt-N, a prefix like out/ckpt-500),
an imported one (convert_checkpoint.py), a Google TF1 bert_model.ckpt, or a HuggingFace folder.
"""

import os
import sys

import numpy as np
import tensorflow as tf
from absl import flags

import convert_checkpoint
import modeling
import tokenization
import train_utils


def load_masked_lm(checkpoint, bert_config_file=None, vocab_file=None, do_lower_case=True):
    """Returns (BertPretrainer with every weight restored, FullTokenizer).

    bert_config_file / vocab_file default to the files beside the checkpoint. A HuggingFace folder
    (config.json + weights, no ckpt) is read directly.
    """
    if os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "config.json")) \
            and not tf.train.latest_checkpoint(checkpoint):
        folder = convert_checkpoint.HFFolder(checkpoint)
        if (folder.hf_config.get("architectures") or ["BertModel"])[0] == "BertModel":
            raise ValueError(f"{folder.config_path}: a BertModel folder has no masked-LM head")
        config = modeling.BertConfig.from_dict(folder.bert_config, source=folder.config_path)
        model = convert_checkpoint.build_task_model(config, "mlm")
        convert_checkpoint.assign_from_hf(model, folder)
        return model, tokenization.FullTokenizer(vocab_file or folder.vocab_file, do_lower_case)
    bert_config_file = bert_config_file or convert_checkpoint.beside(
        checkpoint, "bert_config.json", "bert_config_file")
    vocab_file = vocab_file or convert_checkpoint.beside(checkpoint, "vocab.txt", "vocab_file")
    config = modeling.BertConfig.from_json_file(bert_config_file)
    convert_checkpoint.check_vocab_size(vocab_file, config, bert_config_file)
    model, _ = convert_checkpoint.load_checkpoint_fully(checkpoint, config, "mlm")
    return model, tokenization.FullTokenizer(vocab_file, do_lower_case)


def encode(tokenizer, text, max_seq_length):
    """Tokenizes `text`, keeping each literal "[MASK]" as one mask token.

    Returns (tokens with [CLS]/[SEP], runs) where runs lists (first position, length) of each
    maximal run of consecutive [MASK] tokens.
    """
    tokens = [tokenization.CLS]
    for i, piece in enumerate(text.split(tokenization.MASK)):
        if i:
            tokens.append(tokenization.MASK)
        tokens += tokenizer.tokenize(piece)
    tokens.append(tokenization.SEP)
    if len(tokens) > max_seq_length:
        raise ValueError(f"{len(tokens)} tokens (with [CLS]/[SEP]) exceed max_position_embeddings "
                         f"{max_seq_length}: {text[:40]}...")
    runs = []
    for pos, token in enumerate(tokens):
        if token == tokenization.MASK:
            if runs and runs[-1][0] + runs[-1][1] == pos:
                runs[-1][1] += 1
            else:
                runs.append([pos, 1])
    if not runs:
        raise ValueError(f"no {tokenization.MASK} in: {text}")
    return tokens, [tuple(r) for r in runs]


def mask_log_probs(model, input_ids, position):
    """input_ids [B, S] int -> log-probabilities [B, V] of the token at `position`."""
    batch = np.asarray(input_ids, np.int32)
    logits = model({
        "input_ids": tf.constant(batch),
        "input_mask": tf.ones_like(batch),
        "segment_ids": tf.zeros_like(batch),
        "masked_lm_positions": tf.fill([batch.shape[0], 1], position),
    }, training=False)                                            # [B, 1, V]
    return tf.nn.log_softmax(logits[:, 0], axis=-1).numpy()       # [B, V]


def join_pieces(pieces):
    """WordPiece tokens -> text: "##" continues a word; CJK characters join without spaces."""
    text = ""
    for piece in pieces:
        if piece.startswith("##"):
            text += piece[2:]
        elif text and text[-1].isascii() and text[-1].isalnum() and piece[0].isascii() and piece[0].isalnum():
            text += " " + piece
        else:
            text += piece
    return text


def fill_masks(model, tokenizer, text, top_k=5):
    """For each run of [MASK]s in `text`: [(word, probability)] * top_k, best first."""
    tokens, runs = encode(tokenizer, text, model.config.max_position_embeddings)
    ids = np.array(tokenizer.convert_tokens_to_ids(tokens), np.int32)
    vocab_size = model.config.vocab_size
    banned = [tokenizer.vocab[t] for t in tokenization.SPECIAL_TOKENS if t in tokenizer.vocab]
    results = []
    for start, length in runs:
        beams = [((), 0.0)]  # (token ids so far, sum of log-probabilities)
        for step in range(length):
            batch = np.repeat(ids[np.newaxis], len(beams), axis=0)    # [beams, S]
            for b, (chosen, _) in enumerate(beams):
                batch[b, start:start + step] = chosen
            log_probs = mask_log_probs(model, batch, start + step)    # [beams, V]
            if length > 1:
                log_probs[:, banned] = -np.inf
            scores = (np.array([s for _, s in beams])[:, np.newaxis] + log_probs).ravel()
            best = np.argsort(-scores, kind="stable")[:top_k]
            beams = [(beams[i // vocab_size][0] + (int(i % vocab_size),), float(scores[i]))
                     for i in best]
        results.append([(join_pieces(tokenizer.convert_ids_to_tokens(list(chosen))), float(np.exp(s)))
                        for chosen, s in beams])
    return results


FLAGS = flags.FLAGS


def define_flags():
    with train_utils.flag_group("Model"):
        flags.DEFINE_string("checkpoint", None, "Our checkpoint folder or prefix, a TF1 bert_model.ckpt "
                            "prefix, or a HuggingFace folder.")
        flags.DEFINE_string("bert_config_file", None, "bert_config.json (default: beside --checkpoint).")
        flags.DEFINE_string("vocab_file", None, "vocab.txt (default: beside --checkpoint).")
        flags.DEFINE_bool("do_lower_case", True, "As in pretraining.")
    with train_utils.flag_group("Output"):
        flags.DEFINE_integer("top_k", 5, "Candidates per [MASK] run.", lower_bound=1)
    train_utils.require_flags("checkpoint")


def main(argv):
    texts = argv[1:] or [line.strip() for line in sys.stdin if line.strip()]
    try:
        model, tokenizer = load_masked_lm(FLAGS.checkpoint, FLAGS.bert_config_file,
                                          FLAGS.vocab_file, FLAGS.do_lower_case)
        blocks = [run for text in texts for run in fill_masks(model, tokenizer, text, FLAGS.top_k)]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print("\n\n".join("\n".join(f"{word}\t{score:.4f}" for word, score in block) for block in blocks))


if __name__ == "__main__":
    define_flags()
    train_utils.run_script(main, __doc__, "python fill_mask.py --checkpoint=demo_output/pretrain "
                           "--vocab_file=resources/vocab.txt '这本书的内容很[MASK]。'")
