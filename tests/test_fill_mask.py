"""fill_mask.py: candidates for each [MASK] run, from our, imported and HuggingFace checkpoints.

A tiny model (L=2, H=64) is trained here for a few seconds to memorise three sentences, so the
right answers ("北", "北京") are known without any downloaded weights.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize, tiny_config, write_vocab

import convert_checkpoint
import fill_mask
import modeling
import tokenization

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["中国的首都是北京。", "我们爱北京。", "他是大学生。"]


def train_memoriser(model, tokenizer, steps=80):
    """Masked-LM training on every 1- and 2-token masking of SENTENCES (no dropout)."""
    rows, positions, labels, weights = [], [], [], []
    for sentence in SENTENCES:
        ids = tokenizer.convert_tokens_to_ids(["[CLS]"] + tokenizer.tokenize(sentence) + ["[SEP]"])
        for i in range(1, len(ids) - 1):
            for span in (1, 2):
                if i + span > len(ids) - 1:
                    continue
                row = list(ids) + [0] * (12 - len(ids))
                pos = list(range(i, i + span)) + [0] * (2 - span)
                rows.append([tokenizer.vocab["[MASK]"] if i <= j < i + span else t for j, t in enumerate(row)])
                positions.append(pos)
                labels.append([ids[p] for p in pos])
                weights.append([1.0] * span + [0.0] * (2 - span))
    rows = tf.constant(rows, tf.int32)
    inputs = {"input_ids": rows, "input_mask": tf.cast(rows > 0, tf.int32),
              "segment_ids": tf.zeros_like(rows), "masked_lm_positions": tf.constant(positions, tf.int32)}
    labels, weights = tf.constant(labels), tf.constant(weights)
    optimizer = tf.keras.optimizers.Adam(5e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(inputs, training=False)                                 # [N, 2, V]
            loss = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.reduce_sum(loss * weights) / tf.reduce_sum(weights)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    for _ in range(steps):
        loss = step()
    return float(loss)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trained model, tokenizer, our checkpoint dir holding ckpt-1 = random, ckpt-2 = trained)."""
    root = tmp_path_factory.mktemp("fill_mask")
    vocab = write_vocab(str(root))
    config = tiny_config()
    tokenizer = tokenization.FullTokenizer(vocab)
    model = randomize(modeling.make_task_model(config, "mlm"), seed=0)
    ckpt_dir = str(root / "pretrain")
    manager = tf.train.CheckpointManager(modeling.make_checkpoint(model), ckpt_dir, max_to_keep=3)
    manager.save()
    config.to_json_file(os.path.join(ckpt_dir, "bert_config.json"))
    os.link(vocab, os.path.join(ckpt_dir, "vocab.txt"))
    assert train_memoriser(model, tokenizer) < 0.1
    manager.save()
    return model, tokenizer, ckpt_dir


def test_trained_model_fills_one_mask_and_a_whole_word(trained):
    model, tokenizer, _ = trained
    [single] = fill_mask.fill_masks(model, tokenizer, "中国的首都是[MASK]京。", top_k=5)
    assert single[0][0] == "北" and single[0][1] > 0.5
    assert len(single) == 5 and [s for _, s in single] == sorted((s for _, s in single), reverse=True)
    [word] = fill_mask.fill_masks(model, tokenizer, "中国的首都是[MASK][MASK]。", top_k=3)
    assert word[0][0] == "北京" and len(word) == 3
    assert all(len(w) == 2 for w, _ in word)
    # two separate runs in one text: each gets its own candidates
    runs = fill_mask.fill_masks(model, tokenizer, "中国的[MASK]都是北[MASK]。", top_k=2)
    assert [r[0][0] for r in runs] == ["首", "京"]


def test_single_mask_scores_are_the_model_softmax(trained):
    model, tokenizer, _ = trained
    tokens, runs = fill_mask.encode(tokenizer, "我们爱[MASK]京。", 40)
    assert runs == [(4, 1)] and tokens[4] == "[MASK]"
    logits = model({"input_ids": tf.constant([tokenizer.convert_tokens_to_ids(tokens)]),
                    "masked_lm_positions": tf.constant([[4]])}).numpy()[0, 0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = np.argsort(-probs)[:4]
    [got] = fill_mask.fill_masks(model, tokenizer, "我们爱[MASK]京。", top_k=4)
    assert [w for w, _ in got] == tokenizer.convert_ids_to_tokens(best.tolist())
    np.testing.assert_allclose([s for _, s in got], probs[best], rtol=1e-5)


def test_word_score_is_the_product_of_conditional_token_probabilities(trained):
    model, tokenizer, _ = trained
    text = "他是大[MASK][MASK]。"
    [[(word, score), *_]] = fill_mask.fill_masks(model, tokenizer, text, top_k=3)
    tokens, [(start, _)] = fill_mask.encode(tokenizer, text, 40)
    ids = np.array([tokenizer.convert_tokens_to_ids(tokens)])
    first = np.exp(fill_mask.mask_log_probs(model, ids, start)[0])
    ids[0, start] = tokenizer.vocab[word[0]]
    second = np.exp(fill_mask.mask_log_probs(model, ids, start + 1)[0])
    assert word == "学生"
    np.testing.assert_allclose(score, first[tokenizer.vocab[word[0]]] * second[tokenizer.vocab[word[1]]], rtol=1e-5)


def test_hf_folder_and_imported_checkpoint_give_the_same_candidates(trained, tmp_path):
    import export_to_pytorch
    model, tokenizer, ckpt_dir = trained
    text = "中国的首都是[MASK][MASK]。"
    expected = fill_mask.fill_masks(model, tokenizer, text, top_k=3)
    hf_dir = export_to_pytorch.export_model(model, "mlm", os.path.join(ckpt_dir, "vocab.txt"),
                                            str(tmp_path / "hf"))
    from_hf = fill_mask.fill_masks(*fill_mask.load_masked_lm(hf_dir), text, top_k=3)
    convert_checkpoint.hf_to_tf2(hf_dir, str(tmp_path / "imported"))
    imported = fill_mask.fill_masks(*fill_mask.load_masked_lm(str(tmp_path / "imported")), text, top_k=3)
    # A transformers-5 style folder: tokenizer.json instead of vocab.txt.
    transformers = pytest.importorskip("transformers")
    transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(hf_dir)
    os.remove(os.path.join(hf_dir, "vocab.txt"))
    from_t5 = fill_mask.fill_masks(*fill_mask.load_masked_lm(hf_dir), text, top_k=3)
    for got in (from_hf, imported, from_t5):
        assert [w for w, _ in got[0]] == [w for w, _ in expected[0]]
        np.testing.assert_allclose([s for _, s in got[0]], [s for _, s in expected[0]], rtol=1e-6)


def test_bad_text_is_a_clear_error(trained):
    model, tokenizer, _ = trained
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        fill_mask.fill_masks(model, tokenizer, "中国的首都是北京。")
    with pytest.raises(ValueError, match="exceed max_position_embeddings 40"):
        fill_mask.fill_masks(model, tokenizer, "中" * 50 + "[MASK]")


def test_a_pretraining_checkpoint_without_mlm_head_is_refused(tmp_path):
    config = tiny_config()
    qa_model = modeling.make_task_model(config, "qa")
    convert_checkpoint.save_tf2_checkpoint(qa_model, config, write_vocab(str(tmp_path)), str(tmp_path / "qa"))
    with pytest.raises(ValueError, match="holds a qa model, not a mlm model"):
        fill_mask.load_masked_lm(str(tmp_path / "qa"))
    os.remove(tmp_path / "qa" / "model_info.json")  # a folder that does not say: the tensors decide
    with pytest.raises(ValueError, match="cls/predictions"):
        fill_mask.load_masked_lm(str(tmp_path / "qa"))


def test_join_pieces_glues_word_pieces_and_cjk():
    assert fill_mask.join_pieces(["北", "京"]) == "北京"
    assert fill_mask.join_pieces(["hello", "##c", "a"]) == "helloc a"
    assert fill_mask.join_pieces(["a", "北", "b"]) == "a北b"


def test_command_line_reads_the_latest_checkpoint_of_a_directory(trained):
    _, _, ckpt_dir = trained  # ckpt-1 is random, ckpt-2 trained: only the latest knows "北京"
    result = subprocess.run([sys.executable, os.path.join(REPO, "fill_mask.py"), f"--checkpoint={ckpt_dir}",
                             "--top_k=3", "中国的首都是[MASK]京。", "中国的首都是[MASK][MASK]。"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    blocks = [block.split("\n") for block in result.stdout.strip().split("\n\n")]
    assert len(blocks) == 2 and all(len(b) == 3 for b in blocks)
    assert blocks[0][0].split("\t")[0] == "北" and blocks[1][0].split("\t")[0] == "北京"
    scores = [float(line.split("\t")[1]) for line in blocks[0]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.5
