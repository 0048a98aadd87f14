"""finetuning.py, the fine-tuning driver's pieces: windows over long documents, the masked loss,
the stall warning, padding and batching, and files that are not what they should be. The driver
end to end is exercised by each task's tests (test_run_classifier.py, test_run_ner.py,
test_run_cmrc.py)."""

import math

import numpy as np
import pytest
import tensorflow as tf

import finetuning
import modeling
from train_utils import UsageError


def test_windows_cover_every_token_and_each_token_has_one_best_window():
    windows = finetuning.doc_windows(10, 4, 3)
    assert windows == [(0, 4), (3, 4), (6, 4)]
    assert finetuning.doc_windows(0, 4, 3) == [(0, 0)]  # an empty document still gets a window
    for n, window, stride in ((1, 4, 3), (37, 8, 5), (100, 16, 16)):
        windows = finetuning.doc_windows(n, window, stride)
        covered = sorted({t for s, k in windows for t in range(s, s + k)})
        assert covered == list(range(n))
        best = [finetuning.max_context_window(windows, t) for t in range(n)]
        assert all(b is not None and windows[b][0] <= t < sum(windows[b]) for t, b in enumerate(best))
    # Token 4: in window 0 it has 4 tokens left and none right; in window 1, 1 left and 2 right.
    assert finetuning.max_context_window([(0, 5), (3, 4)], 4) == 1
    with pytest.raises(ValueError, match="no room for document tokens"):
        finetuning.doc_windows(5, 0, 1)


def test_masked_loss_ignores_label_minus_one():
    logits = tf.constant([[[2.0, 0.0], [0.0, 2.0], [9.0, -9.0]]])       # [B=1, S=3, C=2]
    full = finetuning.masked_sparse_ce(tf.constant([[0, 1, -1]]), logits)
    expected = math.log(1 + math.exp(-2.0))                               # both real positions right
    assert float(full) == pytest.approx(expected, rel=1e-5)
    # The ignored position's logits do not matter; an all-ignored batch is 0, not NaN.
    other = tf.constant([[[2.0, 0.0], [0.0, 2.0], [-9.0, 9.0]]])
    assert float(finetuning.masked_sparse_ce(tf.constant([[0, 1, -1]]), other)) == pytest.approx(expected, rel=1e-5)
    assert float(finetuning.masked_sparse_ce(tf.constant([[-1, -1, -1]]), logits)) == 0.0


def test_stall_warning_names_the_likely_cause():
    assert finetuning.stall_warning([0.7, 0.6], 5e-5) is None            # too few steps to tell
    assert finetuning.stall_warning([0.69, 0.5, 0.3, 0.2], 5e-5) is None  # learning
    flat = [0.69, 0.70, 0.69, 0.69, 0.70, 0.69, 0.69, 0.69]
    assert "too high for fine-tuning: try 5e-5" in finetuning.stall_warning(flat, 1e-3)
    assert "too low" in finetuning.stall_warning(flat, 1e-6)
    assert "too few steps" in finetuning.stall_warning(flat, 3e-5)
    assert "not learning" in finetuning.stall_warning([0.7, 0.6, float("nan"), float("nan")], 3e-5)


def test_padded_predictions_equal_unpadded_ones():
    """predict_batches pads to whole batches and drops the padding again: 5 rows in batches of 4
    give the rows' own logits, whatever the padding."""
    config = modeling.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=16)
    model = modeling.make_task_model(config, "classifier", 3)
    rows = [([2, 5 + i, 6, 3], [0, 0, 0, 0]) for i in range(5)]
    features = finetuning.pad_features(rows, 8)
    assert features["input_mask"].sum(1).tolist() == [4] * 5 and features["input_ids"].shape == (5, 8)
    batched = finetuning.predict_batches(model, features, batch_size=4)
    one_by_one = np.concatenate([finetuning.predict_batches(
        model, {k: v[i:i + 1] for k, v in features.items()}, batch_size=1) for i in range(5)])
    assert batched.shape == (5, 3) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_files_that_are_not_text_or_json_lines_are_one_line_errors(tmp_path):
    gbk = tmp_path / "gbk.json"
    gbk.write_bytes('{"text": "中文"}\n'.encode("gbk"))
    with pytest.raises(UsageError, match=r"gbk\.json:1: not UTF-8"):
        finetuning.read_text(str(gbk))
    with pytest.raises(UsageError, match="is a directory, not a file"):
        finetuning.read_text(str(tmp_path))
    lines = tmp_path / "lines.json"
    lines.write_text('{"a": 1}\n\n[1, 2]\n', encoding="utf-8")
    found = finetuning.json_lines(str(lines))
    assert next(found) == (1, {"a": 1})
    with pytest.raises(UsageError, match=r"lines\.json:3: a JSON object \{\.\.\.\} expected, got a list"):
        next(found)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval_results.json").mkdir()
    with pytest.raises(UsageError, match=r"eval_results\.json is a directory"):
        finetuning.check_outputs(str(tmp_path / "out"), ["eval_results.json"])
