"""One inventory row per input file: open it, read metadata, probe a read, refuse with a reason."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.config import StorageConfig
from engine.errors import PartOfSlide, SlideError, SlideUnsupported
from engine.schema import slide_id_for
from engine.slides.base import SlideInfo, SlideReader
from engine.slides.registry import looks_like_slide, no_slide_by_content, open_slide
from engine.slides.storage import FileEntry, StagingArea
from engine.specimen import UNKNOWN

PROBE_PX = 256  # side of the thumbnail read to prove the pixels decode


@dataclass(frozen=True)
class MppOverrides:
    """Pixel sizes supplied by the user.

    A table entry (by URI or slide_id, or by a folder or S3 prefix for the slides under it: a
    scanner's export, a DICOM series' folder) wins over file metadata, since it is an explicit
    statement about that slide; the global default only fills in where metadata has none. A
    slide's own entry wins over its folder's, and a nearer folder's over one further up.
    """

    default: float | None = None
    table: dict[str, float] = field(default_factory=dict)

    def value(self, uri: str, slide_id: str, missing: bool) -> float | None:
        """The pixel size to state for a slide, or None to keep its metadata's; ``missing``:
        its metadata has none."""
        mpp = self.stated(uri, slide_id)
        if mpp is None and missing:
            mpp = self.default
        return None if mpp is None else float(mpp)

    def stated(self, uri: str, slide_id: str) -> float | None:
        """The table's pixel size for the slide: its own entry's, else its nearest folder's."""
        if not self.table:
            return None
        for key in (uri, slide_id, *folders_above(uri)):
            if key in self.table:
                return self.table[key]
        return None

    def unused(self, uris) -> list[str]:
        """The table's keys that name none of ``uris`` (by URI, slide_id or a folder above
        it): a typo in a hand-made sheet, or a slide listed under another path, left its
        slides without the size it was to state."""
        named: set[str] = set()
        for uri in uris:
            named.update((uri, slide_id_for(uri), *folders_above(uri)))
        return sorted(k for k in self.table if k not in named)

    def apply(self, info: SlideInfo, slide_id: str) -> SlideInfo:
        mpp = self.value(info.uri, slide_id, info.mpp_source == "missing")
        if mpp is None:
            return info
        return info.replace(mpp_x=mpp, mpp_y=mpp, mpp_source="override")

    def restate(self, row: dict, earlier_table: bool = True) -> dict | None:
        """An earlier inventory's ``row`` with these pixel sizes in place of the ones it was
        made with, or None where that needs the slide read again. ``earlier_table``: whether
        that inventory had a table (``--mpp-table``). Without one, its overrides were all the
        default, given to slides whose metadata has none; with one, a row's override may have
        hidden what its metadata says, which only a read tells, unless this run's table states
        that slide's size again."""
        source = row.get("mpp_source")
        if source is None:  # a row that never got as far as the slide's metadata
            return row
        uri, slide_id = row["uri"], row["slide_id"]
        if source == "override":
            if not earlier_table:
                source = "missing"
            elif self.stated(uri, slide_id) is None:
                return None
        mpp = self.value(uri, slide_id, source == "missing")
        if mpp is not None:
            return {**row, "mpp_x": mpp, "mpp_y": mpp, "mpp_source": "override"}
        return {**row, "mpp_x": None, "mpp_y": None, "mpp_source": "missing"} \
            if source == "missing" else row


def folders_above(uri: str) -> Iterator[str]:
    """The folders (S3 prefixes) that hold ``uri``, nearest first, as `normalize_uri` writes
    them: ``s3://b/x/y.svs`` -> ``s3://b/x``, ``s3://b``; ``/a/b/c.svs`` -> ``/a/b``, ``/a``."""
    start = uri.index("://") + 3 if "://" in uri else 0
    while (cut := uri.rfind("/", start)) > start:
        uri = uri[:cut]
        yield uri


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def modified_since_read(row: dict, entry: FileEntry) -> bool:
    """Whether the local file ``entry`` lists was modified after the inventory ``row`` began
    to read it (its modification time later than the row's ``inventoried_at``): a copy under
    way then into a file its copier had made its full size first (rsync --preallocate, a
    Windows copy), whose size tells nothing; or a file saved over since with the same size.
    Not told for an object (its ETag tells) or a link (its listing gives no target's time)."""
    at = row.get("inventoried_at")
    return entry.mtime is not None and at is not None and entry.mtime > at.timestamp()


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
                specimen: str = UNKNOWN, case: str | None = None, sparse: bool = False
                ) -> Iterator[tuple[dict, SlideReader | None]]:
    """Inventory one file and keep it open: yields ``(slides row, reader)``, the reader being
    None unless the row is ``ok``, so a caller that goes on to plan tiles opens (and, on S3,
    downloads) the slide once.

    Slide problems become ``status = failed`` with the error's type and message; files that are
    not slides by name (``LICENSE.txt``), and a DICOM series' instances read through another of
    its files (``entry.part_of``), become ``skipped``. Errors raised by the caller's block
    propagate unchanged. ``specimen``: the slide's type as the input gave it
    (`engine.specimen`), and ``case``: the case it belongs to, recorded in the row.
    ``sparse``: see `engine.slides.registry.open_slide` (a reader that reads only what it
    touches, for a caller that reads nothing more than the probe).
    """
    mpp = mpp or MppOverrides()
    if entry.part_of:
        yield error_row(entry, PartOfSlide(entry.uri, "an instance of the DICOM series read "
                                                      f"through {entry.part_of}"),
                        status="skipped", specimen=specimen, case=case), None
        return
    if not looks_like_slide(entry.uri) or no_slide_by_content(entry.uri):
        name = entry.uri.rsplit("/", 1)[-1]
        why = f".{name.rsplit('.', 1)[-1]}" if "." in name else "no extension, and not DICOM"
        yield error_row(entry, SlideUnsupported(entry.uri, f"not a slide file ({why})"),
                        status="skipped", specimen=specimen, case=case), None
        return
    row = base_row(entry, specimen, case)
    with contextlib.ExitStack() as stack:
        try:
            slide = stack.enter_context(open_slide(entry.uri, storage, staging,
                                                   size=entry.size, etag=entry.etag,
                                                   direct_jpeg=direct_jpeg, sparse=sparse))
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

    With ``sparse``, a remote SVS, generic TIFF or DICOM series is read from a sparse copy of
    its directories (a series' headers) and thumbnail level
    (`engine.slides.registry.open_slide`): megabytes where staging it moved the whole object.
    Any other slide, and any slide that does not read from that copy, is staged whole as
    before, which gives its row.
    """
    with inventoried(entry, storage, staging, mpp, specimen=specimen, case=case,
                     sparse=sparse) as (row, _):
        return row
