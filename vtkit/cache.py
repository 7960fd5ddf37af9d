"""Fingerprinted, resumable HDF5 files shared by the stages.

A stage's durable record of finished work is a directory of *part* files next to its final
file (``features.parts/``, ``sweep.parts/``). Each part is written to a temporary name, fsynced
and renamed, so a part either exists whole or not at all, even after ``kill -9``. A manifest in
the directory holds the fingerprint of the inputs; a re-run with other inputs is refused with a
message naming what changed. When every part is there the stage merges them into the final
file, again through a temporary name, and only then removes the parts. A final file therefore
never reads as complete unless it is.

Every file vtkit writes goes through :func:`atomic_path` (a temporary name unique to the process
and the write; a failed write leaves nothing and becomes one line naming the file), and every
stage holds :func:`output_lock` on its output directory: one writer per directory. The names
of the files in an output directory and of the datasets in them (:func:`k_name`,
:func:`spectra_dataset`) are defined here, once, for the stages that write them and those that
read them.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import json
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from vtkit import __version__
from vtkit.errors import (
    CacheMismatchError,
    DataError,
    LockedError,
    StorageError,
    os_error_message,
)

#: The layout version of each file; a file of another version is refused (or, with --force,
#: recomputed). features.h5 3: the [CLS] hidden state, head-averaged keys and DivPrune scores
#: of the per-method selection; 2: each image's sha256 (not its size and mtime), models compared
#: by weights, not by path.
FEATURES_SCHEMA_VERSION = 3
#: sweep.h5 3: spectra and kept rows by tensor and decoder layer index
#: (``spectra/attn_out/layer0/k20``); 2 held the first and last layer's attention output alone
#: (``spectra/first_layer/k20``) and the answer key's hash.
SWEEP_SCHEMA_VERSION = 3
#: What survives a failed write of a stage, for its error message.
PARTS_KEPT = "finished parts are kept"
STRING = h5py.string_dtype("utf-8")


# ---------------------------------------------------------------------------------------------
# The layout of an output directory (docs/cache.md): the stages that write a file and those
# that read it take its name from here.

FEATURES_FILE = "features.h5"
FEATURES_PARTS_DIR = "features.parts"
SWEEP_FILE = "sweep.h5"
SWEEP_PARTS_DIR = "sweep.parts"
ANSWERS_DIR = "answers"
#: One run per seed of the random scorer (``--seeds``): OUTPUT_DIR/seed{N}/, beside the
#: features.h5 they share.
SEED_DIR_PREFIX = "seed"
RANKS_FILE = "ranks.json"
RAW_RESULTS_FILE = "raw_results.json"
NORMALIZED_RESULTS_FILE = "normalized_results.json"
#: Figures are written as ``<stem>.png`` and ``<stem>.pdf``.
FIGURE_PREFIX = "pruning_experiment_"
RESULTS_FIGURE = FIGURE_PREFIX + "results"
RAW_FIGURE = FIGURE_PREFIX + "raw"
COMPARE_FIGURE = FIGURE_PREFIX + "compare"
FIGURE_FORMATS = ("png", "pdf")
#: `vtkit compare`'s outputs, in its own output dir.
COMPARISON_FIGURE = "comparison"
COMPARISON_TABLE = "comparison.md"
COMPARISON_JSON = "comparison.json"
#: The depth figures of `vtkit plot` (ranks.json with more than two layers): one depth x k
#: heatmap per measure (:func:`heatmap_figure`) and the rank curves of selected layers.
HEATMAP_FIGURE_PREFIX = "rank_heatmap_"
LAYER_CURVES_FIGURE = "rank_by_layer"
DEPTH_FIGURE_PATTERNS = tuple(f"{stem}.{ext}" for stem in (HEATMAP_FIGURE_PREFIX + "*",
                                                           LAYER_CURVES_FIGURE)
                              for ext in FIGURE_FORMATS)


def heatmap_figure(measure: str) -> str:
    """The heatmap stem of one ranks.json measure, safe as a file name: ``numerical_rank@0.001``
    gives ``rank_heatmap_numerical_rank_1e-3``, ``effective_rank`` ``rank_heatmap_effective_rank``.
    """
    name, _, threshold = measure.partition("@")
    if threshold:
        mantissa, exponent = f"{float(threshold):.12e}".split("e")
        name += f"_{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return HEATMAP_FIGURE_PREFIX + "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


#: The seed's two curves, as named in ranks.json, the results files and the seed's figure: the
#: smallest and the largest analysed layer of the primary capture.
LAYERS = ("first_layer", "last_layer")
_K_PREFIX = "k"
_LAYER_PREFIX = "layer"
_ANSWERS_SUFFIX = ".jsonl"


def k_name(k: int) -> str:
    """The name of one k of the grid, in sweep.h5 (``spectra/attn_out/layer0/k20``) and in the
    answer files (``answers/k20.jsonl``)."""
    return f"{_K_PREFIX}{int(k)}"


def layer_name(layer: int) -> str:
    """The name of one decoder layer (by its index from 0) in sweep.h5: ``layer0``."""
    return f"{_LAYER_PREFIX}{int(layer)}"


def slot_name(capture: str, layer: int) -> str:
    """One captured tensor of one layer, as sweep.h5 and its part files name it:
    ``attn_out/layer0``."""
    return f"{capture}/{layer_name(layer)}"


def spectra_dataset(capture: str, layer: int, k: int) -> str:
    """sweep.h5's dataset of the singular values of one tensor's k visual rows at one layer:
    [n_img, min(k, d)] float32, descending."""
    return f"spectra/{slot_name(capture, layer)}/{k_name(k)}"


def attention_dataset(capture: str, layer: int, k: int) -> str:
    """sweep.h5's dataset of the raw rows kept (--keep-attention) of one tensor at one layer and
    one k: [n_keep, k, d] float16."""
    return f"attention/{slot_name(capture, layer)}/{k_name(k)}"


def seed_dir(seed: int) -> str:
    """The sub-directory of one seed's run: ``seed0``."""
    return f"{SEED_DIR_PREFIX}{seed}"


def answers_file(k: int) -> str:
    """The answer file of one k, relative to the output dir."""
    return f"{ANSWERS_DIR}/{k_name(k)}{_ANSWERS_SUFFIX}"


#: Every answer file, of any grid, relative to the output dir.
ANSWERS_PATTERN = f"{ANSWERS_DIR}/{_K_PREFIX}*{_ANSWERS_SUFFIX}"
FIGURE_PATTERNS = (*(f"{FIGURE_PREFIX}*.{ext}" for ext in FIGURE_FORMATS),
                   *DEPTH_FIGURE_PATTERNS)


class Outputs(NamedTuple):
    """Outputs in an output dir: files or directories by name, and glob patterns."""

    names: tuple[str, ...]
    patterns: tuple[str, ...]


#: Plot's outputs hold accuracies: re-scoring the stored answers makes them stale.
STALE_AFTER_RESCORE = Outputs((RAW_RESULTS_FILE, NORMALIZED_RESULTS_FILE), FIGURE_PATTERNS)
#: What rank and plot made from sweep.h5, and the answer files (an old grid's would stay behind):
#: stale once the sweep is recomputed.
STALE_AFTER_SWEEP = Outputs((RANKS_FILE, *STALE_AFTER_RESCORE.names),
                            (ANSWERS_PATTERN, *STALE_AFTER_RESCORE.patterns))
#: What sweep, rank and plot made from features.h5: stale once it is recomputed.
STALE_AFTER_EXTRACT = Outputs((SWEEP_FILE, SWEEP_PARTS_DIR, *STALE_AFTER_SWEEP.names),
                              STALE_AFTER_SWEEP.patterns)


def remove_outputs(output_dir: Path, outputs: Outputs) -> list[Path]:
    """Remove what ``outputs`` names and matches in ``output_dir``: the outputs a recomputed
    stage no longer stands behind."""
    output_dir = Path(output_dir)
    gone = [output_dir / name for name in outputs.names if (output_dir / name).exists()]
    gone += sorted(p for pattern in outputs.patterns for p in output_dir.glob(pattern))
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return gone


# ---------------------------------------------------------------------------------------------
# Fingerprints and atomic writes


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A stable hash of everything that produced a file (canonical JSON, sha256, 16 hex)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digest(items: Any) -> str:
    """sha256 (16 hex) of a JSON-serialisable list: the per-item records fingerprints hold
    (question ids, prompts, image hashes)."""
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Top-level keys whose values differ between two input records."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True, default=str)
            != json.dumps(new.get(k), sort_keys=True, default=str)]


def mismatch_message(path: Path, old: Mapping[str, Any], new: Mapping[str, Any],
                     hint: str = "pass --force to recompute") -> str:
    changed = ", ".join(changed_keys(old, new)) or "the fingerprint"
    return f"{path} was made from other inputs (changed: {changed}); {hint}"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Mode of every file vtkit writes: what a plain open() gives (0644 under the usual umask 022).
#: Read once at import, since os.umask cannot be read without setting it.
FILE_MODE = 0o666 & ~_current_umask()

#: Temporary files are named ``.<name>.tmp-<pid>-<token>``: unique per process and per write.
TEMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process or write uses."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(path: Path) -> bool:
    """A temporary file of an atomic write (or of an older vtkit's fixed ``.tmp``/``.part``)."""
    name = path.name
    return (name.startswith(".") and (TEMP_MARK in name or name.endswith(".tmp"))) \
        or name.endswith(".json.part")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, kept: str = "") -> Iterator[Path]:
    """Write ``path`` whole or not at all: yield a temporary name to write, then fsync it, give
    it :data:`FILE_MODE`, rename it to ``path`` and fsync the directory.

    On any failure the temporary file is removed; an OS error becomes a :class:`StorageError`
    naming ``path`` and what to do (``kept`` says what survives, e.g. "finished parts are kept").
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(error, OSError):
            raise StorageError(os_error_message(error, path, kept=kept)) from None
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes, kept: str = "") -> None:
    with atomic_path(path, kept) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, kept: str = "") -> None:
    write_bytes_atomic(path, text.encode("utf-8"), kept)


def write_json_atomic(path: Path, document: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(document, indent=indent) + "\n")


def set_file_modes(directory: Path) -> None:
    """Give the files in ``directory`` :data:`FILE_MODE`, for writers that do not (safetensors
    creates its files 0600, so transformers' ``save_pretrained`` does too)."""
    for path in Path(directory).iterdir():
        if path.is_file():
            os.chmod(path, FILE_MODE)


class _GuardedFile:
    """The file object HDF5 writes through (h5py's ``fileobj`` driver).

    The first failed write (no space, size limit, I/O error) is kept and every later write is
    dropped, so HDF5 finishes and closes the file without an error; :func:`atomic_h5` then raises
    the kept error. A close that fails inside HDF5 leaves its datasets half closed, and freeing
    them later crashed the process (a segfault during the extract merge on a full disk).
    """

    def __init__(self, raw) -> None:
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while self.error is None and view:
            try:
                view = view[self.raw.write(view):]
            except OSError as error:
                self.error = error
        return memoryview(data).nbytes

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                self.raw.truncate(size)
            except OSError as error:
                self.error = error
        return size if size is not None else self.raw.tell()

    def flush(self) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


@contextmanager
def atomic_h5(path: Path, kept: str = "", rdcc_nbytes: int | None = None,
              ) -> Iterator[h5py.File]:
    """An HDF5 file written through :func:`atomic_path`: yield it open for writing; it appears
    at ``path`` only once it is closed and complete."""
    with atomic_path(path, kept) as tmp, open(tmp, "w+b", buffering=0) as raw:
        guard = _GuardedFile(raw)
        options = {} if rdcc_nbytes is None else {"rdcc_nbytes": rdcc_nbytes}
        with h5py.File(guard, "w", **options) as handle:
            yield handle
        if guard.error is not None:
            raise guard.error


def write_h5_atomic(path: Path, arrays: Mapping[str, Any], attrs: Mapping[str, Any],
                    compression: Mapping[str, Mapping[str, Any]] | None = None,
                    kept: str = "") -> None:
    """Write an HDF5 file whole or not at all (see :func:`atomic_h5`).

    ``arrays`` maps dataset paths ("spectra/attn_out/layer0/k20") to arrays or lists of strings;
    ``compression`` optionally maps a dataset path to h5py create_dataset keyword arguments.
    """
    with atomic_h5(path, kept) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, value in arrays.items():
            kwargs = dict((compression or {}).get(name, {}))
            if isinstance(value, list | tuple) and (not value or isinstance(value[0], str)):
                f.create_dataset(name, data=np.asarray(value, dtype=object), dtype=STRING)
            elif isinstance(value, np.ndarray) and value.dtype == object:
                f.create_dataset(name, data=value, dtype=STRING)
            else:
                f.create_dataset(name, data=value, **kwargs)


def check_free_space(directory: Path, needed: int, what: Path, kept: str = "") -> None:
    """Refuse up front when ``directory`` has less than ``needed`` bytes free for ``what``."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed:
        raise StorageError(f"not enough space to write {what}: it needs up to "
                           f"{needed / 1e6:.1f} MB and {directory} has {free / 1e6:.1f} MB free; "
                           f"free space and re-run" + (f": {kept}" if kept else ""))


def read_attrs(path: Path) -> dict[str, Any]:
    """The attributes of an HDF5 file, or a DataError naming it if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 file ({error})") from None


def read_rows(dataset: h5py.Dataset, rows: Any) -> np.ndarray:
    """``dataset[rows]`` for strictly ascending ``rows``, each run of consecutive rows read as
    one slice into the array it returns.

    h5py's list indexing reads a chunked dataset row by row at great cost when the rows are
    not consecutive (measured on the CPU, features.h5 chunked one question per chunk: 17 ms a
    row, against 0.15 ms for the same row read as a slice), and a torchrun rank's share of
    the questions is every world-size-th row."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    steps = np.diff(rows)
    if rows.size and (rows[0] < 0 or rows[-1] >= len(dataset) or (steps <= 0).any()):
        raise ValueError(f"{dataset.name}: rows must ascend, each once, within "
                         f"0..{len(dataset) - 1}")
    out = np.empty((rows.size, *dataset.shape[1:]), dtype=dataset.dtype)
    bounds = np.concatenate(([0], np.flatnonzero(steps != 1) + 1, [rows.size]))
    for start, end in itertools.pairwise(bounds):
        if end > start:
            first = int(rows[start])
            dataset.read_direct(out, np.s_[first:first + end - start], np.s_[start:end])
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def base_attrs(config: Mapping[str, Any], inputs: Mapping[str, Any], schema: int,
               ) -> dict[str, Any]:
    """The attributes every vtkit file carries: version, schema, config, inputs, fingerprint."""
    return {
        "vtkit_version": __version__,
        "schema_version": schema,
        "config": json.dumps(config, sort_keys=True, default=str),
        "inputs": json.dumps(inputs, sort_keys=True, default=str),
        "fingerprint": fingerprint(inputs),
    }


def stored_inputs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(attrs.get("inputs", "{}"))
    except json.JSONDecodeError:
        return {}


# ---------------------------------------------------------------------------------------------
# One writer per output directory

LOCK_FILE = ".vtkit.lock"
_held: dict[Path, list] = {}   # resolved directory -> [file descriptor, depth]


def _lock_owner(path: Path) -> str:
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        owner = {}
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"


def _acquire(directory: Path, command: str) -> int:
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{directory} is in use by vtkit ({_lock_owner(path)}); wait for "
                              f"it to finish or choose another --output-dir") from None
        except OSError:
            return fd      # a filesystem without locks: go on unlocked rather than refuse
        # The previous holder may have removed the file between our open and our lock.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(owner) + "\n").encode())
    return fd


def _remove_orphans(directory: Path) -> None:
    """Temporary files of killed writes: nobody else writes here while the lock is held."""
    folders = [directory, directory / ANSWERS_DIR, *directory.glob("*.parts")]
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if is_temporary(path) and path.is_file():
                    path.unlink(missing_ok=True)


@contextmanager
def output_lock(directory: Path, create: bool = True) -> Iterator[None]:
    """Hold the output directory for this process: one writer per directory.

    The lock is an flock on ``<directory>/.vtkit.lock``, which holds the owner's pid, host and
    command as JSON. A second process stops at once with a :class:`LockedError` naming the
    owner; the lock of a killed process goes with it, so the next run simply takes it. Nested
    holds in one process (``vtkit run`` calls the stages) count up and down. Under torchrun only
    rank 0 holds it (the ranks share the directory). Taking the lock also proves the directory
    writable, before any model loads, and removes temporary files left by killed writes.
    ``create=False`` (stages that only read before writing) skips a directory that does not exist.
    """
    directory = Path(directory)
    if int(os.environ.get("RANK", "0")) != 0 or (not create and not directory.is_dir()):
        yield
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        key = directory.resolve()
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(directory, " ".join(sys.argv) or "python"), 1]
            _remove_orphans(directory)
    except OSError as error:
        raise StorageError(os_error_message(error, directory)) from None
    try:
        yield
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            fd = _held.pop(key)[0]
            # Unlink while still locked: a process that opened it meanwhile sees another inode
            # and retries. A lock file that cannot be removed is harmless (only the flock counts).
            try:
                (directory / LOCK_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            os.close(fd)


def holds_output_lock(stage: Callable | None = None, *, create: bool = True) -> Callable:
    """Decorate a stage ``fn(config, ...)`` to run under :func:`output_lock` of
    ``config.output_dir``. A config with a ``validate()`` method is checked first, so a bad flag
    stops before anything in the directory is touched."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(config, *args, **kwargs):
            if hasattr(config, "validate"):
                config.validate()
            with output_lock(config.output_dir, create=create):
                return fn(config, *args, **kwargs)
        return wrapper

    return decorate(stage) if stage is not None else decorate


class PartStore:
    """The directory of part files a stage writes while it works (see the module docstring)."""

    MANIFEST = "manifest.json"

    def __init__(self, directory: Path, inputs: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.inputs = dict(inputs)
        self.fingerprint = fingerprint(inputs)

    def open(self, force: bool = False) -> PartStore:
        """Create the directory, or check that existing parts were made from the same inputs."""
        manifest = self.directory / self.MANIFEST
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("fingerprint") != self.fingerprint:
                if not force:
                    raise CacheMismatchError(mismatch_message(
                        self.directory, old.get("inputs", {}), self.inputs,
                        "pass --force to discard the unfinished parts"))
                shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            write_json_atomic(manifest, {"fingerprint": self.fingerprint, "inputs": self.inputs,
                                         "vtkit_version": __version__})
        return self

    def write(self, name: str, arrays: Mapping[str, Any], attrs: Mapping[str, Any] | None = None,
              ) -> Path:
        path = self.directory / f"{name}.h5"
        write_h5_atomic(path, arrays, dict(attrs or {}), kept=PARTS_KEPT)
        return path

    def parts(self) -> Iterator[Path]:
        """Finished parts, in name order (temporary files of a killed write are ignored)."""
        if not self.directory.is_dir():
            return iter(())
        return iter(sorted(p for p in self.directory.glob("*.h5") if not p.name.startswith(".")))

    def size(self) -> int:
        """Bytes of the finished parts: an upper bound for the merged file (which compresses)."""
        return sum(p.stat().st_size for p in self.parts())

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _refusal(path: Path, attrs: Mapping[str, Any], inputs: Mapping[str, Any],
             schema: int) -> str:
    if attrs.get("schema_version") != schema:
        return (f"{path} has schema version {attrs.get('schema_version')}, this vtkit reads "
                f"version {schema}: pass --force to recompute it")
    if not attrs.get("complete") and attrs.get("fingerprint") == fingerprint(inputs):
        return f"{path} is incomplete: delete it or pass --force to recompute it"
    return mismatch_message(path, stored_inputs(attrs), inputs)


def start_parts(final: Path, parts_dir: Path, inputs: Mapping[str, Any], force: bool,
                workers, schema: int) -> PartStore | None:
    """Decide what a stage does about ``final``; return its opened part store, or None.

    None: ``final`` is complete and was made from these inputs (nothing to do). A final file
    from other inputs, or of a ``schema`` other than this vtkit's for that file, is refused with
    a message naming what changed (or the version), or with ``force`` removed.
    Under torchrun rank 0 opens (or resets) the part directory before the other ranks do.
    """
    if final.exists():
        try:
            attrs = read_attrs(final)
        except DataError as error:
            if not force:
                raise DataError(f"{error}; delete it or pass --force to recompute it") from None
            attrs = {}
        if (attrs.get("schema_version") == schema and attrs.get("complete")
                and attrs.get("fingerprint") == fingerprint(inputs)):
            return None
        if not force:
            raise CacheMismatchError(_refusal(final, attrs, inputs, schema))
        workers.barrier()   # every rank has read the old file before rank 0 removes it
        if workers.is_main:
            final.unlink()
    store = PartStore(parts_dir, inputs)
    if workers.is_main:
        store.open(force=force)
    workers.barrier()
    if not workers.is_main:
        store.open()
    return store
