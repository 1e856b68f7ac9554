"""Driver-side assembly of each slide's results as the stream delivers them, and its commit.

The driver sees only small rows (cell probabilities, tile statistics, embeddings), never pixels.
A slide is committed when every task of every stage has reported; memory is bounded by the
slides in flight (one chunk), not by the archive.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from dataclasses import dataclass, field

import numpy as np

import engine
from engine.cellularity import slide_cellularity
from engine.differential import compute_differential
from engine.pipeline.commit import OutputStore
from engine.report.geojson import cells_to_geojson


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class SlideState:
    slide_id: str
    uri: str
    slide_row: dict
    plan: dict
    started: dt.datetime
    t0: float
    expected: dict[str, int] = field(default_factory=dict)   # stage -> number of tasks
    received: dict[str, collections.Counter] = field(default_factory=dict)  # stage -> task -> n
    done: dict[str, set] = field(default_factory=dict)
    cells: list[dict] = field(default_factory=list)
    tiles: list[dict] = field(default_factory=list)
    error: tuple[str, str] | None = None

    def complete(self) -> bool:
        return all(len(self.done[s]) >= n for s, n in self.expected.items())


class Aggregator:
    """Collects stream rows per slide and commits each slide once all its tasks are in."""

    def __init__(self, store: OutputStore, config_hash: str, stages_run: list[str],
                 stages_skipped: list[str], model_codes: tuple[str, ...], min_nucleated: int,
                 log=print, mil=None, mil_bags: tuple[int, int] = (10, 256)):
        self.mil, self.mil_bags = mil, mil_bags
        self.store, self.config_hash = store, config_hash
        self.stages_run, self.stages_skipped = stages_run, stages_skipped
        self.model_codes, self.min_nucleated = model_codes, min_nucleated
        self.log = log
        self.slides: dict[str, SlideState] = {}
        self.summary: list[dict] = []

    # ---- intake -------------------------------------------------------------------------
    def add_plan(self, slide_id: str, uri: str, plan: dict, n_tasks: dict[str, int]) -> None:
        row = dict(plan["slide"])
        row["inventoried_at"] = dt.datetime.fromisoformat(row["inventoried_at"])
        state = SlideState(slide_id, uri, row, plan, utcnow(), time.time())
        if plan["status"] != "ok":
            state.error = (plan["error_type"], plan["error_message"])
        else:
            for stage, n in n_tasks.items():
                state.expected[stage] = n
                state.received[stage] = collections.Counter()
                state.done[stage] = set()
        self.slides[slide_id] = state
        self._maybe_commit(state)

    def add_cells(self, batch: dict) -> None:
        for i in range(len(batch["task"])):
            state = self.slides[str(batch["slide_id"][i])]
            task, kind = int(batch["task"][i]), str(batch["kind"][i])
            if kind == "error" and state.error is None:
                state.error = (str(batch["error_type"][i]), str(batch["error_message"][i]))
            if kind in ("error", "none"):
                state.done["cells"].add(task)
            else:
                state.cells.append({
                    "x": float(batch["x"][i]), "y": float(batch["y"][i]),
                    "x0": float(batch["x0"][i]), "y0": float(batch["y0"][i]),
                    "x1": float(batch["x1"][i]), "y1": float(batch["y1"][i]),
                    "area_um2": float(batch["area_um2"][i]), "kind": kind,
                    "at_edge": bool(batch["at_edge"][i]),
                    "class_code": str(batch["class_code"][i]),
                    "class_prob": float(batch["class_prob"][i]),
                    "probabilities": batch["probabilities"][i].astype(np.float32).tolist()})
                state.received["cells"][task] += 1
                if state.received["cells"][task] >= int(batch["n_in_task"][i]):
                    state.done["cells"].add(task)
        self._check_all()

    def add_tiles(self, batch: dict) -> None:
        for i in range(len(batch["task"])):
            state = self.slides[str(batch["slide_id"][i])]
            err = str(batch["error_type"][i])
            if err and state.error is None:
                state.error = (err, str(batch["error_message"][i]))
            px = int(batch["tile_px"][i]) ** 2
            state.tiles.append({
                "x": int(batch["x"][i]), "y": int(batch["y"][i]),
                "mpp": float(batch["tile_mpp"][i]), "tile_px": int(batch["tile_px"][i]),
                "tissue_fraction": float(batch["tissue_fraction"][i]),
                "nuclear_fraction": float(batch["cellular_px"][i]) / px,
                "cellular_px": int(batch["cellular_px"][i]), "fat_px": int(batch["fat_px"][i]),
                "embedding": batch["embedding"][i].astype(np.float32).tolist()
                if "embedding" in batch else None})
            state.done["tiles"].add(int(batch["task"][i]))
        self._check_all()

    # ---- commit -------------------------------------------------------------------------
    def _check_all(self) -> None:
        for state in list(self.slides.values()):
            self._maybe_commit(state)

    def _maybe_commit(self, state: SlideState) -> None:
        if state.expected and not state.complete():
            return
        del self.slides[state.slide_id]
        sid = state.slide_id
        status = {"slide_id": sid, "uri": state.uri, "started_at": state.started,
                  "engine_version": engine.__version__, "config_hash": self.config_hash,
                  "stages": self.stages_run, "skipped_stages": self.stages_skipped}
        tables: dict = {"slides": [state.slide_row]}
        geo = None
        if state.error:
            status.update(status="failed", error_type=state.error[0],
                          error_message=state.error[1], n_tiles=None, n_cells=None)
        else:
            cells = sorted(state.cells, key=lambda c: (c["y"], c["x"]))
            for i, c in enumerate(cells):
                c.update(slide_id=sid, cell_id=i, model_codes=list(self.model_codes))
            if "cells" in state.expected:
                tables["cells"] = cells
                tables["differentials"] = self._differential(sid, cells)
                geo = cells_to_geojson(cells)
            if "tiles" in state.expected:
                tiles = sorted(state.tiles, key=lambda t: (t["y"], t["x"]))
                value = slide_cellularity([t["cellular_px"] for t in tiles],
                                          [t["fat_px"] for t in tiles])
                tables["tiles"] = [{k: v for k, v in t.items()
                                    if k not in ("cellular_px", "fat_px")} | {"slide_id": sid}
                                   for t in tiles]
                tables["cellularity"] = [{"slide_id": sid, "method": "image_analysis",
                                          "cellularity_mean": value, "cellularity_sd": None,
                                          "n_bags": None, "bag_size": None,
                                          "n_tiles": len(tiles)}]
                if self.mil is not None and tiles and tiles[0]["embedding"] is not None:
                    from engine.models.mil import predict_bags

                    emb = np.asarray([t["embedding"] for t in tiles], np.float32)
                    pred = predict_bags(self.mil, emb, *self.mil_bags)
                    tables["cellularity"].append({
                        "slide_id": sid, "method": "abmil",
                        "cellularity_mean": float(pred.mean[0]) * 100,
                        "cellularity_sd": float(pred.sd[0]) * 100, "n_bags": pred.n_bags,
                        "bag_size": pred.bag_size, "n_tiles": len(tiles)})
            status.update(status="ok", error_type=None, error_message=None,
                          n_tiles=sum(state.expected.values()), n_cells=len(cells))
        finished = utcnow()
        status.update(finished_at=finished, seconds=round(time.time() - state.t0, 3))
        self.store.commit(sid, tables, status, geo)
        self.summary.append(status)
        self.log(f"slide {sid}: {status['status']}"
                 + (f" ({status['error_type']})" if state.error else "")
                 + f", tiles {status['n_tiles'] or 0}, cells {status['n_cells'] or 0}, "
                 f"{status['seconds']:.1f}s")

    def _differential(self, sid: str, cells: list[dict]) -> list[dict]:
        d = compute_differential([c["class_code"] for c in cells], self.model_codes,
                                 self.min_nucleated)
        lo, hi = d.blast_ci if d.blast_ci else (None, None)
        return [{"slide_id": sid, "level": r["level"], "class_code": r["code"],
                 "lineage": r["lineage"], "nucleated": r["nucleated"], "count": r["count"],
                 "percent": r["percent"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                 "n_nucleated": d.n_nucleated, "me_ratio": d.me_ratio,
                 "blast_percent": d.blast_percent, "blast_ci_low": lo, "blast_ci_high": hi,
                 "low_count": d.low_count, "codes_not_covered": list(d.not_covered)}
                for r in d.rows]
