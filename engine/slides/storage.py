"""Where slides live: local paths and ``s3://`` through fsspec/s3fs, listing, retries and a
size-bounded local staging area for readers that need a file path (OpenSlide)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import fsspec

from engine.config import StorageConfig
from engine.errors import (HemeflowError, SlideAccessDenied, SlideNotFound, StagingError,
                           TransientStorageError)

T = TypeVar("T")

_TRANSIENT_MARKERS = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                      "Throttl", "Connection reset", "timed out", "503", "500 ")


class InputError(HemeflowError):
    """The job's input as a whole is unusable (missing path or bucket, nothing to process)."""


@dataclass(frozen=True)
class FileEntry:
    """One object found under an input: its URI, size and (on S3) ETag."""

    uri: str
    size: int | None = None
    etag: str | None = None


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize_uri(uri: str) -> str:
    """Canonical form: absolute local paths, ``s3://bucket/key`` without a trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri.rstrip("/") if uri.count("/") > 2 else uri
    return os.path.abspath(os.path.expanduser(uri))


def get_filesystem(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (fsspec caches instances)."""
    protocol = uri.split("://", 1)[0] if is_remote(uri) else "file"
    return fsspec.core.url_to_fs(uri, **storage.fsspec_options(protocol))


def is_transient(err: BaseException) -> bool:
    """Worth retrying: timeouts, dropped connections, throttling, server-side 5xx."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError, TransientStorageError)):
        return True
    text = str(err)
    return isinstance(err, OSError) and any(m in text for m in _TRANSIENT_MARKERS)


def call_with_retries(fn: Callable[[], T], storage: StorageConfig, what: str,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``fn``; retry transient storage errors with exponential back-off, never permanent ones."""
    delay = storage.retry_backoff_s
    for attempt in range(storage.retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - re-raised unless transient
            if not is_transient(err) or attempt == storage.retries:
                raise
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def translate_storage_error(uri: str, err: Exception) -> Exception:
    """Built-in IO errors become slide errors; anything else is returned unchanged."""
    if isinstance(err, FileNotFoundError):
        return SlideNotFound(uri, "no such file or object")
    if isinstance(err, PermissionError):
        return SlideAccessDenied(uri, f"permission denied ({err.strerror or err})")
    return err


def _is_companion(uri: str, stems: set[str]) -> bool:
    """MIRAX slides are an ``X.mrxs`` index plus an ``X/`` folder of data files."""
    parts = uri.split("/")
    return any("/".join(parts[:i]) in stems for i in range(1, len(parts)))


def list_files(uri: str, storage: StorageConfig) -> list[FileEntry]:
    """Every file under a local folder or S3 prefix (a single file gives itself), sorted.

    Hidden files are skipped, and so are the data folders of MIRAX slides.

    Raises:
        InputError: the path, bucket or prefix does not exist or cannot be listed.
    """
    uri = normalize_uri(uri)
    fs, path = get_filesystem(uri, storage)
    remote = is_remote(uri)
    proto = uri.split("://", 1)[0] + "://" if remote else ""
    try:
        if not call_with_retries(lambda: fs.exists(path), storage, "exists"):
            what = "bucket or prefix" if remote else "path"
            raise InputError(f"input {what} does not exist: {uri}")
        if call_with_retries(lambda: fs.isfile(path), storage, "isfile"):
            info = fs.info(path)
            return [FileEntry(uri, info.get("size"), _etag(info))]
        found = call_with_retries(lambda: fs.find(path, detail=True), storage, "list")
    except (PermissionError, OSError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot list {uri}: {err}") from err
    entries = []
    for key, info in sorted(found.items()):
        name = key.rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "directory" or name.startswith("."):
            continue
        entries.append(FileEntry(proto + key if remote else key, info.get("size"), _etag(info)))
    stems = {e.uri[:-5] for e in entries if e.uri.lower().endswith(".mrxs")}
    return [e for e in entries if not _is_companion(e.uri, stems)]


def stat_file(uri: str, storage: StorageConfig) -> FileEntry:
    """Size and ETag of one object; slide errors for missing or forbidden objects."""
    fs, path = get_filesystem(uri, storage)
    try:
        info = call_with_retries(lambda: fs.info(path), storage, "stat")
    except OSError as err:
        raise translate_storage_error(uri, err) from err
    return FileEntry(uri, info.get("size"), _etag(info))


def _etag(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    return str(etag).strip('"') if etag else None


class StagingArea:
    """Size-bounded local copies of remote objects, each deleted when its last user is done.

    Thread-safe: a stage that would overflow the bound waits until others are released; an object
    larger than the whole bound is refused with `StagingError`.
    """

    def __init__(self, storage: StorageConfig):
        self.storage = storage
        self.max_bytes = storage.stage_max_bytes
        self._own_dir = storage.stage_dir is None
        self.root = storage.stage_dir or tempfile.mkdtemp(prefix="hemeflow-stage-")
        os.makedirs(self.root, exist_ok=True)
        self._used = 0
        self._cond = threading.Condition()
        self._counter = 0

    def _companions(self, fs, path: str) -> list[tuple[str, int]]:
        """Other objects a multi-file format needs beside its main file, with sizes.

        MIRAX keeps its data in an ``X/`` folder beside ``X.mrxs``; a DICOM WSI is a folder of
        instances (one per level or associated image) that OpenSlide finds next to the one opened.
        """
        lower = path.lower()
        if lower.endswith(".mrxs"):
            found = fs.find(path[:-5], detail=True)
        elif lower.endswith(".dcm"):
            listing = fs.ls(path.rsplit("/", 1)[0], detail=True)
            found = {i["name"]: i for i in listing
                     if i["name"].lower().endswith(".dcm") and i["name"] != path}
        else:
            return []
        return [(k, int(v.get("size") or 0)) for k, v in sorted(found.items())
                if v.get("type") != "directory"]

    @contextlib.contextmanager
    def stage(self, uri: str, size: int | None = None) -> Iterator[str]:
        """Yield a local path holding the object at ``uri`` (a local ``uri`` is yielded as is).

        Companion files of multi-file formats are staged beside it, keeping relative paths.
        """
        if not is_remote(uri):
            yield uri
            return
        fs, path = get_filesystem(uri, self.storage)
        if size is None:
            size = stat_file(uri, self.storage).size or 0
        try:
            companions = call_with_retries(lambda: self._companions(fs, path), self.storage,
                                           "list companions")
        except OSError as err:
            raise translate_storage_error(uri, err) from err
        total = size + sum(s for _, s in companions)
        if total > self.max_bytes:
            raise StagingError(uri, f"object of {total:,} bytes exceeds the staging bound of "
                               f"{self.max_bytes:,} bytes (storage.stage_max_bytes)")
        with self._cond:
            self._cond.wait_for(lambda: self._used + total <= self.max_bytes)
            self._used += total
            self._counter += 1
            folder = os.path.join(self.root, f"{self._counter:08d}")
        parent = path.rsplit("/", 1)[0]
        try:
            local = os.path.join(folder, path.rsplit("/", 1)[-1])  # keep the name: some
            try:                                                   # formats key on extension
                for remote in [path] + [c for c, _ in companions]:
                    dest = os.path.join(folder, remote[len(parent) + 1:])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    call_with_retries(lambda r=remote, d=dest: fs.get_file(r, d), self.storage,
                                      "download")
            except OSError as err:
                raise translate_storage_error(uri, err) from err
            yield local
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with self._cond:
                self._used -= total
                self._cond.notify_all()

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> StagingArea:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
