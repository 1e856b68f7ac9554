"""``process_slides`` on Ray Data: plan slides on workers, stream tiles through CPU readers and
model actors, assemble and commit each slide on the driver.

    entries ─► PlanSlide (map) ─► cell tasks ─► DetectCells (CPU) ─► ClassifyCells (actors) ─┐
                              └─► tile tasks ─► ReadTiles (CPU)  ─► EncodeTiles (actors)  ─┴► Aggregator
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

import ray

from engine.cells import KIND_CELL, KIND_PLATELET
from engine.classes import DEEPHEME_CODES
from engine.config import Config
from engine.models import MissingWeights, create_model
from engine.pipeline.aggregate import Aggregator
from engine.pipeline.commit import OutputStore
from engine.pipeline.steps import (ClassifyCells, DetectCells, EncodeTiles, PlanSlide, ReadTiles,
                                   cell_tasks, tile_tasks)
from engine.schema import slide_id_for
from engine.slides.inventory import MppOverrides
from engine.slides.storage import FileEntry


@dataclass
class StagePlan:
    """Which stages run, which are skipped and why (printed, and recorded per slide)."""

    run: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    model_codes: tuple[str, ...] = ()
    encoder: bool = False
    mil: object = None  # the ABMIL cellularity model, when configured and embeddings exist


@dataclass
class RunMetrics:
    """Where a run's time went: wall seconds per phase and, per stage, summed busy seconds (from
    the ``_t_<stage>`` columns), items and actors. ``utilisation`` = busy / (actors x phase wall);
    the stage nearest 1 bounds its branch."""

    wall: dict[str, float] = field(default_factory=dict)       # plan, cells, tiles
    first: dict[str, float] = field(default_factory=dict)      # branch -> s to its first batch
    busy: dict[str, float] = field(default_factory=dict)       # detect, classify, read, encode
    items: dict[str, int] = field(default_factory=dict)        # cell_tiles, cells, tiles
    actors: dict[str, int] = field(default_factory=dict)
    phase: dict[str, str] = field(default_factory=dict)        # stage -> its branch
    _started: dict[str, float] = field(default_factory=dict, repr=False)

    def add_wall(self, phase: str, seconds: float) -> None:
        self.wall[phase] = self.wall.get(phase, 0.0) + seconds

    def add_batch(self, batch: dict) -> None:
        for key, values in batch.items():
            if key.startswith("_t_"):
                self.busy[key[3:]] = self.busy.get(key[3:], 0.0) + float(np.sum(values))

    def count(self, name: str, n: int) -> None:
        self.items[name] = self.items.get(name, 0) + int(n)

    def utilisation(self) -> dict[str, float]:
        return {s: round(b / max(self.actors.get(s, 1), 1) / self.wall[self.phase[s]], 3)
                for s, b in self.busy.items() if self.wall.get(self.phase.get(s, ""), 0) > 0}

    def startup_share(self) -> dict[str, float]:
        """Per branch, the share of its wall time spent before its first batch came out (actor
        start-up: imports, CUDA, model loading)."""
        return {ph: round(t / self.wall[ph], 3) for ph, t in self.first.items()
                if self.wall.get(ph)}

    def bounding(self) -> dict[str, str]:
        """Per branch, the stage with the highest utilisation, or ``startup`` where waiting for
        the first batch took a larger share of the wall time than any stage was busy."""
        out: dict[str, tuple[float, str]] = {}
        for stage, u in self.utilisation().items():
            ph = self.phase[stage]
            if u > out.get(ph, (-1.0, ""))[0]:
                out[ph] = (u, stage)
        for ph, share in self.startup_share().items():
            if share > out.get(ph, (-1.0, ""))[0]:
                out[ph] = (share, "startup")
        return {ph: s for ph, (_, s) in out.items()}

    def first_batch(self, phase: str, t0: float) -> None:
        """Call with every batch of a branch started at ``t0``; counts the wait for its first."""
        if self._started.get(phase) != t0:
            self._started[phase] = t0
            self.first[phase] = self.first.get(phase, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict:
        return {"wall_s": {k: round(v, 2) for k, v in self.wall.items()},
                "busy_s": {k: round(v, 2) for k, v in self.busy.items()},
                "items": dict(self.items), "actors": dict(self.actors),
                "utilisation": self.utilisation(), "startup_share": self.startup_share(),
                "bounding_stage": self.bounding()}

    def line(self) -> str:
        u = self.utilisation()
        parts = [f"{ph} {w:.1f} s" for ph, w in self.wall.items()]
        parts += [f"{s} {u[s]:.0%} busy on {self.actors.get(s, 1)}" for s in u]
        parts += [f"{ph} start-up {v:.0%}" for ph, v in self.startup_share().items()]
        return "time: " + "; ".join(parts)


def resolve_stages(cfg: Config, allow_untrained: bool) -> StagePlan:
    """Decide the stages from the config and the weights that exist.

    Raises:
        MissingWeights: the cell classifier has no weights and ``allow_untrained`` is False (a
            differential from an untrained model would be meaningless).
    """
    plan = StagePlan()
    pc = cfg.pipeline
    stages = pc.stages
    if "cells" in stages:
        c = cfg.pipeline.classifier
        model = create_model(c.model, c.checkpoint, allow_untrained=allow_untrained,
                             storage=cfg.storage, class_codes=DEEPHEME_CODES)
        plan.model_codes = model.class_codes
        plan.run += ["cell_detection", f"cell_classification:{c.model}", "differential"]
        if not model.trained:
            plan.run[-2] += " (UNTRAINED)"
    if "tiles" in stages:
        plan.run += ["tiles", "cellularity:image_analysis"]
        e = cfg.pipeline.encoder
        try:
            enc = create_model(e.model, e.checkpoint, allow_untrained=allow_untrained,
                               storage=cfg.storage)
            plan.encoder = True
            plan.run.append(f"tile_embedding:{e.model}" + ("" if enc.trained
                                                           else " (UNTRAINED)"))
        except MissingWeights as err:
            plan.skipped["tile_embedding"] = str(err)
        if not pc.cellularity_checkpoint:
            plan.skipped["cellularity:abmil"] = "no ABMIL checkpoint configured " \
                "(pipeline.cellularity_checkpoint)"
        elif not plan.encoder:
            plan.skipped["cellularity:abmil"] = "needs tile embeddings, and the encoder is skipped"
        else:
            from engine.models.mil import load_mil

            plan.mil, _ = load_mil(pc.cellularity_checkpoint, cfg.storage)
            plan.run.append("cellularity:abmil")
    return plan


def _actors(n: int) -> ray.data.ActorPoolStrategy:
    return ray.data.ActorPoolStrategy(size=max(1, n))


def _chunks(items: list, n: int):
    for i in range(0, len(items), max(n, 1)):
        yield items[i : i + n]


def run_pipeline(entries: list[FileEntry], output: str, cfg: Config, mpp: MppOverrides,
                 allow_untrained: bool = False, log=print,
                 metrics: RunMetrics | None = None) -> list[dict]:
    """Process every entry not yet committed under ``output``; returns the new status rows.

    ``metrics``, when given, is filled with where the time went (``RunMetrics``)."""
    metrics = metrics if metrics is not None else RunMetrics()
    stages = resolve_stages(cfg, allow_untrained)
    for name, why in stages.skipped.items():
        log(f"stage skipped: {name}: {why}")
    store = OutputStore(output, cfg.storage)
    cleaned = store.clean_partial()
    if cleaned:
        log(f"removed partial outputs of {len(cleaned)} uncommitted slide(s)")
    done = store.committed()
    pending = [e for e in entries if slide_id_for(e.uri) not in done]
    log(f"{len(entries)} slide(s): {len(entries) - len(pending)} already committed, "
        f"{len(pending)} to process")
    agg = Aggregator(store, cfg.hash(), stages.run, sorted(stages.skipped), stages.model_codes,
                     cfg.pipeline.min_nucleated, log, mil=stages.mil,
                     mil_bags=(cfg.pipeline.cellularity_bags, cfg.pipeline.cellularity_bag_size))
    if not pending:
        return agg.summary
    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) > 0
    cpus = int(resources.get("CPU", 1))
    pc = cfg.pipeline
    readers = pc.read_concurrency or max(1, cpus - 1)
    metrics.actors.update(detect=readers, read=readers, classify=pc.classifier.concurrency,
                          encode=pc.encoder.concurrency)
    metrics.phase.update(detect="cells", classify="cells", read="tiles", encode="tiles")
    for chunk in _chunks(pending, pc.slides_per_chunk):
        items = [{"uri": e.uri, "size": e.size, "etag": e.etag} for e in chunk]
        t0 = time.perf_counter()
        planned = (ray.data.from_items(items)
                   .map(PlanSlide, fn_constructor_args=(cfg, mpp),
                        compute=_actors(min(len(items), readers)), num_cpus=1)
                   .take_all())
        ctasks, ttasks = [], []
        for row in planned:
            plan = json.loads(row["plan"])
            n = {}
            if plan["status"] == "ok":
                if "cells" in plan["plans"]:
                    ct = cell_tasks(row["slide_id"], row["uri"], plan)
                    ctasks += ct
                    n["cells"] = len(ct)
                if "tiles" in plan["plans"]:
                    tt = tile_tasks(row["slide_id"], row["uri"], plan)
                    ttasks += tt
                    n["tiles"] = len(tt)
            agg.add_plan(row["slide_id"], row["uri"], plan, n)
        metrics.add_wall("plan", time.perf_counter() - t0)
        if ctasks:
            t0 = time.perf_counter()
            metrics.count("cell_tiles", len(ctasks))
            c = pc.classifier
            ds = (ray.data.from_items(ctasks)
                  .map_batches(DetectCells, fn_constructor_args=(cfg,),
                               batch_size=pc.read_batch_size, compute=_actors(readers), num_cpus=1)
                  .map_batches(ClassifyCells,
                               fn_constructor_args=(c.model, c.checkpoint, allow_untrained,
                                                    c.tta, cfg.storage, c.compile),
                               batch_size=c.batch_size, compute=_actors(c.concurrency),
                               num_gpus=c.num_gpus if gpus else 0,
                               num_cpus=0 if gpus else 1))
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                metrics.first_batch("cells", t0)
                metrics.add_batch(batch)
                metrics.count("cells", np.isin(batch["kind"], (KIND_CELL, KIND_PLATELET)).sum())
                agg.add_cells(batch)
            metrics.add_wall("cells", time.perf_counter() - t0)
        if ttasks:
            t0 = time.perf_counter()
            e = pc.encoder
            ds = ray.data.from_items(ttasks).map_batches(
                ReadTiles, fn_constructor_args=(cfg, stages.encoder, pc.read_threads),
                batch_size=pc.read_batch_size * 4, compute=_actors(readers), num_cpus=1)
            if stages.encoder:
                ds = ds.map_batches(EncodeTiles, fn_constructor_args=(
                    e.model, e.checkpoint, allow_untrained, cfg.storage, e.compile),
                    batch_size=e.batch_size, compute=_actors(e.concurrency),
                    num_gpus=e.num_gpus if gpus else 0, num_cpus=0 if gpus else 1)
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                metrics.first_batch("tiles", t0)
                metrics.add_batch(batch)
                metrics.count("tiles", len(batch["task"]))
                agg.add_tiles(batch)
            metrics.add_wall("tiles", time.perf_counter() - t0)
        if agg.slides:  # every task reported, so nothing may remain open
            raise RuntimeError(f"slides left uncommitted: {sorted(agg.slides)}")
    return agg.summary
