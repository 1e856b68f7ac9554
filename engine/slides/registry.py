"""Backend registry (name -> lazily imported class, with an install hint, as in fsspec) and
format detection by content, not by extension alone."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator

from engine.config import StorageConfig
from engine.errors import (HemeflowError, SlideCorrupt, SlideError, SlideNotFound,
                           SlideReadError, SlideUnsupported)
from engine.slides.base import SlideReader
from engine.slides.dicom import is_dicom_name
from engine.slides.header_copy import open_sparse
from engine.slides.storage import (StagingArea, is_remote, misnamed, stat_file,
                                   translate_storage_error)

_BACKENDS: dict[str, tuple[str, str]] = {
    "openslide": ("engine.slides.openslide_backend:OpenSlideReader",
                  "pip install openslide-python openslide-bin"),
    "vips": ("engine.slides.vips_backend:VipsReader", "pip install 'pyvips[binary]'"),
    "image": ("engine.slides.image_backend:ImageReader", "pip install pillow"),
}

logger = logging.getLogger(__name__)

# where s3fs ends an object's key and begins a version's id (`open_slide` refuses such a key)
VERSION_MARK = "?versionId="

# Extensions users mean as slides; anything else found while listing a folder is skipped.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif",
                    ".svslide", ".dcm", ".qptiff", ".btf", ".png", ".jpg", ".jpeg", ".isyntax",
                    ".czi")


def register_backend(name: str, class_path: str, install_hint: str = "") -> None:
    """Add or replace a backend: ``class_path`` is ``"module:Class"``, imported on first use."""
    _BACKENDS[name] = (class_path, install_hint)


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> type[SlideReader]:
    """The reader class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        ImportError: the backend's library is missing (the message says what to install).
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown slide backend {name!r}; valid: {list_backends()}")
    class_path, hint = _BACKENDS[name]
    module, cls = class_path.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ImportError(f"slide backend {name!r} needs a missing library: {hint}") from err


def looks_like_slide(uri: str) -> bool:
    """True for names with a slide/image extension, or named as DICOM files are (no extension
    at all, or a UID: `engine.slides.dicom.is_dicom_name`)."""
    name = uri.rsplit("/", 1)[-1].lower()
    return bool(name) and (name.endswith(SLIDE_EXTENSIONS) or is_dicom_name(name))


def no_slide_by_content(uri: str) -> bool:
    """A local file without an extension (`looks_like_slide` takes it for a DICOM instance, as
    PACS exports name them: ``IM0001``) whose first bytes are no DICOM file's nor any other
    format's: a README, a LICENSE or a Makefile beside the slides, which the jobs took for
    slides and failed ``SlideUnsupported``. So is such a file not yet 132 bytes long (one
    being copied: the next run reads it). Only these are read (132 bytes); on S3 each would
    be a request, and an object there goes on to fail as ever."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if "." in name or "://" in uri:
        return False
    try:
        with open(uri, "rb") as fh:
            head = fh.read(132)
    except OSError:  # missing, not readable, a folder: the read says which
        return False
    return _magic_kind(head) is None


def _magic_kind(head: bytes) -> str | None:
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return None


def detect_backend(path: str, uri: str | None = None) -> str:
    """Pick the backend for a local file by its content.

    Raises:
        SlideNotFound, SlideAccessDenied: the file is missing or unreadable.
        SlideCorrupt: empty, or named like a slide but holding something else.
        SlideUnsupported: a readable file in no format hemeflow takes.
    """
    uri = uri or path
    if os.path.isdir(path):
        raise SlideUnsupported(uri, "is a directory, not a slide file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as err:
        raise translate_storage_error(uri, err) from err
    if size == 0:
        raise SlideCorrupt(uri, "empty file (0 bytes)")
    import openslide  # the detector is part of the openslide backend's library

    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except openslide.OpenSlideError:
        vendor = None
    kind = _magic_kind(head)
    if vendor:
        return "openslide"
    if kind == "tiff":
        return "vips"
    if kind in ("png", "jpeg"):
        return "image"
    if kind == "dicom":
        raise SlideUnsupported(uri, "DICOM file that OpenSlide does not read as a whole-slide "
                                    "image (another kind of DICOM object, or its header is "
                                    "damaged)")
    ext = os.path.splitext(uri.lower())[1]
    shown = head[:16]
    if ext in SLIDE_EXTENSIONS:
        raise SlideCorrupt(uri, f"named {ext} but its content is not a slide or image "
                           f"(starts with {shown!r})")
    raise SlideUnsupported(uri, f"not a slide or image format (starts with {shown!r})")


@contextlib.contextmanager
def decoding(uri: str, what: str) -> Iterator[None]:
    """Raise an error of a slide's decoding that hemeflow does not know (a decoder library's
    on bytes it did not expect: pydicom's, Pillow's and tifffile's own classes, IndexError,
    struct.error, MemoryError, ...) as `SlideReadError`, the failure of that slide alone, its
    traceback in the log. Raised as it was, such an error stopped the run over every slide of
    the archive, and every rerun again (two were found by damaging the fixtures, and are
    worded where they arise). hemeflow's own errors, the system's (OSError: a disk, a mount)
    and a missing library pass through: they are no slide's."""
    try:
        yield
    except (HemeflowError, OSError, ImportError):
        raise
    except Exception as err:  # noqa: BLE001 - any other: the decoder's, on this slide
        logger.warning("%s: %s raised", uri, what, exc_info=True)
        raise SlideReadError(uri, f"{what} raised {type(err).__name__}: {err} (if other software "
                                  "reads the slide, please report it, with this log)") from err


class _Decoded:
    """A backend's reader whose reads go through `decoding`; all else is the reader's."""

    def __init__(self, reader: SlideReader, uri: str):
        self._reader, self._uri = reader, uri

    def __getattr__(self, name: str):
        if name == "_reader":  # not set yet
            raise AttributeError(name)
        return getattr(self._reader, name)

    def read_region(self, level: int, x: int, y: int, width: int, height: int):
        with decoding(self._uri, f"reading level {level} at ({x}, {y})"):
            return self._reader.read_region(level, x, y, width, height)

    def read_thumbnail(self, max_size: tuple[int, int]):
        with decoding(self._uri, "reading its thumbnail"):
            return self._reader.read_thumbnail(max_size)


def open_reader(path: str, uri: str | None = None, backend: str | None = None,
                direct_jpeg: bool = True) -> SlideReader:
    """Open a local file with the named backend or the detected one.

    A TIFF that OpenSlide claims but cannot open is retried with libvips; if both fail, OpenSlide's
    error (usually the more specific) is raised. ``direct_jpeg`` lets the OpenSlide backend
    decode JPEG-tiled TIFF levels itself (`engine.slides.jpeg_tiles`). An error of opening or
    reading the slide that hemeflow does not know is its `SlideReadError` (`decoding`).
    """
    uri = uri or path
    with decoding(uri, "detecting its format"):
        name = backend or detect_backend(path, uri)
    try:
        return _Decoded(_construct(get_backend(name), path, uri,
                                   direct_jpeg if name == "openslide" else None), uri)
    except SlideError as first:
        if backend is None and name == "openslide":
            with open(path, "rb") as fh:
                if _magic_kind(fh.read(512)) == "tiff":
                    try:
                        return _Decoded(_construct(get_backend("vips"), path, uri), uri)
                    except SlideError:
                        pass
        raise first


def _construct(cls: type[SlideReader], path: str, uri: str,
               direct_jpeg: bool | None = None) -> SlideReader:
    with decoding(uri, "opening it"):
        return cls(path, uri) if direct_jpeg is None else cls(path, uri, direct_jpeg=direct_jpeg)


@contextlib.contextmanager
def open_slide(uri: str, storage: StorageConfig | None = None, staging: StagingArea | None = None,
               backend: str | None = None, size: int | None = None, etag: str | None = None,
               make_room=None, direct_jpeg: bool = True, keep: bool = True,
               sparse: bool = False) -> Iterator[SlideReader]:
    """Open a slide by URI (local path or ``s3://``) as a context manager.

    Remote objects are staged to a local file first (``staging``, or the node's staging folder;
    see `StagingArea`, which also explains ``make_room``); ``size`` and ``etag``, when known
    from a listing, save a request. ``direct_jpeg``: see `open_reader`. ``keep`` False (a job
    that reads a slide once: `jobs.export_cells`, `jobs.cell_gallery`, ...): a copy this call
    downloaded is removed when the slide is closed, unless another process reads it then; one
    already staged stays. ``sparse`` (a job that reads a slide's thumbnail or a few regions:
    `jobs.inventory`, `jobs.slide_map`, `jobs.cell_gallery`, `jobs.export_cells`, ...): a remote
    SVS, generic TIFF or DICOM series is read through OpenSlide from a sparse copy that fetches
    by range what each read touches (`engine.slides.header_copy.SparseReader`), where staging
    moved the whole object; any other slide, and any read that copy cannot answer, is staged
    whole (and every slide, with ``storage.sparse_reads`` false).

    Example:
        >>> with open_slide("s3://archive/case-1.svs", storage) as slide:
        ...     tile = slide.read_region(0, 1024, 2048, 512, 512)  # (512, 512, 3) uint8
    """
    storage = storage or StorageConfig()
    if not is_remote(uri) and not os.path.exists(uri):
        if os.path.islink(uri):
            raise SlideNotFound(uri, f"a link to {os.readlink(uri)}, which does not exist")
        if why := misnamed(uri):
            raise SlideUnsupported(uri, why)
        raise SlideNotFound(uri, "no such file")
    if is_remote(uri) and VERSION_MARK in uri:  # else "not found", though listed
        raise SlideUnsupported(uri, f"its key holds {VERSION_MARK!r}, which the S3 client reads "
                                    "as the start of an object version's id, not as part of "
                                    "the name: rename the object")
    with contextlib.ExitStack() as stack:
        if is_remote(uri) and staging is None:
            staging = stack.enter_context(StagingArea(storage))

        def whole() -> SlideReader:
            path = stack.enter_context(staging.stage(uri, size, etag, make_room, keep)) \
                if is_remote(uri) else uri
            reader = open_reader(path, uri, backend, direct_jpeg)
            stack.callback(reader.close)
            return reader

        reader = None
        if sparse and storage.sparse_reads and backend is None and is_remote(uri):
            if size is None or etag is None:
                entry = stat_file(uri, storage)
                size, etag = entry.size or 0, entry.etag
            reader = stack.enter_context(open_sparse(uri, storage, size, whole, direct_jpeg))
        yield reader or whole()
