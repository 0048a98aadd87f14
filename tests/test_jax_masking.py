"""jax_masking: dynamic whole-word masking drawn on the device for the JAX path.

The rule (pretraining_records.mask_whole_words, keras.ops) is run on both backends: equal draws must
give equal tensors, and each backend's own draws (tf.data's vs JAX's, from (seed, position)) must
give the same statistics on the same records. The JAX side runs in one subprocess with
KERAS_BACKEND=jax and TensorFlow blocked.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, RESOURCES

import create_pretraining_data as cpd
import pretraining_records as records
import record_reader as rr

VOCAB = str(RESOURCES / "vocab.txt")
CORPUS = ",".join(sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt")))
SEQ, PRED, PROB, SEED = 64, 10, 0.15, 3
EPOCHS = 12  # 216 records per epoch -> 2,592 masked sequences per backend

JAX_SIDE = """
import sys
sys.modules["tensorflow"] = None
import jax, jax.numpy as jnp, numpy as np
import pretraining_records as records, record_reader as rr, jax_masking as jm
path, out_path, SEQ, PRED, PROB, SEED, EPOCHS = sys.argv[1:8]
SEQ, PRED, EPOCHS, SEED, PROB = int(SEQ), int(PRED), int(EPOCHS), int(SEED), float(PROB)
given = np.load(out_path + ".in.npz")
info = rr.check_file(path, SEQ, PRED, int(given["vocab_size"]))
opts = jm.options(info, PROB, PRED)
result = {}
# (a) equal draws: the rule on JAX
exact = records.mask_whole_words(jnp.asarray(given["ids"]), jnp.asarray(given["n"]),
    jnp.asarray(given["ws"]), jnp.asarray(given["u"]), **opts)
result.update({"exact_" + k: np.asarray(v) for k, v in exact.items()})
# (b) JAX's own draws over EPOCHS passes (positions 0, 1, ...)
f = rr.RecordFile(path)
one = rr.Decoder(info.kind, SEQ, PRED)(f.read(range(len(f))), lambda i: (path, i))
step = jax.jit(lambda batch, seed: jm.mask_batch(batch, seed, **opts))
n = len(f)
parts = []
for e in range(EPOCHS):
    batch = dict(one, positions=np.arange(e * n, (e + 1) * n, dtype=np.int32))
    parts.append({k: np.asarray(v) for k, v in step(batch, SEED).items()})
result.update({"stats_" + k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
# (c) determinism, other seeds, evaluation seed, padding rows
batch = dict(one, positions=np.arange(n, dtype=np.int32))
again = step(batch, SEED)
result["same"] = np.array(all(np.array_equal(again[k], parts[0][k]) for k in again))
other = step(batch, SEED + 1)
result["other_seed_differs"] = np.array(not np.array_equal(other["input_ids"], parts[0]["input_ids"]))
result["eval_a"] = np.asarray(step(batch, records.EVAL_MASK_SEED)["masked_lm_positions"])
pad = {k: v.copy() for k, v in batch.items()}
pad["num_tokens"][:5] = 0
padded = step(pad, SEED)
result["pad_weights"] = np.asarray(padded["masked_lm_weights"][:5])
result["pad_rest_equal"] = np.array(np.array_equal(padded["input_ids"][5:], parts[0]["input_ids"][5:]))
assert "tensorflow" not in [m for m, v in sys.modules.items() if v is not None]
np.savez(out_path, **result)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both backends on the same records: {"jax": the subprocess's arrays, "tf": tf.data's, ...}."""
    import tensorflow as tf
    root = tmp_path_factory.mktemp("jaxmask")
    path = str(root / "unmasked.tfrecord")
    cpd.generate(cpd.Options(input_file=CORPUS, output_file=path, vocab_file=VOCAB, max_seq_length=SEQ,
                             max_predictions_per_seq=PRED, dupe_factor=1, random_seed=7,
                             dynamic_masking=True), log=lambda line: None)
    info = records.read_info([path])
    meta = info.meta
    # (a) inputs for equal draws: random word structures, random uniforms
    rng = np.random.default_rng(0)
    b = 1000
    given = {"ids": rng.integers(200, 900, (b, SEQ)).astype(np.int32),
             "n": rng.integers(1, SEQ - 1, b).astype(np.int32),
             "ws": rng.random((b, SEQ)) < rng.random((b, 1)),
             "u": rng.random((b, 3 * SEQ + 1)).astype(np.float32),
             "vocab_size": np.array(meta["vocab_size"])}
    out = str(root / "jax.npz")
    np.savez(out + ".in.npz", **given)
    proc = subprocess.run([sys.executable, "-c", JAX_SIDE, path, out, str(SEQ), str(PRED), str(PROB),
                           str(SEED), str(EPOCHS)], capture_output=True, text=True, timeout=600,
                          cwd=str(REPO_ROOT), env=dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                                                       PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    jax_side = dict(np.load(out))
    opts = records.masking_settings(info, PROB)
    exact_tf = records.mask_whole_words(tf.constant(given["ids"]), tf.constant(given["n"]),
                                        tf.constant(given["ws"]), tf.constant(given["u"]), max_pred=PRED,
                                        masked_lm_prob=PROB, **opts)
    parse = records.make_parser(info, SEQ, PRED, seed=SEED, masked_lm_prob=PROB)
    d = tf.data.TFRecordDataset(path).repeat(EPOCHS).enumerate().batch(512).map(parse)
    parts = list(d.as_numpy_iterator())
    tf_stats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    f = rr.RecordFile(path)
    unmasked = rr.Decoder(info.kind, SEQ, PRED)(f.read(range(len(f))), lambda i: (path, i))
    return {"jax": jax_side, "tf_exact": {k: v.numpy() for k, v in exact_tf.items()}, "tf": tf_stats,
            "unmasked": unmasked, "meta": meta, "n": len(f)}


def test_equal_draws_give_equal_tensors_on_both_backends(run):
    for k, v in run["tf_exact"].items():
        got = run["jax"]["exact_" + k]
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)


def _summary(out, unmasked, n, mask_id):
    """Per backend: masked tokens per sequence, and per chosen word its length and decision; checks
    the whole-word property and the cap on the way."""
    rows = len(out["input_ids"])
    weights = out["masked_lm_weights"]
    counts = weights.sum(axis=1)
    assert (counts <= PRED).all() and (counts >= 1).all()
    lengths, decisions, words_by_length = [], [], np.zeros(SEQ, np.int64)
    for r in range(rows):
        i = r % n
        body = unmasked["num_tokens"][i]
        starts = list(np.flatnonzero(unmasked["word_starts"][i][1:body + 1]) + 1)
        if not starts or starts[0] != 1:
            starts = [1, *starts]
        bounds = [*starts, body + 1]
        masked = set(out["masked_lm_positions"][r][weights[r] > 0].tolist())
        original = unmasked["token_ids"][i]
        np.testing.assert_array_equal(out["masked_lm_ids"][r][weights[r] > 0],
                                      original[sorted(masked)])
        for a, z in zip(bounds[:-1], bounds[1:]):
            words_by_length[min(z - a, 4)] += 1
            inside = [p in masked for p in range(a, z)]
            assert all(inside) or not any(inside), f"row {r}: word {a}..{z - 1} partly masked"
            if inside[0]:
                lengths.append(min(z - a, 4))
                token = out["input_ids"][r][a]
                decisions.append(0 if token == mask_id else 1 if token == original[a] else 2)
    return counts, np.array(lengths), np.array(decisions), words_by_length


def _close(p1, n1, p2, n2, what):
    """Two independent proportions agree within 5 standard errors of their difference."""
    p = (p1 * n1 + p2 * n2) / (n1 + n2)
    tol = 5 * np.sqrt(max(p * (1 - p), 1e-12) * (1 / n1 + 1 / n2))
    assert abs(p1 - p2) <= tol, f"{what}: {p1:.4f} (JAX) vs {p2:.4f} (tf.data), tolerance {tol:.4f}"


def test_jax_draws_mask_with_the_statistics_of_tf_data(run):
    jax_out = {k[len("stats_"):]: v for k, v in run["jax"].items() if k.startswith("stats_")}
    mask_id = run["meta"]["mask_id"]
    js = _summary(jax_out, run["unmasked"], run["n"], mask_id)
    ts = _summary(run["tf"], run["unmasked"], run["n"], mask_id)
    (jc, jl, jd, words), (tc, tl, td, _) = js, ts
    # masked tokens per sequence
    se = np.sqrt(jc.var() / len(jc) + tc.var() / len(tc))
    assert abs(jc.mean() - tc.mean()) <= 5 * se, (jc.mean(), tc.mean())
    total_tokens = run["unmasked"]["num_tokens"].sum() * EPOCHS
    _close(jc.sum() / total_tokens, total_tokens, tc.sum() / total_tokens, total_tokens, "masked fraction")
    # rate at which a word of each length (1, 2, 3, 4+) is chosen
    for length in range(1, 5):
        n_words = words[length]
        _close((jl == length).sum() / n_words, n_words, (tl == length).sum() / n_words, n_words,
               f"mask rate of {length}-token words")
    # 80/10/10 per chosen word
    for d, name in enumerate(("[MASK]", "kept", "random")):
        _close((jd == d).mean(), len(jd), (td == d).mean(), len(td), f"share {name}")
    assert abs((jd == 0).mean() - 0.8) < 0.03 and abs((jd == 1).mean() - 0.1) < 0.03


def test_masks_are_a_function_of_seed_and_position(run):
    jax_side = run["jax"]
    assert jax_side["same"] and jax_side["other_seed_differs"]
    first_epoch = jax_side["stats_masked_lm_positions"][:run["n"]]
    second_epoch = jax_side["stats_masked_lm_positions"][run["n"]:2 * run["n"]]
    assert not np.array_equal(first_epoch, second_epoch)  # new positions, new masks
    assert not np.array_equal(jax_side["eval_a"], first_epoch)  # evaluation has its own key


def test_padding_rows_count_nothing_and_leave_other_rows_alone(run):
    assert (run["jax"]["pad_weights"] == 0).all() and run["jax"]["pad_rest_equal"]


def test_mask_batch_refuses_the_tensorflow_backend(run):
    import jax_masking
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
        jax_masking.mask_batch(run["unmasked"], 0, **{"max_pred": PRED, "masked_lm_prob": PROB,
                                                        "pool": np.arange(5), "cls_id": 1, "sep_id": 2,
                                                        "mask_id": 3})


def test_options_come_from_the_sidecar(run, tmp_path):
    import json

    import jax_masking
    from train_utils import UsageError
    opts = jax_masking.options(records.RecordInfo(records.UNMASKED, (("x", run["meta"]),)), PROB, PRED)
    assert opts["mask_id"] == run["meta"]["mask_id"] and opts["pool"].dtype == np.int32
    path = str(tmp_path / "r.tfrecord")
    meta = {k: v for k, v in run["meta"].items() if k != "mask_id"}
    open(path, "wb").close()
    with open(path + records.SIDECAR_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(UsageError, match="sidecar lacks mask_id"):
        jax_masking.options(records.read_info([path]), PROB, PRED)
