"""Driver-side assembly of each slide's results as the stream delivers them, and its commit.

The driver sees only small rows (cell probabilities, tile statistics, embeddings), never pixels.
A slide is committed when every task of every branch has reported; memory is bounded by the
slides in flight, not by the archive.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

import engine
from engine.cells import KIND_CELL, KIND_PLATELET, lobes
from engine.cellularity import slide_cellularity
from engine.classes import LOBED_CODES
from engine.differential import compute_differential, differential_rows, review_warnings
from engine.errors import (NOT_COMMITTED, NotOnEveryNode, SlideBeingWritten,
                           stop_if_it_stops_the_job)
from engine.pipeline.commit import OutputStore
from engine.pipeline.progress import Progress
from engine.report.geojson import cells_geojson_text
from engine.schema import CELL_FEATURES, CELLS, TILES
from engine.slides.storage import is_remote
from engine.specimen import SMEARS, SPECIMENS, UNKNOWN, branches_for, slide_stages, why_left_out
from engine.stain import StainCheck, stain_summary


# what a read of a file still being written fails as: its missing part undecodable, or its
# format not yet told by the bytes that are there
BEING_WRITTEN_SHOWS_AS = ("SlideCorrupt", "SlideUnsupported")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class BranchState:
    """One slide in one branch's stream (``cells`` or ``tiles``)."""

    n_tasks: int | None = None       # from any row
    header: dict | None = None       # from the row that carries it
    received: collections.Counter = field(default_factory=collections.Counter)  # task -> rows
    done: set = field(default_factory=set)
    chunks: list[dict] = field(default_factory=list)  # column arrays, a batch's slice each
    finished: bool = False

    def complete(self) -> bool:
        return self.header is not None and self.n_tasks is not None \
            and len(self.done) >= self.n_tasks


@dataclass
class SlideState:
    slide_id: str
    branches: dict[str, BranchState]
    started: dt.datetime
    t0: float
    error: tuple[str, str] | None = None
    written: bool = False             # a branch's tables are on storage, not yet committed
    n_cells: int = 0
    warnings: dict[str, str] = field(default_factory=dict)  # why an ok slide needs review
    specimen: str = UNKNOWN           # from the header (`engine.specimen`)
    writes: list[Future] = field(default_factory=list)  # its tables' writes under way

    def fail(self, error_type: str, message: str) -> None:
        """Record the slide's first error; one that stops the job (`STOPS_THE_JOB`: storage
        that refused the credentials, which every other slide would meet too) is raised."""
        stop_if_it_stops_the_job(error_type, message)
        if self.error is None:
            self.error = (error_type, message)


def stop_if_not_on_every_node(header: dict) -> None:
    """Raise `NotOnEveryNode` where a slide's plan (``header``) found its local file missing
    on another node while this driver's node has it: an archive mounted on the head node
    alone (a PVC left off the worker pods, a path on the submitting machine's disk) failed
    every slide planned elsewhere `SlideNotFound`, committed, and each rerun skipped them."""
    node = header.get("node")
    if node and node != socket.gethostname():
        not_on_every_node(header["slide"].get("uri") or "", header.get("error_type"),
                          f"node {node}")


def not_on_every_node(uri: str, error_type: str | None, where: str) -> None:
    """Raise `NotOnEveryNode` where the local file ``uri`` was not found (``error_type``)
    ``where`` it was read, and this driver's node has it."""
    if error_type != "SlideNotFound" or not uri or is_remote(uri) or not os.path.exists(uri):
        return
    raise NotOnEveryNode(
        f"{uri} was not found on {where}, though this job's driver ({socket.gethostname()})"
        " sees it: the input is not at the same path on every node of the cluster. Mount it "
        "there on every node (a shared file system: NFS, a volume on every pod), or put it in "
        "S3, and run again: nothing was committed for it, and the slides committed stay")


def _read_failed(state: SlideState, error_type: str, message: str) -> None:
    """A read step's failure of one of ``state``'s tasks: the slide's, unless its file was not
    found where it was read, which a node of the cluster not mounting the input tells
    (`not_on_every_node`; its message begins with the slide's URI, `SlideError`)."""
    not_on_every_node(message.partition(": ")[0], error_type, "the node that read its tiles")
    state.fail(error_type, message)


class Aggregator:
    """Collects the branch streams' rows per slide and commits each slide once all its tasks in
    every branch are in.

    A branch that completes a slide writes that slide's tables of its own (cells, differentials
    and GeoJSON; tiles and cellularity) straight away and drops its rows, so the driver holds
    only slides in flight, however far one branch runs ahead of the other; the status row, the
    commit, follows when the last branch completes. A failed slide's written tables are deleted.
    A slide of a known specimen type (`engine.specimen`) gets only the tables that apply to it:
    a section no cells or differential, a smear no cellularity; one to which no configured
    stage applies is committed as ``skipped``. Thread-safe: each branch's stream is consumed on
    its own thread.

    A slide whose file ``changed`` since the job listed it (``changed``: by URI, how, or None:
    `engine.slides.storage.changed_since_listed`) was still being written, or was saved over,
    as it was read: its reads may have failed on the missing part or mixed two versions. It
    is reported ``SlideBeingWritten`` and not committed, so the next run reads it whole; so
    is one that failed ``StagingFull`` (no room on the node to stage it: `NOT_COMMITTED`); a
    slide that failed otherwise (missing, no pixel size) is committed as it failed.

    With ``write_threads`` above 1 the writes go to storage on threads of their own (the
    tables ``write_threads`` at once, each commit marker after its slide's tables), so the
    branches' intake goes on meanwhile: on S3 each write is a round trip of tens of ms, and one
    after another in the intake they would hold a GPU's tiles branch to a few slides/s. At most
    ``2 * write_threads`` writes are under way (the intake waits beyond that: memory stays
    bounded); `flush` waits for them and raises the first that failed, and a failure also
    stops the next intake. ``write_threads`` 1 writes in the intake, as before.
    """

    def __init__(self, store: OutputStore, config_hash: str, stages_run: list[str],
                 stages_skipped: list[str], model_codes: tuple[str, ...], min_nucleated: int,
                 branches: tuple[str, ...], log=print, mil=None,
                 mil_bags: tuple[int, int] = (10, 256), max_ood_percent: float = 20.0,
                 embeddings: bool = True, max_out_of_focus_percent: float = 20.0,
                 count_out_of_focus: bool = False,
                 red_cell_diameter_um: tuple[float, float] | None = None,
                 lobe_merge_um: float | None = None, stain: StainCheck | None = None,
                 write_threads: int = 1, total: int | None = None,
                 changed: Callable[[str], str | None] | None = None):
        self.embeddings = embeddings  # an encoder makes tile embeddings (a smear's tiles' use)
        self.changed = changed
        self.max_ood_percent = max_ood_percent
        self.max_out_of_focus_percent = max_out_of_focus_percent
        self.count_out_of_focus = count_out_of_focus
        self.red_cell_diameter_um = red_cell_diameter_um
        self.lobe_merge_um = lobe_merge_um
        self.stain = stain  # the classifier's training stain, to hold each slide's against
        self.mil, self.mil_bags = mil, mil_bags
        self.store, self.config_hash = store, config_hash
        self.stages_run, self.stages_skipped = stages_run, stages_skipped
        self.model_codes, self.min_nucleated = model_codes, min_nucleated
        self.branches = tuple(branches)
        self.log = log
        self.slides: dict[str, SlideState] = {}
        self.summary: list[dict] = []
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()  # summary and log lines, from the commit threads
        self._pools = (ThreadPoolExecutor(write_threads, "write"),
                       ThreadPoolExecutor(write_threads, "commit")) if write_threads > 1 else None
        self._room = threading.BoundedSemaphore(2 * max(write_threads, 1))
        self._under_way: set[Future] = set()
        self._failed: BaseException | None = None
        self.progress = Progress(total) if total else None  # the run's slides to commit

    # ---- intake -------------------------------------------------------------------------
    def _branch(self, sid: str, branch: str, n_tasks, header) -> tuple[SlideState, BranchState]:
        state = self.slides.get(sid)
        if state is None:
            state = self.slides[sid] = SlideState(
                sid, {b: BranchState() for b in self.branches}, utcnow(), time.time())
        br = state.branches[branch]
        br.n_tasks = int(n_tasks)
        if header:
            br.header = json.loads(str(header))
            t = br.header.get("planned_at")  # the slide timed from its planning, not from
            if t is not None and t < state.t0:  # its first rows reaching this driver
                state.t0 = float(t)
                state.started = dt.datetime.fromtimestamp(state.t0, dt.timezone.utc)
            state.specimen = br.header["slide"].get("specimen") or UNKNOWN
            if br.header["status"] != "ok":
                stop_if_not_on_every_node(br.header)
                state.fail(br.header["error_type"], br.header["error_message"])
        return state, br

    def fail_held(self, sid: str, header: str) -> None:
        """Fail slide ``sid`` with ``header`` (a failed plan's, JSON: `crashed_plan`'s) in
        each branch not yet finished, and commit it, unless it has been: a slide found to hang
        whose failure the branches' streams still hold (they bring it with their next batch)
        as the run stops on storage that stopped answering (`run.stop_if_stalled`). Left
        uncommitted, a plain rerun read it again, and stopped on it again."""
        with self._lock:
            if sid not in self.slides and sid in {s["slide_id"] for s in list(self.summary)}:
                return  # committed already
            state = self.slides.get(sid)
            for name in self.branches:
                br = state.branches[name] if state is not None else None
                if br is None or not br.finished:
                    state, br = self._branch(sid, name, len(br.done) if br else 0, header)
            if state is not None:
                self._progress(state)

    def add_cells(self, batch: dict) -> None:
        self._intake("cells", batch, self._take_cells)

    def add_tiles(self, batch: dict) -> None:
        self._intake("tiles", batch, self._take_tiles)

    def _intake(self, branch: str, batch: dict, take) -> None:
        """Route a branch's batch to its slides by columns: each slide's task rows go to
        ``take`` as slices of the batch's arrays (rows of slides without tasks only bring the
        header), then commit what is complete. The driver touches each cell or tile in C, not
        in Python: a GPU node classifies some 40k cells/s or encodes 12k tiles/s, and a dict
        per row held this driver to about 15k and 12k."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            sids, first = np.unique(batch["slide_id"], return_index=True)
            touched = {}
            for sid in sids[np.argsort(first)]:  # slides in the order they appear
                rows = np.flatnonzero(batch["slide_id"] == sid)
                for i in rows[batch["header"][rows] != ""]:  # the rows that carry the header
                    self._branch(str(sid), branch, batch["n_tasks"][i], batch["header"][i])
                state, br = self._branch(str(sid), branch, batch["n_tasks"][rows[-1]], "")
                touched[str(sid)] = state
                take(batch, rows[batch["task"][rows] >= 0], state, br)
            for state in touched.values():
                self._progress(state)

    @staticmethod
    def _take_cells(batch: dict, rows: np.ndarray, state: SlideState, br: BranchState) -> None:
        """One slide's task rows of a batch: markers (``none``, ``error``) finish their task;
        cells are kept as columns and finish it once all ``n_in_task`` of them are in."""
        kind = batch["kind"][rows]
        for i in rows[kind == "error"]:
            _read_failed(state, str(batch["error_type"][i]), str(batch["error_message"][i]))
        marker = (kind == "error") | (kind == "none")
        br.done.update(int(t) for t in batch["task"][rows[marker]])
        cells = rows[~marker]
        if not len(cells):
            return
        n = len(cells)
        dist = batch["ood_distance"][cells].astype(np.float32) if "ood_distance" in batch \
            else np.full(n, np.nan, np.float32)
        chunk = {k: batch[k][cells] for k in ("x", "y", "x0", "y0", "x1", "y1", "area_um2",
                                               "kind", "at_edge", "class_code", "class_prob",
                                               "probabilities")}
        chunk["ood_distance"] = dist
        chunk["blur_um"] = batch["blur_um"][cells].astype(np.float32) if "blur_um" in batch \
            else np.full(n, np.nan, np.float32)  # NaN: not measured
        chunk["out_of_focus"] = batch["out_of_focus"][cells].astype(bool) \
            if "out_of_focus" in batch else np.zeros(n, bool)
        for key in ("nuclear_hue_deg", "nuclear_saturation"):  # NaN: not measured
            chunk[key] = batch[key][cells].astype(np.float32) if key in batch \
                else np.full(n, np.nan, np.float32)
        if "features" in batch:
            chunk["features"] = batch["features"][cells]
        chunk["out_of_distribution"] = batch["out_of_distribution"][cells].astype(bool) \
            if "out_of_distribution" in batch else np.zeros(n, bool)
        br.chunks.append(chunk)
        tasks, first, counts = np.unique(batch["task"][cells], return_index=True,
                                         return_counts=True)
        need = batch["n_in_task"][cells[first]]
        for t, c, k in zip(tasks.tolist(), counts.tolist(), need.tolist()):
            br.received[t] += c
            if br.received[t] >= k:
                br.done.add(t)

    @staticmethod
    def _take_tiles(batch: dict, rows: np.ndarray, state: SlideState, br: BranchState) -> None:
        """One slide's tile rows of a batch, kept as columns; each finishes its task (an
        unreadable tile fails the slide)."""
        for i in rows[batch["error_type"][rows] != ""]:
            _read_failed(state, str(batch["error_type"][i]), str(batch["error_message"][i]))
        if not len(rows):
            return
        keys = ("x", "y", "tile_mpp", "tile_px", "tissue_fraction", "cellular_px", "fat_px",
                *(("embedding",) if "embedding" in batch else ()))
        br.chunks.append({k: batch[k][rows] for k in keys})
        br.done.update(batch["task"][rows].tolist())

    # ---- commit -------------------------------------------------------------------------
    def _progress(self, state: SlideState) -> None:
        for name, br in state.branches.items():
            if br.finished or not br.complete():
                continue
            br.finished = True
            if state.error is None and name in self._ran(state):
                tables, geo = (self._cell_tables if name == "cells" else self._tile_tables)(
                    state, br)
                if self._pools is None:
                    self.store.write_tables(state.slide_id, tables, geo)
                else:
                    state.writes += [self._submit(0, job) for job in
                                     self.store.table_writes(state.slide_id, tables, geo)]
                state.written = True
            br.chunks = []
        if all(br.finished for br in state.branches.values()):
            self._commit(state)

    def _no_tissue(self, state: SlideState) -> str | None:
        """Why a slide whose every branch found no tissue to read gives no results (the
        ``no_tissue`` flag), or None. A smear with cells but no tile of 50 % tissue for an
        encoder is not flagged: its headline, the differential, was measured."""
        ran = self._ran(state)
        if state.error or not ran or any(state.branches[b].n_tasks for b in ran):
            return None
        grids = [g for b in ran
                 if (g := ((state.branches[b].header or {}).get("tissue") or {}).get(b))]
        if not grids:
            return None
        g = min(grids, key=lambda g: g["min_fraction"])  # the least any branch asked for
        tiles = f"{g['grid']} tile{'s' if g['grid'] != 1 else ''}"
        return (f"none of the slide's {tiles} of {g['tile_um']:g} µm is "
                f"{g['min_fraction']:.0%} tissue or smear on its thumbnail (blank glass, a "
                f"stain too pale for the tissue mask, or a slide smaller than a tile): nothing "
                f"was measured; look at the slide")

    def _ran(self, state: SlideState) -> tuple[str, ...]:
        """The branches whose tables this slide gets (`engine.specimen.branches_for`)."""
        return branches_for(state.specimen, self.branches, self.embeddings)

    def _cell_tables(self, state: SlideState, br: BranchState) -> tuple[dict, dict | str]:
        sid = state.slide_id
        cols = _raster_columns(br.chunks)
        n = len(cols["x"]) if cols else 0
        state.n_cells = n
        codes, ood = [], []  # per cell: the class, and out of distribution (None: unknown)
        blurred = None  # per cell: out of focus (None: focus not measured)
        platelets = []  # per platelet-sized detection: out of focus
        stain = None  # the counted cells' nuclei's colour (`engine.stain.stain_summary`)
        lobe_of = None  # per detection: the detection whose cell's lobe it is (-1: none)
        if cols:
            mpp = br.header["slide"].get("mpp_x")  # level-0 µm/px, as the cells' x and y
            if self.lobe_merge_um and state.specimen == "blood" and mpp:
                lobe_of = lobes(cols["x"], cols["y"],
                                np.where(cols["kind"] == KIND_CELL, cols["class_code"], ""),
                                LOBED_CODES, self.lobe_merge_um / float(mpp))
            # the differential counts nucleated detections: a platelet-sized object is no
            # nucleated cell whatever the classifier calls it (a pale platelet reads as an
            # erythroblast's nucleus at times); a second lobe of one cell is no second cell
            counted = (cols["kind"] == KIND_CELL) & (True if lobe_of is None else lobe_of < 0)
            codes = cols["class_code"][counted].tolist()
            ood = [bool(f) if known else None for f, known in
                   zip(cols["out_of_distribution"][counted].tolist(),
                       (~np.isnan(cols["ood_distance"][counted])).tolist())]
            if not np.isnan(cols["blur_um"]).all():
                blurred = cols["out_of_focus"][counted].tolist()
            platelets = cols["out_of_focus"][cols["kind"] == KIND_PLATELET].tolist()
            # the nuclei of the cells the differential counts: a blurred nucleus reads paler
            sharp = counted & (True if self.count_out_of_focus else ~cols["out_of_focus"])
            stain = stain_summary(np.stack([cols["nuclear_hue_deg"][sharp],
                                            cols["nuclear_saturation"][sharp]], 1))
        red = br.header.get("red_cells")  # measured when the slide was planned
        d = compute_differential(codes, self.model_codes, self.min_nucleated, ood,
                                 self.max_ood_percent, blood=state.specimen == "blood",
                                 out_of_focus=blurred,
                                 max_out_of_focus_percent=self.max_out_of_focus_percent,
                                 count_out_of_focus=self.count_out_of_focus,
                                 platelets=platelets,
                                 red_cells=red and (red["n"], red["diameter_um"]),
                                 stain=stain)
        differential = differential_rows(sid, d)
        state.warnings.update(review_warnings(d, self.min_nucleated, self.red_cell_diameter_um,
                                              self.stain))
        if not cols:
            return {"cells": [], "differentials": differential}, \
                {"type": "FeatureCollection", "features": []}
        tables = {"cells": cells_table(sid, cols, self.model_codes, lobe_of),
                  "differentials": differential}
        if "features" in cols:
            tables["cell_features"] = cell_features_table(
                sid, cols["features"], cols["class_code"].astype(str) == "")
        geo = cells_geojson_text(range(n), cols["x0"], cols["y0"], cols["x1"], cols["y1"],
                                 cols["class_code"], cols["class_prob"], cols["ood_distance"],
                                 cols["blur_um"])
        return tables, geo

    def _tile_tables(self, state: SlideState, br: BranchState) -> tuple[dict, None]:
        sid = state.slide_id
        cols = _raster_columns(br.chunks)
        n = len(cols["x"]) if cols else 0
        tables = {"tiles": tiles_table(sid, cols) if cols else []}
        if state.specimen in SMEARS:  # no marrow space to fill: no cellularity
            return tables, None
        value = slide_cellularity(cols["cellular_px"], cols["fat_px"]) if cols else None
        tables["cellularity"] = [{"slide_id": sid, "method": "image_analysis",
                                  "cellularity_mean": value, "cellularity_sd": None,
                                  "n_bags": None, "bag_size": None, "n_tiles": n}]
        if self.mil is not None and cols and "embedding" in cols:
            from engine.models.mil import predict_bags

            pred = predict_bags(self.mil, np.asarray(cols["embedding"], np.float32),
                                *self.mil_bags)
            tables["cellularity"].append({
                "slide_id": sid, "method": "abmil",
                "cellularity_mean": float(pred.mean[0]) * 100,
                "cellularity_sd": float(pred.sd[0]) * 100, "n_bags": pred.n_bags,
                "bag_size": pred.bag_size, "n_tiles": n})
        return tables, None

    def _commit(self, state: SlideState) -> None:
        del self.slides[state.slide_id]
        sid = state.slide_id
        header = next(br.header for br in state.branches.values())
        row = dict(header["slide"])
        row["inventoried_at"] = dt.datetime.fromisoformat(row["inventoried_at"])
        run, skipped = slide_stages(state.specimen, self.stages_run, self.stages_skipped,
                                    self.embeddings)
        status = {"slide_id": sid, "uri": row["uri"], "started_at": state.started,
                  "engine_version": engine.__version__, "config_hash": self.config_hash,
                  "stages": run, "skipped_stages": skipped}
        ran = self._ran(state)
        nothing_applies = state.error is None and not ran
        if nothing_applies:
            state.fail("NoStageForSpecimen",
                       f"a {SPECIMENS[state.specimen]}: no configured stage applies to it "
                       f"(pipeline.stages {list(self.branches)}; "
                       f"{why_left_out(state.specimen)})")
        if state.error:
            status.update(status="skipped" if nothing_applies else "failed",
                          error_type=state.error[0],
                          error_message=state.error[1], n_tiles=None, n_cells=None)
        else:
            status.update(status="ok", error_type=None, error_message=None,
                          n_tiles=sum(br.n_tasks for br in state.branches.values()),
                          n_cells=state.n_cells if "cells" in ran else None)
        empty = self._no_tissue(state)
        if empty:  # first: nothing else the slide is flagged for was measured on anything
            state.warnings = {"no_tissue": empty, **state.warnings}
        status["warnings"] = [] if state.error else [f"{k}: {v}"
                                                     for k, v in state.warnings.items()]
        if self._pools is None:
            self._finish(state, row, status, empty)
        else:
            self._submit(1, self._finish, state, row, status, empty)

    def _submit(self, pool: int, fn, *args) -> Future:
        """``fn(*args)`` on the write (0) or commit (1) threads, once there is room."""
        self._room.acquire()
        future = self._pools[pool].submit(fn, *args)
        with self._report_lock:
            self._under_way.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._report_lock:
            self._under_way.discard(future)
            if future.exception() is not None and self._failed is None:
                self._failed = future.exception()
        self._room.release()

    def flush(self) -> None:
        """Wait for the writes under way; raise the first that failed."""
        while True:
            with self._report_lock:
                under_way = set(self._under_way)
            if not under_way:
                break
            wait(under_way)
        if self._failed is not None:
            raise self._failed

    def close(self, raise_failed: bool = True) -> None:
        """Wait for the writes under way and end their threads; then raise the first that
        failed (with ``raise_failed``: not while another error is on its way out)."""
        for pool in self._pools or ():
            pool.shutdown(wait=True)
        if raise_failed and self._failed is not None:
            raise self._failed

    def _finish(self, state: SlideState, row: dict, status: dict, empty: str | None) -> None:
        """Commit a slide once its tables are written: the status row last; then report it."""
        sid = state.slide_id
        if state.writes:
            wait(state.writes)
            failed = next((f.exception() for f in state.writes if f.exception()), None)
            if failed is not None:
                raise failed  # not committed: the rerun processes the slide again
        if self._changed_as_read(state, status):
            empty = None
        if state.error and state.written:  # one branch finished before another failed
            self.store.discard(sid)
        status.update(finished_at=utcnow(), seconds=round(time.time() - state.t0, 3))
        if status["error_type"] not in NOT_COMMITTED:
            self.store.commit(sid, {"slides": [row]}, status)
        with self._report_lock:
            self._report(state, status, empty)

    def _changed_as_read(self, state: SlideState, status: dict) -> bool:
        """Whether the slide's file changed since the job listed it (``changed``), which makes
        its ``status`` a ``SlideBeingWritten`` failure, not to be committed. Asked here, on the
        commit threads: on S3 it is a request."""
        if self.changed is None or status["status"] == "skipped" or \
                status["error_type"] not in (None, *BEING_WRITTEN_SHOWS_AS):
            return False
        why = self.changed(status["uri"])
        if not why:
            return False
        failed = f" (its read failed {state.error[0]}: {state.error[1]})" if state.error else ""
        state.error = (SlideBeingWritten.__name__,
                       f"{status['uri']}: {why} since the job listed it: still being written as "
                       "it was read, or saved over (a copy under way? a rescan?); not committed, "
                       f"so the next run reads it{failed}")
        status.update(status="failed", error_type=state.error[0], error_message=state.error[1],
                      n_tiles=None, n_cells=None, warnings=[])
        return True

    def _report(self, state: SlideState, status: dict, empty: str | None) -> None:
        sid = state.slide_id
        self.summary.append(status)
        self.log(f"slide {sid}: {status['status']}"
                 + (f" ({status['error_type']})" if state.error else "")
                 + f", tiles {status['n_tiles'] or 0}, "
                 f"cells {'-' if status['n_cells'] is None else status['n_cells']}, "
                 f"{status['seconds']:.1f}s"
                 + (f" [{len(self.summary)}/{self.progress.total}]" if self.progress else ""))
        if self.progress and (line := self.progress.tick()):
            self.log(line)
        if status["error_type"] in NOT_COMMITTED:
            self.log(f"warning: slide {sid}: {status['error_message']}")
        if empty:
            self.log(f"warning: slide {sid}: no_tissue: {empty}")
        if "pixel_size" in state.warnings and not state.error:
            self.log(f"warning: slide {sid}: pixel_size: {state.warnings['pixel_size']} "
                     f"(slides.mpp_x, mpp_source). If it is wrong, give the right one "
                     f"(--mpp-table, a slide_id,mpp row) and run the slide again with "
                     f"--reprocess")
        root = shlex.quote(self.store.root)  # its commands, pasted into a shell as they are
        if "stain" in state.warnings and not state.error:
            self.log(f"warning: slide {sid}: stain: {state.warnings['stain']} (which: python "
                     f"-m jobs.cell_gallery --output {root} --slide {sid})")
        if "out_of_focus" in state.warnings and not state.error:
            self.log(f"warning: slide {sid}: out_of_focus: {state.warnings['out_of_focus']}; "
                     f"where: python -m jobs.slide_map --output {root} --slide "
                     f"{sid}; which: python -m jobs.cell_gallery --output {root} "
                     f"--slide {sid} --order blurred")
        if "out_of_distribution" in state.warnings and not state.error:
            self.log(f"warning: slide {sid}: out_of_distribution: "
                     f"{state.warnings['out_of_distribution']} (another stain, scanner or "
                     f"cell type); review them before trusting its differential: python -m "
                     f"jobs.cell_gallery --output {root} --slide {sid} --order far"
                     f" (where: python -m jobs.slide_map --output {root} --slide "
                     f"{sid} --measure ood)")

def _raster_columns(chunks: list[dict]) -> dict | None:
    """A slide's column chunks joined and put in raster order (y, then x; ties in arrival
    order, as a stable sort of the rows gave); None without any."""
    if not chunks:
        return None
    cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]
            if all(k in c for c in chunks)}
    order = np.lexsort((cols["x"], cols["y"]))
    return {k: v[order] for k, v in cols.items()}


def _lists(values: np.ndarray, null: np.ndarray | None = None) -> pa.ListArray:
    """``(n, k)`` numbers (or n arrays of k, as Ray Data may hand over a tensor column) -> a
    list<float32> column of n lists of k, null where ``null`` is set."""
    values = np.stack(values) if values.dtype == object else values
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(values, np.float32).ravel()),
                                    mask=None if null is None or not null.any() else
                                    pa.array(null))


def tiles_table(slide_id: str, cols: dict) -> pa.Table:
    """A slide's tiles (columns in raster order) as the ``tiles`` table."""
    n = len(cols["x"])
    px = cols["tile_px"].astype(np.float64) ** 2
    columns = {"slide_id": pa.array(np.full(n, slide_id)),
               "x": pa.array(cols["x"], pa.int64()), "y": pa.array(cols["y"], pa.int64()),
               "mpp": pa.array(cols["tile_mpp"], pa.float64()),
               "tile_px": pa.array(cols["tile_px"], pa.int32()),
               "tissue_fraction": pa.array(cols["tissue_fraction"], pa.float64()),
               "nuclear_fraction": pa.array(cols["cellular_px"].astype(np.float64) / px),
               "embedding": _lists(cols["embedding"]) if "embedding" in cols else
               pa.nulls(n, pa.list_(pa.float32()))}
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in TILES], schema=TILES)


def cells_table(slide_id: str, cols: dict, model_codes: tuple[str, ...],
                lobe_of: np.ndarray | None = None) -> pa.Table:
    """A slide's cells (columns in raster order) as the ``cells`` table; ``cell_id`` is the
    raster rank, an unknown distance or blur (NaN) is null and so is its flag; a detection the
    classifier did not see (an empty class code) has null class columns; ``lobe_of`` (per
    detection, the index of the one whose cell's lobe it is, -1 for none) is null but for
    lobes."""
    n = len(cols["x"])
    lobe_of = np.full(n, -1, np.int64) if lobe_of is None else lobe_of
    m = len(model_codes)
    unknown = np.isnan(cols["ood_distance"])
    codes = cols["class_code"].astype(str)
    unscored = codes == ""
    columns = {
        "slide_id": pa.array(np.full(n, slide_id)), "cell_id": pa.array(np.arange(n)),
        **{c: pa.array(cols[c], pa.float64()) for c in ("x", "y", "x0", "y0", "x1", "y1")},
        "area_um2": pa.array(cols["area_um2"], pa.float32()),
        "kind": pa.array(cols["kind"].astype(str)),
        "at_edge": pa.array(cols["at_edge"], pa.bool_()),
        "lobe_of": pa.array(lobe_of, pa.int64(), mask=lobe_of < 0),
        "blur_um": pa.array(cols["blur_um"], pa.float32(), mask=np.isnan(cols["blur_um"])),
        "out_of_focus": pa.array(cols["out_of_focus"], pa.bool_(),
                                 mask=np.isnan(cols["blur_um"])),
        "class_code": pa.array(codes, mask=unscored),
        "class_prob": pa.array(cols["class_prob"], pa.float32(), mask=unscored),
        "probabilities": _lists(cols["probabilities"], unscored),
        "model_codes": pa.ListArray.from_arrays(
            pa.array(np.arange(0, n * m + 1, m, dtype=np.int32)),
            pa.array(list(model_codes), pa.string()).take(np.tile(np.arange(m), n))),
        "ood_distance": pa.array(cols["ood_distance"], pa.float32(), mask=unknown),
        "out_of_distribution": pa.array(cols["out_of_distribution"], pa.bool_(), mask=unknown),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in CELLS], schema=CELLS)


def cell_features_table(slide_id: str, features: np.ndarray,
                        unscored: np.ndarray | None = None) -> pa.Table:
    """A slide's cells' features (rows in the cells table's raster order, so ``cell_id`` is
    the same) as the ``cell_features`` table; null for the cells ``unscored``."""
    n = len(features)
    return pa.Table.from_arrays([pa.array(np.full(n, slide_id)), pa.array(np.arange(n)),
                                 _lists(features, unscored)], schema=CELL_FEATURES)
