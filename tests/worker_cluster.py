"""Starts N real worker processes of one of our scripts on 127.0.0.1, each with its own TF_CONFIG,
for the multi-worker tests (and any test that needs a cluster).

    cluster = LocalCluster(2, tmp_path)
    cluster.start(["run_pretraining.py", "--do_train", ...])      # the same command on every worker
    codes = cluster.wait(timeout=300)                              # [0, 0]
    cluster.kill(1)                                                # SIGKILL, as a preemption does

Each worker's stdout/stderr go to files under `log_dir` (never to pipes a test might forget to
read, which would stall a worker once their buffer fills). Ports are picked free once per cluster
and kept, so a relaunch uses the same TF_CONFIG as the first launch, as a user's rerun would.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from conftest import REPO_ROOT

# Runs a script as __main__ after an optional fault hook: with ROBERTA_ZH_TEST_PAUSE_SAVE=N the process
# pauses (ROBERTA_ZH_TEST_PAUSE_SECONDS, default 60) in the middle of its save of ckpt-N (checkpoint files written, the `checkpoint`
# state file not yet updated), after creating the file ROBERTA_ZH_TEST_PAUSE_MARKER, so that a test
# can kill it there. Test-only: nothing in the scripts knows about it.
_MAIN = textwrap.dedent("""
    import os, runpy, sys, time
    pause = os.environ.get("ROBERTA_ZH_TEST_PAUSE_SAVE")
    if pause:
        import tensorflow as tf
        record_state = tf.train.CheckpointManager._record_state
        def paused_record_state(self):
            latest = self._latest_checkpoint or ""
            if latest.endswith("ckpt-" + pause):
                open(os.environ["ROBERTA_ZH_TEST_PAUSE_MARKER"], "w").close()
                time.sleep(float(os.environ.get("ROBERTA_ZH_TEST_PAUSE_SECONDS", "60")))
            record_state(self)
        tf.train.CheckpointManager._record_state = paused_record_state
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def free_ports(n):
    """n ports free on 127.0.0.1 now (bound together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class LocalCluster:
    def __init__(self, num_workers, log_dir):
        self.ports = free_ports(num_workers)
        self.addresses = [f"127.0.0.1:{p}" for p in self.ports]
        self.log_dir = str(log_dir)
        self.procs, self.launches = [], 0
        os.makedirs(self.log_dir, exist_ok=True)

    def tf_config(self, index):
        return json.dumps({"cluster": {"worker": self.addresses},
                           "task": {"type": "worker", "index": index}})

    def start(self, argv, env=None, worker_env=None):
        """Launches every worker with `argv` ([script, flags...], script relative to the repo);
        worker_env: {index: {name: value}} for some workers only (fault hooks)."""
        assert not self.procs or all(p.poll() is not None for p in self.procs), "still running"
        self.launches += 1
        self.procs, self.logs = [], []
        for i in range(len(self.ports)):
            log = os.path.join(self.log_dir, f"launch{self.launches}-worker{i}.log")
            worker = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}),
                          **(worker_env or {}).get(i, {}), TF_CONFIG=self.tf_config(i))
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", _MAIN, str(REPO_ROOT / argv[0]), *argv[1:]],
                    stdout=out, stderr=subprocess.STDOUT, env=worker, cwd=self.log_dir))
            self.logs.append(log)
        return self

    def log(self, index):
        with open(self.logs[index], encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for(self, predicate, timeout, what):
        """Polls predicate() every 20 ms until true; fails if a worker ends or time runs out."""
        deadline = time.time() + timeout
        while not predicate():
            ended = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            assert not ended, f"worker {ended[0]} ended before {what}:\n{self.log(ended[0])[-3000:]}"
            assert time.time() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.02)

    def kill(self, index):
        """SIGKILL worker `index` (no cleanup runs, as on a preempted machine); returns the time."""
        os.kill(self.procs[index].pid, signal.SIGKILL)
        self.procs[index].wait()
        return time.time()

    def wait(self, timeout):
        """-> every worker's exit status; kills them all and fails if any is still running."""
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.time())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.stop()
            logs = "\n".join(self.log(i)[-2000:] for i in range(len(self.procs)))
            raise AssertionError(f"workers still running after {timeout} s:\n{logs}") from None

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
