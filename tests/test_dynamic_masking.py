"""Dynamic whole-word masking: unmasked records (create_pretraining_data.py --dynamic_masking) and the
masks drawn from them in tf.data (pretraining_records, kind "unmasked"), down to run_pretraining.py.

Records are made by the real generator from the embedded corpus and vocab (resources/); statistics
run the parser over several epochs of them (each epoch is a new stream position, so new masks).
"""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, RESOURCES
from helpers import generate_demo_records

import corpus
import create_pretraining_data as cpd
import pretraining_instances
import pretraining_records as records
import tokenization

VOCAB = str(RESOURCES / "vocab.txt")
CORPUS = ",".join(sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt")))
SEQ, PRED = 64, 10
EPOCHS = 15  # 216 sequences per epoch -> a few thousand masked sequences


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic")
    return {"root": root,
            "unmasked": generate_demo_records(root / "unmasked.tfrecord", dynamic_masking=True, dupe_factor=5),
            "static": generate_demo_records(root / "static.tfrecord")}


def _read_unmasked(path):
    """-> [(ids list, word start indices list)] per record, decoded with protobuf and NumPy only."""
    import tensorflow as tf
    out = []
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
        features = tf.train.Example.FromString(raw).features.feature
        ids = list(features["token_ids"].int64_list.value)
        bits = np.unpackbits(np.frombuffer(features["word_starts"].bytes_list.value[0], np.uint8),
                             bitorder="little")[:len(ids)]
        out.append((ids, np.flatnonzero(bits).tolist()))
    return out


def _masked(path, epochs=1, seed=3, training=True, masked_lm_prob=0.10, max_pred=PRED, batch=256):
    """The parser's tensors for `epochs` passes over the file (positions 0, 1, ...) -> numpy [N, ...]."""
    import tensorflow as tf
    parse = records.make_parser(records.read_info([path]), SEQ, max_pred, seed=seed,
                                masked_lm_prob=masked_lm_prob, training=training)
    d = tf.data.TFRecordDataset(path).repeat(epochs).enumerate().batch(batch).map(parse)
    parts = list(d.as_numpy_iterator())
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _meta(path):
    with open(path + ".meta.json", encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# The records
# ------------------------------------------------------------------------------------------------

def test_unmasked_records_hold_each_instance_of_static_copy_zero_once(data):
    """Same packing, tokenizer and segmentation: record i is static record i with its masks undone."""
    import tensorflow as tf
    unmasked = _read_unmasked(data["unmasked"])
    spec = records.feature_spec(SEQ, PRED)
    static = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(data["static"])]
    assert len(unmasked) == len(static) > 200  # dupe_factor=5 was ignored: one copy
    for (ids, starts), s in zip(unmasked, static):
        original = s["input_ids"].numpy().copy()
        w = s["masked_lm_weights"].numpy() > 0
        original[s["masked_lm_positions"].numpy()[w]] = s["masked_lm_ids"].numpy()[w]
        n = int(s["input_mask"].numpy().sum()) - 2
        assert ids == original[1:n + 1].tolist()
        assert starts[0] == 0 and starts == sorted(set(starts))
    meta = _meta(data["unmasked"])
    vocab = tokenization.load_vocab(VOCAB)
    assert meta["kind"] == "unmasked" and meta["dupe_factor"] == 1
    assert (meta["cls_id"], meta["sep_id"], meta["mask_id"]) == (vocab["[CLS]"], vocab["[SEP]"],
                                                                 vocab["[MASK]"])
    # The replacement pool travels in the sidecar as id ranges: the generator's pool, exactly.
    assert records._parse_id_ranges(meta["ordinary_ids"], "sidecar") == sorted(records.ordinary_ids(vocab))
    assert os.path.getsize(data["unmasked"]) < 0.5 * os.path.getsize(data["static"])


def test_word_starts_are_the_static_generators_masking_groups(data):
    """The stored word boundaries are the generator's own groups (jieba words, ## joined)."""
    o = cpd.Options(input_file=CORPUS, output_file="unused", vocab_file=VOCAB, max_seq_length=SEQ)
    maker = pretraining_instances.InstanceMaker(o)
    reader = corpus.InputReader(CORPUS.split(","), o.input_format)
    groups = set()
    for pieces in maker.featurize_many([(CORPUS, doc) for _, doc in reader.documents()])[0]:
        for ids, starts in pieces:
            bounds = starts + [len(ids)]
            groups.update(tuple(ids[a:b]) for a, b in zip(bounds, bounds[1:]))
    for ids, starts in _read_unmasked(data["unmasked"]):
        bounds = starts + [len(ids)]
        words = [tuple(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
        # The first word of a record may be the tail of a sentence split at a group start.
        assert all(w in groups for w in words[1:])


# ------------------------------------------------------------------------------------------------
# The masks
# ------------------------------------------------------------------------------------------------

def _words_of(ids, starts):
    bounds = starts + [len(ids)]
    return list(zip(bounds, bounds[1:]))


def test_masks_are_whole_words_with_80_10_10_and_the_right_share(data):
    vocab = tokenization.load_vocab(VOCAB)
    inv = {i: t for t, i in vocab.items()}
    unmasked = _read_unmasked(data["unmasked"])
    out = _masked(data["unmasked"], epochs=EPOCHS)
    n_seq = len(out["input_ids"])
    assert n_seq == EPOCHS * len(unmasked) >= 3000
    predicted = tokens = budget = 0
    decisions = collections.Counter()
    for i in range(n_seq):
        ids, starts = unmasked[i % len(unmasked)]
        n = len(ids)
        original = np.array([vocab["[CLS]"]] + ids + [vocab["[SEP]"]])
        assert out["input_mask"][i].tolist() == [1] * (n + 2) + [0] * (SEQ - n - 2)
        assert not out["segment_ids"][i].any() and not out["input_ids"][i][n + 2:].any()
        real = out["masked_lm_weights"][i] > 0
        positions = out["masked_lm_positions"][i][real]
        assert (out["masked_lm_positions"][i][~real] == 0).all() and (out["masked_lm_ids"][i][~real] == 0).all()
        assert len(positions) >= 1 and (np.diff(positions) > 0).all()
        assert positions.min() >= 1 and positions.max() <= n
        assert (out["masked_lm_ids"][i][real] == original[positions]).all()  # labels: the originals
        chosen = set(positions.tolist())
        unchanged = np.ones(n + 2, bool)
        for a, b in _words_of(ids, starts):
            inside = [p + 1 in chosen for p in range(a, b)]
            assert all(inside) or not any(inside), "a masked group is not one whole word"
            if not inside[0]:
                continue
            got, was = out["input_ids"][i][a + 1:b + 1], original[a + 1:b + 1]
            unchanged[a + 1:b + 1] = False
            if (got == vocab["[MASK]"]).all():
                decisions["mask"] += 1
            elif (got == was).all():
                decisions["keep"] += 1
            else:
                decisions["random"] += 1
                for t in got.tolist():  # never special, [unused*] or ## pieces
                    token = inv[t]
                    assert not re.fullmatch(r"\[.+\]|##.+", token), token
        assert (out["input_ids"][i][:n + 2][unchanged] == original[unchanged]).all()
        predicted += len(positions)
        tokens += n
        budget += min(PRED, max(1, round(n * 0.10)))
    assert 0.09 <= predicted / tokens <= 0.11, predicted / tokens
    assert abs(predicted / budget - 1) < 0.03  # the budget rule of the static generator, on average
    words = sum(decisions.values())
    assert abs(decisions["mask"] / words - 0.8) < 0.03, decisions
    assert abs(decisions["keep"] / words - 0.1) < 0.03, decisions
    assert abs(decisions["random"] / words - 0.1) < 0.03, decisions


def test_no_word_length_is_left_out(data):
    """Every word is chosen at the same rate whatever its length (the static rule prefers short words)."""
    unmasked = _read_unmasked(data["unmasked"])
    out = _masked(data["unmasked"], epochs=EPOCHS)
    seen, masked = collections.Counter(), collections.Counter()
    for i in range(len(out["input_ids"])):
        ids, starts = unmasked[i % len(unmasked)]
        chosen = set(out["masked_lm_positions"][i][out["masked_lm_weights"][i] > 0].tolist())
        for a, b in _words_of(ids, starts):
            length = min(b - a, 4)
            seen[length] += 1
            masked[length] += (a + 1) in chosen
    rates = {length: masked[length] / seen[length] for length in seen}
    overall = sum(masked.values()) / sum(seen.values())
    for length in (1, 2, 3, 4):
        assert seen[length] > 300, seen
        assert abs(rates[length] / overall - 1) < 0.25, (rates, overall)


def test_the_cap_bounds_predictions_and_long_words_still_get_masked(data):
    out = _masked(data["unmasked"], epochs=EPOCHS, masked_lm_prob=0.5, max_pred=4)
    counts = out["masked_lm_weights"].sum(axis=1)
    assert counts.max() == 4 and counts.min() >= 0
    unmasked = _read_unmasked(data["unmasked"])
    longest_masked = 0
    for i in range(len(out["input_ids"])):
        ids, starts = unmasked[i % len(unmasked)]
        chosen = set(out["masked_lm_positions"][i][out["masked_lm_weights"][i] > 0].tolist())
        for a, b in _words_of(ids, starts):
            if a + 1 in chosen:
                longest_masked = max(longest_masked, b - a)
    assert longest_masked == 4  # a word as long as the cap is masked whole


def test_same_seed_and_position_give_the_same_masks_and_other_epochs_new_ones(data):
    n = len(_read_unmasked(data["unmasked"]))
    first, again = _masked(data["unmasked"], epochs=2), _masked(data["unmasked"], epochs=2)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k], err_msg=k)
    # Epoch 2 (positions n..2n-1) masks the same sequences differently ...
    same = (first["masked_lm_positions"][:n] == first["masked_lm_positions"][n:]).all(axis=1)
    assert same.mean() < 0.1
    # ... and so does another seed; the unmasked content stays the same.
    other = _masked(data["unmasked"], epochs=1, seed=4)
    assert (other["masked_lm_positions"] == first["masked_lm_positions"][:n]).all(axis=1).mean() < 0.1
    np.testing.assert_array_equal(other["input_mask"], first["input_mask"][:n])


def test_evaluation_uses_one_fixed_mask_whatever_the_seed(data):
    a = _masked(data["unmasked"], seed=1, training=False)
    b = _masked(data["unmasked"], seed=2, training=False)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    train = _masked(data["unmasked"], seed=1)
    assert (train["masked_lm_positions"] == a["masked_lm_positions"]).all(axis=1).mean() < 0.1


def test_model_tensors_match_static_records_in_names_shapes_and_dtypes(data):
    """What run_pretraining hands the model: identical structure for both kinds, train and eval."""
    import tensorflow as tf

    import pretraining_input
    for training in (True, False):
        specs = []
        for kind in ("static", "unmasked"):
            files, counts = [data[kind]], [_meta(data[kind])["num_instances"]]
            parse = records.make_parser(records.read_info(files), SEQ, PRED, training=training)
            dataset_fn = (pretraining_input.train_dataset_fn(files, counts, 8, 0, 100, 0, parse)
                          if training else pretraining_input.eval_dataset_fn(files, counts, 8, 2, parse))
            specs.append(dataset_fn(tf.distribute.InputContext()).element_spec)
        # Static records hand over only the prediction slots their generator can fill
        # (records.predictions_in_use); everything else is the same.
        width = records.predictions_in_use(records.read_info([data["static"]]), SEQ, PRED)
        assert width < PRED
        assert specs[0].keys() == specs[1].keys()
        for key, static in specs[0].items():
            dynamic = specs[1][key]
            assert static.dtype == dynamic.dtype, key
            expected = dynamic.shape[:-1] + [width] if key.startswith("masked_lm_") else dynamic.shape
            assert static.shape == expected, key
        assert all(s.shape.is_fully_defined() for s in specs[1].values())


def test_one_record_or_a_batch_parse_alike_with_tensorflow_ops_only(data):
    import tensorflow as tf
    info = records.read_info([data["unmasked"]])
    parse = records.make_parser(info, SEQ, PRED, seed=5)
    raw = list(tf.data.TFRecordDataset(data["unmasked"]).take(16))
    batch = parse(tf.range(100, 116, dtype=tf.int64), tf.stack(raw))
    for j in range(16):
        one = parse(tf.constant(100 + j, tf.int64), raw[j])
        for k in one:
            assert one[k].shape == batch[k].shape[1:] and one[k].dtype == batch[k].dtype
            np.testing.assert_array_equal(one[k].numpy(), batch[k][j].numpy(), err_msg=k)
    # No Python inside the pipeline: it runs on a TPU host and under any strategy.
    graph = tf.function(parse).get_concrete_function(
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string)).graph.as_graph_def()
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert "StatelessRandomUniformV2" in ops
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}, ops


def test_check_records_accepts_unmasked_records_and_rejects_a_wrong_length(data):
    info = records.check_records(data["unmasked"], SEQ, PRED, len(tokenization.load_vocab(VOCAB)))
    assert info.kind == "unmasked"
    with pytest.raises(records.UsageError, match="max_seq_length"):
        records.check_records(data["unmasked"], 128, PRED, len(tokenization.load_vocab(VOCAB)))


def test_full_scan_names_an_unmasked_record_with_a_bad_id_or_length(data, tmp_path):
    import tensorflow as tf
    vocab_size = len(tokenization.load_vocab(VOCAB))
    meta = _meta(data["unmasked"])
    for bad_ids in ([5, vocab_size], list(range(5, 5 + SEQ))):
        path = str(tmp_path / "bad.tfrecord")
        raws = list(tf.data.TFRecordDataset(data["unmasked"]).take(3).as_numpy_iterator())
        raws[2] = tf.train.Example(features=tf.train.Features(feature={
            "token_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=bad_ids)),
            "word_starts": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x01"]))}
        )).SerializeToString()
        with tf.io.TFRecordWriter(path) as w:
            for raw in raws:
                w.write(raw)
        with open(path + ".meta.json", "w", encoding="utf-8") as f:
            json.dump(dict(meta, num_instances=3), f)
        with pytest.raises(records.UsageError, match="record 2"):
            records.check_records(path, SEQ, PRED, vocab_size)


def test_sidecar_without_masking_keys_is_a_clear_error(data, tmp_path):
    path = str(tmp_path / "r.tfrecord")
    with open(data["unmasked"], "rb") as f, open(path, "wb") as g:
        g.write(f.read())
    meta = _meta(data["unmasked"])
    del meta["ordinary_ids"]
    with open(path + ".meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(records.UsageError, match="ordinary_ids"):
        records.make_parser(records.read_info([path]), SEQ, PRED)


# ------------------------------------------------------------------------------------------------
# End to end (slow): the shell driver, and kill-and-resume in run_pretraining.py
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_create_pretrain_data_sh_passes_dynamic_masking_through(tmp_path):
    (tmp_path / "in").mkdir()
    src = sorted((RESOURCES / "corpus").glob("*.txt"))[0]
    (tmp_path / "in" / "part_01.txt").write_bytes(src.read_bytes())
    env = dict(os.environ, INPUT_DIR=str(tmp_path / "in"), INPUT_PATTERN="part_%02d.txt",
               OUTPUT_DIR=str(tmp_path / "out"), OUTPUT_PATTERN="part_%02d.tfrecord",
               MAX_SEQ_LENGTH="64", MAX_PREDICTIONS_PER_SEQ="8", DYNAMIC_MASKING="true",
               PYTHON=sys.executable, VOCAB_FILE=VOCAB)
    result = subprocess.run(["bash", str(REPO_ROOT / "create_pretrain_data.sh"), "1", "1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = _meta(str(tmp_path / "out" / "part_01.tfrecord"))
    assert meta["kind"] == "unmasked" and meta["dupe_factor"] == 1


def _config(tmp_path, vocab_size):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, max_position_embeddings=SEQ, type_vocab_size=2,
        initializer_range=0.02)))
    return str(path)


def _weights(prefix):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith(("bert", "cls")) and "OPTIMIZER_SLOT" not in k}


@pytest.mark.slow
def test_sigkilled_run_on_unmasked_records_resumes_to_the_same_weights(data, tmp_path):
    """The masks are a function of (seed, position) and the position is in the checkpoint, so a
    resumed run sees exactly the masks of an uninterrupted one; eval masks ignore --seed."""
    import tensorflow as tf

    import run_pretraining
    config = _config(tmp_path, len(tokenization.load_vocab(VOCAB)))

    def argv(output_dir, *extra):
        return [f"--input_file={data['unmasked']}", f"--output_dir={output_dir}",
                f"--bert_config_file={config}", f"--max_seq_length={SEQ}",
                f"--max_predictions_per_seq={PRED}", "--train_batch_size=16", "--eval_batch_size=16",
                "--learning_rate=2e-3", "--num_warmup_steps=2", "--shuffle_buffer_size=50",
                "--num_train_steps=10", "--iterations_per_loop=1", "--save_checkpoints_steps=2",
                "--jit_compile=false", "--max_eval_steps=4", *extra]

    killed, uninterrupted = str(tmp_path / "killed"), str(tmp_path / "uninterrupted")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "run_pretraining.py"), "--do_train",
                             *argv(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    def latest_step():  # the `checkpoint` state file names a checkpoint once it is complete
        path = tf.train.latest_checkpoint(killed)
        return int(path.rsplit("-", 1)[1]) if path else 0

    deadline = time.time() + 300
    while latest_step() < 4 and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 4 <= latest_step() < 10

    run = lambda *a: run_pretraining.run(run_pretraining.parse_flags(argv(*a)))  # noqa: E731
    run(killed, "--do_train")
    run(uninterrupted, "--do_train")
    resumed, reference = _weights(os.path.join(killed, "ckpt-10")), _weights(
        os.path.join(uninterrupted, "ckpt-10"))
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], atol=1e-6, err_msg=name)
    assert run(killed, "--do_eval", "--seed=1") == run(killed, "--do_eval", "--seed=2")
