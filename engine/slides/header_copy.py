"""A remote TIFF-family slide's structure without its pixels, for jobs that read only a slide's
metadata and a thumbnail (`jobs.inventory`).

OpenSlide reads local files only, so a remote slide is staged whole before it opens: an
inventory of an S3 archive moved every byte of it (1-3 GB a slide) to read some kilobytes of
header and a thumbnail. Here a local *sparse* file of the object's size is written instead,
holding only what that reading needs, fetched by range:

- every byte tifffile reads to walk the TIFF's directories and their tags' values (the
  directory chain, tile offsets and byte counts, JPEG tables, image descriptions): what a
  reader reads to open the slide;
- then, once the reader opened the copy and said which level its thumbnail comes from, that
  level's pixel data (`SparseCopy.fill`).

The rest of the file is a hole that reads as zeros and takes no disk. Nothing is guessed, since
holes need not fail to decode (an uncompressed page reads them as black): the level filled is
the one the reader names, matched to its page by size, and where no page matches, the caller
stages the slide whole (`engine.slides.inventory.inventory_file`). A truncated object gives a
copy of the same size, so it fails the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from engine.config import StorageConfig
from engine.slides.storage import call_with_retries, get_filesystem

BLOCK = 64 * 1024  # the walk's reads are rounded out to whole blocks: few requests, each small
MERGE_GAP = BLOCK   # pixel-data ranges closer than this are fetched in one request
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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


def _walk(ranges: _Ranges, size: int) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Walk every directory of the TIFF behind ``ranges`` (tifffile reads them through it, with
    every tag's value): the byte ranges of each page's pixel data, by ``(width, height)``."""
    import tifffile

    pages: dict[tuple[int, int], list[tuple[int, int]]] = {}
    with tifffile.TiffFile(ranges) as tif:
        tif.pages.cache = False
        for page in tif.pages:
            for tag in page.tags:
                tag.value  # noqa: B018 - large values (tile offsets) are read when asked for
            pages.setdefault((page.imagewidth, page.imagelength), []).extend(
                (int(o), min(int(o) + int(n), size))
                for o, n in zip(page.dataoffsets, page.databytecounts) if o > 0 and n > 0)
    return pages


class SparseCopy:
    """A local sparse copy of one object: `path`, and what it cost (`bytes_fetched`,
    `requests`). Made by `sparse_copy`."""

    def __init__(self, fs, remote: str, storage: StorageConfig, size: int, local: str):
        self._fs, self._remote, self._storage = fs, remote, storage
        self.path, self.size, self.bytes_fetched, self.requests = local, size, 0, 0
        self._ranges = _Ranges(self._fetch, size)
        self._pages: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def _fetch(self, start: int, end: int) -> bytes:
        data = call_with_retries(lambda: self._fs.cat_file(self._remote, start=start, end=end),
                                 self._storage, "read range")
        self.requests += 1
        self.bytes_fetched += len(data)
        return data

    def _write(self) -> bool:
        """Walk the TIFF and write its structure into `path`; False for an object no TIFF."""
        if self._ranges.read(4) not in _TIFF_MAGIC:
            return False
        self._ranges.seek(0)  # tifffile reads a TIFF from where its file stands
        self._pages = _walk(self._ranges, self.size)
        with open(self.path, "wb") as fh:
            fh.truncate(self.size)
            for b, block in self._ranges.blocks.items():
                os.pwrite(fh.fileno(), block, b * BLOCK)
        return True

    def fill(self, width: int, height: int) -> bool:
        """Fetch the pixel data of the pages of ``width`` x ``height`` into the copy; False
        (nothing fetched) where no page has that size."""
        wanted = self._pages.get((int(width), int(height)))
        if not wanted:
            return False
        wanted = _merged(_missing(wanted, self._ranges.blocks), MERGE_GAP)
        if wanted:
            pieces = call_with_retries(
                lambda: self._fs.cat_ranges([self._remote] * len(wanted), [a for a, _ in wanted],
                                            [b for _, b in wanted], on_error="raise"),
                self._storage, "read ranges")
            self.requests += len(wanted)
            self.bytes_fetched += sum(len(p) for p in pieces)
            with open(self.path, "r+b") as fh:
                for (start, _), piece in zip(wanted, pieces):
                    os.pwrite(fh.fileno(), piece, start)
        return True


@contextlib.contextmanager
def sparse_copy(uri: str, storage: StorageConfig, size: int) -> Iterator[SparseCopy | None]:
    """Yield a `SparseCopy` of the TIFF-family object at ``uri`` (``size`` bytes: the
    listing's) holding its structure, to be opened and then `SparseCopy.fill`ed with the level
    to read; or None for an object that is no TIFF (DICOM, a MIRAX index: stage it whole).
    The copy is a file of the object's name (formats key on the extension) in a folder of its
    own (under ``storage.stage_dir`` where set), removed on exit; it is never taken for a
    staged copy (`engine.slides.storage.StagingArea`).

    Raises what tifffile and the storage raise on an object they cannot read: the caller
    stages it whole, and the full copy reports the slide's problem.
    """
    fs, path = get_filesystem(uri, storage)
    folder = tempfile.mkdtemp(prefix="hemeflow-sparse-", dir=storage.stage_dir)
    try:
        copy = SparseCopy(fs, path, storage, size, os.path.join(folder, path.rsplit("/", 1)[-1]))
        yield copy if copy._write() else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
