"""Labelled single-cell images: read ``labels.csv`` and bring images to the model's µm/px."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from engine.errors import HemeflowError

T = TypeVar("T")


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with class codes (and optional groups such as patient or slide ids)."""

    paths: tuple[str, ...]
    codes: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> LabelledImages:
        idx = list(map(int, idx))
        return LabelledImages(tuple(self.paths[i] for i in idx), tuple(self.codes[i] for i in idx),
                              tuple(self.groups[i] for i in idx) if self.groups else None)

    def digest(self) -> str:
        """A short hash of what a model trained on these rows learns from: each row's image
        (its source, size and modification time, as ``aws s3 sync`` and `fetch_labelled`
        compare files), code and group. The same labels over the same files give the same
        digest; a relabelled row, an added or removed one, or a replaced image changes it."""
        h = hashlib.sha256()
        for i, (path, code) in enumerate(zip(self.paths, self.codes)):
            try:
                st = os.stat(path)
                file = f"{st.st_size}:{int(st.st_mtime)}"
            except OSError:
                file = "missing"
            group = self.groups[i] if self.groups else ""
            h.update(f"{source_of(path)}\t{file}\t{code}\t{group}\n".encode())
        return h.hexdigest()[:16]


def labelled(rows: list[dict]) -> list[dict]:
    """The rows of a labels table with a code (an empty one is a cell not yet labelled)."""
    return [r for r in rows if (r.get("code") or "").strip()]


def _known_codes(table: str, rows: list[dict]) -> list[dict]:
    """The rows with their codes as the class scheme spells them (``mo2`` is ``MO2``).

    Raises:
        ValueError: codes that are no DeepHeme code (the first few with their lines; a PBC
            folder's or a counting sheet's name with the codes it stands for), rather than a
            failure mid-run.
    """
    from engine.classes import CLASSES
    from engine.report.agreement import codes_named

    out, bad = [], []
    for r in rows:
        code = r["code"].strip()
        known = code if code in CLASSES else code.upper() if code.upper() in CLASSES else None
        if known is None:
            hint = codes_named(code)  # a PBC folder's or a counting sheet's name for a class
            bad.append(f"line {r['_line']} {code!r}"
                       + (f" (a name for {' or '.join(sorted(hint))})" if hint else ""))
        out.append({**r, "code": known})
    if bad:
        raise ValueError(f"{table}: {len(bad)} row(s) with a code that is no DeepHeme code: "
                         f"{'; '.join(bad[:3])}{'; …' if len(bad) > 3 else ''}; the codes: "
                         f"{', '.join(sorted(CLASSES))}")
    return out


def first_of_each(paths: list[str], codes: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Each image once: the indices of the first row of each image (by its normalised path),
    and ``(first, later)`` for each later row that gives the image another code. A later row
    with the same code is simply left out."""
    first: dict[str, int] = {}
    keep, clashes = [], []
    for i, path in enumerate(paths):
        j = first.setdefault(os.path.normpath(path), i)
        if j == i:
            keep.append(i)
        elif codes[j] != codes[i]:
            clashes.append((j, i))
    return keep, clashes


def _two_codes(where: str, clashes: list[str]) -> ValueError:
    return ValueError(f"{where}{len(clashes)} image(s) labelled with two codes" + (
        " in two --data tables" if not where else "") + "; settle each on one: "
        + "; ".join(clashes[:5]) + ("; …" if len(clashes) > 5 else ""))


def _once_each(table: str, rows: list[dict], paths: list[str]
               ) -> tuple[list[dict], list[str]]:
    """The rows of a labels table with each image once: a row repeating an earlier one's image
    and code is left out (and said: two sheets merged, say), since an image listed twice could
    land on both sides of a train/test split and lift the test figures.

    Raises:
        ValueError: an image labelled with two codes (the first few named with their lines),
            which a lab resolves, not the job.
    """
    codes = [r["code"].strip() for r in rows]
    keep, clashes = first_of_each(paths, codes)
    if clashes:
        raise _two_codes(f"{table}: ", [f"{rows[i]['path']} is {codes[j]} on line "
                                        f"{rows[j]['_line']} and {codes[i]} on line "
                                        f"{rows[i]['_line']}" for j, i in clashes])
    if len(keep) < len(rows):
        print(f"hemeflow: {table}: {len(rows) - len(keep)} row(s) repeat an earlier row's image "
              "and code; each image taken once", file=sys.stderr, flush=True)
    return [rows[i] for i in keep], [paths[i] for i in keep]


def read_labels(data_dir: str, csv_name: str = "labels.csv") -> LabelledImages:
    """``<data_dir>/labels.csv`` with ``path`` and ``code`` columns (``patient_id``, ``slide_id`` or
    ``group`` optional); relative paths are relative to ``data_dir``. A row with an empty code
    is not labelled (`jobs.export_cells` writes the rows for experts to fill) and is left out;
    an image listed again with the same code is taken once (`_once_each`).

    Raises:
        ValueError: no ``path`` and ``code`` columns, no labelled row, or an image labelled
            with two codes.
    """
    table = os.path.join(data_dir, csv_name)
    if not os.path.exists(table):
        raise FileNotFoundError(f"no {csv_name} in {data_dir} (expected columns: path,code)")
    with open(table, newline="", encoding="utf-8-sig") as fh:  # Excel's 'CSV UTF-8' too
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "code"} <= set(rows[0]):
        raise ValueError(f"{table} needs 'path' and 'code' columns")
    rows = labelled([{**r, "_line": i + 2} for i, r in enumerate(rows)])  # lines for messages
    if not rows:
        raise ValueError(f"{table} has no row with a code: fill in the code column")
    rows = _known_codes(table, rows)
    group_col = next((c for c in ("patient_id", "slide_id", "group") if c in rows[0]), None)
    paths = [r["path"] if os.path.isabs(r["path"]) else os.path.join(data_dir, r["path"])
             for r in rows]
    rows, paths = _once_each(table, rows, paths)
    # a row with an empty group (a list that mixes exports with PBC-like images) is its own
    return LabelledImages(tuple(paths), tuple(r["code"].strip() for r in rows),
                          tuple((r[group_col] or "").strip() or f"(no group) row {i}"
                                for i, r in enumerate(rows)) if group_col else None)


def merge_labelled(parts: list[tuple[str, LabelledImages]]) -> LabelledImages:
    """Several labels tables as one, each ``(source, its rows)``: rounds of labelling, or a
    lab's cells beside PBC. An image two tables list with one code is taken once (and said),
    as within a table (`_once_each`); with two codes, refused naming both. Groups (slide or
    patient) keep their names, so a slide labelled in two rounds stays one group; a row
    without one is a group of its own.

    Raises:
        ValueError: an image labelled with two codes.
    """
    if len(parts) == 1:
        return parts[0][1]
    rows = [(source, d, i) for source, d in parts for i in range(len(d))]
    paths = [d.paths[i] for _, d, i in rows]
    codes = [d.codes[i] for _, d, i in rows]
    keep, clashes = first_of_each(paths, codes)  # within a table, read_labels did it already
    if clashes:
        raise _two_codes("", [f"{paths[i]} is {codes[j]} in {rows[j][0]} and {codes[i]} in "
                              f"{rows[i][0]}" for j, i in clashes])
    if repeated := len(rows) - len(keep):
        print(f"hemeflow: {repeated} image(s) listed in two --data tables with one code; each "
              "taken once", file=sys.stderr, flush=True)
    groups = []
    for source, d, i in (rows[k] for k in keep):
        group = d.groups[i] if d.groups else ""
        groups.append(f"(no group) {source} row {i}"
                      if not group or group.startswith("(no group) ") else group)
    grouped = any(d.groups for _, d in parts)
    return LabelledImages(tuple(paths[k] for k in keep), tuple(codes[k] for k in keep),
                          tuple(groups) if grouped else None)


def data_cache_dir() -> str:
    """Where `fetch_labelled` mirrors remote images: ``$HEMEFLOW_DATA_CACHE``, or one folder per
    user in the temp dir."""
    return os.environ.get("HEMEFLOW_DATA_CACHE") or os.path.join(
        tempfile.gettempdir(), f"hemeflow-data-{os.geteuid()}")


def cache_budget() -> int:
    """Bytes `fetch_labelled`'s cache may hold before it evicts (`evict_cache`):
    ``$HEMEFLOW_DATA_CACHE_GB`` gigabytes (10^9 bytes), 50 by default."""
    value = os.environ.get("HEMEFLOW_DATA_CACHE_GB", "").strip() or "50"
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(f"HEMEFLOW_DATA_CACHE_GB must be a number of gigabytes, not "
                         f"{value!r}") from None
    if gb < 0:
        raise ValueError(f"HEMEFLOW_DATA_CACHE_GB must be at least 0, not {value!r}")
    return int(gb * 1e9)


def evict_cache(cache: str, keep: str, budget: int, grace_s: float = 3600.0
                ) -> tuple[int, int]:
    """Bring `fetch_labelled`'s ``cache`` under ``budget`` bytes, least recently fetched list
    first; returns the files and bytes removed (nothing while it is under budget).

    A list is a ``labels.csv`` the cache holds (one per fetched ``--data``, written at each
    fetch, so its modification time is that list's last use) with the copies its rows name.
    The list in ``keep`` (the folder just fetched) and those fetched in the last ``grace_s``
    seconds (a job on this node may be reading them) are kept whatever their size; older ones
    are kept, newest first, while all kept copies fit the budget. Every other file goes: the
    copies only evicted lists named, copies no list names any more (an object a list dropped),
    and the evicted lists' ``labels.csv`` and ``pack.json``. Call it holding the cache's lock.
    """
    cache = os.path.abspath(cache)
    files: dict[str, int] = {}
    for root, _, names in os.walk(cache):
        for name in names:
            path = os.path.join(root, name)
            if path != os.path.join(cache, ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    files[path] = os.path.getsize(path)
    if sum(files.values()) <= budget:
        return 0, 0
    lists = []  # (last fetched, folder, the copies its rows name)
    for path in files:
        if os.path.basename(path) != "labels.csv":
            continue
        folder = os.path.dirname(path)
        with open(path, newline="", encoding="utf-8-sig") as fh:
            named = {os.path.abspath(os.path.join(folder, r.get("path") or ""))
                     for r in csv.DictReader(fh)}
        lists.append((os.path.getmtime(path), folder, named & files.keys()))
    lists.sort(reverse=True)
    now, keep = time.time(), os.path.abspath(keep)
    kept: set[str] = set()
    for fetched, folder, named in lists:
        meta = {os.path.join(folder, n) for n in ("labels.csv", "pack.json")} & files.keys()
        more = (named | meta) - kept
        if folder == keep or now - fetched < grace_s or \
                sum(files[f] for f in kept | more) <= budget:
            kept |= more
    removed = [f for f in files if f not in kept]
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    for root, dirs, names in os.walk(cache, topdown=False):  # the folders left empty
        if root != cache and not dirs and not names:
            with contextlib.suppress(OSError):
                os.rmdir(root)
    return len(removed), sum(files[f] for f in removed)


def mirror_path(uri: str, cache: str) -> str:
    """The local copy of ``s3://bucket/key`` in a mirror: ``<cache>/s3/bucket/key``."""
    scheme, rest = uri.split("://", 1)
    return os.path.join(cache, scheme, *rest.split("/"))


def source_of(path: str, cache: str | None = None) -> str:
    """The URI a mirrored file was fetched from (the inverse of `mirror_path`); any other path
    as an absolute path (a URI as it is)."""
    if "://" in path:
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(cache or data_cache_dir()))
    parts = rel.split(os.sep)
    if rel.startswith("..") or len(parts) < 3 or parts[0] == "lists":
        return os.path.abspath(path)
    return f"{parts[0]}://" + "/".join(parts[1:])


def fetch_labelled(data: str, storage=None, cache: str | None = None) -> str:
    """A local folder to read the labelled images ``data`` names, for `read_labels`.

    ``data`` is a folder or ``s3://`` prefix with ``labels.csv``; its paths are relative to it,
    or URIs (``s3://bucket/key``, any bucket). A local folder whose labelled rows are all local
    is returned as it is. Otherwise the images of the labelled rows are mirrored under
    ``cache`` (`data_cache_dir`) at ``<scheme>/<bucket>/<key>``, and the folder returned holds
    ``labels.csv`` with each row's path made absolute (labelled remote rows: their copies) and
    the ``pack.json`` of a pack. A copy whose size and modification time are the object's is
    not fetched again (as ``aws s3 sync`` decides), so a rerun lists and downloads only what
    changed.

    Raises:
        FileNotFoundError: no ``labels.csv``, or images it names are missing (the first named).
        ValueError: no path column, a local path in a remote list, or access denied.
    """
    from engine.config import StorageConfig
    from engine.outputs import write_bytes
    from engine.slides.storage import is_remote, normalize_uri

    storage = storage or StorageConfig()
    cache = os.path.abspath(cache or data_cache_dir())
    remote = is_remote(data)
    base = normalize_uri(data)
    table = f"{base}/labels.csv" if remote else os.path.join(base, "labels.csv")
    if not remote and not os.path.exists(table):
        return data  # read_labels says what is missing
    text = _read_optional(table, storage)
    if text is None:
        raise FileNotFoundError(f"no labels.csv in {data} (expected columns: path,code)")
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and "path" not in rows[0]:
        raise ValueError(f"{table} needs 'path' and 'code' columns")

    def resolve(path: str) -> str:
        if "://" in path:
            return normalize_uri(path)
        if not remote:
            return os.path.normpath(os.path.join(base, path))
        if path.startswith("/"):
            raise ValueError(f"{table} names the local path {path}: in a remote list a path is "
                             "relative to it, or a URI")
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(f"{rest}/{path}")

    for r in rows:
        r["path"] = resolve(r["path"])
    wanted = sorted({r["path"] for r in labelled(rows) if is_remote(r["path"])})
    if not remote and not wanted:
        return data
    budget = cache_budget()  # a bad value is said before anything is fetched
    folder = mirror_path(base, cache) if remote else os.path.join(
        cache, "lists", hashlib.sha256(base.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    with _locked(cache):
        fetched = _mirror(wanted, cache, storage, table)
        for r in labelled(rows):
            if is_remote(r["path"]):
                r["path"] = mirror_path(r["path"], cache)
        write_bytes(os.path.join(folder, "labels.csv"),
                    (_csv_text(rows) if rows else text).encode(), storage)
        pack = _read_optional(f"{base}/pack.json" if remote else os.path.join(base, "pack.json"),
                              storage)
        if pack is not None:
            write_bytes(os.path.join(folder, "pack.json"), pack.encode(), storage)
        elif os.path.exists(os.path.join(folder, "pack.json")):
            os.remove(os.path.join(folder, "pack.json"))
        n, size = evict_cache(cache, folder, budget)
    print(f"{len(wanted)} image(s) of {data} in {folder} ({fetched} fetched)", file=sys.stderr)
    if n:
        print(f"cache {cache} over its {budget / 1e9:g} GB ($HEMEFLOW_DATA_CACHE_GB): "
              f"removed {n} file(s), {size / 1e9:.2f} GB, of lists fetched longest ago",
              file=sys.stderr)
    return folder


def _read_optional(uri: str, storage) -> str | None:
    """The text of a local or remote file, None if there is none."""
    from engine.slides.storage import call_with_retries, get_filesystem

    fs, path = get_filesystem(uri, storage)
    try:
        return call_with_retries(lambda: fs.cat_file(path), storage, "read").decode("utf-8-sig")
    except FileNotFoundError:
        return None
    except PermissionError as err:
        raise ValueError(f"cannot read {uri}: access denied ({err})") from err


def _mirror(uris: list[str], cache: str, storage, table: str) -> int:
    """Bring the local copies of ``uris`` up to date; returns how many were fetched. One
    listing per folder gives the sizes and modification times; a copy takes its object's."""
    from engine.slides.storage import call_with_retries, get_filesystem

    listed: dict[str, dict] = {}
    for parent in sorted({u.rsplit("/", 1)[0] for u in uris}):
        fs, path = get_filesystem(parent, storage)
        scheme = parent.split("://", 1)[0]
        try:
            entries = call_with_retries(lambda: fs.ls(path, detail=True, refresh=True), storage,
                                        "list")
        except FileNotFoundError:
            entries = []
        except PermissionError as err:
            raise ValueError(f"cannot list {parent}: access denied ({err})") from err
        listed.update({f"{scheme}://{e['name']}": e for e in entries
                       if e.get("type") != "directory"})
    missing = [u for u in uris if u not in listed]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) that {table} names are not there: "
                                + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
    stale = [u for u in uris if not _up_to_date(mirror_path(u, cache), listed[u])]
    by_fs: dict[int, tuple] = {}  # one concurrent download per filesystem
    for u in stale:
        fs, path = get_filesystem(u, storage)
        _, paths, targets = by_fs.setdefault(id(fs), (fs, [], []))
        paths.append(path)
        targets.append(mirror_path(u, cache))
        os.makedirs(os.path.dirname(targets[-1]), exist_ok=True)
    for fs, paths, targets in by_fs.values():
        call_with_retries(lambda: fs.get(paths, targets), storage, "download")
    for u in stale:
        modified = _modified(listed[u])
        if modified is not None:
            os.utime(mirror_path(u, cache), (modified, modified))
    return len(stale)


def _modified(entry: dict) -> float | None:
    when = entry.get("LastModified") or entry.get("mtime")
    return when.timestamp() if hasattr(when, "timestamp") else when


def _up_to_date(local: str, entry: dict) -> bool:
    try:
        st = os.stat(local)
    except FileNotFoundError:
        return False
    modified = _modified(entry)
    return st.st_size == entry.get("size") and (
        modified is None or abs(st.st_mtime - modified) < 1e-3)


@contextlib.contextmanager
def _locked(cache: str) -> Iterator[None]:
    """One fetch at a time in a cache (two jobs on a node write the same copies)."""
    import fcntl

    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


@dataclass(frozen=True)
class Shift:
    """What another scanner or stain does to images, made at their own pixels before they are
    resampled, to measure how a model holds up (`evaluate_cell_classifier`): ``blur_um``, a
    Gaussian of that sigma (µm; a scanner out of focus); ``hue_deg``, every pixel's hue turned
    by so many degrees; ``saturation``, its saturation multiplied (a paler or deeper stain)."""

    blur_um: float = 0.0
    hue_deg: float = 0.0
    saturation: float = 1.0

    def __bool__(self) -> bool:
        return self != Shift()

    def apply(self, rgb: np.ndarray, source_mpp: float) -> np.ndarray:
        """``(H, W, 3) uint8`` at ``source_mpp`` µm/px, shifted."""
        import cv2

        if self.blur_um > 0:
            rgb = cv2.GaussianBlur(rgb, (0, 0), self.blur_um / source_mpp)
        if self.hue_deg or self.saturation != 1:
            hsv = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)  # hue 0-360
            hsv[..., 0] = np.mod(hsv[..., 0] + self.hue_deg, 360)
            hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0, 1)
            rgb = np.clip(np.rint(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255), 0, 255
                          ).astype(np.uint8)
        return rgb


def load_cell_image(path: str, source_mpp: float, target_mpp: float, out_px: int,
                    shift: Shift = Shift()) -> np.ndarray:
    """One image resampled to ``target_mpp`` and centre-cropped (or white-padded) to ``out_px``;
    with a ``shift``, first shifted at its own pixels (blurred, its colours turned).

    Returns:
        ``(out_px, out_px, 3) uint8``.
    """
    with Image.open(path) as im:
        return cell_crop(np.asarray(im.convert("RGB")), source_mpp, target_mpp, out_px, shift)


def cell_crop(rgb: np.ndarray, source_mpp: float, target_mpp: float, out_px: int,
              shift: Shift = Shift()) -> np.ndarray:
    """`load_cell_image` of an image already decoded, ``(H, W, 3) uint8`` at ``source_mpp``."""
    if shift:
        rgb = shift.apply(rgb, source_mpp)
    im = Image.fromarray(rgb)
    scale = source_mpp / target_mpp
    if abs(scale - 1) > 1e-3:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.LANCZOS)
    arr = np.asarray(im)
    h, w = arr.shape[:2]
    out = np.full((out_px, out_px, 3), 255, np.uint8)
    sy, sx = max((h - out_px) // 2, 0), max((w - out_px) // 2, 0)
    dy, dx = max((out_px - h) // 2, 0), max((out_px - w) // 2, 0)
    ch, cw = min(h, out_px), min(w, out_px)
    out[dy:dy + ch, dx:dx + cw] = arr[sy:sy + ch, sx:sx + cw]
    return out


class UnreadableImages(HemeflowError, ValueError):
    """Images a labels table names that cannot be read or decoded (missing, truncated, not an
    image): the message names them, with what to do."""

    def __init__(self, failed: list[tuple[str, BaseException]], total: int):
        self.failed = failed
        shown = "; ".join(f"{source_of(p)} ({type(e).__name__}: {e})" for p, e in failed[:5])
        super().__init__(f"{len(failed)} of {total} image(s) cannot be read: {shown}"
                         + (" ..." if len(failed) > 5 else "")
                         + ": replace them, or take their rows out of labels.csv")


def try_load(load: Callable[..., T]) -> Callable[..., T | Exception]:
    """``load`` that returns, rather than raises, the error of an unreadable image."""
    def attempt(item):
        try:
            return load(item)
        # PIL's errors for broken files, and for one past the size it decodes (a "bomb")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return err
    return attempt


def unreadable(paths, threads: int = 8) -> list[tuple[str, Exception]]:
    """The images of ``paths`` that cannot be decoded, with why (each one decoded in full)."""
    def decode(path: str) -> None:
        with Image.open(path) as im:
            im.load()

    paths = list(paths)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(try_load(decode), paths))
    return [(p, r) for p, r in zip(paths, results) if isinstance(r, Exception)]


def load_cell_images(paths, source_mpp: float, target_mpp: float = 0.25, out_px: int = 144,
                     threads: int = 8, shift: Shift = Shift()) -> np.ndarray:
    """Many images at once, ``(N, out_px, out_px, 3) uint8`` (decoded in threads).

    Raises:
        UnreadableImages: naming every image that could not be read, after trying them all.
    """
    paths = list(paths)
    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(try_load(
            lambda p: load_cell_image(p, source_mpp, target_mpp, out_px, shift)), paths))
    failed = [(p, r) for p, r in zip(paths, images) if isinstance(r, Exception)]
    if failed:
        raise UnreadableImages(failed, len(paths))
    return np.stack(images) if images else np.zeros((0, out_px, out_px, 3), np.uint8)
