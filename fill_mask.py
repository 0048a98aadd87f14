"""Fills [MASK] tokens with a masked language model and prints the best candidates.

    python fill_mask.py --checkpoint=pretrain_out/ --top_k=5 "中国的首都是[MASK]京。"
    北	0.9731
    南	0.0102
    ...

For each run of [MASK]s, one line per candidate, `token<TAB>score`, best first; runs are separated
by a blank line (also across several input texts). A run of k [MASK]s in a row is filled with a
whole k-token word ("[MASK][MASK]" -> "北京"): a left-to-right beam search of width top_k that puts
each chosen token into the input before predicting the next, scoring a word by the product of its
tokens' conditional probabilities. Special tokens are never proposed inside such a word. A single
[MASK] gets the plain softmax over the vocabulary, as transformers' fill-mask pipeline does.

--checkpoint: a model folder (model_folder.py; ours means its latest ckpt-N), a prefix like
out/ckpt-500, an imported one (convert_checkpoint.py), a Google TF1 bert_model.ckpt, or a
HuggingFace folder (transformers 5's without vocab.txt too: the vocab comes from tokenizer.json).
"""

import sys

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import numpy as np
import tensorflow as tf
from absl import flags

import convert_checkpoint
import tokenization


def load_masked_lm(checkpoint, bert_config_file=None, vocab_file=None, do_lower_case=None):
    """Returns (BertPretrainer with every weight restored, FullTokenizer).

    `checkpoint` is a model folder or prefix (model_folder.resolve: ours, Google's, or a HuggingFace
    folder, also transformers 5's without vocab.txt); the other arguments override what it says.
    """
    model, found = convert_checkpoint.load_model(checkpoint, "mlm", bert_config_file, vocab_file)
    do_lower_case = found.do_lower_case if do_lower_case is None else do_lower_case
    return model, tokenization.FullTokenizer(found.vocab_file, do_lower_case)


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


EXAMPLE = "python fill_mask.py --checkpoint=demo_output/pretrain '这本书的内容很[MASK]。'"


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Model", fv):
        flags.DEFINE_string("checkpoint", None, "A model folder (ours, Google's bert_model.ckpt, or a "
                            "HuggingFace folder) or a checkpoint prefix like out/ckpt-1000.", flag_values=fv)
        flags.DEFINE_string("bert_config_file", None, "bert_config.json (default: the folder's).",
                            flag_values=fv)
        flags.DEFINE_string("vocab_file", None, "vocab.txt (default: the folder's).", flag_values=fv)
        flags.DEFINE_bool("do_lower_case", None, "Default: the folder's setting, else true.", flag_values=fv)
    with train_utils.flag_group("Output", fv):
        flags.DEFINE_integer("top_k", 5, "Candidates per [MASK] run.", lower_bound=1, flag_values=fv)
    train_utils.require_flags("checkpoint")


def main(argv):
    fv = flags.FLAGS
    texts = argv[1:] or [line.strip() for line in sys.stdin if line.strip()]
    model, tokenizer = load_masked_lm(fv.checkpoint, fv.bert_config_file, fv.vocab_file, fv.do_lower_case)
    blocks = [run for text in texts for run in fill_masks(model, tokenizer, text, fv.top_k)]
    print("\n\n".join("\n".join(f"{word}\t{score:.4f}" for word, score in block) for block in blocks))


if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags, takes_arguments=True,
                           input_errors=(ValueError,))
