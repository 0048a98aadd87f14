"""Training on several machines with TF_CONFIG: the cluster it names, how a lost worker is noticed and
reported, and what the workers other than the chief may write.

TensorFlow's `MultiWorkerMirroredStrategy` does the work; this module holds our rules around it:

- TF_CONFIG is checked before anything is built or written: not JSON, this task outside its cluster,
  a malformed address or this task's port already taken is one UsageError line (exit 2).
- A lost worker is noticed by TF's coordination service: every worker sends it a heartbeat, and a
  task silent for HEARTBEAT_TIMEOUT_S seconds is declared gone; every collective in flight (and every
  later one) then fails with an error naming it. A killed process is noticed sooner: its sockets close
  and the all-reduce waiting on it fails at once. `lost_peer_error` turns either error into one line
  naming the peer (its job, index and TF_CONFIG address) and the command that resumes, and makes the
  process end right after printing it (see `_exit_at_once`).
- Workers other than the chief keep their checkpoint copies in a local temporary folder that is
  removed when they exit, never under --output_dir, so a two-worker run folder has the same files as
  a one-worker one.
- Fine-tuning on a cluster: Keras 3.15's fit and predict fail under MultiWorkerMirroredStrategy, so
  `fit` and `predict` here do their work (fit's step, the same callbacks) for finetuning.
"""

import atexit
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile

import train_utils

UsageError = train_utils.UsageError

# A worker silent for this long is declared gone (TF's coordination service heartbeat; TF's own default
# is 10 s). 30 s leaves room for a host whose CPUs are saturated by input processing, and keeps "the
# survivors stop" well under a minute. A killed process is noticed sooner, when its sockets close.
HEARTBEAT_TIMEOUT_S = 30
JOBS = ("chief", "worker")  # the jobs MultiWorkerMirroredStrategy trains with, in task order
_FIX = "fix TF_CONFIG (see README, Several machines)"


class Cluster:
    """The training cluster TF_CONFIG names: `tasks` [(job, index, "host:port")] with the chief first,
    and this process's (job, index)."""

    def __init__(self, tasks, job, index):
        self.tasks, self.job, self.index = tasks, job, index

    @property
    def num_workers(self):
        return len(self.tasks)

    def address(self, job, index):
        return next(a for j, i, a in self.tasks if (j, i) == (job, index))

    def name(self, job, index):
        """'worker 1 (127.0.0.1:2223)'."""
        return f"{job} {index} ({self.address(job, index)})"


def _address_port(address, where):
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})", address) \
        if isinstance(address, str) else None
    if not match or not 0 < int(match.group(2)) < 65536:
        raise UsageError(f"TF_CONFIG: {where} = {address!r} is not a host:port address; {_FIX}")
    return int(match.group(2))


def read_tf_config(environ=None):
    """TF_CONFIG -> Cluster, or None when it names no cluster of several workers.

    UsageError (one line) for TF_CONFIG that is not JSON, jobs we cannot train with (ps, evaluator),
    addresses that are not host:port, or a task that is not one of the cluster's.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"TF_CONFIG is not JSON ({e.msg} at character {e.pos}); {_FIX}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise UsageError(f'TF_CONFIG must be a JSON object {{"cluster": {{...}}, "task": {{...}}}}; '
                         f"{_FIX}")
    cluster = config.get("cluster", {})
    others = sorted(set(cluster) - set(JOBS))
    if others:
        raise UsageError(f"TF_CONFIG: cluster job {others[0]!r} is not supported: "
                         f"MultiWorkerMirroredStrategy trains with 'chief' and 'worker' jobs only")
    tasks = []
    for job in JOBS:
        addresses = cluster.get(job, [])
        if not isinstance(addresses, list):
            raise UsageError(f"TF_CONFIG: cluster.{job} must be a list of host:port; {_FIX}")
        for i, address in enumerate(addresses):
            _address_port(address, f"cluster.{job}[{i}]")
            tasks.append((job, i, address))
    if len(cluster.get("chief", [])) > 1:
        raise UsageError(f"TF_CONFIG: cluster.chief lists {len(cluster['chief'])} tasks; "
                         "a cluster has at most one chief")
    if len(tasks) < 2:
        return None  # one task: one machine, no cluster to join
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise UsageError('TF_CONFIG names a cluster but no "task" ({"type": "worker", "index": N}) '
                         f"saying which of its tasks this process is; {_FIX}")
    job, index = task.get("type"), task.get("index", 0)
    if job not in JOBS or not isinstance(index, int) or not 0 <= index < len(cluster.get(job, [])):
        listed = ", ".join(f"{j} {i}" for j, i, _ in tasks)
        raise UsageError(f"TF_CONFIG: this task is {job} {index}, which is not in its cluster "
                         f"({listed}); {_FIX}")
    return Cluster(tasks, job, index)


def check_port_free(cluster):
    """UsageError if this task's port is taken on this machine (TF's gRPC server would share it with
    the other process and the run would hang or mix messages, rather than fail)."""
    address = cluster.address(cluster.job, cluster.index)
    port = _address_port(address, f"cluster.{cluster.job}[{cluster.index}]")
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        try:
            # SO_REUSEADDR: a port left in TIME_WAIT by a killed run is free for its rerun;
            # only a socket bound to it now makes bind fail.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"TF_CONFIG: port {port} of this task ({cluster.name(cluster.job, cluster.index)}) "
                                 "is in use on this machine: stop the process holding it, or give "
                                 "this task another port in every worker's TF_CONFIG") from None
        finally:
            probe.close()


def make_strategy(cluster):
    """MultiWorkerMirroredStrategy for `cluster`, with the heartbeat timeout set (before TF starts
    its server, which is when the coordination service reads it)."""
    import tensorflow as tf

    check_port_free(cluster)
    leader = cluster.tasks[0]
    try:  # TF has no public setting for the heartbeat: configure its coordination service directly
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context

        jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=sum(
            1 for j, _, _ in cluster.tasks if j == job)) for job in JOBS
            if any(j == job for j, _, _ in cluster.tasks)]
        context.context().configure_coordination_service(
            service_type="standalone", service_leader=f"/job:{leader[0]}/replica:0/task:{leader[1]}",
            heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000, coordinated_jobs=jobs)
    except (ImportError, AttributeError) as e:  # another TF version: its default heartbeat (10 s)
        from absl import logging
        logging.warning("could not set the coordination service heartbeat (%s); TF's default applies", e)
    return tf.distribute.MultiWorkerMirroredStrategy()


# ------------------------------------------------------------------------------------------------
# Fine-tuning on a cluster: Keras' fit and predict, done here
# ------------------------------------------------------------------------------------------------

def is_chief(strategy):
    """False only for a worker of a TF_CONFIG cluster other than its chief (the first task)."""
    cluster = cluster_of(strategy)
    return cluster is None or (cluster.job, cluster.index) == cluster.tasks[0][:2]


def fit(model, loss, strategy, ds, epochs, steps_per_epoch, callbacks, jit_compile):
    """`model.fit(ds.repeat(), epochs, steps_per_epoch, callbacks)` under MultiWorkerMirroredStrategy.

    Keras 3.15's fit cannot run there (keras-team/keras#20585, tensorflow/tensorflow#72388): before
    the first step it reduces the first batch, a dict of per-replica tensors, with strategy.reduce,
    which fails ("Attempt to convert a value ({'input_ids': PerReplica...}) ... to a Tensor"), and each
    step reduces its scalar loss with axis=0 ("Invalid reduction dimension 0"). This is fit's step
    with the compiled loss and the same callbacks, and with the gradient handled as one machine
    handles it: summed over the replicas first, then clipped (Keras' apply would clip each
    replica's part), then the optimizer's rule (run_pretraining's trainer does the same).
    ds: the global batches [B, ...] (every worker builds the same, same seed); each worker takes
    its own slice of every one, so the replicas together see exactly one machine's batch.
    """
    import keras
    import tensorflow as tf

    losses = loss if isinstance(loss, (list, tuple)) else [loss]
    optimizer = model.optimizer
    with strategy.scope():
        optimizer.build(model.trainable_variables)  # its slots mirrored, before the step is traced
    global_batch = int(tf.nest.flatten(ds.element_spec)[0].shape[0])  # drop_remainder: static

    def worker_slices(context):  # [B] -> this worker's rows [B / workers] -> per replica
        rows = global_batch // context.num_input_pipelines
        start = context.input_pipeline_id * rows
        return ds.repeat().map(lambda *t: tf.nest.map_structure(lambda x: x[start:start + rows], t)) \
            .unbatch().batch(context.get_per_replica_batch_size(global_batch))

    iterator = iter(strategy.distribute_datasets_from_function(worker_slices))

    def update(strategy, grads):  # cross-replica: every variable copy gets its (equal) gradient
        for variable, grad in zip(model.trainable_variables, grads):
            strategy.extended.update(variable.value, lambda v, g: optimizer.update_step(
                g, v, optimizer.learning_rate), args=(grad,), group=False)
        optimizer.iterations.assign_add(1)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            outs, ys = (out, y) if len(losses) > 1 else ([out], [y])
            value = tf.add_n([f(t, o) for f, t, o in zip(losses, ys, outs)])  # already / replicas
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)  # embeddings: dense
                 for g, v in zip(tape.gradient(value, model.trainable_variables), model.trainable_variables)]
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce("SUM", grads)
        if optimizer.global_clipnorm:
            grads, _ = tf.clip_by_global_norm(grads, optimizer.global_clipnorm)
        context.merge_call(update, args=(grads,))
        return value

    @tf.function(jit_compile=jit_compile)
    def step():
        return strategy.reduce("SUM", strategy.run(replica_step, args=next(iterator)), axis=None)

    callbacks = keras.callbacks.CallbackList(callbacks, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        total = 0.0
        for batch in range(steps_per_epoch):
            try:
                total += float(step())
            except tf.errors.OpError as e:
                lost = lost_peer_error(e, strategy, f"fine-tuning stopped at step "
                                       f"{epoch * steps_per_epoch + batch}; it does not resume: "
                                       "rerun on every worker with a new --output_dir")
                if lost:
                    raise lost from None
                raise
            callbacks.on_train_batch_end(batch, {"loss": total / (batch + 1)})  # fit's running mean
            if model.stop_training:
                break
        callbacks.on_epoch_end(epoch, {"loss": total / (batch + 1)})
        if model.stop_training:
            break
    callbacks.on_train_end()


def predict(model, ds):
    """`model.predict(ds)` for a model built under MultiWorkerMirroredStrategy, where Keras 3.15's
    predict fails too (see `fit`): each worker predicts every row itself, with the same weights,
    outside the strategy's replicas. -> numpy [N, ...] (a tuple of them for several outputs)."""
    import numpy as np
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False))
    batches = [tf.nest.map_structure(np.asarray, call(x)) for x in ds]
    return tf.nest.map_structure(lambda *b: np.concatenate(b), *batches)


# ------------------------------------------------------------------------------------------------
# A lost peer: one line, then the process ends
# ------------------------------------------------------------------------------------------------

_TASK_IN_MESSAGE = re.compile(r"/job:(chief|worker)/replica:\d+/task:(\d+)")


def cluster_of(strategy):
    """The Cluster a MultiWorkerMirroredStrategy was built from, or None for other strategies."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None
    spec = resolver.cluster_spec().as_dict()
    tasks = [(job, i, address) for job in JOBS for i, address in enumerate(spec.get(job, []))]
    if len(tasks) < 2:
        return None
    return Cluster(tasks, resolver.task_type, resolver.task_id)


def lost_peer_error(error, strategy, what_to_do):
    """The UsageError to raise for an error that says a peer is gone, or None for any other error.

    error: an exception from a step under `strategy`; what_to_do: the rest of the line, e.g. "this
    worker stopped at step 43; rerun the same command on every worker to resume from ckpt-40".
    Returning an error also arranges for
    the process to end as soon as it has printed it (see `_exit_at_once`).
    """
    cluster = cluster_of(strategy)
    who = lost_peer(error, cluster) if cluster is not None else None
    if who is None:
        return None
    if not getattr(_exit_at_once, "armed", False):
        _exit_at_once.armed = True
        atexit.register(_exit_at_once)  # registered after TensorFlow's hooks: runs before them
    return UsageError(f"{who} is gone; {what_to_do}")


def lost_peer(error, cluster):
    """'worker 1 (127.0.0.1:2223)': the peer an error of a collective says is gone (the coordination
    service names a task that stopped sending heartbeats, gRPC the remote target whose connection
    closed); 'a peer worker' when it names none; None when the error is not about a peer."""
    import tensorflow as tf

    if not isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                              tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                              tf.errors.InternalError, tf.errors.FailedPreconditionError)):
        return None
    message = getattr(error, "message", None) or str(error)
    named = [(job, int(i)) for job, i in _TASK_IN_MESSAGE.findall(message)]
    peers = [t for t in dict.fromkeys(named) if t != (cluster.job, cluster.index)
             and any((j, i) == t for j, i, _ in cluster.tasks)]
    if peers:
        return cluster.name(*peers[0])
    if re.search(r"[Cc]ollective|heartbeat|[Cc]onnection|unhealthy", message):
        return "a peer worker"
    return None


def _exit_at_once():
    """At exit after a lost peer: flush the logs and end the process now.

    TensorFlow's own shutdown would first wait on the lost peer (the coordination service's shutdown
    barrier and gRPC channels to it: ~20 s when it was killed, longer when its machine vanished), so
    this atexit hook, registered after TensorFlow's and therefore run before them, skips that: the
    one-line error is printed and nothing is left to write (checkpoints are only written between
    steps, and a save in progress elsewhere is never picked up half-written).
    """
    if not getattr(_exit_at_once, "armed", False):
        return
    from absl import logging

    logging.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    _remove_worker_dirs()
    os._exit(2)



# ------------------------------------------------------------------------------------------------
# What the workers other than the chief write
# ------------------------------------------------------------------------------------------------

_WORKER_DIRS = []


def worker_dir(output_dir, worker_index):
    """A local folder for a non-chief worker's own copies (its checkpoints: every worker must write
    one, only the chief's is kept), emptied now and removed at exit. Named by output_dir and worker
    index, so a relaunched worker removes what a killed one left."""
    digest = hashlib.sha256(os.path.abspath(output_dir).encode() if "://" not in output_dir
                            else output_dir.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"roberta_zh-{digest}-worker-{worker_index}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    if not _WORKER_DIRS:
        atexit.register(_remove_worker_dirs)
    _WORKER_DIRS.append(path)
    return path


def _remove_worker_dirs():
    while _WORKER_DIRS:
        shutil.rmtree(_WORKER_DIRS.pop(), ignore_errors=True)
