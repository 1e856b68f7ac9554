"""DICOM whole-slide images: one slide per series, not one per file.

A DICOM WSI is a series of instances, each a file: one per pyramid level, and the label,
overview and thumbnail images. OpenSlide opens any of them and reads the others from the same
folder. Listed file by file, a series of six instances was six slides, each processed whole:
six copies of its cells and differential under six slide ids, counted six times in its case.

`group_series` reads each DICOM file's header (pydicom, up to the total pixel matrix: a request
or two on S3), groups a listing's DICOM files by folder and ``SeriesInstanceUID``, and keeps
one entry a series: its level 0 (the VOLUME instance of the largest matrix). The others stay
in the listing, marked ``part_of`` that entry, so that the inventory accounts for them (a
``skipped`` row naming it) and nothing reads them twice. Staging a series' entry brings the
other files of its series with it, not its folder's other series
(`engine.slides.storage.StagingArea`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from engine.config import StorageConfig
from engine.errors import HemeflowError
from engine.slides.storage import (FileEntry, call_with_retries, changed_since_listed,
                                   entry_of, get_filesystem, is_remote, request_pool)

HEADER_THREADS = 16  # headers read at once: a request each on S3
SERIES_TAG = "dicom-series-"  # how a series' digest begins (`series_tag`)
_T = TypeVar("_T")
_LAST_TAG = 0x00480007  # TotalPixelMatrixRows: the last tag read; sequences after it are skipped


_UID_NAME = re.compile(r"\d+(\.\d+){3,}")  # 1.2.840.113619.2...: a file named by its UID


def is_dicom_name(uri: str) -> bool:
    """Whether a file may be a DICOM instance by its name: ``.dcm``, no extension (``IM0001``,
    as PACS exports write them) or a UID (digits and dots, as archives name instances)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    return bool(name) and (name.endswith(".dcm") or "." not in name
                           or _UID_NAME.fullmatch(name) is not None)


@dataclasses.dataclass(frozen=True)
class Instance:
    """What a DICOM file's header says of its place in a slide."""

    series: str
    volume: bool  # a pyramid level (ImageType VOLUME), not a label, overview or thumbnail
    pixels: int   # its total pixel matrix (columns x rows)


def lenient_pydicom() -> None:
    """Have pydicom read values as they are, without a warning (and a log line) for each that
    breaks the standard's limits (a UID of 65 characters, in a real file here): these reads
    only fold series and find frames; whether a file is a slide is OpenSlide's to say."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def unparsed_as_none(read: Callable[..., _T]) -> Callable[..., _T | None]:
    """``read`` (a header's parse) giving None, no instance of a series, where pydicom cannot
    parse the bytes. A damaged header raises whatever pydicom meets as it converts a value
    (its own ``BytesLengthException``, ``struct.error``, ``IndexError``, ...), on reading or
    on a later ``ds.get``: raised, one such file in a folder stopped every job over it, at
    its listing (`group_series`) and at each open of its neighbours (`series_view`). The file
    itself then goes to OpenSlide as any file of no series, which says what is wrong with it.
    hemeflow's own errors pass through."""
    @functools.wraps(read)
    def parse(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        except HemeflowError:
            raise
        except Exception:  # noqa: BLE001 - bytes pydicom could not parse: no instance here
            return None
    return parse


@unparsed_as_none
def read_instance(fh) -> Instance | None:
    """The series and kind of the DICOM file open as ``fh``, or None for a file that is no
    DICOM instance of a series (or whose header cannot be parsed)."""
    from pydicom.filereader import read_partial

    lenient_pydicom()
    ds = read_partial(fh, stop_when=lambda tag, vr, length: tag > _LAST_TAG)
    series = ds.get("SeriesInstanceUID")
    if not series:
        return None
    kind = [str(v).upper() for v in (ds.get("ImageType") or [])]
    cols = ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0
    rows = ds.get("TotalPixelMatrixRows") or ds.get("Rows") or 0
    return Instance(str(series), "VOLUME" in kind, int(cols) * int(rows))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a DICOM file's pixels lie (`read_layout`)."""

    series: str
    volume: bool        # a pyramid level (ImageType VOLUME)
    width: int          # its total pixel matrix
    height: int
    tile_w: int         # a frame's
    tile_h: int
    encapsulated: bool  # compressed frames, each an item of the pixel data
    tiled: bool         # frames are its tiles in TILED_FULL order: one focal plane and path
    syntax: str         # the transfer syntax UID
    photometric: str    # PhotometricInterpretation
    samples: int        # SamplesPerPixel
    bits: int           # BitsAllocated
    start: int          # where the pixel data's value starts
    # each frame's byte range (an encapsulated one's from its item's tag), or None where no
    # offset table places them (a reader walks the items one by one)
    frames: tuple[tuple[int, int], ...] | None


@unparsed_as_none
def read_layout(fh, size: int) -> Layout | None:
    """The layout of the DICOM file open as ``fh`` (``size`` bytes), read up to its pixel
    data's offset table: pydicom reads every element before the pixel data, as OpenSlide's
    libdicom does to open it, then the table (Basic, in the pixel data's first item, or
    Extended, before it; a single frame: the first item after the table). None for a file no
    DICOM image of a series."""
    import struct

    import numpy as np
    import pydicom

    lenient_pydicom()
    ds = pydicom.dcmread(fh, stop_before_pixels=True)
    series = ds.get("SeriesInstanceUID")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    # the pixel data's tag, VR (explicit VR only) and length, where pydicom stopped
    n_head = 8 if syntax is not None and syntax.is_implicit_VR else 12
    head = fh.read(n_head)
    if not series or len(head) < n_head or head[:4] != b"\xe0\x7f\x10\x00":
        return None
    start = fh.tell()
    width = int(ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0)
    height = int(ds.get("TotalPixelMatrixRows") or ds.get("Rows") or 0)
    cw, ch = int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
    if not (width and height and cw and ch):
        return None
    n = int(ds.get("NumberOfFrames") or 1)
    tiled = n == -(-width // cw) * -(-height // ch) and \
        int(ds.get("TotalPixelMatrixFocalPlanes") or 1) == 1 and \
        int(ds.get("NumberOfOpticalPaths") or 1) == 1 and \
        (n == 1 or ds.get("DimensionOrganizationType", "TILED_FULL") == "TILED_FULL")
    encapsulated = syntax is not None and syntax.is_encapsulated
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 8)
    frames: list[tuple[int, int]] = []
    if encapsulated:
        item = fh.read(8)  # the offset table's item: tag and length
        if len(item) < 8 or item[:4] != b"\xfe\xff\x00\xe0":
            return None
        length = struct.unpack("<I", item[4:])[0]
        basic = np.frombuffer(fh.read(length), "<u4").astype(np.int64)
        first = start + 8 + length  # offsets count from the first frame's item
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            at = np.frombuffer(ds.ExtendedOffsetTable, "<u8").astype(np.int64)
            lengths = np.frombuffer(ds.ExtendedOffsetTableLengths, "<u8").astype(np.int64)
            frames = [(first + int(a), min(first + int(a) + 8 + int(b) + int(b) % 2, size))
                      for a, b in zip(at, lengths)]  # items are of even length
        elif len(basic) == n or n == 1:
            basic = basic if len(basic) else np.zeros(1, np.int64)
            ends = np.append(basic[1:], size - first)
            frames = [(first + int(a), min(first + int(b), size)) for a, b in zip(basic, ends)]
    else:  # native: frames at fixed places
        frame = cw * ch * samples * -(-bits // 8)
        frames = [(start + i * frame, min(start + (i + 1) * frame, size)) for i in range(n)]
    volume = "VOLUME" in [str(v).upper() for v in (ds.get("ImageType") or [])]
    return Layout(str(series), volume, width, height, cw, ch, encapsulated, tiled,
                  str(syntax or ""), str(ds.get("PhotometricInterpretation") or ""), samples,
                  bits, start, tuple(frames) if len(frames) == n else None)


# the headers read of remote objects, by URI, size and ETag (an object's ETag changes with its
# bytes): each slide of a folder that holds several series reads its folder's headers to find
# its own files (staging it, or its sparse copy), which for a folder of S series of F files
# each was S x S x F requests a job; now S x F a process
_HEADERS: dict[tuple[str, int | None, str], Instance | None] = {}
_HEADERS_MAX = 50_000
_HEADERS_LOCK = threading.Lock()


def header(entry: FileEntry, storage: StorageConfig) -> Instance | None:
    """`read_instance` of the object ``entry`` names (a request or two on S3), or None where it
    is no DICOM instance of a series or cannot be read; a remote object's (one with an ETag)
    is read once a process while its size and ETag stand, a local file's while its size and
    modification time do."""
    if not entry.etag and not is_remote(entry.uri):
        path = entry.uri.removeprefix("file://")
        try:
            entry = _local_entry(path, os.stat(path), os.path.islink(path))
        except OSError:
            return None  # the inventory reports it
    known, got = known_header(entry)
    if not known:
        try:
            got = _header(entry, storage)
        except _Unread:
            return None  # not kept: it may be read once restored, or permitted
        remember_header(entry, got)
    return got


class _Unread(Exception):
    """A header that could not be read (missing, denied, archived), as opposed to one that
    says the file is no DICOM instance of a series."""


def known_header(entry: FileEntry) -> tuple[bool, Instance | None]:
    """Whether `header` has ``entry``'s header already, and it."""
    key = (entry.uri, entry.size, entry.etag)
    with _HEADERS_LOCK:
        return (True, _HEADERS[key]) if entry.etag and key in _HEADERS else (False, None)


def remember_header(entry: FileEntry, got: Instance | None) -> None:
    """Keep ``got`` as ``entry``'s header (read otherwise: a sparse copy's walk), for `header`."""
    if entry.etag:
        with _HEADERS_LOCK:
            if len(_HEADERS) >= _HEADERS_MAX:
                _HEADERS.clear()
            _HEADERS[(entry.uri, entry.size, entry.etag)] = got


def _header(entry: FileEntry, storage: StorageConfig) -> Instance | None:
    fs, path = get_filesystem(entry.uri, storage)

    def read() -> Instance | None:
        with fs.open(path, "rb", block_size=64 * 1024) as fh:
            head = fh.read(132)
            if len(head) < 132 or head[128:132] != b"DICM":
                return None
            fh.seek(0)
            return read_instance(fh)

    try:
        return call_with_retries(read, storage, "read DICOM header")
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise _Unread from err  # the inventory reports it


# each local folder's DICOM files and the series each is of (None: no series), kept while the
# folder's modification time stands (a file added, removed or renamed changes it) once it is
# `_SETTLED_NS` old (a change within the clock's tick after a listing would leave the time as
# it was: a folder still being written is listed each time); and a lock a folder, so that
# threads opening its slides read its headers once
_FOLDERS: dict[str, tuple[int, dict[str, str | None]]] = {}
_SETTLED_NS = 2 * 10**9
_FOLDER_LOCKS: dict[str, threading.Lock] = {}
_FOLDERS_MAX = 10_000
_FOLDERS_LOCK = threading.Lock()


def _folder_series(folder: str) -> dict[str, str | None]:
    """The files named like DICOM in the local ``folder`` (by name) and the series each
    header names; each header is read once a process while its file's size and modification
    time stand (`header`, through a link to its target)."""
    real = os.path.realpath(folder or ".")
    with _FOLDERS_LOCK:
        lock = _FOLDER_LOCKS.setdefault(real, threading.Lock())
    with lock:
        mtime = os.stat(real).st_mtime_ns
        known = _FOLDERS.get(real)
        if known and known[0] == mtime:
            return known[1]
        storage, series = StorageConfig(), {}
        with os.scandir(real) as found:
            for e in found:
                if is_dicom_name(e.name) and e.is_file():
                    got = header(_local_entry(e.path, e.stat(), e.is_symlink()), storage)
                    series[e.name] = got.series if got else None
        if time.time_ns() - mtime > _SETTLED_NS:
            with _FOLDERS_LOCK:
                if len(_FOLDERS) >= _FOLDERS_MAX:
                    _FOLDERS.clear()
                _FOLDERS[real] = (mtime, series)
        return series


def _local_entry(path: str, st: os.stat_result, link: bool) -> FileEntry:
    return FileEntry(os.path.realpath(path) if link else path, st.st_size,
                     f"mtime-{st.st_mtime_ns}")


def local_series(path: str) -> list[str]:
    """The files, sorted, of the DICOM series the local file ``path`` is an instance of: its
    folder's files named like DICOM whose header names the same series (``path`` alone where
    its header names none). A PACS export's flat folder of S series of F files had every
    header read, S x F, each time one of its slides opened: each is read once a process now,
    and the folder's files listed again once it changes."""
    folder, name = os.path.split(path)
    return _members(folder, name, _folder_series(folder))


def _members(folder: str, name: str, series: dict[str, str | None]) -> list[str]:
    """The files of ``folder`` (its `_folder_series` ``series``) in the series of ``name``."""
    own = series.get(name)
    if own is None:
        return [os.path.join(folder, name)]
    return [os.path.join(folder, n) for n in sorted(series) if series[n] == own]


def series_view(path: str) -> str | None:
    """Where the local DICOM file ``path`` shares its folder with other series' files (a PACS
    export's flat folder), its name in a new folder of links to its own series' files alone,
    for OpenSlide to open; None where the folder holds no other series (files that are no
    DICOM instances cost OpenSlide little), or ``path`` is of no series. OpenSlide reads the
    header of every DICOM file in the folder of the file it opens, so each open of a slide
    of a flat folder of 2,000 files took 46 ms, where its series alone takes 3. Remove the
    folder once the slide is closed. None too where the folder cannot be listed: OpenSlide
    opens ``path`` itself, and says what is wrong."""
    folder, name = os.path.split(path)
    try:
        series = _folder_series(folder)
    except OSError:
        return None
    own = series.get(name)
    if own is None or all(v in (own, None) for v in series.values()):
        return None
    view = tempfile.mkdtemp(prefix="hemeflow-dicom-series-")
    for p in _members(folder, name, series):
        os.symlink(os.path.abspath(p), os.path.join(view, os.path.basename(p)))
    return os.path.join(view, os.path.basename(path))


def group_series(entries: list[FileEntry], storage: StorageConfig,
                 header: Callable[[FileEntry, StorageConfig], Instance | None] = header
                 ) -> list[FileEntry]:
    """``entries`` in their order, each DICOM instance that is not its series' level 0 marked
    ``part_of`` that level's URI. Files named like DICOM (`is_dicom_name`) whose
    header says no series, and series of one file, are left as they are."""
    candidates = [e for e in entries if is_dicom_name(e.uri)]
    by_folder: dict[str, list[FileEntry]] = {}
    for e in candidates:
        by_folder.setdefault(e.uri.rsplit("/", 1)[0], []).append(e)
    candidates = [e for group in by_folder.values() if len(group) > 1 for e in group]
    if not candidates:
        return entries
    with request_pool(min(HEADER_THREADS, len(candidates)), "dicom") as pool:
        found = dict(zip([e.uri for e in candidates],
                         pool.map(lambda e: header(e, storage), candidates)))
    series: dict[tuple[str, str], list[str]] = {}
    for e in candidates:
        if found[e.uri] is not None:
            series.setdefault((e.uri.rsplit("/", 1)[0], found[e.uri].series), []).append(e.uri)
    part_of, mains = {}, {}
    by_uri = {e.uri: e for e in candidates}
    for uris in series.values():
        main = max(uris, key=lambda u: (found[u].volume, found[u].pixels, -uris.index(u)))
        part_of.update({u: main for u in uris if u != main})
        if len(uris) > 1:  # an inventory's entry (its slides row) holds the tag already
            tag = by_uri[main].etag or ""
            mains[main] = tag if tag.startswith(SERIES_TAG) else \
                series_tag([by_uri[u] for u in uris])
    return [dataclasses.replace(e, part_of=part_of[e.uri]) if e.uri in part_of else
            dataclasses.replace(e, etag=mains[e.uri]) if e.uri in mains else e
            for e in entries]


def series_tag(files: list[FileEntry]) -> str:
    """What stands for a series' ETag in its slide's entry (and so in its ``slides`` row): a
    digest of its files' names, sizes and ETags, which changes when any of them does, where
    its level 0's own size and ETag change only with that file. A series whose thumbnail or
    coarse level was rewritten (which the tiles branch reads) is a changed slide
    (``process_slides --reprocess-changed``, the inventory's rerun)."""
    text = "\n".join(f"{e.uri.rsplit('/', 1)[-1]}\0{e.size}\0{e.etag}"
                     for e in sorted(files, key=lambda e: e.uri))
    return SERIES_TAG + hashlib.sha256(text.encode()).hexdigest()[:32]


def series_beside(entries: list[FileEntry]) -> dict[str, list[FileEntry]]:
    """By the URI each multi-file DICOM series is read through (`group_series`' marks), the
    other files named like DICOM listed in its folder: what `series_changed` compares."""
    mains = {e.part_of for e in entries if e.part_of}
    if not mains:
        return {}
    by_folder: dict[str, list[FileEntry]] = {}
    for e in entries:
        if is_dicom_name(e.uri):
            by_folder.setdefault(e.uri.rsplit("/", 1)[0], []).append(e)
    return {m: [e for e in by_folder.get(m.rsplit("/", 1)[0], []) if e.uri != m]
            for m in mains}


def series_changed(main: FileEntry, beside: list[FileEntry], storage: StorageConfig
                   ) -> str | None:
    """How the DICOM series read through ``main`` changed since the job listed it, in words,
    or None: ``main`` or another of its files changed (`changed_since_listed`), or a file
    of it appeared in its folder since. A scanner or PACS export writes a series file by
    file, so a job that listed it under way read a level or image not yet whole (and failed
    `SlideCorrupt`, which a rerun kept) or none at all. ``beside``: the files named like
    DICOM listed in its folder (`series_beside`); those of other series are theirs to
    check, while a file whose header could not be read (none yet) counts as the series'. A
    file that appeared counts where its header names the series or cannot be read yet."""
    why = changed_since_listed(main, storage)
    if why:
        return why
    for e in beside:
        if e.part_of == main.uri or (e.part_of is None
                                     and not (e.etag or "").startswith(SERIES_TAG)):
            why = changed_since_listed(e, storage)
            if why:
                return f"{e.uri.rsplit('/', 1)[-1]} of its DICOM series: {why}"
    folder = main.uri.rsplit("/", 1)[0]
    known = {main.uri, *(e.uri for e in beside)}
    try:
        now = _folder_now(folder, storage)
    except OSError:
        return None  # the reads have their own verdict
    new = [uri for uri in sorted(now) if uri not in known and is_dicom_name(uri)]
    if not new:
        return None
    own = header(main, storage)
    for uri in new:
        got = header(now[uri] or FileEntry(uri), storage)  # a local file's: `header` stats it
        if got is None or (own is not None and got.series == own.series):
            return f"{uri.rsplit('/', 1)[-1]}, a file of its DICOM series, appeared"
    return None


def _folder_now(folder: str, storage: StorageConfig) -> dict[str, FileEntry | None]:
    """The files in ``folder`` now (not below it), by URI, an object's entry with each (a
    listing past any cache; a local file's is not asked, a round trip on a share)."""
    if not is_remote(folder):
        with os.scandir(folder or ".") as found:
            return {e.path: None for e in found if e.is_file()}
    fs, path = get_filesystem(folder, storage)
    fs.invalidate_cache(path)
    proto = folder.split("://", 1)[0] + "://"
    listed = call_with_retries(lambda: fs.ls(path, detail=True), storage, "list")
    return {proto + i["name"]: entry_of(proto + i["name"], i) for i in listed
            if i.get("type") != "directory"}
