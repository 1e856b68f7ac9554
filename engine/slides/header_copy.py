"""A remote slide's structure without its pixels, and then only the pixels read: for jobs that
read a slide's metadata, a thumbnail or a few regions (`jobs.inventory`, `jobs.slide_map`,
`jobs.cell_gallery`, `jobs.export_cells`, `jobs.predict_mil --figures`;
`engine.slides.registry.open_slide`'s ``sparse``).

OpenSlide reads local files only, so a remote slide is staged whole before it opens: an
inventory of an S3 archive moved every byte of it (1-3 GB a slide) to read some kilobytes of
header and a thumbnail, and a gallery of 48 cells moved the slide for some megabytes of tiles.
Here a local *sparse* file of the object's size is written instead, holding only what those
reads need, fetched by range:

- every byte tifffile reads to walk the TIFF's directories and their tags' values (the
  directory chain, tile offsets and byte counts, JPEG tables, image descriptions): what
  OpenSlide reads to open an SVS or a generic TIFF (`SPARSE_FORMATS`);
- of a DICOM series (a file per level and per label, overview or thumbnail image), a sparse
  copy of each of its files side by side (`SparseSeries`): every element before the pixel
  data and its offset table, which pydicom reads as OpenSlide's libdicom does, and the file's
  last block (OpenSlide reads it as it opens a file);
- before each read, what it touches (`SparseReader`): the level a thumbnail is made from,
  whole (the one OpenSlide names, matched to its page or DICOM file by size); a region's
  tiles (a DICOM level's frames), and those 2 pixels around it, on a page whose tiles fail to
  decode from a hole (JPEG, JPEG 2000, deflate; a DICOM frame's item), in one batch for many
  regions (`SparseReader.prefetch`).

The rest of the file is a hole that reads as zeros and takes no disk. Nothing is guessed: a read
the copy cannot answer exactly (no page of the level's size, tiles that might decode from a
hole, such as uncompressed ones, DICOM frames no offset table places, or any read that fails
from the copy) goes to a full staged copy, for that read and every later one, so a slide's
errors are always what its full copy gives. A truncated object gives a copy of the same size, so
it fails the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from engine.config import StorageConfig
from engine.slides.base import quiet_tifffile
from engine.slides.dicom import Instance, is_dicom_name, read_layout
from engine.slides.storage import (SPARSE_PREFIX, call_with_retries, get_filesystem,
                                   request_pool, shared_stage_root)

BLOCK = 64 * 1024  # the walk's reads are rounded out to whole blocks: few requests, each small
MERGE_GAP = BLOCK   # pixel-data ranges closer than this are fetched in one request
TAIL_BLOCKS = 4     # the file's end, fetched with its first block
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# JPEG, Aperio's JPEG 2000, deflate: a chunk of zeros does not decode (LZW's and raw ones do)
_LOUD = (7, 33003, 33005, 8, 32946)


class _Ranges(io.RawIOBase):
    """A read-only file over ``fetch(start, end)``: each read fetches the whole blocks it needs
    and does not hold yet, in one request, and keeps them (`blocks`) for the copy."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int):
        super().__init__()
        self._fetch, self._size, self._pos = fetch, size, 0
        self.blocks: dict[int, bytes] = {}  # block index -> its bytes (short at the end)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._pos + len(view), self._size)
        if end <= self._pos:
            return 0
        first, last = self._pos // BLOCK, (end - 1) // BLOCK
        missing = [b for b in range(first, last + 1) if b not in self.blocks]
        if missing:
            lo, hi = missing[0] * BLOCK, min((missing[-1] + 1) * BLOCK, self._size)
            data = self._fetch(lo, hi)
            for b in range(missing[0], missing[-1] + 1):
                self.blocks.setdefault(b, data[b * BLOCK - lo:(b + 1) * BLOCK - lo])
        n = 0
        for b in range(first, last + 1):
            block = self.blocks[b]
            lo = self._pos + n - b * BLOCK
            piece = block[lo:lo + (end - self._pos - n)]
            view[n:n + len(piece)] = piece
            n += len(piece)
            if len(piece) < BLOCK - lo:  # a short block: the object ends here
                break
        self._pos += n
        return n


def _merged(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _missing(ranges: list[tuple[int, int]], held: dict[int, bytes]) -> list[tuple[int, int]]:
    """``ranges`` less the blocks already ``held``."""
    out = []
    for start, end in ranges:
        for b in range(start // BLOCK, (end - 1) // BLOCK + 1):
            if b not in held:
                out.append((max(start, b * BLOCK), min(end, (b + 1) * BLOCK)))
    return _merged(out, 0)


@dataclass(frozen=True)
class _Page:
    """One TIFF page's pixel data: its chunks' byte ranges in the TIFF's order (row by row;
    None for a chunk not written) and their size (strips are chunks as wide as the page)."""

    width: int
    height: int
    chunk_w: int
    chunk_h: int
    loud: bool  # its chunks fail to decode from a hole (`_LOUD`), where others may not
    chunks: tuple[tuple[int, int] | None, ...]

    def chunks_in(self, x0: float, y0: float, x1: float, y1: float) -> set[tuple[int, int]]:
        """The byte ranges of the chunks holding pixels ``[x0, x1) x [y0, y1)``."""
        across, down = -(-self.width // self.chunk_w), -(-self.height // self.chunk_h)
        rows = range(max(int(y0 // self.chunk_h), 0), min(int(y1 // self.chunk_h) + 1, down))
        cols = range(max(int(x0 // self.chunk_w), 0), min(int(x1 // self.chunk_w) + 1, across))
        picked = (r * across + c for r in rows for c in cols)
        return {self.chunks[i] for i in picked if i < len(self.chunks) and self.chunks[i]}


def _walk(ranges: _Ranges, size: int) -> list[_Page]:
    """Walk every directory of the TIFF behind ``ranges`` (tifffile reads them through it, with
    every tag's value) and return its pages' pixel data layout."""
    tifffile = quiet_tifffile()

    pages = []
    with tifffile.TiffFile(ranges) as tif:
        tif.pages.cache = False
        for page in tif.pages:
            for tag in page.tags:
                tag.value  # noqa: B018 - large values (tile offsets) are read when asked for
            tiled = page.is_tiled
            chunks = tuple((int(o), min(int(o) + int(n), size)) if o > 0 and n > 0 else None
                           for o, n in zip(page.dataoffsets, page.databytecounts))
            pages.append(_Page(
                page.imagewidth, page.imagelength,
                page.tilewidth if tiled else page.imagewidth,
                page.tilelength if tiled else min(page.rowsperstrip or page.imagelength,
                                                  page.imagelength),
                int(page.compression) in _LOUD and int(page.planarconfig) == 1
                and getattr(page, "imagedepth", 1) == 1, chunks))
    return pages


_DICM = 128  # a DICOM file's "DICM" stands after a 128-byte preamble


def _walk_dicom(ranges: _Ranges, size: int) -> tuple[Instance, _Page] | None:
    """Read the DICOM file behind ``ranges`` up to its pixel data's offset table
    (`engine.slides.dicom.read_layout`, through ``ranges``: what OpenSlide's libdicom reads to
    open it) and return what its header says of its place in a slide (series, pyramid level or
    not, size) and its pixel data's layout, each frame a chunk. A file whose frames cannot all
    be placed so (no offset table: a reader walks them one by one; uncompressed frames, which
    decode from a hole; several focal planes or optical paths) is ``loud`` False: its regions
    are never read from the copy; without an offset table its chunk is the pixel data whole.
    None for a file no DICOM image of a series."""
    got = read_layout(ranges, size)
    if got is None:
        return None
    loud = got.encapsulated and got.tiled and got.frames is not None
    chunks = got.frames if got.frames is not None else ((got.start, size),)
    return (Instance(got.series, got.volume, got.width * got.height),
            _Page(got.width, got.height, got.tile_w, got.tile_h, loud, chunks))


class SparseCopy:
    """A local sparse copy of one object: `path`, and what it cost (`bytes_fetched`,
    `requests`, and `rounds`: those one after another). Made by `sparse_copy`; pixel data
    comes in by `fill` and `fill_region`."""

    def __init__(self, fs, remote: str, storage: StorageConfig, size: int, local: str):
        self._fs, self._remote, self._storage = fs, remote, storage
        self.path, self.size, self.bytes_fetched, self.requests = local, size, 0, 0
        self.rounds = 0  # round trips one after another (a batch of requests is one)
        self._ranges = _Ranges(self._fetch, size)
        self._pages: list[_Page] = []
        self.instance: Instance | None = None  # a DICOM file's series, level or not, size
        self._have: set[tuple[int, int]] = set()  # chunk ranges fetched
        self._lock = threading.Lock()

    def _fetch(self, start: int, end: int) -> bytes:
        data = call_with_retries(lambda: self._fs.cat_file(self._remote, start=start, end=end),
                                 self._storage, "read range")
        self.requests += 1
        self.rounds += 1
        self.bytes_fetched += len(data)
        return data

    def _fetch_many(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, end)``, fetched at once: one round trip."""
        pieces = call_with_retries(
            lambda: self._fs.cat_ranges([self._remote] * len(spans), [a for a, _ in spans],
                                        [b for _, b in spans], on_error="raise"),
            self._storage, "read ranges")
        self.requests += len(spans)
        self.rounds += 1
        self.bytes_fetched += sum(len(p) for p in pieces)
        return pieces

    def _walk(self, tail: bool = True) -> str | None:
        """Walk the object's structure: ``"tiff"`` or ``"dicom"`` (`instance` says which), or
        None for an object neither (or a DICOM file of no series).

        The first block and the last `TAIL_BLOCKS` come in one batch: a TIFF's directories
        often end its file (libtiff writes each level's after its tiles, so the small levels'
        come last), which spares the walk as many round trips one after another. Of a DICOM
        file (`is_dicom_name`), the last block alone: OpenSlide reads its end as it opens it
        (``tail`` False: not yet, for a file that may be of another series; `fetch_tail`)."""
        blocks = 1 if is_dicom_name(self._remote) else TAIL_BLOCKS
        tail_at = max((self.size - 1) // BLOCK - blocks + 1, 1)  # its first block
        if tail and tail_at * BLOCK < self.size:
            pieces = self._fetch_many([(0, BLOCK), (tail_at * BLOCK, self.size)])
            self._ranges.blocks[0] = pieces[0]
            for i in range(0, len(pieces[1]), BLOCK):
                self._ranges.blocks[tail_at + i // BLOCK] = pieces[1][i:i + BLOCK]
        magic = self._ranges.read(_DICM + 4)
        self._ranges.seek(0)  # tifffile reads a TIFF from where its file stands
        if magic[:4] in _TIFF_MAGIC:
            self._pages = _walk(self._ranges, self.size)
            return "tiff"
        if magic[_DICM:] == b"DICM" and (found := _walk_dicom(self._ranges, self.size)):
            self.instance, page = found
            self._pages = [page]
            return "dicom"
        return None

    def fetch_tail(self) -> None:
        """Fetch the object's last block, if the walk did not."""
        self._ranges.seek(self.size - 1)
        self._ranges.read(1)

    def _write(self) -> None:
        """Write what the walk read into `path`, a sparse file of the object's size."""
        with open(self.path, "wb") as fh:
            fh.truncate(self.size)
            for b, block in self._ranges.blocks.items():
                os.pwrite(fh.fileno(), block, b * BLOCK)

    def _pages_of(self, width: int, height: int) -> list[_Page]:
        return [p for p in self._pages if (p.width, p.height) == (int(width), int(height))]

    def fill(self, width: int, height: int) -> bool:
        """Fetch the pixel data of the pages of ``width`` x ``height`` into the copy; False
        (nothing fetched) where no page has that size."""
        pages = self._pages_of(width, height)
        self._get([c for p in pages for c in p.chunks if c is not None])
        return bool(pages)

    def fill_region(self, width: int, height: int, *boxes: tuple[float, float, float, float]
                    ) -> bool:
        """Fetch the chunks of the page of ``width`` x ``height`` that hold its pixels in each
        of ``boxes`` (``(x0, y0, x1, y1)``, page pixels), and those 2 pixels around them (a reader
        interpolating at fractional positions reads a pixel further), all at once; False
        (nothing fetched) where no page has that size, or one whose chunks may decode from a
        hole without failing (uncompressed, LZW)."""
        pages = self._pages_of(width, height)
        if not pages or not all(p.loud for p in pages):
            return False
        # a level, and an associated image of its size (a tiny SVS); 2 px further each way:
        # interpolation reads a neighbour
        self._get(list(set().union(*(p.chunks_in(x0 - 2, y0 - 2, x1 + 2, y1 + 2)
                                     for p in pages for x0, y0, x1, y1 in boxes))))
        return True

    def _get(self, chunks: list[tuple[int, int]]) -> None:
        with self._lock:
            wanted = [c for c in chunks if c not in self._have]
            self._have.update(wanted)
            wanted = _merged(_missing(wanted, self._ranges.blocks), MERGE_GAP)
            if not wanted:
                return
            try:
                pieces = self._fetch_many(wanted)
            except BaseException:
                self._have.difference_update(chunks)
                raise
            with open(self.path, "r+b") as fh:
                for (start, _), piece in zip(wanted, pieces):
                    os.pwrite(fh.fileno(), piece, start)


class SparseSeries:
    """Sparse copies of a DICOM series' files side by side (OpenSlide opens a series from any of
    its files, and reads the others beside it), with `SparseCopy`'s interface: `path` (the file
    the slide is read through), `fill`, `fill_region` and what they cost, summed (not the
    headers read to find the series' files: `engine.slides.dicom.header`)."""

    def __init__(self, main: SparseCopy, others: list[SparseCopy]):
        self.path, self.files = main.path, [main, *others]

    bytes_fetched = property(lambda self: sum(f.bytes_fetched for f in self.files))
    requests = property(lambda self: sum(f.requests for f in self.files))
    rounds = property(lambda self: sum(f.rounds for f in self.files))

    def fill(self, width: int, height: int) -> bool:
        return any([f.fill(width, height) for f in self.files])

    def fill_region(self, width: int, height: int, *boxes: tuple[float, float, float, float]
                    ) -> bool:
        # OpenSlide reads a level's regions from its VOLUME files, never from a thumbnail,
        # label or overview image of the same size
        files = [f for f in self.files if f.instance.volume and f._pages_of(width, height)]
        return bool(files) and all([f.fill_region(width, height, *boxes) for f in files])


def _series_files(fs, uri: str, path: str, series: str, folder: str, storage: StorageConfig
                  ) -> list[SparseCopy]:
    """Sparse copies, in ``folder``, of the other DICOM files beside ``path`` (``uri``'s path)
    whose walks say they belong to ``series`` (as `engine.slides.storage.StagingArea` stages a
    series). A file's header is read once a process (`engine.slides.dicom.known_header`): a
    request for a file of another series, the first time; two for one of its own."""
    from engine.slides.dicom import HEADER_THREADS, known_header, remember_header
    from engine.slides.storage import entry_of

    proto = uri[:len(uri) - len(path)]  # "s3://"
    listing = call_with_retries(lambda: fs.ls(path.rsplit("/", 1)[0], detail=True), storage,
                                "list a DICOM series' folder")
    siblings = [i for i in listing if i.get("type") != "directory" and i["name"] != path
                and is_dicom_name(i["name"]) and i.get("size")]
    if not siblings:
        return []

    def copy(info: dict) -> SparseCopy | None:
        entry = entry_of(proto + info["name"], info)
        known, found = known_header(entry)
        if known and (found is None or found.series != series):
            return None
        c = SparseCopy(fs, info["name"], storage, int(info["size"]),
                       os.path.join(folder, info["name"].rsplit("/", 1)[-1]))
        c._walk(tail=False)
        remember_header(entry, c.instance)
        if c.instance is None or c.instance.series != series:
            return None
        c.fetch_tail()
        c._write()
        return c

    with request_pool(min(HEADER_THREADS, len(siblings)), "sparse-dicom") as pool:
        return [c for c in pool.map(copy, siblings) if c is not None]


@contextlib.contextmanager
def sparse_copy(uri: str, storage: StorageConfig, size: int
                ) -> Iterator[SparseCopy | SparseSeries | None]:
    """Yield a `SparseCopy` of the TIFF-family object at ``uri`` (``size`` bytes: the
    listing's) holding its structure, to be opened and then filled with what is read; a
    `SparseSeries` for a DICOM file and the other files of its series beside it; or None for
    an object neither (a MIRAX index, a DICOM file of no series: stage it whole).
    The copy is a file of the object's name (formats key on the extension) in a folder of its
    own in the node's staging folder, removed on exit, and by `StagingArea.purge` once its
    process has ended (killed before it could); it is never taken for a staged copy.

    Raises what tifffile and the storage raise on an object they cannot read: the caller
    stages it whole, and the full copy reports the slide's problem.
    """
    fs, path = get_filesystem(uri, storage)
    # in the node's staging folder, whose purge clears a killed process's leftovers
    folder = tempfile.mkdtemp(prefix=f"{SPARSE_PREFIX}{os.getpid()}-",
                              dir=shared_stage_root(storage))
    try:
        copy = SparseCopy(fs, path, storage, size, os.path.join(folder, path.rsplit("/", 1)[-1]))
        kind = copy._walk()
        if kind is not None:
            copy._write()
        if kind == "dicom":
            yield SparseSeries(copy, _series_files(fs, uri, path, copy.instance.series, folder,
                                                   storage))
        else:
            yield copy if kind else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class SparseReader:
    """`SlideReader` over a `SparseCopy`, through OpenSlide: a read first fetches what it
    touches (the thumbnail's level whole; a region's chunks and those around it, and, before a
    level's first direct read, the square at its origin its check reads:
    `OpenSlideReader._agrees`). Where that cannot be done, or a read from the copy fails, this
    and every later read come from ``whole()`` (a reader of a full staged copy), so a slide's
    errors are always what its full copy gives. Made by `open_sparse`."""

    backend = "openslide"

    def __init__(self, copy: SparseCopy, reader, whole: Callable[[], object]):
        self.copy, self.info = copy, reader.info
        self._reader, self._whole, self._full = reader, whole, None
        self._lock = threading.Lock()

    @property
    def whole(self) -> bool:
        """Whether reads have gone to a full staged copy."""
        return self._full is not None

    @property
    def direct_checks(self) -> dict[int, bool]:
        return (self._full or self._reader).direct_checks

    def trust_checks(self, checks: dict[int, bool]) -> None:
        (self._full or self._reader).trust_checks(checks)

    def _read(self, fill: Callable[[], bool], read: Callable[[object], np.ndarray]
              ) -> np.ndarray:
        from engine.errors import SlideError

        if self._full is None:
            try:
                if fill():
                    return read(self._reader)
            except (SlideError, OSError):  # a hole read, or a range that did not come
                pass
            with self._lock:
                if self._full is None:
                    self._full = self._whole()
        return read(self._full)

    def _boxes(self, level: int, regions) -> tuple[int, int, list]:
        """The level's size, and ``regions`` (``(x, y, width, height)``: level-0 position,
        level pixels) as boxes of its pixels, with the square a direct read's check reads
        where that read checks the level first (`OpenSlideReader.will_check`)."""
        from engine.slides.openslide_backend import CHECK_PX

        w, h = self.info.level_dimensions[level]
        ds = self.info.level_downsamples[level]
        boxes = [(x / ds, y / ds, x / ds + rw, y / ds + rh) for x, y, rw, rh in regions]
        if self._reader.will_check(level):
            boxes.append((0, 0, CHECK_PX, CHECK_PX))
        return w, h, boxes

    def prefetch(self, level: int, regions) -> None:
        """Fetch what reading each of ``regions`` (``(x, y, width, height)``, as `read_region`
        takes them) at ``level`` touches, in one batch of concurrent requests, where reading
        them one by one makes a request each (`jobs.cell_gallery.read_crops`)."""
        if self._full is None:
            w, h, boxes = self._boxes(level, regions)
            try:
                self.copy.fill_region(w, h, *boxes)
            except OSError:
                pass  # the reads will try again, and go to a full copy

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        w, h, boxes = self._boxes(level, [(x, y, width, height)])
        return self._read(lambda: self.copy.fill_region(w, h, *boxes),
                          lambda r: r.read_region(level, x, y, width, height))

    def read_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        level = self._reader.thumbnail_level(max_size)
        return self._read(lambda: self.copy.fill(*self.info.level_dimensions[level]),
                          lambda r: r.read_thumbnail(max_size))

    def close(self) -> None:
        self._reader.close()


# OpenSlide's formats whose opening reads the TIFF's directories (a DICOM series: its files'
# headers and offset tables) and nothing else, as the tests check on real slides (DICOM: on
# series as converters write them); others (NDPI, Philips, Ventana: no such file here) are
# staged whole
SPARSE_FORMATS = ("aperio", "generic-tiff", "dicom")


@contextlib.contextmanager
def open_sparse(uri: str, storage: StorageConfig, size: int, whole: Callable[[], object],
                direct_jpeg: bool = False) -> Iterator[SparseReader | None]:
    """Yield a `SparseReader` of the remote slide at ``uri`` (``size`` bytes), or None where
    the slide is not one to read so (no TIFF, in none of `SPARSE_FORMATS`, or it does not open
    from its copy): stage it whole. ``whole()`` opens a full staged copy, for the reads the
    copy cannot answer; the caller closes it. ``direct_jpeg``: see
    `engine.slides.registry.open_reader`."""
    from engine.slides.registry import open_reader

    with contextlib.ExitStack() as stack:
        try:
            copy = stack.enter_context(sparse_copy(uri, storage, size))
            reader = open_reader(copy.path, uri, direct_jpeg=direct_jpeg) if copy else None
        except Exception:  # noqa: BLE001 - the full copy reads it again and reports what is wrong
            reader = None
        if reader is not None and reader.info.format not in SPARSE_FORMATS:
            reader.close()
            reader = None
        if reader is None:
            stack.close()
            yield None
            return
        sparse = SparseReader(copy, reader, whole)
        stack.callback(sparse.close)
        yield sparse
