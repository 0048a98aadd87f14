"""Every file a run writes: whole or not at all, never over another run's output.

Three shapes of output, one rule (a reader, or a failing or killed run, never leaves half a file
under the name asked for):

    atomic_write(path, data)             a small file (JSON, vocab, predictions): temp name beside
                                         it, fsync, rename
    with replacing(path) as tmp:         a file a library writes by name (a PNG): the same steps
    with atomic_output_dir(out) as tmp:  a folder (exports, conversions): a temp folder beside it,
                                         renamed when complete
    with LockedOutputs(paths) as out:    large files streamed by a long run (pretraining records):
                                         exclusive locks, temp files, all renamed at `commit`

Temp and lock files are hidden names beside the target (`.NAME.tmp-PID...`, `.NAME.lock`), so a
glob of the folder never matches them (`is_temp_or_lock`). Remote paths (gs://, any tf.io.gfile
scheme) are written locally and copied up when complete; TensorFlow is imported only for them.
"""

import contextlib
import glob
import os
import re
import shutil
import tempfile

from train_utils import UsageError

TMP_MARK = ".tmp-"
LOCK_SUFFIX = ".lock"


def _gfile():
    return import_tensorflow("a gs:// path").io.gfile


def is_remote(path):
    """gs://, s3://, ram:// ... : read and written through tf.io.gfile."""
    return "://" in os.fspath(path)


# ------------------------------------------------------------------------------------------------
# Reading and listing: local paths through the standard library, remote ones through tf.io.gfile
# ------------------------------------------------------------------------------------------------

class LocalFiles:
    """The tf.io.gfile calls our modules make, for local paths (no TensorFlow import: JAX machines)."""
    exists, isdir, listdir, glob = os.path.exists, os.path.isdir, os.listdir, glob.glob
    rmtree, remove = shutil.rmtree, os.remove

    @staticmethod
    def GFile(path, mode="r"):  # noqa: N802 (gfile's name)
        return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))

    @staticmethod
    def rename(src, dst, overwrite=False):
        del overwrite  # os.replace always replaces, as every caller here wants
        os.replace(src, dst)

    @staticmethod
    def makedirs(path):
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def copy(src, dst, overwrite=False):
        del overwrite
        shutil.copyfile(src, dst)


def import_tensorflow(what):
    """TensorFlow, for `what` (a path that needs it); without it (a JAX-only machine) a ValueError
    naming the path rather than an ImportError from deep inside."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ValueError(f"{what}: reading it needs TensorFlow, which is not installed here") from None
    return tf


def fs(path):
    """tf.io.gfile for a remote path (TensorFlow imported on first use), else LocalFiles."""
    return import_tensorflow(path).io.gfile if is_remote(path) else LocalFiles


def read_errors(path):
    """The exceptions a failed read of `path` raises (TF's own for remote paths)."""
    if is_remote(path):
        tf = import_tensorflow(path)
        return (OSError, tf.errors.NotFoundError, tf.errors.FailedPreconditionError)
    return (OSError,)


def hidden(path, suffix):
    """`.NAME<suffix>` beside `path` (absolute): where temp and lock files of `path` go."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}{suffix}")


def is_temp_or_lock(path):
    """True for the temp and lock files this module leaves beside an output while it is written."""
    name = os.path.basename(os.fspath(path).rstrip("/"))
    return name.startswith(".") and (TMP_MARK in name or name.endswith(LOCK_SUFFIX))


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_local(tmp, path):
    """fsync, then rename: after a crash `path` holds the old bytes or the new ones, never a mix."""
    _fsync(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# One file
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def replacing(path):
    """Yields a temp file name to write; on success it becomes `path`, on any error it is removed.

    Local: a hidden name beside `path` (same file system, so the rename is atomic), fsynced before
    the rename. Remote: a local temp file copied up at the end (an object store shows an object only
    once its upload completes).
    """
    path = os.fspath(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="roberta_zh-out-") as tmpdir:
            tmp = os.path.join(tmpdir, os.path.basename(path.rstrip("/")) or "out")
            yield tmp
            _gfile().copy(tmp, path, overwrite=True)
        return
    tmp = hidden(path, f"{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        _commit_local(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, data):
    """Writes bytes or text (UTF-8, "\\n" line ends kept as given) to `path` via `replacing`."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# One folder: a temp folder beside the target, renamed at the end
# ------------------------------------------------------------------------------------------------

def check_writable(folder, flag="--output_dir", beside=False):
    """UsageError naming `flag` unless `folder` can be written, before any work: a read-only file
    system (or a folder without write permission) would otherwise fail deep in the first save.

    The folder checked is `folder` or, while it does not exist, the nearest one above it (where it
    would be created); with `beside`, its parent (atomic_output_dir writes a temp folder there).
    Remote paths (gs://) are left to the first write.
    """
    if is_remote(folder):
        return
    target = os.path.abspath(folder)
    path = os.path.dirname(target) if beside else target
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path) or os.access(path, os.W_OK):
        return
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
    where = "" if path == target else f" (where {folder} would be written)"
    raise UsageError(f"{flag}={folder}: {path} {why}{where}; choose another {flag}")


def check_output_dir(output_dir, overwrite=False, sources=()):
    """Fails early (before any work) if `output_dir` holds something and `overwrite` is off, if
    replacing it would delete one of `sources` (the model being converted) (ValueError), or if it
    cannot be written, e.g. on a read-only file system (UsageError)."""
    remote = is_remote(output_dir)
    real = (lambda p: p.rstrip("/")) if remote else os.path.realpath
    out = real(output_dir)
    for source in sources:
        src = real(source)
        if src == out or src.startswith(out.rstrip("/" if remote else os.sep) + "/"):
            raise ValueError(f"--output_dir={output_dir} holds the input {source}; writing there "
                             f"would replace it: choose another --output_dir")
    files = fs(output_dir)
    if files.exists(output_dir):
        if not files.isdir(output_dir):
            raise ValueError(f"--output_dir={output_dir} is an existing file, not a folder")
        if files.listdir(output_dir) and not overwrite:
            raise ValueError(f"--output_dir={output_dir} already exists and is not empty; "
                             f"pass --overwrite to replace it")
    check_writable(output_dir, beside=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temp_dirs(output_dir):
    """Removes `.NAME.tmp-PID-*` folders that a killed run left beside `output_dir`.

    Only our own naming pattern, and only for processes that no longer exist on this machine. A
    `.NAME.old-PID-*` folder holds the previous output, moved aside during --overwrite: if the run
    died before the new output took its place, it is moved back rather than deleted.
    """
    from absl import logging

    parent, base = os.path.split(os.path.abspath(output_dir))
    if not os.path.isdir(parent):
        return
    pattern = re.compile(rf"^\.{re.escape(base)}\.(tmp|old)-(\d+)-")
    for name in sorted(os.listdir(parent)):
        m = pattern.match(name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, name)
        previous = os.path.join(path, "x")
        if m.group(1) == "old" and os.path.isdir(previous) and not os.path.exists(output_dir):
            os.rename(previous, output_dir)
            logging.warning("restored %s from %s (a run was killed while replacing it)", output_dir, path)
        logging.info("removing %s, left by a killed run (pid %s)", path, m.group(2))
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(output_dir, overwrite=False, sources=()):
    """Yields a temp folder beside `output_dir`; on success it becomes `output_dir`.

    On any exception the temp folder is removed, so a failed run leaves no partial output; what a
    killed run left is removed by the next run (clean_stale_temp_dirs). With `overwrite`, an existing
    `output_dir` is replaced only after the new one is complete. The folder gets the user's umask
    (mkdtemp alone makes it 0700).
    """
    if is_remote(output_dir):
        with _remote_output_dir(output_dir, overwrite, sources) as tmp:
            yield tmp
        return
    output_dir = os.path.abspath(output_dir)
    check_output_dir(output_dir, overwrite, sources)
    parent, base = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temp_dirs(output_dir)
    umask = os.umask(0)
    os.umask(umask)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}{TMP_MARK}{os.getpid()}-")
    try:
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(root, name))
        old = None
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-{os.getpid()}-")
            os.rename(output_dir, os.path.join(old, "x"))
        os.rename(tmp, output_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _remote_output_dir(output_dir, overwrite, sources):
    """gs:// (any tf.io.gfile scheme): the output is made in a local temp folder and copied up only
    when complete, so a failed run writes nothing there. (Cloud storage has no atomic folder
    rename: with --overwrite the old files are deleted just before the copy.)"""
    check_output_dir(output_dir, overwrite, sources)
    gfile = _gfile()
    with tempfile.TemporaryDirectory(prefix="roberta_zh-export-") as tmp:
        yield tmp
        if gfile.exists(output_dir):
            gfile.rmtree(output_dir)
        for root, _, files in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            target = output_dir.rstrip("/") + ("" if rel == "." else "/" + rel)
            gfile.makedirs(target)
            for name in files:
                gfile.copy(os.path.join(root, name), f"{target.rstrip('/')}/{name}", overwrite=True)


# ------------------------------------------------------------------------------------------------
# Files streamed by a long run: locked, written under temp names, all put in place at `commit`
# ------------------------------------------------------------------------------------------------

class LockedOutputs:
    """Writes output files (and a sidecar beside each) so that a failing or concurrent run harms nothing.

        with LockedOutputs(paths, inputs=input_paths, sidecar_suffix=".meta.json") as out:
            out.write([bytes for output 0, bytes for output 1, ...])   # as often as needed
            out.commit([sidecar text of output 0, ...])                # all or nothing

    - Before anything is written: each path must not be a directory, one of `inputs` or a sidecar
      name, and its folder must be writable (UsageError naming the flag and path).
    - A lock (`.<name>.lock`, flock) is held per output for the whole run: a second run on the
      same output fails at once with a one-line message; a killed run's lock dies with it.
    - Data goes to `.<name>.tmp-<pid>`; only the lock holder removes stale temp files of killed
      runs. `commit` writes the sidecars to temp files, fsyncs, then per output: removes the old
      sidecar (it must never describe new data), renames the data into place, renames the sidecar
      into place. Leaving the block without `commit` (an error) removes the temp files; files
      already on disk are never touched.
    - Remote paths (gs://...) are written locally first and copied through tf.io.gfile at commit
      (no lock there: object stores have none).
    - A caller that writes the files itself (Beam's workers) may hold the block open only for the
      checks and locks, and never call `write` or `commit`.
    """

    def __init__(self, paths, inputs=(), flag="--output_file", sidecar_suffix=None):
        self.paths, self.inputs, self.flag = list(paths), list(inputs), flag
        self.sidecar_suffix = sidecar_suffix
        self._locks, self._files, self._tmps = [], [], []
        self._staging = None
        self.counts = [0] * len(self.paths)

    def __enter__(self):
        try:
            self._check()
            if any(map(is_remote, self.paths)):
                self._staging = tempfile.mkdtemp(prefix="roberta_zh-out-")
                self._tmps = [os.path.join(self._staging, f"{i}.part") for i in range(len(self.paths))]
            else:
                for path in self.paths:
                    self._lock(path)
                self._tmps = [hidden(p, f"{TMP_MARK}{os.getpid()}") for p in self.paths]
                for path in self.paths:
                    self._remove_stale_tmps(path)
            self._files = [open(t, "wb") for t in self._tmps]
        except BaseException:
            self._cleanup()
            raise
        return self

    def _check(self):
        inputs = {os.path.realpath(p) for p in self.inputs if not is_remote(p)}
        for path in self.paths:
            if is_remote(path):
                if path in self.inputs:
                    raise UsageError(f"{self.flag}: {path} is also an input file; choose another name")
                continue
            if os.path.isdir(path) or path.endswith(("/", os.sep)):
                raise UsageError(f"{self.flag}: {path} is a directory; give a file name inside it")
            if os.path.realpath(path) in inputs:
                raise UsageError(f"{self.flag}: {path} is also an input file; choose another name")
            if self.sidecar_suffix and path.endswith(self.sidecar_suffix):
                raise UsageError(f"{self.flag}: {path} ends in {self.sidecar_suffix}, the sidecar suffix")
            directory = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise UsageError(f"{self.flag}: cannot write to {directory}: {e.strerror or e}") from None
            if not os.access(directory, os.W_OK | os.X_OK):
                raise UsageError(f"{self.flag}: cannot write to {directory}: permission denied")
            if os.path.exists(path) and not os.access(path, os.W_OK):
                raise UsageError(f"{self.flag}: {path} is read-only; make it writable or choose "
                                 "another name")

    def _lock(self, path):
        import fcntl
        lock_path = hidden(path, LOCK_SUFFIX)
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"{self.flag}: cannot write to {os.path.dirname(lock_path)}: "
                                 f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UsageError(f"{self.flag}: {path} is being written by another run (lock "
                                 f"{lock_path} is held); wait for it or choose another name") from None
            # The holder we waited for may have removed the lock file meanwhile: lock the new one.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._locks.append((lock_path, fd))
                return
            os.close(fd)

    @staticmethod
    def _remove_stale_tmps(path):
        for stale in glob.glob(glob.escape(hidden(path, TMP_MARK)) + "*"):
            try:
                os.remove(stale)
            except OSError:
                pass

    def write(self, shard_bytes, counts=None):
        """Appends shard_bytes[i] to output i; counts[i] records, if given."""
        for i, (f, data) in enumerate(zip(self._files, shard_bytes)):
            try:
                f.write(data)
            except OSError as e:
                self._write_failed(i, e)
            if counts is not None:
                self.counts[i] += counts[i]

    def _write_failed(self, i, error):
        # A full disk is the usual cause; the temp files go on leaving the block, the old output stays.
        raise UsageError(f"{self.flag}: cannot write {self.paths[i]}: {error.strerror or error}; "
                         "nothing was replaced") from None

    def commit(self, sidecars=None):
        """Puts every output, and its sidecar (sidecars[i], text) when given, in place."""
        sidecars = list(sidecars) if sidecars is not None else [None] * len(self.paths)
        if any(s is not None for s in sidecars) and not self.sidecar_suffix:
            raise ValueError("sidecars given, but LockedOutputs was made without a sidecar_suffix")
        suffix = self.sidecar_suffix or ""
        side_tmps = [t + suffix if s is not None else None for t, s in zip(self._tmps, sidecars)]
        for i, (f, tmp, text) in enumerate(zip(self._files, side_tmps, sidecars)):
            try:
                f.flush()  # the disk can fill here too
                os.fsync(f.fileno())
                f.close()
                if text is not None:
                    with open(tmp, "w", encoding="utf-8") as g:
                        g.write(text)
                        g.flush()
                        os.fsync(g.fileno())
            except OSError as e:
                self._write_failed(i, e)
        for path, tmp, side_tmp in zip(self.paths, self._tmps, side_tmps):
            side = path + suffix
            if is_remote(path):
                gfile = _gfile()
                if suffix and gfile.exists(side):
                    gfile.remove(side)
                gfile.copy(tmp, path, overwrite=True)
                if side_tmp:
                    gfile.copy(side_tmp, side, overwrite=True)
                continue
            if suffix and os.path.exists(side):  # an old sidecar must never describe new data
                os.remove(side)
            os.replace(tmp, path)
            if side_tmp:
                os.replace(side_tmp, side)
        self._tmps = []

    def _cleanup(self):
        for f in self._files:
            try:
                f.close()
            except OSError:  # a full disk fails the flush again; the file is removed below anyway
                pass
        for tmp in self._tmps:
            for p in (tmp, tmp + (self.sidecar_suffix or "")):
                if os.path.exists(p):
                    os.remove(p)
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
        for lock_path, fd in self._locks:
            try:
                os.remove(lock_path)  # while still locked: a waiter re-checks the inode
            except OSError:
                pass
            os.close(fd)
        self._files, self._tmps, self._locks = [], [], []

    def __exit__(self, *exc):
        self._cleanup()
        return False
