"""Where slides live: local paths and ``s3://`` through fsspec/s3fs, listing, retries and a
size-bounded local staging area for readers that need a file path (OpenSlide)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
import fsspec.asyn
import fsspec.implementations.local

from engine import first_contact
from engine.config import StorageConfig, unsupported_storage
from engine.errors import (HemeflowError, SlideAccessDenied, SlideArchived, SlideError,
                           SlideNotFound, StagingError, StagingFull, StorageCredentialsError,
                           TransientStorageError)
from engine.watchdog import WATCHDOG

T = TypeVar("T")

_TRANSIENT_MARKERS = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                      "Throttl", "Connection reset", "timed out", "503", "500 ")


class InputError(HemeflowError):
    """The job's input as a whole is unusable (missing path or bucket, nothing to process)."""


@dataclass(frozen=True)
class FileEntry:
    """One object found under an input: its URI, size and (on S3) ETag; ``part_of``: for a
    file of a multi-file slide that is read through another file (a DICOM series' instances,
    `engine.slides.dicom`), that file's URI; ``mtime``: a local file's modification time as
    listed, which tells a file still being written (`changed_since_listed`)."""

    uri: str
    size: int | None = None
    etag: str | None = None
    part_of: str | None = None
    storage_class: str | None = None  # S3's, where the listing gives it (`ARCHIVE_CLASSES`)
    mtime: float | None = field(default=None, compare=False)


# S3 storage classes whose objects must be restored before they can be read (an archived
# Intelligent-Tiering object shows as INTELLIGENT_TIERING: only a read tells)
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize_uri(uri: str) -> str:
    """Canonical form: absolute local paths, ``s3://bucket/key`` without a trailing slash; a
    local name that is not UTF-8 as `printable` writes it."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri.rstrip("/") if uri.count("/") > 2 else uri
    return printable(os.path.abspath(os.path.expanduser(uri)))


def printable(path: str) -> str:
    """``path`` where its bytes are UTF-8; else with each byte that is not as ``\\xNN``. Linux
    names are bytes: a share's or an old archive's may be in a legacy code page (``Müller`` in
    Latin-1), which Python keeps as lone surrogates that no table, hash or log can hold. The
    slide under such a name fails to open, saying why (`misnamed`)."""
    try:
        path.encode()
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def misnamed(path: str) -> str | None:
    """Where the local ``path`` names no file: why, if it names one through `printable` (its
    name, or a folder's above it, not UTF-8), else None."""
    real, bad = b"/", None
    for part in path.strip("/").split("/"):
        here = os.path.join(real, os.fsencode(part))
        if os.path.lexists(here):
            real = here
            continue
        try:
            names = os.listdir(real)
        except OSError:
            return None
        for raw in names:
            try:
                raw.decode()
            except UnicodeDecodeError as err:
                if raw.decode("utf-8", "backslashreplace") == part:
                    real, bad = os.path.join(real, raw), raw[err.start] if bad is None else bad
                    break
        else:
            return None
    if bad is None:
        return None
    return (f"its path is not UTF-8 text (byte 0x{bad:02x}: a legacy code page's, Latin-1 or "
            "Windows-1252 say), which no table can hold: rename it (convmv -f latin1 -t utf8 "
            "--notest -r <folder>), or mount the share with iocharset=utf8")


def get_filesystem(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (fsspec caches instances).

    Raises:
        InputError: a storage other than S3 or a local path (`engine.config.PROTOCOLS`).
    """
    if said := unsupported_storage(uri):
        raise InputError(said)
    protocol = uri.split("://", 1)[0] if is_remote(uri) else "file"
    options = storage.fsspec_options(protocol)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if protocol != "file":
        first_contact.check(fs, path, options)
    return fs, path


def remove(fs: fsspec.AbstractFileSystem, paths: str | list[str],
           recursive: bool = False) -> None:
    """Delete ``paths`` of ``fs`` (``recursive``: with what lies below each), each by its own
    name. fsspec's ``rm`` reads ``*``, ``?`` and ``[`` in a path as a glob's (s3fs's does; the
    local file system's own does not): under an output named ``run [2]`` it deleted nothing
    (a crashed slide's leftovers, a run's mark), or ``run 2``'s files. Such paths go to S3's
    batch delete as they are, 1,000 keys a request, as ``rm`` sends them.

    Raises:
        FileNotFoundError: as ``fs.rm``, where no path names anything (plain paths only).
    """
    from glob import has_magic

    paths = [paths] if isinstance(paths, str) else list(paths)
    magic = [p for p in paths if has_magic(p)]
    if not magic or isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        if paths:
            fs.rm(paths, recursive=recursive)
        return
    if plain := [p for p in paths if not has_magic(p)]:
        fs.rm(plain, recursive=recursive)
    named = [f for p in magic for f in ((fs.find(p) or [p]) if recursive else [p])]
    keys = sorted({fs._strip_protocol(p) for p in named})
    batch = getattr(fs, "_bulk_delete", None)  # s3fs's: what its rm sends (it drops the cache)
    for _, same in itertools.groupby(keys, key=lambda k: k.split("/", 1)[0]):  # a bucket each
        mine = list(same)
        for i in range(0, len(mine), 1000):
            if batch is not None:
                fsspec.asyn.sync(fs.loop, batch, mine[i:i + 1000])
            else:
                for key in mine[i:i + 1000]:
                    fs.rm_file(key)


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


@contextlib.contextmanager
def request_pool(workers: int, name: str = "") -> Iterator[ThreadPoolExecutor]:
    """Threads for storage requests whose tasks not yet started are dropped when the block
    raises (an error that stops the job, Ctrl-C, SIGTERM). A `ThreadPoolExecutor`'s own exit
    waits for every task it was given unless the ``map`` that gave them is closed first: the
    inventory holds its map while it records each row, so one stopped there (on refused
    credentials, as it now stops, or by a Ctrl-C that came as a row was recorded) would read
    every slide left."""
    pool = ThreadPoolExecutor(workers, name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # those under way end; the rest never run
        raise
    finally:
        pool.shutdown(wait=True)


def translate_storage_error(uri: str, err: Exception,
                            probe: Callable[[], object] | None = None) -> Exception:
    """Built-in IO errors become slide errors; anything else is returned unchanged. A refusal
    of the credentials themselves is a `StorageCredentialsError`, which stops a job. S3 answers
    a HEAD request (an object's size) with a bare status, no code: ``probe``, a request with a
    body (a byte of the object), is made then to learn why."""
    if isinstance(err, FileNotFoundError):
        return SlideNotFound(uri, "no such file or object")
    if isinstance(err, PermissionError):
        code = _error_code(err)
        if probe is not None and (code is None or code.isdigit()):
            try:
                probe()
            except PermissionError as why:  # a refusal with its code
                err, code = why, _error_code(why)
            except Exception:  # noqa: BLE001 - the probe only asks why; the first error stands
                pass
        if code in CREDENTIAL_CODES:
            return StorageCredentialsError(
                uri, f"object storage refused the credentials ({code}: {err}): renew them (a "
                "new session token, `aws sso login`, the node's role) and run the job again; "
                "what it committed stays, and it goes on from there")
        if code == "InvalidObjectState":  # s3fs makes it a PermissionError
            return SlideArchived(uri, f"in an archive storage class, not readable until it is "
                                 f"restored: {restore_command(uri)}, then run again with "
                                 "--retry-failed")
        return SlideAccessDenied(uri, f"permission denied ({err.strerror or err})")
    return err


# S3's codes for credentials refused as such (a session token expired, after an hour by
# default; a key deleted or mistyped): s3fs makes each a PermissionError, as it does a policy
# that denies one object. Not SignatureDoesNotMatch: a wrong secret gives it for every
# request, but so may one key that a store or proxy encodes otherwise, and one such slide
# must not stop an archive's job
CREDENTIAL_CODES = ("ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId",
                    "InvalidClientTokenId", "InvalidToken", "TokenRefreshRequired")


def _error_code(err: BaseException) -> str | None:
    """The S3 error code behind an error s3fs translated (its botocore ``__cause__``'s)."""
    response = getattr(err.__cause__, "response", None)
    return (response.get("Error") or {}).get("Code") if isinstance(response, dict) else None


def restore_command(uri: str) -> str:
    """The AWS CLI command that restores the archived object at the ``s3://`` ``uri`` for a
    week (S3 Glacier Flexible Retrieval: hours; Deep Archive: up to two days)."""
    import shlex

    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return (f"aws s3api restore-object --bucket {shlex.quote(bucket)} --key {shlex.quote(key)} "
            "--restore-request Days=7")


def storage_failure(err: BaseException) -> str | None:
    """What to tell a user whose object storage cannot be used at all (the endpoint unreachable,
    no credentials found, an unknown AWS profile: `engine.first_contact.unusable`) or fails in
    another of botocore's own errors, or None for any other error. botocore raises these past
    s3fs, outside the built-in IO errors, so they ended jobs in a traceback.
    """
    boto = sys.modules.get("botocore.exceptions")
    if boto is None or not isinstance(err, boto.BotoCoreError):
        return None
    hint = first_contact.unusable(err) or \
        "check the --s3-* flags and the storage: section of the config"
    return f"object storage: {err}: {hint}"


def _is_companion(uri: str, stems: set[str]) -> bool:
    """MIRAX slides are an ``X.mrxs`` index plus an ``X/`` folder of data files."""
    parts = uri.split("/")
    return any("/".join(parts[:i]) in stems for i in range(1, len(parts)))


def list_files(uri: str, storage: StorageConfig, twins: dict[str, str] | None = None
               ) -> list[FileEntry]:
    """Every file under a local folder or S3 prefix (a single file gives itself), sorted.

    Hidden files and everything in hidden folders below ``uri`` are skipped (a file server's
    ``.snapshot`` copies of the whole archive, a ``.Trash``), and so are the data folders of
    MIRAX slides and S3's folder markers (the empty ``x/`` keys the S3 console's 'Create
    folder' makes). Locally, links to folders are followed (`local_files`); a file reached
    under two names is taken once, by the first, and ``twins``, where given, gets the other
    name's, by name.

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
            return [entry_of(uri, info)]
        found = call_with_retries(lambda: fs.find(path, detail=True), storage, "list") \
            if remote else local_files(path, twins)
    except (PermissionError, OSError) as err:
        if isinstance(err, InputError):
            raise
        said = translate_storage_error(uri, err, lambda: fs.ls(path, refresh=True)) \
            if remote else err
        if isinstance(said, StorageCredentialsError):
            raise said from err
        raise InputError(f"cannot list {uri}: {err}") from err
    entries, base = [], path.rstrip("/")
    for key, info in sorted(found.items()):
        below = key.rstrip("/")[len(base):].split("/")  # the parts below the input's root
        if info.get("type") == "directory" or key.endswith("/") or \
                any(p.startswith(".") for p in below):
            continue  # a folder, an S3 folder marker (an empty 'x/' key), or hidden
        entries.append(entry_of(proto + key if remote else key, info))
    stems = {e.uri[:-5] for e in entries if e.uri.lower().endswith(".mrxs")}
    return [e for e in entries if not _is_companion(e.uri, stems)]


def local_files(root: str, twins: dict[str, str] | None = None) -> dict[str, dict]:
    """The files under the local folder ``root`` by path, each with its ``size`` (an fsspec
    listing's entries, as `list_files` reads them), hidden ones left out. Links to folders are
    followed, where fsspec took each for a file (an archive put together from links to other
    volumes failed "is a directory" where its slides were), and each folder is read once, by
    the name first reached, so a link back up ends there. A file reached under two names
    through links (its real path the same) is taken once, by the name first in order;
    ``twins`` gets the other's. Hard links are files of their own, as ``find`` and ``rsync``
    take them (a benchmark's copies of one slide). A link to nothing is kept, without a size,
    to fail as missing.

    Raises:
        OSError: a folder that cannot be read (permission denied, say): its slides would be
            lost without a word.
    """
    files: list[tuple[str, str | None, int | None, float | None]] = []
    seen: set[str] = set()
    stack = [root.rstrip("/") or "/"]
    while stack:  # depth first, in order of name
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as listing:
            items = sorted((d for d in listing if not d.name.startswith(".")),
                           key=lambda d: d.name)
        below = []
        for d in items:
            try:
                if d.is_dir():
                    below.append(d.path)
                    continue
                st = d.stat()
                if not stat.S_ISREG(st.st_mode):
                    continue  # a pipe, socket or device: no slide (and a pipe's open waits)
                files.append((d.path, os.path.realpath(d.path) if d.is_symlink() else
                              os.path.join(real, d.name), st.st_size, st.st_mtime))
            except FileNotFoundError:  # a link to nothing
                files.append((d.path, None, None, None))
        stack.extend(reversed(below))
    found, first = {}, {}
    for path, key, size, mtime in sorted(files, key=lambda f: f[0]):
        name = first.setdefault(key, path) if key is not None else path
        if name != path:
            if twins is not None:
                twins[path] = name
            continue
        found[printable(path)] = {"name": printable(path), "size": size, "type": "file",
                                  "mtime": mtime}
    return found


# file systems whose reads cross a network: NFS, SMB, the cluster ones, and FUSE mounts (sshfs,
# s3fs, mountpoint-s3, gcsfuse, rclone: a remote host or an object store behind each) but
# fuseblk (a local disk's NTFS or exFAT)
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre",
                       "gpfs", "beegfs", "afs", "9p")


def is_network_filesystem(kind: str) -> bool:
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse.")


def parse_mounts(text: str) -> list[tuple[str, str]]:
    """``/proc/self/mounts``' mount points and their file system types, in its order (a later
    mount over the same point hides an earlier one); a space or tab in a path is ``\\040``,
    ``\\011`` there."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
            out.append((point, parts[2]))
    return out


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[tuple[str, str], ...]:
    try:
        with open("/proc/self/mounts") as fh:
            return tuple(parse_mounts(fh.read()))
    except OSError:  # no procfs (macOS): no mount known
        return ()


def network_filesystem(path: str, mounts: list[tuple[str, str]] | None = None) -> str | None:
    """The type of the network file system (`NETWORK_FILESYSTEMS`, a FUSE mount) that holds
    the local ``path`` (through links too), or None where a local disk does: each of its reads
    waits on a round trip, as an object store's do."""
    real = os.path.realpath(path)
    kind, depth = None, -1
    for point, fs_kind in _mounts() if mounts is None else mounts:
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= depth:
            kind, depth = fs_kind, len(point)
    return kind if kind is not None and is_network_filesystem(kind) else None


def on_network_filesystem(uris) -> bool:
    """Whether any of the local ``uris`` lies on a network file system (`network_filesystem`,
    asked once per folder); object-store URIs are not asked."""
    folders = {u.rsplit("/", 1)[0] for u in uris if not is_remote(u)}
    return any(network_filesystem(f) for f in folders)


def stat_file(uri: str, storage: StorageConfig, folders: bool = False) -> FileEntry | None:
    """Size and ETag of one object; slide errors for missing or forbidden objects. With
    ``folders``, None where ``uri`` is a folder (an S3 prefix that holds objects)."""
    fs, path = get_filesystem(uri, storage)
    try:
        info = call_with_retries(lambda: fs.info(path), storage, "stat")
    except OSError as err:
        raise translate_storage_error(uri, err, lambda: fs.cat_file(path, 0, 1)) from err
    if folders and info.get("type") == "directory":
        return None
    return entry_of(uri, info)


def entry_of(uri: str, info: dict) -> FileEntry:
    """The `FileEntry` of the object at ``uri`` from its fsspec listing or info entry."""
    return FileEntry(uri, info.get("size"), object_etag(info),
                     storage_class=info.get("StorageClass"),
                     # fsspec gives a local link's own time, not its target's
                     mtime=None if is_remote(uri) or info.get("islink") else info.get("mtime"))


def changed_since_listed(entry: FileEntry, storage: StorageConfig | None = None) -> str | None:
    """How the file or object differs from its listing (``entry``), in words, or None where it
    does not or cannot tell (gone or denied now: its reads have their own verdict): a local
    file still being written (a copy under way: larger now, or preallocated and written into),
    or one saved over, an object replaced (a rescan), whose reads while it changed may have
    failed on its missing part or mixed two versions. An object is compared by its ETag where
    ``entry`` has one, else by its size; ``storage``: its store's (one request)."""
    if entry.size is None:
        return None
    if is_remote(entry.uri):
        storage = storage or StorageConfig()
        fs, path = get_filesystem(entry.uri, storage)
        fs.invalidate_cache(path)  # the listing's entry, which s3fs keeps, is what is asked
        try:
            now = stat_file(entry.uri, storage)
        except SlideError:
            return None
        if entry.etag and now.etag and now.etag != entry.etag:
            return f"its ETag went from {entry.etag} to {now.etag}"
        if now.size is not None and now.size != entry.size:
            return f"its size went from {entry.size:,} to {now.size:,} bytes"
        return None
    try:
        st = os.stat(entry.uri)
    except OSError:
        return None
    if st.st_size != entry.size:
        return f"its size went from {entry.size:,} to {st.st_size:,} bytes"
    if entry.mtime is not None and st.st_mtime != entry.mtime:
        return "it was modified"
    return None


def object_etag(info: dict) -> str | None:
    """An object's ETag from its fsspec listing or info entry, without quotes (None locally)."""
    etag = info.get("ETag") or info.get("etag")
    return str(etag).strip('"') if etag else None


def default_stage_dir() -> str:
    """The node's shared staging folder when ``storage.stage_dir`` is not set (one per user)."""
    return os.path.join(tempfile.gettempdir(), f"hemeflow-stage-{os.geteuid()}")


def shared_stage_root(storage: StorageConfig) -> str:
    """The node's shared staging folder, made (mode 0700) where missing.

    Raises:
        StagingError: the folder belongs to another user (never read from or written in).
    """
    root = storage.stage_dir or default_stage_dir()
    os.makedirs(root, mode=0o700, exist_ok=True)
    if os.stat(root).st_uid != os.geteuid():
        raise StagingError(root, "the staging folder belongs to another user; set "
                                 "storage.stage_dir")
    return root


# a sparse copy's folder in the staging folder: <prefix><pid>-<random> (engine.slides.header_copy)
SPARSE_PREFIX = "hemeflow-sparse-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagingArea:
    """Local copies of remote objects for readers that need a file path (OpenSlide), shared by
    every process on the node: an object is downloaded once per node, not once per reader.

    Each object has a folder ``<root>/<key>/`` (key: a hash of URI, size and ETag) and a lock
    file ``<root>/<key>.lock`` holding its size. The first user downloads under an exclusive
    ``flock`` and marks the copy complete; every user holds a shared lock while it reads, and the
    lock file's mtime records the last use. To stay under ``stage_max_bytes``, a process that
    needs room evicts the least recently used copies that nobody holds; while everything is in
    use it calls ``make_room`` (a caller can close slides it holds idle), then waits. A crashed
    download leaves no complete mark (and its lock dies with the process), so the next user
    downloads again. Copies outlive their readers until evicted or `purge`d (the job purges
    every node's folder when it ends).

    With ``stage_shared = False`` the area is this process's own temporary folder, removed on
    `close`. Thread-safe: threads lock through their own file descriptors, like processes.
    """

    poll_s = 0.1  # between tries of a busy lock
    wait_s = 1800.0  # longest wait for a lock or for room before the stage fails
    disk_reserve = 512 * 1024**2  # bytes always left free on the staging disk

    def __init__(self, storage: StorageConfig):
        self.storage = storage
        self.max_bytes = storage.stage_max_bytes
        self.shared = storage.stage_shared
        self.root = storage.stage_dir or default_stage_dir()
        self._ready = False  # the folder is made on the first remote stage: local jobs never do
        self.downloads = 0  # objects this instance downloaded (not counting companions)

    def _make_root(self) -> None:
        if self._ready:
            return
        if self.shared:
            self.root = shared_stage_root(self.storage)
        else:
            if self.storage.stage_dir:
                os.makedirs(self.storage.stage_dir, mode=0o700, exist_ok=True)
            self.root = tempfile.mkdtemp(prefix="hemeflow-stage-", dir=self.storage.stage_dir)
        self._ready = True

    def _companions(self, fs, uri: str, path: str) -> list[tuple[str, int]]:
        """Other objects a multi-file format needs beside its main file, with sizes.

        MIRAX keeps its data in an ``X/`` folder beside ``X.mrxs``; a DICOM WSI is a series of
        instances (one per level or associated image) that OpenSlide finds next to the one
        opened: those of its series alone (`_same_series`), where a study's folder holds several.
        """
        from engine.slides.dicom import is_dicom_name

        lower = path.lower()
        if lower.endswith(".mrxs"):
            found = fs.find(path[:-5], detail=True)
        elif is_dicom_name(path):
            listing = fs.ls(path.rsplit("/", 1)[0], detail=True)
            found = self._same_series(uri, path, {i["name"]: i for i in listing
                                                  if is_dicom_name(i["name"])})
        else:
            return []
        return [(k, int(v.get("size") or 0)) for k, v in sorted(found.items())
                if v.get("type") != "directory"]

    def _same_series(self, uri: str, path: str, found: dict[str, dict]) -> dict[str, dict]:
        """Of the DICOM files ``found`` beside ``path`` (``uri``'s path; among them), the
        others of its series (`engine.slides.dicom.group_series`: a header each). A folder of
        ten series staged each of them with every other: ten times the archive's bytes. A
        series of one file (a single-level slide), or a file whose header names no series, has
        none: it staged every other DICOM file of its folder, so a folder of single-file slides
        staged the folder for each."""
        from engine.slides.dicom import group_series

        proto = uri[:len(uri) - len(path)]  # "s3://"
        series = {e.uri[len(proto):]: e.part_of or e.uri for e in group_series(
            [entry_of(proto + k, v) for k, v in sorted(found.items())],
            self.storage)}
        mine = series.get(path)
        return {k: v for k, v in found.items() if k != path and series.get(k) == mine}

    @contextlib.contextmanager
    def stage(self, uri: str, size: int | None = None, etag: str | None = None,
              make_room: Callable[[], bool] | None = None, keep: bool = True) -> Iterator[str]:
        """Yield a local path holding the object at ``uri`` (a local ``uri`` is yielded as is).

        Companion files of multi-file formats are staged beside it, keeping relative paths.
        ``make_room`` is called while the folder is full of copies in use; it returns True if
        it released one of the caller's own. With ``keep`` False, a copy this call downloaded
        is removed when the caller is done with it, unless another process holds it then (a
        copy that was already staged stays): for a job that reads a slide once.
        """
        if not is_remote(uri):
            yield uri
            return
        self._make_root()
        fs, path = get_filesystem(uri, self.storage)
        if size is None or etag is None:
            entry = stat_file(uri, self.storage)
            size, etag = entry.size or 0, entry.etag
        key = hashlib.sha256(f"{uri}\0{size}\0{etag}".encode()).hexdigest()[:32]
        folder, lock = os.path.join(self.root, key), os.path.join(self.root, key + ".lock")
        done = os.path.join(folder, ".complete")
        fd = None
        waited = _Wait(self, uri, make_room)
        fetched = False
        try:
            # a whole slide's download, or the wait on another's, is slow, not hung: it has
            # its own time-outs (storage.retries, StagingArea.wait_s), and no read's deadline counts it
            with WATCHDOG.unhurried():
                while True:
                    fd = self._open_locked(lock, fcntl.LOCK_SH, waited)
                    if os.path.exists(done):
                        break
                    # to exclusive; not atomic, so an evictor may slip in between: check the
                    # inode
                    waited.lock(fd, fcntl.LOCK_EX)
                    if _same_file(fd, lock) and not os.path.exists(done):
                        self._download(uri, fs, path, size, folder, fd, key, waited)
                        fetched = True
                    os.close(fd)  # and take it again shared
                    fd = None
            os.utime(lock)  # last use, for eviction
            yield os.path.join(folder, path.rsplit("/", 1)[-1])  # keep the name: some formats
        finally:                                                  # key on the extension
            if fd is not None:
                os.close(fd)
            if fetched and not keep:
                self._remove(key)

    def _open_locked(self, path: str, mode: int, waited: _Wait) -> int:
        """A descriptor of lock file ``path`` holding ``flock`` ``mode`` on the file it names."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                waited.lock(fd, mode)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                return fd
            os.close(fd)

    def _reserve(self, total: int, fd: int, key: str, waited: _Wait) -> None:
        """Evict until ``total`` bytes fit, then record them in our lock file, so that others
        count them; one process at a time checks and reserves (``.room.lock``)."""
        room = os.open(os.path.join(self.root, ".room.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                fcntl.flock(room, fcntl.LOCK_EX)
                try:
                    if self._evict(total, keep=key):
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, f"{total}\n".encode(), 0)
                        return
                finally:
                    fcntl.flock(room, fcntl.LOCK_UN)
                waited.pause(f"no room for {total:,} bytes: the staging folder is full of "
                             f"copies in use (storage.stage_max_bytes: {self.max_bytes:,}), "
                             f"or its disk is ({self.root}: "
                             f"{shutil.disk_usage(self.root).free:,} bytes free)")
        finally:
            os.close(room)

    def _download(self, uri, fs, path, size, folder, fd, key, waited) -> None:
        """Fetch the object and its companions into ``folder`` (we hold its lock exclusively);
        a copy already staged needs neither the companions' listing nor this."""
        try:
            companions = call_with_retries(lambda: self._companions(fs, uri, path), self.storage,
                                           "list companions")
        except OSError as err:
            raise translate_storage_error(uri, err) from err
        total = size + sum(s for _, s in companions)
        if total > self.max_bytes:
            raise StagingError(uri, f"object of {total:,} bytes exceeds the staging bound of "
                               f"{self.max_bytes:,} bytes (storage.stage_max_bytes: raise it, "
                               "then run again with --retry-failed)")
        shutil.rmtree(folder, ignore_errors=True)  # a crashed download's leftovers
        self._reserve(total, fd, key, waited)
        parent = path.rsplit("/", 1)[0]
        try:
            for remote in [path] + [c for c, _ in companions]:
                dest = os.path.join(folder, remote[len(parent) + 1:])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                call_with_retries(lambda r=remote, d=dest: fs.get_file(r, d), self.storage,
                                  "download")
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                raise StagingFull(uri, f"no space left on the staging disk ({self.root}); "
                                  "set storage.stage_dir or storage.stage_max_bytes; not "
                                  "committed, so the next run reads it") from err
            raise translate_storage_error(uri, err) from err
        with open(os.path.join(folder, ".complete"), "w"):
            pass
        self.downloads += 1

    def _entries(self) -> list[tuple[float, str, int]]:
        """``(last use, key, bytes)`` of every copy in the folder, oldest first."""
        out = []
        for name in os.listdir(self.root):
            if name.endswith(".lock") and not name.startswith("."):
                try:
                    p = os.path.join(self.root, name)
                    with open(p) as fh:
                        text = fh.read().strip()
                    out.append((os.stat(p).st_mtime, name[:-5], int(text or 0)))
                except (OSError, ValueError):
                    continue  # removed meanwhile, or being written
        return sorted(out)

    def _evict(self, need: int, keep: str | None = None) -> bool:
        """Remove least recently used copies nobody holds until ``need`` more bytes fit, both
        under the bound and on the disk (less what other downloads have reserved and not yet
        written, and `disk_reserve`)."""
        entries = [e for e in self._entries() if e[1] != keep]
        used = sum(b for _, _, b in entries)
        pending = sum(b for _, k, b in entries
                      if not os.path.exists(os.path.join(self.root, k, ".complete")))
        free = shutil.disk_usage(self.root).free - pending - self.disk_reserve
        for _, key, nbytes in entries:
            if used + need <= self.max_bytes and need <= free:
                break
            if self._remove(key):
                used, free = used - nbytes, free + nbytes
        return used + need <= self.max_bytes and need <= free

    def _remove(self, key: str) -> bool:
        """Delete one copy if no process holds it; False if one does."""
        lock = os.path.join(self.root, key + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if _same_file(fd, lock):
                shutil.rmtree(os.path.join(self.root, key), ignore_errors=True)
                os.unlink(lock)  # under the lock: late openers see another inode and retry
            return True
        finally:
            os.close(fd)

    def purge(self) -> int:
        """Remove every copy nobody holds, and the sparse copies of processes that ended
        without removing theirs (killed outright); returns how many staged copies were
        removed."""
        if not os.path.isdir(self.root) or (not self.shared and not self._ready):
            return 0
        for name in os.listdir(self.root):
            pid = name[len(SPARSE_PREFIX):].split("-", 1)[0]
            if name.startswith(SPARSE_PREFIX) and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return sum(self._remove(key) for _, key, _ in self._entries())

    def close(self) -> None:
        """A private area is removed; the shared folder stays for the node's other readers."""
        if not self.shared and self._ready:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> StagingArea:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (an evictor may have unlinked it)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class _Wait:
    """Waiting on the staging folder without deadlock: locks are polled, and each time one is
    busy (or the folder is full) the caller's ``make_room`` may release a copy it holds idle
    before we sleep. After ``StagingArea.wait_s`` the stage fails with `StagingFull`."""

    def __init__(self, area: StagingArea, uri: str, make_room: Callable[[], bool] | None):
        self.area, self.uri, self.make_room = area, uri, make_room
        self.deadline = time.monotonic() + area.wait_s

    def pause(self, why: str) -> None:
        if self.make_room is not None and self.make_room():
            return
        if time.monotonic() > self.deadline:
            raise StagingFull(self.uri, f"waited {self.area.wait_s:.0f} s: {why}; not "
                              "committed, so the next run reads it")
        time.sleep(self.area.poll_s)

    def lock(self, fd: int, mode: int) -> None:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.pause("another process holds this object's copy")
