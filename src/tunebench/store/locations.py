"""Where trial artifacts live: a directory (local, or a mount every worker shares) or an fsspec URL.

A trial's artifact is written to a staging location of its own (``.KEY.OWNER.partial``: two drivers on one store
never touch each other's), then promoted to ``KEY`` by the driver that commits it. On a directory the promotion is
one ``rename``; on a URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``) the worker writes into a local
temporary directory and uploads it to the staging URL, the driver moves it into place, and readers (serve,
export) download it into a local cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import StoreError

log = logging.getLogger(__name__)


def is_url(location: str) -> bool:
    return "://" in str(location)


class ArtifactRoot:
    """The artifact root of a store: ``location`` is a directory path or an fsspec URL."""

    def __init__(self, location: str | Path):
        self.location = str(location).rstrip("/") if is_url(location) else str(Path(location).expanduser())
        self.is_local = not is_url(self.location)
        self._fs = None

    def __repr__(self) -> str:
        return f"ArtifactRoot({self.location!r})"

    def __getstate__(self) -> dict:  # sent to Ray workers: each opens its own filesystem
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self):
        if self._fs is None:
            import fsspec  # heavy: only for URL roots

            try:
                self._fs, _ = fsspec.core.url_to_fs(self.location)
            except (ImportError, ValueError) as exc:
                raise StoreError(f"artifacts: {self.location}: {exc} (an s3:// root needs `pip install s3fs`, "
                                 "gs:// needs gcsfs)") from None
        return self._fs

    def join(self, name: str) -> str:
        return f"{self.location}/{name}" if not self.is_local else str(Path(self.location) / name)

    def final(self, key: str) -> str:
        return self.join(key)

    def staging(self, key: str, owner: str) -> str:
        """A fresh, empty staging location for ``key`` that only ``owner`` writes."""
        loc = self.join(f".{key}.{_token(owner)}.partial")
        self.remove(loc)
        if self.is_local:
            Path(self.location).mkdir(parents=True, exist_ok=True)
        return loc

    def exists(self, loc: str) -> bool:
        return Path(loc).exists() if self.is_local else self.fs.exists(loc)

    def remove(self, loc: str) -> None:
        if self.is_local:
            shutil.rmtree(loc, ignore_errors=True)
        elif self.fs.exists(loc):
            self.fs.rm(loc, recursive=True)

    def promote(self, staged: str, key: str) -> str:
        """Move a staged artifact to its final place (a leftover there, from a driver killed between this move and
        its commit, is replaced: only the holder of the trial's claim gets here). Idempotent: a retried commit
        whose first attempt already moved it finds it in place."""
        final = self.final(key)
        if not self.exists(staged):
            if self.exists(final):
                return final
            raise StoreError(f"artifact of trial {key[:8]} vanished from {staged} before it was committed")
        self.remove(final)
        if self.is_local:
            os.replace(staged, final)
        else:
            self.fs.mv(staged, final, recursive=True)
        return final

    def upload(self, local_dir: Path, loc: str) -> None:
        self.fs.put(str(local_dir), loc, recursive=True)

    def clear_staging(self, key: str) -> None:
        """Remove every staging location of ``key`` (drivers that held it before and died)."""
        for loc in self.leftovers():
            if loc.rstrip("/").rsplit("/", 1)[-1].startswith(f".{key}."):
                log.info("removing %s, left by a driver that stopped before committing", loc)
                self.remove(loc)

    def leftovers(self) -> list[str]:
        """Staging locations under this root (a driver's unfinished work)."""
        if self.is_local:
            root = Path(self.location)
            return [str(p) for p in root.glob(".*.partial")] if root.is_dir() else []
        try:
            return [p for p in self.fs.ls(self.location, detail=False) if p.rstrip("/").endswith(".partial")]
        except FileNotFoundError:
            return []


def local_copy(location: str) -> Path:
    """A local directory holding the artifact at ``location``: itself when it is a path, else a cached download
    (``$TUNEBENCH_CACHE`` or ``~/.cache/tunebench/artifacts``, one folder per location)."""
    if not is_url(location):
        return Path(location)
    import fsspec  # heavy: only for URL roots

    cache = Path(os.environ.get("TUNEBENCH_CACHE", Path.home() / ".cache" / "tunebench")) / "artifacts"
    target = cache / hashlib.sha256(location.encode()).hexdigest()[:16]
    marker = target.with_name(target.name + ".complete")
    if not marker.exists():
        fs, path = fsspec.core.url_to_fs(location)
        if not fs.exists(path):
            raise StoreError(f"artifact {location} does not exist (was the artifact root moved or cleaned?)")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        marker.touch()
        log.info("downloaded artifact %s to %s", location, target)
    return target


def _token(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:10]
