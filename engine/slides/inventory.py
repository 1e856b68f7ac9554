"""One inventory row per input file: open it, read metadata, probe a read, refuse with a reason."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.config import StorageConfig
from engine.errors import SlideError, SlideUnsupported
from engine.schema import slide_id_for
from engine.slides.base import SlideInfo, SlideReader
from engine.slides.header_copy import sparse_copy
from engine.slides.registry import looks_like_slide, open_reader, open_slide
from engine.slides.storage import FileEntry, StagingArea, is_remote
from engine.specimen import UNKNOWN

PROBE_PX = 256  # side of the thumbnail read to prove the pixels decode
# OpenSlide's formats whose opening reads the TIFF's directories and nothing else, as the tests
# check on real slides; others (NDPI, Philips, Ventana: no such file here) are staged whole
SPARSE_FORMATS = ("aperio", "generic-tiff")


@dataclass(frozen=True)
class MppOverrides:
    """Pixel sizes supplied by the user.

    A per-slide table entry (by URI or slide_id) wins over file metadata, since it is an explicit
    statement about that slide; the global default only fills in where metadata has none.
    """

    default: float | None = None
    table: dict[str, float] = field(default_factory=dict)

    def apply(self, info: SlideInfo, slide_id: str) -> SlideInfo:
        mpp = self.table.get(info.uri, self.table.get(slide_id))
        if mpp is None and info.mpp_source == "missing":
            mpp = self.default
        if mpp is None:
            return info
        return info.replace(mpp_x=float(mpp), mpp_y=float(mpp), mpp_source="override")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def base_row(entry: FileEntry, specimen: str = UNKNOWN, case: str | None = None) -> dict:
    return {"slide_id": slide_id_for(entry.uri), "uri": entry.uri, "size_bytes": entry.size,
            "etag": entry.etag, "specimen": specimen, "case": case, "inventoried_at": _now()}


INFO_FIELDS = ("format", "backend", "width", "height", "level_count", "level_downsamples", "mpp_x",
               "mpp_y", "mpp_source", "objective", "associated_images", "notes")


def info_row(info: SlideInfo) -> dict:
    return {"format": info.format, "backend": info.backend, "width": info.width,
            "height": info.height, "level_count": info.level_count,
            "level_downsamples": list(info.level_downsamples), "mpp_x": info.mpp_x,
            "mpp_y": info.mpp_y, "mpp_source": info.mpp_source, "objective": info.objective,
            "associated_images": list(info.associated_images), "notes": info.notes}


def error_row(entry: FileEntry, err: SlideError, status: str = "failed",
              specimen: str = UNKNOWN, case: str | None = None) -> dict:
    return {**base_row(entry, specimen, case), "status": status, "error_type": type(err).__name__,
            "error_message": str(err)}


@contextlib.contextmanager
def inventoried(entry: FileEntry, storage: StorageConfig, staging: StagingArea | None = None,
                mpp: MppOverrides | None = None, direct_jpeg: bool = True,
                specimen: str = UNKNOWN, case: str | None = None
                ) -> Iterator[tuple[dict, SlideReader | None]]:
    """Inventory one file and keep it open: yields ``(slides row, reader)``, the reader being
    None unless the row is ``ok``, so a caller that goes on to plan tiles opens (and, on S3,
    downloads) the slide once.

    Slide problems become ``status = failed`` with the error's type and message; files that are
    not slides by name (``LICENSE.txt``) become ``skipped``. Errors raised by the caller's block
    propagate unchanged. ``specimen``: the slide's type as the input gave it
    (`engine.specimen`), and ``case``: the case it belongs to, recorded in the row.
    """
    mpp = mpp or MppOverrides()
    if not looks_like_slide(entry.uri):
        ext = entry.uri.rsplit(".", 1)[-1]
        yield error_row(entry, SlideUnsupported(entry.uri, f"not a slide file (.{ext})"),
                        status="skipped", specimen=specimen, case=case), None
        return
    row = base_row(entry, specimen, case)
    with contextlib.ExitStack() as stack:
        try:
            slide = stack.enter_context(open_slide(entry.uri, storage, staging,
                                                   size=entry.size, etag=entry.etag,
                                                   direct_jpeg=direct_jpeg))
            row.update(info_row(mpp.apply(slide.info, row["slide_id"])))
            slide.read_thumbnail((PROBE_PX, PROBE_PX))  # raises SlideCorrupt on bad data
        except SlideError as err:
            failed = {**error_row(entry, err, specimen=specimen, case=case),
                      **{k: v for k, v in row.items() if k in INFO_FIELDS}}
        else:
            failed = None
        if failed is not None:
            yield failed, None
        else:
            yield {**row, "status": "ok", "error_type": None, "error_message": None}, slide


def inventory_file(entry: FileEntry, storage: StorageConfig, staging: StagingArea | None = None,
                   mpp: MppOverrides | None = None, specimen: str = UNKNOWN,
                   case: str | None = None, sparse: bool = True) -> dict:
    """Inventory one file into a ``slides`` row (see `engine.schema.SLIDES` and `inventoried`).

    With ``sparse``, a remote slide that OpenSlide reads as an SVS or a generic TIFF is
    read from a sparse copy of its directories and thumbnail level
    (`engine.slides.header_copy`): megabytes where staging it moved the whole object. Anything
    else, and any slide that does not open and decode from that copy, is staged whole and
    inventoried as before, which gives its row.
    """
    mpp = mpp or MppOverrides()
    if sparse and is_remote(entry.uri) and entry.size and looks_like_slide(entry.uri):
        row = _sparse_row(entry, storage, mpp, specimen, case)
        if row is not None:
            return row
    with inventoried(entry, storage, staging, mpp, specimen=specimen, case=case) as (row, _):
        return row


def _sparse_row(entry: FileEntry, storage: StorageConfig, mpp: MppOverrides, specimen: str,
                case: str | None) -> dict | None:
    """The ``ok`` row of a slide OpenSlide reads from its sparse copy, or None to stage it
    whole: no TIFF, one in none of `SPARSE_FORMATS` (libvips, which may read any page, among
    them), one whose thumbnail level is no page of the file, or any error (the full copy
    reports it)."""
    try:
        with sparse_copy(entry.uri, storage, entry.size) as copy:
            if copy is None:
                return None
            reader = open_reader(copy.path, entry.uri)
            try:
                if reader.info.format not in SPARSE_FORMATS or not copy.fill(
                        *reader.info.level_dimensions[reader.thumbnail_level((PROBE_PX,) * 2)]):
                    return None
                info = mpp.apply(reader.info, slide_id_for(entry.uri))
                reader.read_thumbnail((PROBE_PX, PROBE_PX))
            finally:
                reader.close()
    except Exception:  # noqa: BLE001 - the full copy reads it again and reports what is wrong
        return None
    return {**base_row(entry, specimen, case), **info_row(info), "status": "ok",
            "error_type": None, "error_message": None}
