"""Pipeline steps: small callable classes with no Ray calls inside, so tests call them directly.

Each loads what it needs in ``__init__`` and maps a row (``PlanSlide``) or a batch dict of numpy
arrays (the rest) to the same. Ray Data runs them as tasks or actors (``engine.pipeline.run``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import socket
import sys
import threading
import time
import warnings

import cv2
import numpy as np

from engine.classes import DEEPHEME_CODES
from engine.cells import (KIND_CELL, KIND_PLATELET, PALE_OFF, crops_around, detect_cells,
                          estimate_threshold, inside_of_crops, owned_by_tile, pale_pass)
from engine.cellularity import AreaRules, calibrate, tile_area_counts
from engine.config import Config, TileConfig
from engine.errors import MissingMPP, SlideCrashedReader, SlideError, read_timed_out
from engine.focus import edge_blur_um
from engine.pipeline.progress import duration
from engine.pixel_size import red_cell_diameters, red_cell_size
from engine.slides import FileEntry, open_slide
from engine.slides.inventory import MppOverrides, error_row, inventoried
from engine.slides.storage import StagingArea, is_remote, stat_file
from engine.specimen import UNKNOWN, branches_for
from engine.stain import nuclear_colour
from engine.tiling import TilePlan, plan_tiles
from engine.tissue import compute_tissue_mask, with_enclosed_fat
from engine.watchdog import WATCHDOG

CROP_PX = 96  # DeepHeme input, at cell_tiles.target_mpp


def node_cpus() -> int:
    """Logical CPUs of the Ray node this process runs on: what Ray was started with (a pod's
    limit, not its host's cores); ``os.cpu_count()`` outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            here = ray.get_runtime_context().get_node_id()
            for node in ray.nodes():
                if node["NodeID"] == here:
                    return max(1, int(node["Resources"].get("CPU", 1)))
    except Exception:  # noqa: BLE001 - any doubt: the OS's count
        pass
    return os.cpu_count() or 1


def model_threads(device, threads: int) -> None:
    """Let a model actor on a CPU use ``threads`` torch threads (0: the node's CPUs); Ray's
    default for an actor of one CPU is one."""
    import torch

    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads or node_cpus())


def limit_native_threads(n: int) -> None:
    """Let OpenCV and libvips use ``n`` threads in this worker (0: their default, one per core).

    The CPU actor pools are sized to the cluster's CPUs, so per-library thread pools of one
    thread per core in every actor only oversubscribe the node.
    """
    if n <= 0:
        return
    import cv2
    import pyvips

    cv2.setNumThreads(n)
    pyvips.concurrency_set(n)


class ReaderCache:
    """A few open slides per worker (tiles of one slide arrive together), closed LRU-first.

    A remote slide holds its staged copy in the node's staging folder while open, so the step
    calls `release_unused` after each batch: an actor waiting on the rest of the stream then
    holds at most the slides of its last batch, and the copies it no longer reads can be evicted.
    """

    def __init__(self, cfg: Config, size: int = 4, threads: int = 1):
        self.cfg, self.size = cfg, size
        # with one reading thread, a stage waiting for room may close this cache's other
        # slides; with more, another thread may be reading them
        self._make_room = self._close_oldest if threads <= 1 else None
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._used: set[str] = set()
        self._busy: collections.Counter = collections.Counter()  # slides being read (`reading`)
        self._stat: dict[str, FileEntry] = {}  # size and ETag of remote slides, asked once
        self._staging = StagingArea(cfg.storage)
        self._lock = threading.RLock()  # readers themselves are thread-safe; the cache is not

    def get(self, uri: str, level: int = 0, direct_ok: int = -1, sparse: bool = False):
        """The open reader of ``uri``. ``direct_ok`` (a task's: 1 or 0, -1 unknown): whether
        the planner found ``level`` to decode directly as OpenSlide decodes it, which a newly
        opened reader then takes instead of checking it again (`OpenSlideReader.trust_checks`).
        ``sparse`` (a task's): a remote slide is read from a sparse copy (`PlanSlide.sparse`)."""
        with self._lock:
            self._used.add(uri)
            reader = self._get(uri, sparse)
            if direct_ok >= 0 and hasattr(reader, "trust_checks"):
                reader.trust_checks({int(level): bool(direct_ok)})
            return reader

    @contextlib.contextmanager
    def reading(self, uri: str, level: int = 0, direct_ok: int = -1, sparse: bool = False):
        """`get`'s reader, not closed to make room for another slide while the block runs: with
        several threads reading, a slide whose read waits on storage is the least recently
        asked for, and the next slide opened would have closed it under that read."""
        with self._lock:
            reader = self.get(uri, level, direct_ok, sparse)
            self._busy[uri] += 1
        try:
            yield reader
        finally:
            with self._lock:
                self._busy[uri] -= 1
                if not self._busy[uri]:
                    del self._busy[uri]

    def _get(self, uri: str, sparse: bool = False):
        if uri in self._open:
            self._open.move_to_end(uri)
            return self._open[uri][0]
        entry = None
        if is_remote(uri):
            if uri not in self._stat:
                self._stat[uri] = stat_file(uri, self.cfg.storage)
            entry = self._stat[uri]
        stack = contextlib.ExitStack()
        reader = stack.enter_context(open_slide(
            uri, self.cfg.storage, self._staging, size=entry and entry.size,
            etag=entry and entry.etag, make_room=self._make_room,
            direct_jpeg=self.cfg.pipeline.direct_jpeg, sparse=sparse))
        self._open[uri] = (reader, stack)
        while len(self._open) > self.size and self._close_oldest(keep=uri):
            pass  # more stay open while all the others are being read
        return reader

    def _close_oldest(self, keep: str | None = None) -> bool:
        """Close the least recently used open slide that is not being read (`reading`) nor
        ``keep``; False if there is none."""
        old = next((u for u in self._open if u != keep and u not in self._busy), None)
        if old is None:
            return False
        self._open.pop(old)[1].close()
        return True

    def release_unused(self) -> None:
        """Close remote slides not read since the last call (local ones stay open: cheap)."""
        with self._lock:
            for uri in [u for u in self._open if is_remote(u) and u not in self._used]:
                self._open.pop(uri)[1].close()
            self._used.clear()

    def close(self) -> None:
        while self._close_oldest():
            pass
        self._staging.close()


# columns the steps add for RunMetrics: busy seconds, when the actor was ready (epoch s), how
# long its constructor took, and of that how long its model's warm-up, its imports (torch, timm)
# and its loading (weights, the model to its device: on a GPU, CUDA's start) took
READY_PREFIXES = ("_r_", "_i_", "_w_", "_m_", "_l_")  # `ready_since`'s, in its order
METRIC_PREFIXES = ("_t_", *READY_PREFIXES)


def ready_since(t_born: float, warmup: float = 0.0, imports: float = 0.0, load: float = 0.0
                ) -> tuple[float, ...]:
    """``(ready, init, warm-up, imports, load)`` for a step whose constructor began at
    ``t_born`` (``time.time``) and ends now (seconds but the first, an epoch time). A model
    step gives the parts of its start: ``warmup``, running its batch shapes once
    (`engine.models.Predictor.warmup`); ``imports``, its model code's; ``load``, making the
    model and putting it on its device."""
    now = time.time()
    return now, now - t_born, warmup, imports, load


def warmed(predictor, batch_size: int, **path) -> float:
    """Seconds ``predictor.warmup(batch_size, **path)`` took (GPU: kernels and plans, and CUDA
    graphs where the actor runs them, at actor start, not in-stream; on a CPU, the compile of
    a compiled model, and nothing otherwise).
    ``path``: a classifier's ``tta`` and ``features``, as its actor will score."""
    t0 = time.perf_counter()
    predictor.warmup(batch_size, **path)
    return time.perf_counter() - t0


def stamp(batch: dict, stage: str, t0: float,
          ready: tuple[float, float] | None = None, n: int | None = None) -> dict:
    """Add column ``_t_<stage>``: this batch's busy seconds spread over its rows, so the driver
    sums a stage's busy time without another channel (``RunMetrics``); with ``ready`` (from
    `ready_since`), also ``_r_<stage>`` and ``_i_<stage>``: when this actor was ready and how
    long it took to start, and for a model's step ``_w_``, ``_m_`` and ``_l_``: how much of that
    its warm-up, its imports and its loading took, so the driver sees where start-up went.
    ``n``: the batch's rows, where ``batch`` holds only the columns a step adds to a block
    (default: its ``task`` column's)."""
    n = len(batch["task"]) if n is None else n
    batch[f"_t_{stage}"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    if ready is not None:
        for prefix, value in zip(READY_PREFIXES, ready):
            if value or prefix in ("_r_", "_i_"):  # no model columns for steps without one
                batch[f"{prefix}{stage}"] = np.full(n, value)
    return batch


def in_place(table, column: str):
    """A block's ``(B, H, W, 3)`` tensor column without copying it: its one chunk as a numpy
    view, or its chunks as one `engine.models.inference.Stacked`."""
    return _joined([chunk.to_numpy() for chunk in table.column(column).chunks])


def _joined(parts: list[np.ndarray]):
    from engine.models.inference import Stacked

    return parts[0] if len(parts) == 1 else Stacked(parts) if parts else \
        np.zeros((0, 1, 1, 3), np.uint8)


def scored_kinds(platelets: bool) -> tuple[str, ...]:
    """The detection kinds the classifier scores: nucleated cells, and with ``platelets``
    (``pipeline.classifier.platelets``) the platelet-sized ones too."""
    return (KIND_CELL, KIND_PLATELET) if platelets else (KIND_CELL,)


def packed_crops(crops: np.ndarray, has_crop: np.ndarray):
    """A ``crop`` column for `DetectCells`' rows: each row with ``has_crop`` holds its crop's
    bytes (``crops``, one per such row, in order), each other row none: a detection the
    classifier does not score (a platelet without ``pipeline.classifier.platelets``), a task's
    marker. A ``pyarrow`` large binary array over ``crops``' own memory (no copy), whose rows
    without a crop cost 8 bytes where a tensor column's would cost a whole blank crop."""
    import pyarrow as pa

    crops = np.ascontiguousarray(crops, np.uint8)
    size = int(np.prod(crops.shape[1:])) if crops.ndim > 1 else 0
    offsets = np.zeros(len(has_crop) + 1, np.int64)
    np.cumsum(has_crop.astype(np.int64) * size, out=offsets[1:])
    if offsets[-1] != crops.size:
        raise ValueError(f"{len(crops)} crops for {int(has_crop.sum())} rows with one")
    return pa.Array.from_buffers(pa.large_binary(), len(has_crop),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(crops)])


def unpacked_crops(table, column: str = "crop", shape: tuple = (CROP_PX, CROP_PX, 3)):
    """``(crops, has_crop)``: the crops of a block's `packed_crops` column, read in place (one
    chunk's as a numpy view, several as one `engine.models.inference.Stacked`), and which
    rows hold one."""
    parts, has = [], []
    size = int(np.prod(shape))
    for chunk in table.column(column).chunks:
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        lengths = np.diff(offsets)
        if not np.isin(lengths, (0, size)).all():
            raise ValueError(f"a {column} column's rows hold {size} bytes or none")
        data = np.frombuffer(data, np.uint8) if data else np.zeros(0, np.uint8)
        parts.append(data[offsets[0]:offsets[-1]].reshape(-1, *shape))
        has.append(lengths > 0)
    return _joined(parts), np.concatenate(has) if has else np.zeros(0, bool)


def with_columns(table, columns: dict):
    """``table`` (``pyarrow.Table``) with ``columns`` (name -> numpy array, one row each)
    appended, converted as Ray Data converts a numpy batch (arrays of more than one dimension
    as its tensor extension type)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    for name, values in columns.items():
        table = table.append_column(name, ArrowTensorArray.from_numpy(values)
                                    if values.ndim > 1 else pa.array(values))
    return table


def read_tile(reader, level: int, x: int, y: int, read_px: int, tile_px: int) -> np.ndarray:
    """``(tile_px, tile_px, 3) uint8``: a region read at ``level`` and resized: enlarged or
    reduced by less than 2 bilinearly, and reduced by more by averaging areas.

    OpenCV's filters throughout. Enlarging gives Pillow's bilinear filter to a rounding (at
    most 1 grey level apart, tested; a 20x scan's cell tiles: 0.4 ms a 1024 px tile against
    Pillow's 6), and reducing by a whole factor Pillow's box (2x: 0.04 against 0.6 ms a 224 px
    tile). Below 2x, a bilinear sample (OpenCV's, whose kernel does not widen as Pillow's
    does) is nearer Pillow's Lanczos filter, the training crops', than Pillow's box filter is
    (1.0 against 2.1 grey levels on average on CMU-1), and takes 1.2 ms where the box took
    7-12 for a 1130 px region: a cell tile of a 0.2265 µm/px scan (Hamamatsu), or of a 0.243
    one (3DHistech at 20x). By a fraction of 2x or more (a 100x oil scan's cell tiles: 2560 px
    at 0.1 µm/px to 1024), the area filter weighs the pixels a tile pixel half covers by half,
    where Pillow's box takes them whole or not at all: it is nearer Lanczos (0.5 against 0.9
    grey levels on PBC's 0.1 µm/px images reduced 2.5x, 1.3 against 2.2 on CMU-1) and takes
    about a third of the box's time (release 0.7.0)."""
    region = reader.read_region(level, int(x), int(y), int(read_px), int(read_px))
    if read_px == tile_px:
        return region
    if read_px < 2 * tile_px:  # enlarging, or reducing by less than 2
        return cv2.resize(region, (tile_px, tile_px), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(region, (tile_px, tile_px), interpolation=cv2.INTER_AREA)


def _plan_dict(plan: TilePlan, overlap_l0: float = 0.0) -> dict:
    return {"level": plan.level, "read_px": plan.read_px, "tile_px": plan.tile_px,
            "mpp": plan.target_mpp, "stride": plan.stride, "overlap": overlap_l0,
            "footprint": plan.footprint, "grid": list(plan.grid_shape),
            "x": plan.x.tolist(), "y": plan.y.tolist(),
            "tissue_fraction": [round(float(f), 4) for f in plan.tissue_fraction]}


# a slide without a pixel size no larger than this is likely one cell's image or one camera
# field (a CellaVision export's are 360 px; a microscope camera's a few thousand), not a scan
SINGLE_IMAGE_PX = 4096


def _grid_summary(p: TilePlan, cfg: TileConfig) -> dict:
    """How many tiles a branch's grid held before its tissue filter, their side in µm and the
    foreground share a tile needed: what a slide with no tissue is told (the header's
    ``tissue``)."""
    return {"grid": int(p.grid_shape[0] * p.grid_shape[1]),
            "tile_um": round(p.tile_px * p.target_mpp, 1),
            "min_fraction": cfg.min_tissue_fraction}


def _sample(p: TilePlan, n: int) -> list[tuple[int, int]]:
    """Up to ``n`` tile origins spread evenly over the plan."""
    step = max(1, len(p) // max(n, 1))
    return list(zip(p.x, p.y))[::step][:n]


def _header(inv: dict, planned_at: float) -> dict:
    """A plan's header of its slide's inventory row ``inv``, before its tile plans."""
    return {"slide": {k: (v.isoformat() if hasattr(v, "isoformat") else v)
                      for k, v in inv.items()},
            "status": inv["status"], "error_type": inv["error_type"],
            "error_message": inv["error_message"], "planned_at": planned_at,
            "node": socket.gethostname()}  # where it was read (`stop_if_not_on_every_node`)


CRASHES_ALLOWED = 2  # a slide's plans that may kill their process before it fails (`Attempts`)


class Attempts:
    """How many times each attempt at a slide's plan, or at a read step's batch, began in a
    run and never ended: the process died (a file that crashes a native decoder, an
    out-of-memory kill), or was ended because the attempt hung (`attempt`'s deadline). Ray
    starts the actor again and retries its task, so such a slide was read again and again,
    and the run never ended, nor any rerun. Run as a Ray actor of the run (`run_pipeline`);
    the steps tell it before each attempt (``begin``, `attempt`) and after (``end``), and in
    an actor started again they wait for its answer: `PlanTasks` fails a slide whose plans
    died ``CRASHES_ALLOWED`` times, or hung once, and a read batch that died so often, or
    hung, is read a task at a time (`crashed_tasks`), each task of a slide that hung failing
    at once."""

    def __init__(self, clock=time.time):
        self._open: collections.Counter = collections.Counter()
        self._since: dict = {}  # when each open key's first attempt began
        self._late: dict = {}  # key -> the seconds after which its attempt was ended
        self._hung: dict = {}  # slide -> the same, for an attempt at that slide alone
        self._hung_at: dict = {}  # slide -> when it was found to hang
        self._answered_at = clock()  # when an attempt that read last ended
        self.clock = clock

    def begin(self, key, slides=()) -> tuple[int, float]:
        """Mark ``key``'s attempt begun, at ``slides``' tiles; returns how many of its earlier
        ones never ended, and the seconds after which one of them, or an attempt at one of
        ``slides`` alone, was ended as hung (0.0: none)."""
        died = self._open[key]
        self._open[key] += 1
        self._since.setdefault(key, self.clock())
        return died, max([self._late.get(key, 0.0), *(self._hung.get(s, 0.0) for s in slides)])

    def timed_out(self, key, slides, seconds: float) -> None:
        """``key``'s attempt, at ``slides``, is being ended after ``seconds`` (it hung)."""
        self._late[key] = seconds
        if len(set(slides)) == 1:  # that slide hung: its every read would
            self._hung[slides[0]] = seconds
            self._hung_at.setdefault(slides[0], self.clock())

    def end(self, key, answered: bool = True) -> None:
        """``key``'s attempt ended; ``answered``: it read (its slide not known to hang)."""
        self._open.pop(key, None)
        self._since.pop(key, None)
        self._late.pop(key, None)
        if answered:
            self._answered_at = self.clock()

    def hung(self) -> list[str]:
        """Every slide found to hang, in that order."""
        return sorted(self._hung_at, key=self._hung_at.get)

    def hung_unanswered(self) -> list[str]:
        """The slides found to hang since an attempt that read last ended, in that order: on a
        mount that stopped answering, each slide left (`engine.errors.HUNG_IN_A_ROW`,
        `run_pipeline`)."""
        return [s for s, t in sorted(self._hung_at.items(), key=lambda st: st[1])
                if t >= self._answered_at]

    def oldest(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` attempts under way longest, each ``(what, seconds)`` (`describe_attempt`),
        since the first attempt at its key began: what a run that commits nothing waits on
        (`engine.pipeline.run.StallReport`)."""
        now = self.clock()
        keys = sorted(self._since, key=self._since.get)[:n]
        return [(describe_attempt(k), now - self._since[k]) for k in keys]


def describe_attempt(key) -> str:
    """An `Attempts` key in words: a slide's plan, or a read step's batch or task."""
    if len(key) == 3 and isinstance(key[0], str) and key[0] not in ("read", "detect"):
        uri, branch, shard = key
        return f"planning {uri} ({branch}{f', part {shard + 1}' if shard else ''})"
    what = {"read": "reading encoder tiles", "detect": "detecting cells"}.get(key[0], key[0])
    tasks = f"task {key[2]}" if len(key) == 3 else f"tasks {key[2]}-{key[3]}"
    return f"{what} of {key[1]} ({tasks})"


@dataclasses.dataclass
class Earlier:
    """What `attempt` learnt of the earlier attempts at its key (`Attempts.begin`)."""

    died: int = 0  # how many never ended: their process died, or was ended
    hung_s: float = 0.0  # > 0: one of them, or one at its slide alone, was ended after this long
    token: int | None = None  # its deadline's (`WATCHDOG`), if any


@contextlib.contextmanager
def attempt(attempts, key, slides: tuple = (), timeout_s: float = 0.0):
    """Yields `Earlier`: how many earlier attempts at ``key`` (``slides``' tiles) killed
    their process, and whether one hung (all 0 where ``attempts`` is None), and tells
    ``attempts`` when the block ends: a block that kills its process never does. A block that
    has not ended after ``timeout_s`` (0: never) is taken to hang: `ended_late` ends its
    process, and its retry learns why."""
    if attempts is None:
        yield Earlier()
        return
    import ray

    begun = attempts.begin.remote(key, slides)
    # only a process started again can be given an attempt that died: elsewhere the count is
    # told, not waited for (0.3 ms a batch against a round trip's 1.5 ms, more on a busy node)
    earlier = Earlier()
    if restarted():
        try:
            earlier.died, earlier.hung_s = ray.get(begun)
        except ray.exceptions.RayActorError:  # the count lost (its process killed): unguarded
            pass
    if timeout_s > 0:
        earlier.token = WATCHDOG.watch(timeout_s, functools.partial(
            ended_late, attempts, key, slides, timeout_s))
    try:
        yield earlier
    finally:
        WATCHDOG.unwatch(earlier.token)
    # not waited for: a caller's calls to an actor run in order
    attempts.end.remote(key, not earlier.hung_s)


def ended_late(attempts, key, slides: tuple, timeout_s: float) -> None:
    """End this process, whose attempt at ``key`` has run ``timeout_s`` (`attempt`): a read
    that hangs cannot be interrupted, and held its run for ever. ``attempts`` is told first,
    so that the retry Ray makes in the actor it starts again fails the slide
    (`SlideReadTimeout`), or reads a batch of several slides a task at a time."""
    import ray

    print(f"hemeflow: {describe_attempt(key)} has not ended after {duration(timeout_s)}: "
          "ending its process (pipeline.read_timeout_minutes)", file=sys.stderr, flush=True)
    try:
        ray.get(attempts.timed_out.remote(key, slides, timeout_s), timeout=30)
    except Exception:  # noqa: BLE001 - untold, the retry counts it as a crash
        pass
    os._exit(1)


@functools.cache
def restarted() -> bool:
    """Whether this process is a Ray actor started again after its process died. Ray Data's
    actors are started again, and their tasks retried there, for ever (its ``max_restarts``
    and ``max_task_retries`` of -1), so the attempt a process's death ended is made again in
    such an actor alone: `attempt` waits for its count there. An attempt whose count was lost
    with its process (told just before the death) costs one more death, no more."""
    import ray

    if not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # it reads Ray's deprecated actor_id, which warns in the log
        warnings.simplefilter("ignore")
        return bool(context.was_current_actor_reconstructed)


def crashed(uri: str, earlier: Earlier, what: str = "reading it") -> SlideError | None:
    """The failure of a slide ``earlier.died`` of whose reads (``what``) killed their process
    (`SlideCrashedReader`), or one of which hung (`SlideReadTimeout`); None where none did."""
    if earlier.hung_s:
        return read_timed_out(uri, duration(earlier.hung_s), what)
    if not earlier.died:
        return None
    return SlideCrashedReader(uri, f"{what} killed the process reading it {earlier.died} "
                              "times (a file that crashes the slide decoder, or needs more "
                              "memory than the node has): not read again; --retry-failed "
                              "reads it again")


def read_alone(earlier: Earlier) -> bool:
    """Whether a read step's batch is read a task at a time (`crashed_tasks`): its attempts
    killed their process ``CRASHES_ALLOWED`` times, or one hung."""
    return earlier.died >= CRASHES_ALLOWED or earlier.hung_s > 0


def crashed_tasks(step: str, batch: dict, attempts, one, earlier: Earlier,
                  timeout_s: float = 0.0):
    """``one(i, earlier)`` of each of the batch's tasks, in order, for a read step
    (``step``) whose attempts at this batch (``earlier``) killed their process
    ``CRASHES_ALLOWED`` times, or hung: one task at a time, each an attempt of its own with
    its own deadline, so that a task whose attempt died once, or hung, gives its own
    `Earlier` (its slide fails: `crashed`) and its batch's other tasks, of other slides too,
    are read as ever. A tile that crashes its decoder costs three deaths of a read actor, a
    tile that hangs two deadlines, where Ray retried its batch for ever, or it held the
    run."""
    WATCHDOG.unwatch(earlier.token)  # each task has its own
    out = []
    for i in range(len(batch["task"])):
        slide = str(batch["slide_id"][i])
        with attempt(attempts, (step, slide, int(batch["task"][i])), (slide,),
                     timeout_s) as task:
            out.append(one(i, task))
    return out


def batch_key(step: str, batch: dict) -> tuple:
    """A read step's batch as `Attempts` counts it: Ray retries the same rows."""
    task = batch["task"]
    return (step, str(batch["slide_id"][0]), int(task[0]), int(task[-1]), len(task))


def batch_slides(batch: dict) -> tuple[str, ...]:
    """The slides whose tiles a read step's batch holds."""
    return tuple(dict.fromkeys(map(str, batch["slide_id"])))


def crashed_plan(row: dict, earlier: Earlier) -> dict:
    """`PlanSlide`'s row of a slide not planned again: its plans killed their process
    ``earlier.died`` times, or one hung (`Attempts`)."""
    entry = FileEntry(row["uri"], row.get("size"), row.get("etag"))
    err = crashed(entry.uri, earlier)
    inv = error_row(entry, err, specimen=row.get("specimen") or UNKNOWN, case=row.get("case"))
    return {"slide_id": inv["slide_id"], "uri": entry.uri,
            "plan": json.dumps(_header(inv, time.time()))}


class PlanSlide:
    """Inventory one slide, mask its tissue on a thumbnail, and plan its tiles (coordinates only).

    Row in: ``uri``, ``size``, ``etag``, optionally ``specimen`` (`engine.specimen`: a section
    plans no cell tiles) and ``case`` (recorded in the slides row). Row out: ``slide_id``,
    ``uri``, ``plan`` (JSON text with the inventory row, status, per-stage tile plans and, with
    cell tiles, ``red_cells``: the free-lying red cells of the tiles sampled for the stain
    threshold, measured at the slide's µm/px to check it).
    Slide problems become a failed status; other exceptions are bugs and propagate.
    """

    def __init__(self, cfg: Config, mpp: MppOverrides | None = None,
                 stages: tuple[str, ...] | None = None, embeddings: bool = True):
        self.cfg = cfg
        self.mpp = mpp or MppOverrides()
        self.stages = tuple(stages or cfg.pipeline.stages)
        self.embeddings = embeddings  # an encoder embeds tiles (a smear's tiles' only use)

    def sparse(self, specimen: str) -> bool:
        """Whether this planner reads a slide of this type from a sparse copy: where it plans
        the tiles branch alone, and the run's cells branch does not read the slide (a section;
        a run without cells): that branch reads one coarse level and the thumbnail's, a
        fraction of the slide, where the cells branch reads all of level 0 and its node's
        staged copy serves both (`engine.slides.header_copy`)."""
        return self.stages == ("tiles",) and "cells" not in branches_for(
            specimen, tuple(self.cfg.pipeline.stages), self.embeddings)

    def __call__(self, row: dict) -> dict:
        entry = FileEntry(row["uri"], row.get("size"), row.get("etag"))
        specimen = row.get("specimen") or UNKNOWN
        planned_at = time.time()  # the slide's start: its status row's started_at
        sparse = self.sparse(specimen)
        with inventoried(entry, self.cfg.storage, None, self.mpp,
                         self.cfg.pipeline.direct_jpeg, specimen, row.get("case"), sparse
                         ) as (inv, slide):
            out = _header(inv, planned_at)
            if slide is not None:
                try:
                    out.update(self._plan(slide, entry.uri, inv), sparse=int(sparse))
                except SlideError as err:
                    out.update(status="failed", error_type=type(err).__name__,
                               error_message=str(err))
        return {"slide_id": inv["slide_id"], "uri": entry.uri, "plan": json.dumps(out)}

    def _plan(self, slide, uri: str, inv: dict) -> dict:
        cfg = self.cfg
        if inv["mpp_source"] == "missing":
            small = max(inv["width"] or 0, inv["height"] or 0) <= SINGLE_IMAGE_PX
            raise MissingMPP(uri, "no pixel size in the slide's metadata; supply --mpp or "
                                  "--mpp-table" + (
                                      f" (a {inv['width']}x{inv['height']} px image: a single "
                                      "cell's or a camera field's? A folder of single-cell "
                                      "images goes to python -m jobs.classify_cells)"
                                      if small else ""))
        mpp = (inv["mpp_x"] + inv["mpp_y"]) / 2
        info = slide.info
        stages = branches_for(inv["specimen"], self.stages, self.embeddings)
        if not stages:  # nothing applies to this specimen here (a section's cells branch)
            return {"mpp0": mpp, "width": info.width, "height": info.height, "plans": {}}
        side = max(info.width, info.height) * mpp / cfg.tissue.thumbnail_mpp
        scale = min(1.0, cfg.tissue.thumbnail_max_px / max(side, 1))
        tw = max(8, int(info.width * mpp / cfg.tissue.thumbnail_mpp * scale))
        th = max(8, int(info.height * mpp / cfg.tissue.thumbnail_mpp * scale))
        thumb = slide.read_thumbnail((tw, th))
        mask_scale = (info.width / thumb.shape[1], info.height / thumb.shape[0])
        mask = compute_tissue_mask(thumb, mpp * mask_scale[0], cfg.tissue)
        plans, measured = {}, {}  # what the plan measured on the slide (the header carries it)
        if "cells" in stages:
            tc = cfg.cell_tiles
            p = plan_tiles(info.dimensions, info.level_downsamples, mpp, tc, mask,
                           mask_scale, uri)
            d = _plan_dict(p, tc.overlap_px * tc.target_mpp / mpp)
            # the stain threshold is set once per slide from a sample of its tiles
            samples = [read_tile(slide, p.level, x, y, p.read_px, p.tile_px)
                       for x, y in _sample(p, cfg.pipeline.threshold_samples)]
            d["threshold"] = estimate_threshold(samples, cfg.cells)
            d["direct_ok"] = _direct_ok(slide, p.level)
            d["pale"] = pale_pass(inv["specimen"], cfg.cells)
            plans["cells"] = d
            measured.setdefault("tissue", {})["cells"] = _grid_summary(p, tc)
            # the same tiles check the pixel size: red cells should be about 7.5 µm across
            red = red_cell_size(map(red_cell_diameters, samples), p.target_mpp)
            measured["red_cells"] = {"n": red.n_cells, "diameter_um": red.diameter_um,
                                     "iqr_um": red.iqr_um}
        if "tiles" in stages:
            tmask = with_enclosed_fat(mask, thumb, mpp * mask_scale[0],
                                      cfg.tiles.fat_closing_um, cfg.tissue)
            p = plan_tiles(info.dimensions, info.level_downsamples, mpp, cfg.tiles, tmask,
                           mask_scale, uri)
            d = _plan_dict(p)
            # stain vectors and the nucleus cut of the label-free cellularity, once per slide
            sample = _sample(p, cfg.pipeline.threshold_samples)
            if hasattr(slide, "prefetch"):  # a sparse copy: their tiles in one batch
                slide.prefetch(p.level, [(x, y, p.read_px, p.read_px) for x, y in sample])
            rules = calibrate([read_tile(slide, p.level, x, y, p.read_px, p.tile_px)
                               for x, y in sample])
            d["stains"], d["nucleus_h_od"] = rules.stains, rules.nucleus_h_od
            d["direct_ok"] = _direct_ok(slide, p.level)
            plans["tiles"] = d
            measured.setdefault("tissue", {})["tiles"] = _grid_summary(p, cfg.tiles)
        return {**measured, "mpp0": mpp, "width": info.width, "height": info.height,
                "plans": plans}


def _direct_ok(slide, level: int) -> int:
    """Whether the plan's sample reads found ``level`` to decode directly as OpenSlide decodes
    it: 1 or 0, and -1 where nothing was checked (another backend, or no direct path). The
    tasks carry it, so that each process reading the slide need not check it again."""
    checks = getattr(slide, "direct_checks", {})
    return int(checks[level]) if level in checks else -1


def cell_tasks(slide_id: str, uri: str, plan: dict) -> list[dict]:
    """One task row per cell tile of a planned slide."""
    p = plan["plans"]["cells"]
    common = {"slide_id": slide_id, "uri": uri, "level": int(p["level"]),
              "read_px": int(p["read_px"]), "tile_px": int(p["tile_px"]),
              "tile_mpp": float(p["mpp"]), "mpp0": float(plan["mpp0"]),
              "stride": float(p["stride"]), "overlap": float(p["overlap"]),
              "grid_nx": int(p["grid"][0]), "grid_ny": int(p["grid"][1]),
              "threshold": float(p["threshold"]), "width": int(plan["width"]),
              "height": int(plan["height"]), "pale": str(p.get("pale", PALE_OFF)),
              "direct_ok": int(p.get("direct_ok", -1))}
    return [{**common, "task": i, "x": int(x), "y": int(y)}
            for i, (x, y) in enumerate(zip(p["x"], p["y"]))]


def tile_tasks(slide_id: str, uri: str, plan: dict) -> list[dict]:
    p = plan["plans"]["tiles"]
    return [{"slide_id": slide_id, "uri": uri, "task": i, "x": int(x), "y": int(y),
             "level": int(p["level"]), "read_px": int(p["read_px"]),
             "tile_px": int(p["tile_px"]), "tile_mpp": float(p["mpp"]),
             "tissue_fraction": float(f), "stains": np.asarray(p["stains"], np.float32).ravel(),
             "nucleus_h_od": float(p["nucleus_h_od"]), "direct_ok": int(p.get("direct_ok", -1)),
             "sparse": int(plan.get("sparse", 0))}
            for i, (x, y, f) in enumerate(zip(p["x"], p["y"], p["tissue_fraction"]))]


# the task row of a slide with no tasks (failed, or no tissue): same columns, task -1
_NO_TASK = {
    "cells": {"level": 0, "read_px": 0, "tile_px": 0, "tile_mpp": 0.0, "mpp0": 0.0,
              "stride": 0.0, "overlap": 0.0, "grid_nx": 0, "grid_ny": 0, "threshold": 0.0,
              "width": 0, "height": 0, "pale": PALE_OFF, "task": -1, "x": 0, "y": 0,
              "direct_ok": -1},
    "tiles": {"task": -1, "x": 0, "y": 0, "level": 0, "read_px": 0, "tile_px": 0,
              "tile_mpp": 0.0, "tissue_fraction": 0.0, "nucleus_h_od": 0.0,
              "stains": np.zeros(6, np.float32), "direct_ok": -1, "sparse": 0}}


class PlanTasks:
    """Plan one slide for one branch (``cells`` or ``tiles``) and expand it into that branch's
    task rows (a ``flat_map`` step), so slides stream through one dataset per branch and its
    actors live for the whole run.

    Every row carries ``n_tasks`` (the slide's tasks in this branch); the first also carries
    ``header``, the plan as JSON without its coordinates (inventory row, status, error). A slide
    that failed or has no tissue gives one row with ``task = -1``, which later steps pass
    through, so the driver learns of every slide from the stream itself.

    A row with ``shard`` k of ``shards`` K plans the slide and keeps every K-th task from the
    k-th: a slide's tasks leave this step as one block, and a block goes to one actor, so a
    few large slides are split K ways to keep every CPU actor busy (``slide_shards``). An actor
    keeps its last few shard plans, so the shards it gets of one slide are planned once.
    """

    def __init__(self, cfg: Config, mpp: MppOverrides | None, branch: str,
                 embeddings: bool = True, attempts=None):
        t_born = time.time()
        limit_native_threads(cfg.pipeline.native_threads)
        self.branch = branch
        self.attempts = attempts  # the run's `Attempts` actor (none: not asked)
        self.timeout_s = 60.0 * cfg.pipeline.read_timeout_minutes
        self.plan = PlanSlide(cfg, mpp, stages=(branch,), embeddings=embeddings)
        # the other shards of a slide usually follow on this actor: plan it once for them
        self._recent: collections.OrderedDict = collections.OrderedDict()
        self._ready = ready_since(t_born)

    def _planned(self, row: dict) -> dict:
        key = (row["uri"], row.get("size"), row.get("etag"))
        if key not in self._recent:
            self._recent[key] = self.plan(row)
            while len(self._recent) > 4:
                self._recent.popitem(last=False)
        return self._recent[key]

    def _plan_once(self, row: dict) -> dict:
        """The slide's plan (`_planned` or `PlanSlide`), or `crashed_plan` where its plans
        killed their process ``CRASHES_ALLOWED`` times already, or one hung (`Attempts`)."""
        with attempt(self.attempts, (row["uri"], self.branch, int(row.get("shard", 0))),
                     (row["uri"],), self.timeout_s) as earlier:
            if earlier.died >= CRASHES_ALLOWED or earlier.hung_s:
                return crashed_plan(row, earlier)
            return self._planned(row) if int(row.get("shards", 1)) > 1 else self.plan(row)

    def __call__(self, row: dict) -> list[dict]:
        t0 = time.perf_counter()
        planned = self._plan_once(row)
        sid, uri, plan = planned["slide_id"], planned["uri"], json.loads(planned["plan"])
        tasks = []
        if plan["status"] == "ok" and self.branch in plan["plans"]:
            tasks = (cell_tasks if self.branch == "cells" else tile_tasks)(sid, uri, plan)
        n = len(tasks)
        shard, shards = int(row.get("shard", 0)), int(row.get("shards", 1))
        tasks = tasks[shard::shards]
        if not n and shard == 0:
            tasks = [{"slide_id": sid, "uri": uri, **_NO_TASK[self.branch]}]
        if not tasks:
            return []
        busy = (time.perf_counter() - t0) / len(tasks)
        header = json.dumps({k: v for k, v in plan.items() if k != "plans"})
        for i, t in enumerate(tasks):
            t.update(n_tasks=n, header=header if i == 0 else "",
                     **{f"_t_plan_{self.branch}": busy, f"_r_plan_{self.branch}": self._ready[0],
                        f"_i_plan_{self.branch}": self._ready[1]})
        return tasks


_CELL_COLUMNS = ("slide_id", "task", "n_in_task", "x", "y", "x0", "y0", "x1", "y1", "area_um2",
                 "kind", "at_edge", "blur_um", "out_of_focus", "nuclear_hue_deg",
                 "nuclear_saturation", "error_type", "error_message", "n_tasks", "header")


class DetectCells:
    """Read cell tiles, detect cells, keep those the tile owns, crop at 96 px each the
    classifier scores (nucleated cells, and platelet-sized ones with
    ``pipeline.classifier.platelets``) and measure how blurred each nucleated cell is
    (``blur_um``, ``out_of_focus``: `engine.focus`; NaN and False for platelets) and how its
    nucleus is stained (``nuclear_hue_deg``, ``nuclear_saturation``: `engine.stain`; NaN for
    platelets).

    Batch in: cell task rows. Batch out (a ``pyarrow.Table``): one row per cell, plus one
    ``kind = "none"`` row for a tile without cells and ``kind = "error"`` for an unreadable
    tile, so the driver can count every task as done. ``crop``: `packed_crops`, a
    ``(96, 96, 3) uint8`` crop's bytes in each scored cell's row and none in the others: on a
    blood film most detections are platelets, which without ``platelets`` would otherwise
    travel to the classifier's actor as whole crops that it never reads.
    """

    def __init__(self, cfg: Config, threads: int = 1, attempts=None):
        from concurrent.futures import ThreadPoolExecutor

        t_born = time.time()
        limit_native_threads(cfg.pipeline.native_threads)
        self.cfg = cfg
        self.attempts = attempts  # the run's `Attempts` actor (none: not asked)
        self.timeout_s = 60.0 * cfg.pipeline.read_timeout_minutes
        self.readers = ReaderCache(cfg, threads=threads)
        self.scored = scored_kinds(cfg.pipeline.classifier.platelets)
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self._ready = ready_since(t_born)

    def __call__(self, batch: dict):
        from ray.data.block import BlockAccessor

        t0 = time.perf_counter()
        parts: list[dict] = []  # per task: its columns (arrays of its rows) and crops
        carried = [k for k in batch if k.startswith(METRIC_PREFIXES)]  # earlier stages' times
        tasks = [{k: batch[k][i] for k in batch} for i in range(len(batch["task"]))]
        for t, part in zip(tasks, self._parts(batch, tasks)):
            n = len(part["task"])
            part["n_tasks"] = np.full(n, int(t.get("n_tasks", 0)), np.int64)
            # the task's header and busy times go on its first row only, so sums stay right
            part["header"] = np.asarray([str(t.get("header", ""))] + [""] * (n - 1))
            for k in carried:
                part[k] = np.zeros(n, np.asarray(t[k]).dtype)
                part[k][0] = t[k]
            parts.append(part)
        out = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)
               for k in (*_CELL_COLUMNS, *carried)}
        crops = np.concatenate([p["crop"] for p in parts]) if parts else \
            np.zeros((0, CROP_PX, CROP_PX, 3), np.uint8)
        has_crop = np.isin(out["kind"], self.scored)
        self.readers.release_unused()
        table = BlockAccessor.batch_to_block(stamp(out, "detect", t0, self._ready))
        return table.append_column("crop", packed_crops(crops, has_crop))

    def _parts(self, batch: dict, tasks: list[dict]) -> list[dict]:
        """Each task's `_task` columns; one at a time (`crashed_tasks`) where the attempts at
        this batch killed their process ``CRASHES_ALLOWED`` times, or hung."""
        if not tasks:
            return []
        def one(i: int, earlier: Earlier) -> dict:
            t = tasks[i]
            return self._task(t, crashed(str(t["uri"]), earlier, "reading its cell tiles")
                              or self._read(t))

        with attempt(self.attempts, batch_key("detect", batch), batch_slides(batch),
                     self.timeout_s) as earlier:
            if not read_alone(earlier):
                return [self._task(t, tile) for t, tile in zip(tasks, self._tiles(tasks))]
            return crashed_tasks("detect", batch, self.attempts, one, earlier, self.timeout_s)

    def _tiles(self, tasks: list[dict]):
        """Each task's tile (`_read`), in order. With ``threads`` > 1 (`pipeline.read_threads`:
        on a network file system, where a 1024 px region's reads wait 6 times as long as
        its detection takes) that many reads are under way while a tile is detected."""
        if self._pool is None:
            yield from map(self._read, tasks)
            return
        left = iter(tasks)
        ahead = collections.deque(self._pool.submit(self._read, t)
                                  for t in itertools.islice(left, self.threads))
        while ahead:
            tile = ahead.popleft().result()
            for t in itertools.islice(left, 1):
                ahead.append(self._pool.submit(self._read, t))
            yield tile

    def _read(self, t: dict) -> np.ndarray | SlideError | None:
        """The task's tile, or why it cannot be read; None for a slide without tasks."""
        if int(t["task"]) < 0:
            return None
        try:
            with self.readers.reading(str(t["uri"]), int(t["level"]),
                                      int(t.get("direct_ok", -1))) as reader:
                return read_tile(reader, t["level"], t["x"], t["y"], t["read_px"],
                                 t["tile_px"])
        except SlideError as err:
            return err

    def _task(self, t: dict, tile: np.ndarray | SlideError | None) -> dict:
        """One task's cell columns (at least one row: a marker without cells) and ``crop``,
        the crops of its rows the classifier scores; ``tile``: its `_read`."""
        if int(t["task"]) < 0:  # a slide without tasks: its header passes through
            return self._marker(t, "none")
        if isinstance(tile, SlideError):
            return self._marker(t, "error", type(tile).__name__, str(tile))
        # the pale pass the slide's plan gives its specimen type (`engine.cells.pale_pass`)
        det = detect_cells(tile, float(t["tile_mpp"]), float(t["threshold"]), self.cfg.cells,
                           str(t.get("pale", PALE_OFF)))
        f = float(t["tile_mpp"]) / float(t["mpp0"])  # level-0 px per tile px
        cx, cy = t["x"] + det.x * f, t["y"] + det.y * f
        own = owned_by_tile(cx, cy, int(t["x"]), int(t["y"]), float(t["stride"]),
                            float(t["overlap"]), (int(t["grid_nx"]), int(t["grid_ny"])))
        idx = np.flatnonzero(own)
        n = len(idx)
        if not n:
            return self._marker(t, "none")
        half = CROP_PX / 2 * f
        cx, cy = cx[idx], cy[idx]
        tx, ty = det.x[idx], det.y[idx]  # tile px
        kind = det.kind[idx]
        scored = np.isin(kind, self.scored)  # the rows that carry a crop, in order
        crops = crops_around(tile, tx[scored], ty[scored], CROP_PX)
        at_edge = ((cx - half < 0) | (cy - half < 0) | (cx + half > t["width"]) |
                   (cy + half > t["height"]))
        max_blur = self.cfg.cells.max_blur_um
        blur = np.full(n, np.nan, np.float32)  # measured on nucleated cells, what is counted
        stain = np.full((n, 3), np.nan)
        nucleated = np.flatnonzero(kind == KIND_CELL)
        if len(nucleated):
            stain[nucleated] = nuclear_colour(crops[kind[scored] == KIND_CELL],
                                              float(t["tile_mpp"]))
        if max_blur is not None and len(nucleated):
            # the slide in each crop: at its border the rest is background, not the cell's
            inside = inside_of_crops(tx[nucleated], ty[nucleated], CROP_PX, -t["x"] / f,
                                     -t["y"] / f, (t["width"] - t["x"]) / f,
                                     (t["height"] - t["y"]) / f)
            blur[nucleated] = edge_blur_um(crops[kind[scored] == KIND_CELL],
                                           float(t["tile_mpp"]), inside)
        return {"slide_id": np.full(n, str(t["slide_id"])),
                "task": np.full(n, int(t["task"]), np.int64),
                "n_in_task": np.full(n, n, np.int64), "x": cx, "y": cy,
                "x0": t["x"] + det.x0[idx] * f, "y0": t["y"] + det.y0[idx] * f,
                "x1": t["x"] + det.x1[idx] * f, "y1": t["y"] + det.y1[idx] * f,
                "area_um2": det.area_um2[idx].astype(np.float32),
                "kind": kind.astype(str),
                "at_edge": at_edge,
                "blur_um": blur,
                "out_of_focus": blur > max_blur if max_blur is not None else np.zeros(n, bool),
                "nuclear_hue_deg": stain[:, 0].astype(np.float32),
                "nuclear_saturation": stain[:, 1].astype(np.float32),
                "error_type": np.full(n, ""), "error_message": np.full(n, ""),
                "crop": crops}

    @staticmethod
    def _marker(t: dict, kind: str, error_type: str = "", message: str = "") -> dict:
        """The one row of a task without cells (``kind`` ``none`` or ``error``), blank crop."""
        zero = np.zeros(1)
        return {"slide_id": np.asarray([str(t["slide_id"])]),
                "task": np.asarray([int(t["task"])], np.int64),
                "n_in_task": np.zeros(1, np.int64), "x": zero, "y": zero, "x0": zero,
                "y0": zero, "x1": zero, "y1": zero, "area_um2": np.zeros(1, np.float32),
                "kind": np.asarray([kind]), "at_edge": np.zeros(1, bool),
                "blur_um": np.full(1, np.nan, np.float32), "out_of_focus": np.zeros(1, bool),
                "nuclear_hue_deg": np.full(1, np.nan, np.float32),
                "nuclear_saturation": np.full(1, np.nan, np.float32),
                "error_type": np.asarray([error_type]), "error_message": np.asarray([message]),
                "crop": np.zeros((0, CROP_PX, CROP_PX, 3), np.uint8)}  # a marker has none


class ClassifyCells:
    """DeepHeme on the crops (GPU when the actor has one). Adds ``probabilities``,
    ``class_code``, ``class_prob``, ``ood_distance`` (to the training data, NaN when the
    checkpoint carries no feature density; `engine.models.ood`) and ``out_of_distribution``,
    and with ``features`` each cell's pooled penultimate ``features`` ``(D,)``; drops
    ``crop``. Marker rows pass through unscored, and so do platelet-sized detections without
    ``platelets`` (``class_code`` empty: null in the cells table). With ``ensemble``
    checkpoints the probabilities are averaged over them and ``checkpoint`` (whose features
    they are)."""

    def __init__(self, model: str, checkpoint: str | None, allow_untrained: bool = False,
                 tta: bool = False, storage=None, compile: bool = False, batch_size: int = 0,
                 ensemble: tuple[str, ...] = (), amp: bool = True, threads: int = 0,
                 features: bool = False, platelets: bool = True, graphs: bool = False):
        t_born = time.time()
        from engine.models import UNTRAINED_SEED, EnsemblePredictor, create_model

        imported = time.time()
        members = [create_model(model, ckpt, allow_untrained=allow_untrained,
                                class_codes=DEEPHEME_CODES, storage=storage, seed=UNTRAINED_SEED)
                   for ckpt in (checkpoint, *ensemble)]
        self.predictor = EnsemblePredictor(members, compile=compile, amp=amp,
                                           chunk=batch_size or 256, graphs=graphs)
        loaded = time.time()
        model_threads(self.predictor.members[0].device, threads)
        self.model = self.predictor.model
        self.tta = tta
        self.features = features
        warmup = warmed(self.predictor, batch_size, tta=tta, features=features)
        self.scored_kinds = list(scored_kinds(platelets))
        self._ready = ready_since(t_born, warmup, imported - t_born, loaded - imported)

    def __call__(self, batch):
        """``batch``: a dict of numpy arrays, or (as the pipeline hands it: `branch_dataset`) a
        whole Ray Data block as a ``pyarrow.Table``. A block's crops are read in place from its
        chunks (`unpacked_crops` of `DetectCells`' packed column, or `in_place` of a tensor
        column); a numpy batch of them would be one more copy of every crop, which on the
        2-core CPU cost the model actor's process 4x its CPU per crop
        (`ray_data_passthrough.py`). A block's detection to score without its crop (the
        steps set up with different ``platelets``) is an error."""
        import pyarrow as pa
        import pyarrow.compute as pc

        t0 = time.perf_counter()
        table = batch if isinstance(batch, pa.Table) else None
        if table is not None:
            real = pc.is_in(table.column("kind"), value_set=pa.array(self.scored_kinds))
            real = real.to_numpy(zero_copy_only=False)
            if pa.types.is_large_binary(table.schema.field("crop").type):  # `DetectCells`'
                crops, has_crop = unpacked_crops(table)  # only the rows that hold one
                if (real & ~has_crop).any():
                    raise ValueError("a detection to score came without its crop: "
                                     "DetectCells and ClassifyCells disagree on platelets")
                picked = np.flatnonzero(real[has_crop])  # those to score, among the crops
            else:
                crops, picked = in_place(table, "crop"), np.flatnonzero(real)
            batch = {}  # only the new columns, and the stamps
        else:
            crops = batch.pop("crop")
            real = np.isin(batch["kind"], self.scored_kinds)
            picked = np.flatnonzero(real)
        n, c = len(real), len(self.model.class_codes)
        probs = np.zeros((n, c), np.float32)
        distance = np.full(n, np.nan, np.float32)
        if self.features:
            batch["features"] = np.zeros((n, self.model.num_features), np.float32)
        rows = np.flatnonzero(real)
        if len(rows):  # the model reads the real rows straight from the crops (no copy first)
            probs[rows], d, f = self.predictor.score(
                crops, tta=self.tta, rows=None if len(picked) == len(crops) else picked,
                features=self.features)
            if d is not None:
                distance[rows] = d
            if f is not None:
                batch["features"][rows] = f
        codes = np.asarray(self.model.class_codes)
        batch["probabilities"] = probs
        batch["class_code"] = np.where(real, codes[probs.argmax(1)], "")
        batch["class_prob"] = probs.max(1)
        batch["ood_distance"] = distance
        density = self.predictor.ood
        batch["out_of_distribution"] = distance > (density.threshold if density else np.inf)
        batch = stamp(batch, "classify", t0, self._ready, n)
        return batch if table is None else with_columns(table.drop_columns(["crop"]), batch)


class ReadTiles:
    """Read encoder tiles (2 µm/px by default) and measure cellular and fat area per tile.

    Batch in: tile task rows. Batch out: the same with ``cellular_px``, ``fat_px``, ``image``
    (``(B, 224, 224, 3) uint8``, only when ``keep_pixels``), ``error_type``, ``error_message``.
    """

    def __init__(self, cfg: Config, keep_pixels: bool, threads: int = 1, attempts=None):
        from concurrent.futures import ThreadPoolExecutor

        t_born = time.time()
        limit_native_threads(cfg.pipeline.native_threads)
        self.attempts = attempts  # the run's `Attempts` actor (none: not asked)
        self.timeout_s = 60.0 * cfg.pipeline.read_timeout_minutes
        self.readers = ReaderCache(cfg, threads=threads)
        self.keep_pixels = keep_pixels
        self.tile_px = cfg.tiles.tile_px
        self._pool = ThreadPoolExecutor(threads)
        self._ready = ready_since(t_born)

    def _one(self, batch: dict, i: int, earlier: Earlier | None = None):
        size = int(batch["tile_px"][i])
        if int(batch["task"][i]) < 0:  # a slide without tiles: its header passes through
            return np.zeros((self.tile_px,) * 2 + (3,), np.uint8), 0, 0, "", ""
        # its read killed the process, or hung (`crashed_tasks`)
        if err := crashed(str(batch["uri"][i]), earlier or Earlier(), "reading its tiles"):
            return np.zeros((size, size, 3), np.uint8), 0, 0, type(err).__name__, str(err)
        try:
            with self._reading(batch, i) as reader:
                tile = read_tile(reader, batch["level"][i], batch["x"][i], batch["y"][i],
                                 batch["read_px"][i], size)
            rules = AreaRules(stains=tuple(map(tuple, np.reshape(batch["stains"][i], (2, 3)))),
                              nucleus_h_od=float(batch["nucleus_h_od"][i]))
            return tile, *tile_area_counts(tile, float(batch["tile_mpp"][i]), rules), "", ""
        except SlideError as e:
            return np.zeros((size, size, 3), np.uint8), 0, 0, type(e).__name__, str(e)

    def _reading(self, batch: dict, i: int):
        return self.readers.reading(str(batch["uri"][i]), int(batch["level"][i]),
                                int(batch["direct_ok"][i]) if "direct_ok" in batch else -1,
                                bool(batch["sparse"][i]) if "sparse" in batch else False)

    def _prefetch(self, batch: dict) -> None:
        """The batch's tiles of each slide read from a sparse copy, fetched in one batch of
        requests per slide, where each read would make its own."""
        if "sparse" not in batch:
            return
        todo: dict[str, list[int]] = {}
        for i in np.flatnonzero((np.asarray(batch["sparse"]) > 0)
                                & (np.asarray(batch["task"]) >= 0)):
            todo.setdefault(str(batch["uri"][i]), []).append(int(i))
        for rows in todo.values():
            try:
                with self._reading(batch, rows[0]) as reader:
                    for level in {int(batch["level"][i]) for i in rows} \
                            if hasattr(reader, "prefetch") else ():
                        reader.prefetch(level, [(int(batch["x"][i]), int(batch["y"][i]),
                                                 int(batch["read_px"][i]),
                                                 int(batch["read_px"][i]))
                                                for i in rows if int(batch["level"][i]) == level])
            except SlideError:
                continue  # each read reports it

    def _results(self, batch: dict) -> list[tuple]:
        """`_one` of each row; one at a time (`crashed_tasks`) where the attempts at this batch
        killed their process ``CRASHES_ALLOWED`` times, or hung."""
        n = len(batch["task"])
        if not n:
            return []
        with attempt(self.attempts, batch_key("read", batch), batch_slides(batch),
                     self.timeout_s) as earlier:
            if not read_alone(earlier):
                self._prefetch(batch)
                # OpenSlide decoding releases the GIL, the area masks mostly do not: extra
                # threads help only while a read waits on storage (pipeline.read_threads)
                return list(self._pool.map(lambda i: self._one(batch, i), range(n)))
            return crashed_tasks("read", batch, self.attempts,
                                 lambda i, task: self._one(batch, i, task), earlier,
                                 self.timeout_s)

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        results = self._results(batch)
        images, cellular, fat, errors, messages = (list(c) for c in zip(*results)) \
            if results else ([], [], [], [], [])
        batch.update(cellular_px=np.asarray(cellular, np.int64), fat_px=np.asarray(fat, np.int64),
                     error_type=np.asarray(errors), error_message=np.asarray(messages))
        if self.keep_pixels:
            batch["image"] = np.stack(images) if images else \
                np.zeros((0, self.tile_px, self.tile_px, 3), np.uint8)
        self.readers.release_unused()
        return stamp(batch, "read", t0, self._ready)


class EncodeTiles:
    """Tile encoder (DINOv2): ``image`` -> ``embedding`` ``(B, D) float32``."""

    def __init__(self, model: str, checkpoint: str | None, allow_untrained: bool = False,
                 storage=None, compile: bool = False, batch_size: int = 0, amp: bool = True,
                 threads: int = 0, graphs: bool = False):
        t_born = time.time()
        from engine.models import UNTRAINED_SEED, Predictor, create_model

        imported = time.time()
        self.predictor = Predictor(create_model(model, checkpoint,
                                                allow_untrained=allow_untrained,
                                                storage=storage, seed=UNTRAINED_SEED),
                                   compile=compile, amp=amp,
                                   chunk=batch_size or 256, graphs=graphs)
        loaded = time.time()
        model_threads(self.predictor.device, threads)
        self._ready = ready_since(t_born, warmed(self.predictor, batch_size),
                                  imported - t_born, loaded - imported)

    def __call__(self, batch):
        """``batch``: a dict of numpy arrays, or a whole Ray Data block as a ``pyarrow.Table``
        (as the pipeline hands it), whose tiles are read in place (see `ClassifyCells`)."""
        import pyarrow as pa

        t0 = time.perf_counter()
        # header rows of slides without tiles hold a blank image: one wasted row per such slide
        if not isinstance(batch, pa.Table):
            batch["embedding"] = self.predictor.embed(batch.pop("image"))
            return stamp(batch, "encode", t0, self._ready)
        out = stamp({"embedding": self.predictor.embed(in_place(batch, "image"))}, "encode", t0,
                    self._ready, batch.num_rows)
        return with_columns(batch.drop_columns(["image"]), out)
