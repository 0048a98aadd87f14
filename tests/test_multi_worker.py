"""Several machines: TF_CONFIG that cannot be right, each worker reading its own share of the records,
two real workers on 127.0.0.1 matching one worker, and a lost worker (killed at a step or during a
save, chief or not) ending the survivors with one line, then an exact resume.

The slow tests start real processes (tests/worker_cluster.py) with the tiniest model and few steps.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, RESOURCES

SEQ, PRED = 32, 5
RECORDS = 80            # 10 global batches of 8: epochs line up for one and for two workers
STEPS, SAVE_EVERY = 16, 4


# ------------------------------------------------------------------------------------------------
# TF_CONFIG that cannot be right: one line, before anything is built
# ------------------------------------------------------------------------------------------------

def _cluster(*workers, task=("worker", 0), chief=None):
    cluster = {"worker": list(workers)}
    if chief:
        cluster["chief"] = [chief]
    return json.dumps({"cluster": cluster, "task": {"type": task[0], "index": task[1]}})


@pytest.mark.parametrize("tf_config, message", [
    ('{"cluster": {"worker": ["a:1", "b:2"]}', r"TF_CONFIG is not JSON \(Expecting ',' delimiter"),
    ("cluster=a:1,b:2", r"TF_CONFIG is not JSON"),
    (_cluster("a:1", "b:2", task=("worker", 2)),
     r"this task is worker 2, which is not in its cluster \(worker 0, worker 1\)"),
    (_cluster("a:1", "b:2", task=("ps", 0)), r"this task is ps 0, which is not in its cluster"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}}), r'names a cluster but no "task"'),
    (_cluster("a:1", "b"), r"cluster.worker\[1\] = 'b' is not a host:port address"),
    (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["p:3"]}, "task": {"type": "worker"}}),
     r"cluster job 'ps' is not supported"),
])
def test_tf_config_that_cannot_be_right_is_one_line(tf_config, message):
    import multi_worker
    with pytest.raises(multi_worker.UsageError, match=message) as error:
        multi_worker.read_tf_config({"TF_CONFIG": tf_config})
    assert "\n" not in str(error.value)


def test_one_task_or_no_tf_config_is_one_machine():
    import multi_worker
    assert multi_worker.read_tf_config({}) is None
    assert multi_worker.read_tf_config({"TF_CONFIG": _cluster("a:1")}) is None


def test_chief_comes_first_and_peers_are_named_with_their_address():
    import multi_worker
    cluster = multi_worker.read_tf_config(
        {"TF_CONFIG": _cluster("w0:2", "w1:3", chief="c:1", task=("worker", 1))})
    assert [(j, i) for j, i, _ in cluster.tasks] == [("chief", 0), ("worker", 0), ("worker", 1)]
    assert cluster.name("worker", 1) == "worker 1 (w1:3)"


def test_lost_peer_is_read_from_either_error_tensorflow_gives():
    import tensorflow as tf

    import multi_worker
    cluster = multi_worker.read_tf_config(
        {"TF_CONFIG": _cluster("127.0.0.1:1111", "127.0.0.1:2222", task=("worker", 0))})
    heartbeat = tf.errors.UnavailableError(None, None, (
        "Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks "
        "are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\n"))
    assert multi_worker.lost_peer(heartbeat, cluster) == "worker 1 (127.0.0.1:2222)"
    reset = tf.errors.UnavailableError(None, None, (
        "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
        "information from remote target /job:worker/replica:0/task:1 while calling RecvBuf"))
    assert multi_worker.lost_peer(reset, cluster) == "worker 1 (127.0.0.1:2222)"
    assert multi_worker.lost_peer(tf.errors.InvalidArgumentError(None, None, "shape"), cluster) is None


def test_a_port_in_use_on_this_machine_is_refused():
    import multi_worker
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = multi_worker.read_tf_config(
            {"TF_CONFIG": _cluster(f"127.0.0.1:{port}", "127.0.0.1:1")})
        with pytest.raises(multi_worker.UsageError, match=rf"port {port} of this task \(worker 0 "
                                                          r"\(127.0.0.1:\d+\)\) is in use"):
            multi_worker.check_port_free(cluster)
    multi_worker.check_port_free(cluster)  # free again


# ------------------------------------------------------------------------------------------------
# Each worker reads its own share of the records
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import helpers as records
    from conftest import SHARED_DATA

    import tokenization

    root = tmp_path_factory.mktemp("multi_worker_data")
    vocab_file = str(RESOURCES / "vocab.txt")
    tokenizer = tokenization.FullTokenizer(vocab_file)
    lines = records.corpus_sentences(str(SHARED_DATA), str(RESOURCES), max_chars=12_000)
    instances = records.make_instances(tokenizer, lines, SEQ, PRED, seed=1)
    assert len(instances) >= RECORDS + 30
    train = str(root / "train.tfrecord")
    records.write_records(train, instances[:RECORDS], vocab_file, SEQ, PRED)
    parts, start = [], RECORDS
    for i, size in enumerate((10, 11, 12)):  # three files: whole files per worker
        parts.append(str(root / f"part-{i}.tfrecord"))
        records.write_records(parts[-1], instances[start:start + size], vocab_file, SEQ, PRED)
        start += size
    config = {"vocab_size": len(tokenizer.vocab), "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "max_position_embeddings": SEQ, "type_vocab_size": 2, "initializer_range": 0.02}
    with open(root / "config.json", "w") as f:
        json.dump(config, f)
    return {"root": root, "train": train, "parts": parts, "vocab_file": vocab_file,
            "config": str(root / "config.json")}


def _read_one_epoch(files, num_workers, worker):
    """The serialized records worker `worker` of `num_workers` reads in its first epoch."""
    import tensorflow as tf

    import pretraining_input
    counts = [pretraining_input.count_records(p) for p in files]
    _, _, per_epoch = pretraining_input.pipeline_files(files, counts, num_workers, worker)
    dataset_fn = pretraining_input.train_dataset_fn(files, counts, per_replica_batch=1, seed=3,
                                         shuffle_buffer_size=7, start_step=0,
                                         parse=lambda positions, serialized: serialized)
    context = tf.distribute.InputContext(num_input_pipelines=num_workers,
                                         input_pipeline_id=worker, num_replicas_in_sync=num_workers)
    return [bytes(b[0]) for b in dataset_fn(context).take(per_epoch).as_numpy_iterator()]


@pytest.mark.parametrize("which", ["one file: records dealt", "three files: whole files"])
def test_every_record_is_read_exactly_once_per_epoch_across_workers(data, which):
    import tensorflow as tf
    files = [data["train"]] if which.startswith("one") else data["parts"]
    everything = sorted(bytes(r) for f in files for r in tf.data.TFRecordDataset(f).as_numpy_iterator())
    shares = [_read_one_epoch(files, 2, worker) for worker in (0, 1)]
    assert all(shares) and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == everything   # none twice, none missing


# ------------------------------------------------------------------------------------------------
# Two real workers
# ------------------------------------------------------------------------------------------------

def _argv(data, output_dir, *extra):
    return ["run_pretraining.py", f"--input_file={data['train']}", f"--output_dir={output_dir}",
            f"--bert_config_file={data['config']}", f"--vocab_file={data['vocab_file']}",
            f"--max_seq_length={SEQ}", f"--max_predictions_per_seq={PRED}", "--do_train",
            "--train_batch_size=8", "--learning_rate=5e-3", "--num_warmup_steps=2",
            f"--num_train_steps={STEPS}", "--iterations_per_loop=1",
            f"--save_checkpoints_steps={SAVE_EVERY}", "--keep_checkpoint_max=10",
            "--jit_compile=false", "--shuffle_buffer_size=1", "--check_input_files=false", *extra]


def _weights(prefix):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith(("bert", "cls")) and "OPTIMIZER_SLOT" not in k}


def _losses(output_dir):
    import glob

    import tensorflow as tf
    out = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "train", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "loss":
                    out[event.step] = float(tf.make_ndarray(value.tensor))
    return [out[s] for s in sorted(out)]


def _worker_dirs(output_dir):
    import hashlib
    import tempfile
    digest = hashlib.sha256(os.path.abspath(output_dir).encode()).hexdigest()[:12]
    return [os.path.join(tempfile.gettempdir(), f"roberta_zh-{digest}-worker-{i}") for i in (1,)]


@pytest.fixture(scope="module")
def two_workers(data, tmp_path_factory):
    """An uninterrupted two-worker run: its output folder and the cluster's logs."""
    from worker_cluster import LocalCluster
    root = tmp_path_factory.mktemp("two_workers")
    out = str(root / "run")
    cluster = LocalCluster(2, root / "logs").start(_argv(data, out))
    assert cluster.wait(timeout=600) == [0, 0], cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    return out, cluster


@pytest.mark.slow
def test_two_workers_equal_one_worker_and_leave_a_one_worker_folder(data, two_workers, tmp_path):
    """Records dealt in order (shuffle window 1): the two workers' batches [4 + 4] are the records of
    the one worker's batch [8], so the runs must agree up to float summation order."""
    out, cluster = two_workers
    for i in (0, 1):
        assert "2 replica(s), 2 worker(s); global batch 8 = 4 per replica" in cluster.log(i)
    one = str(tmp_path / "one")
    import run_pretraining
    run_pretraining.run(run_pretraining.parse_flags(_argv(data, one, "--strategy=one_device")[1:]))

    np.testing.assert_allclose(_losses(out), _losses(one), rtol=1e-4)
    assert len(_losses(out)) == STEPS
    a, b = _weights(os.path.join(one, f"ckpt-{STEPS}")), _weights(os.path.join(out, f"ckpt-{STEPS}"))
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=2e-5, err_msg=name)
    # The same folder contract: nothing a second worker wrote is left, here or in its temp folder.
    def files(folder):  # event files are named by time, host and process: one name for them all
        return sorted(os.path.join(os.path.relpath(d, folder), "EVENTS" if f.startswith("events.out")
                                   else f) for d, _, fs in os.walk(folder) for f in fs)
    assert files(out) == files(one)
    assert "workers" not in os.listdir(out)
    assert not any(os.path.exists(d) for d in _worker_dirs(out))


_LINE = (r"run_pretraining.py: error: worker {peer} \(127\.0\.0\.1:{port}\) is gone; stopped at step "
         r"\d+; rerun the same command on every worker to resume from ckpt-{ckpt}")


def _stops_with_one_line(cluster, survivor, peer, ckpt, killed_at):
    """The survivor ends by itself, soon, with exit 2 and the one line naming the lost peer."""
    import re

    import multi_worker
    code = cluster.wait(timeout=multi_worker.HEARTBEAT_TIMEOUT_S + 60)[survivor]
    took = time.time() - killed_at
    log = cluster.log(survivor)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert re.fullmatch(_LINE.format(peer=peer, port=cluster.ports[peer], ckpt=ckpt), last), last
    assert took < multi_worker.HEARTBEAT_TIMEOUT_S + 30, took


@pytest.mark.slow
def test_lost_worker_stops_the_others_with_one_line_and_a_rerun_resumes_exactly(
        data, two_workers, tmp_path):
    """Two losses in a row, each followed by the same command on every worker: worker 1 killed in
    its save while the chief waits at the next step, then the chief killed in its save (files
    written, `checkpoint` state not yet) while worker 1 waits at the next step. The last rerun ends
    with the weights of the uninterrupted run."""
    from worker_cluster import LocalCluster

    import pretraining_input
    reference, _ = two_workers
    out = str(tmp_path / "run")
    cluster = LocalCluster(2, tmp_path / "logs")
    marker = str(tmp_path / "paused")

    def pause(worker, step):
        if os.path.exists(marker):
            os.remove(marker)
        return {worker: {"ROBERTA_ZH_TEST_PAUSE_SAVE": str(step), "ROBERTA_ZH_TEST_PAUSE_MARKER": marker,
                         "ROBERTA_ZH_TEST_PAUSE_SECONDS": "60"}}

    # 1. Worker 1 killed in the middle of its save of ckpt-4: the chief has saved ckpt-4.
    cluster.start(_argv(data, out), worker_env=pause(1, SAVE_EVERY))
    cluster.wait_for(lambda: os.path.exists(marker), 600, "worker 1's save")
    _stops_with_one_line(cluster, 0, 1, SAVE_EVERY, cluster.kill(1))
    assert pretraining_input.latest_checkpoint(out).endswith(f"ckpt-{SAVE_EVERY}")

    # 2. The chief killed in the middle of its save of ckpt-8: its files are there, the state file
    # still names ckpt-4, which is where the rerun must resume.
    cluster.start(_argv(data, out), worker_env=pause(0, 2 * SAVE_EVERY))
    cluster.wait_for(lambda: os.path.exists(marker), 600, "the chief's save")
    _stops_with_one_line(cluster, 1, 0, SAVE_EVERY, cluster.kill(0))
    assert pretraining_input.latest_checkpoint(out).endswith(f"ckpt-{SAVE_EVERY}")

    # 3. The same command again: it ends where the uninterrupted run ended, weight for weight.
    cluster.start(_argv(data, out))
    assert cluster.wait(timeout=600) == [0, 0], cluster.log(0)[-3000:]
    assert f"resumed from {out}/ckpt-{SAVE_EVERY} at step {SAVE_EVERY}" in cluster.log(0)
    assert _losses(out)[-1] == pytest.approx(_losses(reference)[-1], rel=1e-5)
    resumed, uninterrupted = (_weights(os.path.join(d, f"ckpt-{STEPS}")) for d in (out, reference))
    for name in uninterrupted:
        np.testing.assert_allclose(resumed[name], uninterrupted[name], atol=1e-6, err_msg=name)


def _bad_tf_configs(port_in_use):
    return [("{not json", "TF_CONFIG is not JSON"),
            (_cluster("127.0.0.1:1", "127.0.0.1:2", task=("worker", 5)), "this task is worker 5"),
            (_cluster(f"127.0.0.1:{port_in_use}", "127.0.0.1:1"), f"port {port_in_use} of this task")]


def test_bad_tf_config_fails_the_run_before_anything_is_written(data, tmp_path, monkeypatch):
    import run_pretraining
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        for tf_config, message in _bad_tf_configs(taken.getsockname()[1]):
            monkeypatch.setenv("TF_CONFIG", tf_config)
            with pytest.raises(run_pretraining.UsageError, match=message):
                run_pretraining.run(run_pretraining.parse_flags(_argv(data, tmp_path / "run")[1:]))
            assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_tf_config_on_the_command_line_is_one_line_exit_2(data, tmp_path):
    argv = _argv(data, tmp_path / "run")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / argv[0]), *argv[1:]], check=False,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CONFIG="{not json", TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "run_pretraining.py: error: TF_CONFIG is not JSON (Expecting property name")
    assert not (tmp_path / "run").exists()


def test_a_peer_lost_during_evaluation_is_the_same_one_line(data, tmp_path, monkeypatch):
    """run_pretraining's evaluation, like its training, turns the collective error of a lost peer
    into the one line (here a one-device strategy posing as worker 0 of two, and TF's error)."""
    import types

    import tensorflow as tf

    import multi_worker
    import pretraining_input
    import run_pretraining

    class PosingAsWorker0:
        cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": ["127.0.0.1:1111", "127.0.0.1:2222"]}), task_type="worker",
            task_id=0)

        def __getattr__(self, name):
            return getattr(tf.distribute.get_strategy(), name)

    def eval_step(iterator):
        raise tf.errors.UnavailableError(None, None, (
            "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
            "information from remote target /job:worker/replica:0/task:1 while calling RecvBuf"))

    trainer = types.SimpleNamespace(strategy=PosingAsWorker0(), eval_step=eval_step,
                                    optimizer=types.SimpleNamespace(iterations=tf.Variable(12)))
    opts = run_pretraining.parse_flags(_argv(data, str(tmp_path / "run"), "--do_eval")[1:])
    monkeypatch.setattr(multi_worker._exit_at_once, "armed", False, raising=False)  # pytest lives on
    with pytest.raises(multi_worker.UsageError, match=(
            r"^worker 1 \(127\.0\.0\.1:2222\) is gone; stopped while evaluating at step 12; rerun the "
            r"same command on every worker to start again \(no checkpoint yet\)$")):
        run_pretraining._evaluate(opts, trainer, [data["train"]],
                                  [pretraining_input.count_records(data["train"])], 1)


# ------------------------------------------------------------------------------------------------
# Fine-tuning on two workers
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_worker_fine_tuning_equals_one_worker_and_leaves_a_one_worker_folder(tmp_path, google_vocab):
    """run_classifier.py on two workers (each reading half of every global batch of 8) trains the
    same model as one worker at batch 8: no dropout, so the two differ only in float summation
    order; the chief writes the folder a one-worker run writes, the other worker nothing."""
    from helpers import TINY_CLASSIFIER, write_pair_data
    from worker_cluster import LocalCluster

    write_pair_data(tmp_path / "data")
    config = tmp_path / "bert_config.json"
    config.write_text(json.dumps(dict(TINY_CLASSIFIER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))

    def argv(out):
        return ["run_classifier.py", "--task_name=lcqmc_pair", f"--data_dir={tmp_path / 'data'}",
                f"--vocab_file={google_vocab}", f"--bert_config_file={config}", f"--output_dir={out}",
                "--max_seq_length=16", "--train_batch_size=8", "--learning_rate=1e-3",
                "--num_train_epochs=2", "--warmup_proportion=0", "--do_train", "--do_eval", "--do_predict"]

    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    cluster = LocalCluster(2, tmp_path / "logs").start(argv(two))
    assert cluster.wait(timeout=600) == [0, 0], cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    single = LocalCluster(1, tmp_path / "logs1").start(argv(one))  # one task: no cluster
    assert single.wait(timeout=600) == [0], single.log(0)[-3000:]

    def files(folder):
        return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    assert files(two) == files(one) and "best/model_info.json" in files(one)
    assert not any(os.path.exists(d) for d in _worker_dirs(two))
    def read(folder, name):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)
    history = [read(o, "train_history.json")["epochs"] for o in (two, one)]
    assert len(history[0]) == 2
    np.testing.assert_allclose([e["train_loss"] for e in history[0]], [e["train_loss"] for e in history[1]],
                               rtol=1e-4)
    results = [read(o, "eval_results.json") for o in (two, one)]
    assert results[0] == results[1]
    import tensorflow as tf
    readers = [tf.train.load_checkpoint(os.path.join(o, "best")) for o in (one, two)]
    a, b = ({k: r.get_tensor(k) for k in r.get_variable_to_shape_map() if k.endswith("VARIABLE_VALUE")
             and k != "save_counter/.ATTRIBUTES/VARIABLE_VALUE"} for r in readers)
    assert a.keys() == b.keys() and "output_weights/.ATTRIBUTES/VARIABLE_VALUE" in a
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=2e-5, err_msg=name)
    # Both workers printed the same dev metrics: each evaluated the whole dev set with the same weights.
    lines = [[x for x in cluster.log(i).splitlines() if x.startswith('{"accuracy"')] for i in (0, 1)]
    assert lines[0] == lines[1] and len(lines[0]) == 1


@pytest.mark.slow
def test_a_peer_lost_while_fine_tuning_stops_the_chief_with_one_line(tmp_path, google_vocab):
    """Worker 1 killed after the first epoch's best/ checkpoint: the chief stops by itself, soon, with
    the one line (fine-tuning has no resume: it says to start again)."""
    import re

    from helpers import classifier_config, write_pair_data
    from worker_cluster import LocalCluster

    import multi_worker

    write_pair_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["run_classifier.py", "--task_name=lcqmc_pair", f"--data_dir={tmp_path / 'data'}",
            f"--vocab_file={google_vocab}", f"--bert_config_file={classifier_config(tmp_path)}", f"--output_dir={out}",
            "--max_seq_length=16", "--train_batch_size=8", "--num_train_epochs=200", "--do_train", "--do_eval"]
    cluster = LocalCluster(2, tmp_path / "logs").start(argv)
    cluster.wait_for(lambda: (out / "best" / "checkpoint").exists(), 300, "the first best/ checkpoint")
    killed_at = cluster.kill(1)
    code = cluster.wait(timeout=multi_worker.HEARTBEAT_TIMEOUT_S + 60)[0]
    log = cluster.log(0)
    assert code == 2 and "Traceback" not in log, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert re.fullmatch(rf"run_classifier.py: error: worker 1 \(127\.0\.0\.1:{cluster.ports[1]}\) is gone; "
                        r"fine-tuning stopped at step \d+; it does not resume: rerun on every worker "
                        r"with a new --output_dir", last), last
    assert time.time() - killed_at < multi_worker.HEARTBEAT_TIMEOUT_S + 30
