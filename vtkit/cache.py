"""Fingerprinted, resumable HDF5 files shared by the stages.

A stage's durable record of finished work is a directory of *part* files next to its final
file (``features.parts/``, ``sweep.parts/``). Each part is written to a temporary name, fsynced
and renamed, so a part either exists whole or not at all, even after ``kill -9``. A manifest in
the directory holds the fingerprint of the inputs; a re-run with other inputs is refused with a
message naming what changed. When every part is there the stage merges them into the final
file, again through a temporary name, and only then removes the parts. A final file therefore
never reads as complete unless it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vtkit import __version__
from vtkit.errors import CacheMismatchError, DataError

#: 2: features.h5 holds each image's sha256 (not its size and mtime); the fingerprints compare
#: models by weights, not by path; sweep.h5 carries the answer key's hash.
SCHEMA_VERSION = 2
STRING = h5py.string_dtype("utf-8")


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A stable hash of everything that produced a file (canonical JSON, sha256, 16 hex)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Top-level keys whose values differ between two input records."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True, default=str)
            != json.dumps(new.get(k), sort_keys=True, default=str)]


def mismatch_message(path: Path, old: Mapping[str, Any], new: Mapping[str, Any],
                     hint: str = "pass --force to recompute") -> str:
    changed = ", ".join(changed_keys(old, new)) or "the fingerprint"
    return f"{path} was made from other inputs (changed: {changed}); {hint}"


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


def write_h5_atomic(path: Path, arrays: Mapping[str, Any], attrs: Mapping[str, Any],
                    compression: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write an HDF5 file whole or not at all: temporary name, flush, fsync, rename.

    ``arrays`` maps dataset paths ("spectra/first_layer/k20") to arrays or lists of strings;
    ``compression`` optionally maps a dataset path to h5py create_dataset keyword arguments.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
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
        f.flush()
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, document: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_attrs(path: Path) -> dict[str, Any]:
    """The attributes of an HDF5 file, or a DataError naming it if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 file ({error})") from None


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def base_attrs(config: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes every vtkit file carries: version, schema, config, inputs, fingerprint."""
    return {
        "vtkit_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "config": json.dumps(config, sort_keys=True, default=str),
        "inputs": json.dumps(inputs, sort_keys=True, default=str),
        "fingerprint": fingerprint(inputs),
    }


def stored_inputs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(attrs.get("inputs", "{}"))
    except json.JSONDecodeError:
        return {}


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
        write_h5_atomic(path, arrays, dict(attrs or {}))
        return path

    def parts(self) -> Iterator[Path]:
        """Finished parts, in name order (temporary files of a killed write are ignored)."""
        if not self.directory.is_dir():
            return iter(())
        return iter(sorted(p for p in self.directory.glob("*.h5") if not p.name.startswith(".")))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _refusal(path: Path, attrs: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    schema = attrs.get("schema_version")
    if schema != SCHEMA_VERSION:
        return (f"{path} has schema version {schema}, this vtkit reads version {SCHEMA_VERSION}: "
                f"pass --force to recompute it")
    if not attrs.get("complete") and attrs.get("fingerprint") == fingerprint(inputs):
        return f"{path} is incomplete: delete it or pass --force to recompute it"
    return mismatch_message(path, stored_inputs(attrs), inputs)


def start_parts(final: Path, parts_dir: Path, inputs: Mapping[str, Any], force: bool,
                ranks) -> PartStore | None:
    """Decide what a stage does about ``final``; return its opened part store, or None.

    None: ``final`` is complete and was made from these inputs (nothing to do). A final file
    from other inputs is refused with a message naming what changed, or with ``force`` removed.
    Under torchrun rank 0 opens (or resets) the part directory before the other ranks do.
    """
    if final.exists():
        try:
            attrs = read_attrs(final)
        except DataError as error:
            if not force:
                raise DataError(f"{error}; delete it or pass --force to recompute it") from None
            attrs = {}
        if (attrs.get("schema_version") == SCHEMA_VERSION and attrs.get("complete")
                and attrs.get("fingerprint") == fingerprint(inputs)):
            return None
        if not force:
            raise CacheMismatchError(_refusal(final, attrs, inputs))
        ranks.barrier()   # every rank has read the old file before rank 0 removes it
        if ranks.is_main:
            final.unlink()
    store = PartStore(parts_dir, inputs)
    if ranks.is_main:
        store.open(force=force)
    ranks.barrier()
    if not ranks.is_main:
        store.open()
    return store
