"""Atomic writes: a crash, SIGKILL or Ctrl-C leaves the old file or the new one, never a part.

Every file is written beside its destination (same folder, so the rename stays on one file
system) under a hidden temporary name `.NAME.XXXXXXXX.tmp`, flushed to disk, checked, and only
then renamed over the destination with `os.replace`. On an exception or Ctrl-C the temporary
is removed; only a process killed outright (SIGKILL, power loss) can leave a `.NAME.*.tmp`
file or folder behind, never anything at the destination name.

A model saved with external data gets its tensors in `NAME.<digest>.data` beside it, where
<digest> is a hash of the tensor bytes. The data file is renamed into place first and the model
second: until the model's rename the old model still reads its own data file, after it the new
model reads the new one. The old model's data file (`NAME.*.data`) is removed afterwards.

Modes are those a plain `open(path, "w")` would give (as `onnx.save` gives): a new file gets
0666 less the umask, a file that is replaced keeps its mode, and a model's data file gets the
model's mode. (`tempfile.mkstemp` alone would leave every file private, 0600.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import external_data_helper

from onnx_spectral.errors import RewriteError
from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.external_tensors import is_large

_CHUNK = 1 << 24


def _write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` in chunks, then flush it to the disk."""
    view = memoryview(data)
    with open(path, "wb") as handle:
        for start in range(0, len(view), _CHUNK):
            handle.write(view[start:start + _CHUNK])
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def target_mode(path: Path) -> int:
    """The permission bits a file written at `path` gets: those of the file it replaces, else
    0666 less the umask (0644 under umask 022)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextmanager
def _temporary(path: Path, folder: bool) -> Iterator[Path]:
    """A hidden temporary file (or folder) beside `path`, removed unless renamed away."""
    if folder:
        temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.",
                                          suffix=".tmp"))
    else:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary)` and rename the temporary file to `path` once it returns."""
    mode = target_mode(path)
    with _temporary(path, folder=False) as temporary:
        write(temporary)
        _fsync(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    _fsync_folder(path.parent)


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_atomically(path, lambda temporary: _write_bytes(temporary, text.encode()))


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer of `model` refers to an external data file."""
    return any(external_data_helper.uses_external_data(tensor)
               for tensor in model.graph.initializer)


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise RewriteError(f"the written model '{path}' fails the ONNX checker: {exc}; "
                           "nothing was written") from exc


def _data_digest(model: onnx.ModelProto) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for tensor in model.graph.initializer:
        digest.update(tensor.name.encode())
        if external_tensors.is_lazy(tensor):  # the bytes it would hold if loaded: the same digest
            for chunk in external_tensors.read_chunks(tensor):
                digest.update(chunk)
            continue
        digest.update(tensor.raw_data if tensor.HasField("raw_data")
                      else tensor.SerializeToString())
    return digest.hexdigest()


def _old_data_files(path: Path) -> set[Path]:
    """The `NAME.*.data` files the model now at `path` reads (none if it cannot be read)."""
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:  # no old model, or one we cannot read: nothing of ours to clean
        return set()
    names = set()
    for tensor in old.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            location = Path(info.location)
            if (location.parent == Path(".") and location.name.startswith(f"{path.name}.")
                    and location.suffix == ".data"):
                names.add(path.parent / location.name)
    return names


def save_model(model: onnx.ModelProto, path: Path, external_data: bool = False) -> list[Path]:
    """Write `model` to `path` atomically; return the files written.

    With `external_data`, or when the tensors exceed LARGE_BYTES (2 GiB), the tensors go to
    `NAME.<digest>.data` beside `path` (and `model`'s initializers are turned into references
    to that file, in place). The written files pass `onnx.checker` before they are renamed.
    Their mode is `target_mode(path)`.
    """
    path = Path(path)
    mode = target_mode(path)
    if not (external_data or is_large(model)):
        with _temporary(path, folder=False) as temporary:
            _write_bytes(temporary, model.SerializeToString())
            _check(temporary)
            os.chmod(temporary, mode)
            os.replace(temporary, path)
        _fsync_folder(path.parent)
        return [path]
    location = f"{path.name}.{_data_digest(model)}.data"
    stale = _old_data_files(path) - {path.parent / location}
    with _temporary(path, folder=True) as folder:
        external_tensors.save_with_external_data(model, folder / path.name, location)
        _fsync(folder / path.name)
        _check(folder / path.name)
        written = [path]
        if (folder / location).exists():  # absent when the model has no tensors
            _fsync(folder / location)
            os.chmod(folder / location, mode)
            os.replace(folder / location, path.parent / location)
            _fsync_folder(path.parent)
            written.append(path.parent / location)
        os.chmod(folder / path.name, mode)
        os.replace(folder / path.name, path)
    _fsync_folder(path.parent)
    for old in stale:
        old.unlink(missing_ok=True)
    return written
