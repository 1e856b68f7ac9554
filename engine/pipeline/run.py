"""``process_slides`` on Ray Data: two streams over the slides, one per branch, each planning
slides on workers and streaming tiles through CPU actors and model actors; the driver assembles
and commits each slide when both have delivered it.

    entries ─► PlanTasks(cells) ─► DetectCells (CPU) ─► ClassifyCells (model) ─┐
    entries ─► PlanTasks(tiles) ─► ReadTiles (CPU)   ─► EncodeTiles (model)  ─┴► Aggregator
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import numpy as np

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.cells import KIND_CELL, KIND_PLATELET
from engine.classes import DEEPHEME_CODES
from engine.config import NO_MODEL, Config, ConfigError
from engine.errors import (HUNG_IN_A_ROW, HemeflowError, MissingWeights, StorageStalled,
                           storage_stalled)
from engine.pipeline.address import (check_ray_address, keep_sigterm_handler,
                                     no_ray_init_again, quiet_ray_noise)
from engine.pipeline.aggregate import Aggregator
from engine.pipeline.commit import OutputStore
from engine.pipeline.progress import duration
from engine.pipeline.steps import (READY_PREFIXES, Attempts, ClassifyCells, DetectCells,
                                   Earlier, EncodeTiles, PlanTasks, ReadTiles, crashed_plan)
from engine.schema import slide_id_for
from engine.slides.dicom import SERIES_TAG, series_changed
from engine.slides.inventory import MppOverrides
from engine.slides.storage import (FileEntry, StagingArea, changed_since_listed, is_remote,
                                   on_network_filesystem)
from engine.specimen import UNKNOWN, Specimens, branches_for
from engine.stain import StainCheck
from engine.watchdog import stop_grace_s


@dataclass
class StagePlan:
    """Which stages run, which are skipped and why (printed, and recorded per slide)."""

    run: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    model_codes: tuple[str, ...] = ()
    stain: object = None  # the classifier's training stain check (`engine.stain.StainCheck`)
    encoder: bool = False
    mil: object = None  # the ABMIL cellularity model, when configured and embeddings exist
    cpu_models: frozenset = frozenset()  # branches whose model runs on CPU even beside GPUs
    notes: list[str] = field(default_factory=list)  # said once at the start, not per slide


@dataclass
class RunMetrics:
    """Where a run's time went: wall seconds per phase and, per stage, summed busy seconds (from
    the ``_t_<stage>`` columns), items and actors. ``utilisation`` = busy / (actors x phase wall);
    the stage nearest 1 bounds its branch. ``actors`` are each pool's starting size: a CPU pool
    that grew once the other branch finished can show more than 1."""

    wall: dict[str, float] = field(default_factory=dict)       # cells, tiles (concurrent)
    first: dict[str, float] = field(default_factory=dict)      # branch -> s to its first batch
    first_items: dict[str, int] = field(default_factory=dict)  # items in first batches
    busy: dict[str, float] = field(default_factory=dict)       # plan_<branch>, detect, classify,
    #                                                            read, encode
    items: dict[str, int] = field(default_factory=dict)        # cell_tiles, cells, tiles
    actors: dict[str, int] = field(default_factory=dict)
    phase: dict[str, str] = field(default_factory=dict)        # stage -> its branch
    ready: dict[str, list[float]] = field(default_factory=dict)  # stage -> [first, last] time
    #                                                            an actor of it was ready
    init: dict[str, float] = field(default_factory=dict)       # stage -> longest constructor
    warmup: dict[str, float] = field(default_factory=dict)     # stage -> longest model warm-up
    imports: dict[str, float] = field(default_factory=dict)    # ... its model code's imports
    load: dict[str, float] = field(default_factory=dict)       # ... making it, onto its device
    t_start: float = field(default_factory=time.time)          # the run's start (epoch s)
    _started: dict[str, float] = field(default_factory=dict, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_wall(self, phase: str, seconds: float) -> None:
        self.wall[phase] = self.wall.get(phase, 0.0) + seconds

    def add_batch(self, batch: dict) -> None:
        for key, values in batch.items():
            if key.startswith("_t_"):
                self.busy[key[3:]] = self.busy.get(key[3:], 0.0) + float(np.sum(values))
            elif key.startswith(READY_PREFIXES):
                stamped = np.asarray(values, np.float64)
                stamped = stamped[stamped > 0]  # 0: a row that does not carry it
                if not stamped.size:
                    continue
                stage = key[3:]
                longest = {"_i_": self.init, "_w_": self.warmup, "_m_": self.imports,
                           "_l_": self.load}.get(key[:3])
                if longest is not None:
                    longest[stage] = max(longest.get(stage, 0.0), float(stamped.max()))
                else:
                    lo, hi = self.ready.get(stage, [np.inf, -np.inf])
                    self.ready[stage] = [min(lo, float(stamped.min())),
                                         max(hi, float(stamped.max()))]

    def ready_s(self) -> dict[str, list[float]]:
        """Per stage, seconds from the run's start until its first and its last actor (of
        those that delivered a batch) had finished starting: process, imports, constructor."""
        return {s: [round(lo - self.t_start, 1), round(hi - self.t_start, 1)]
                for s, (lo, hi) in self.ready.items()}

    def count(self, name: str, n: float) -> None:
        self.items[name] = self.items.get(name, 0) + n

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

    def first_batch(self, phase: str, t0: float) -> bool:
        """Call with every batch of a branch started at ``t0``; counts the wait for its first
        and says whether this is it."""
        if self._started.get(phase) != t0:
            self._started[phase] = t0
            self.first[phase] = self.first.get(phase, 0.0) + time.perf_counter() - t0
            return True
        return False

    def as_dict(self) -> dict:
        return {"wall_s": {k: round(v, 2) for k, v in self.wall.items()},
                "busy_s": {k: round(v, 2) for k, v in self.busy.items()},
                "items": {k: round(v) for k, v in self.items.items()},
                "actors": dict(self.actors),
                "utilisation": self.utilisation(), "startup_share": self.startup_share(),
                "startup_s": {k: round(v, 2) for k, v in self.first.items()},
                "first_batch_items": dict(self.first_items),
                "bounding_stage": self.bounding(), "actors_ready_s": self.ready_s(),
                "actor_init_s": {k: round(v, 1) for k, v in self.init.items()},
                "model_warmup_s": {k: round(v, 1) for k, v in self.warmup.items()},
                "model_import_s": {k: round(v, 1) for k, v in self.imports.items()},
                "model_load_s": {k: round(v, 1) for k, v in self.load.items()}}

    def line(self) -> str:
        u = self.utilisation()
        parts = [f"{ph} {w:.1f} s" for ph, w in self.wall.items()]
        parts += [f"{s} {u[s]:.0%} busy on {self.actors.get(s, 1)}" for s in u]
        parts += [f"{ph} start-up {v:.0%}" for ph, v in self.startup_share().items()]
        ready = self.ready_s()
        if ready:
            parts.append("actors ready by " + ", ".join(f"{s} {hi:.1f} s"
                                                         for s, (_, hi) in ready.items()))
        for s, init in self.init.items():  # a model actor's start, where it went
            if s in self.imports or s in self.load:
                parts.append(f"{s} started in {init:.1f} s (imports {self.imports.get(s, 0):.1f}"
                             f", model {self.load.get(s, 0):.1f}, warm-up "
                             f"{self.warmup.get(s, 0):.1f})")
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
        # torch and timm, imported where a model is to be loaded: not for a job's --help, nor
        # for a driver whose stages load none (3-4 CPU-seconds)
        from engine.models import EnsemblePredictor, create_model

        c = cfg.pipeline.classifier
        members = [create_model(c.model, ckpt, allow_untrained=allow_untrained,
                                storage=cfg.storage, class_codes=DEEPHEME_CODES)
                   for ckpt in (c.checkpoint, *c.ensemble)]
        model = members[0]
        try:
            EnsemblePredictor.check(members)
        except ValueError as err:
            raise ConfigError(f"pipeline.classifier.ensemble: {err}") from err
        plan.model_codes = model.class_codes
        plan.stain = StainCheck.of(model.card, pc.max_stain_hue_deg,
                                   pc.min_stain_saturation_ratio)
        plan.run += ["cell_detection", f"cell_classification:{c.model}", "differential"]
        if len(members) > 1:
            plan.run[-2] += f" (ensemble of {len(members)})"
        if any(m.int8 is not None for m in members):  # int8 kernels are the CPU's
            plan.run[-2] += " (int8, CPU)"
            plan.cpu_models = frozenset({"cells"})
        if not all(m.trained for m in members):
            plan.run[-2] += " (UNTRAINED)"
        elif all(m.ood is None for m in members):
            plan.notes.append(
                f"the classifier's checkpoint ({c.checkpoint or 'the shipped reference'}) "
                "carries no feature density: no cell is checked against its training data "
                "(cells.ood_distance null, no slide flagged out of distribution; python -m "
                "jobs.fit_cell_ood gives it one, on 50 training images at least)")
    if "tiles" in stages:
        plan.run += ["tiles", "cellularity:image_analysis"]
        e = cfg.pipeline.encoder
        if e.ensemble:
            raise ConfigError("pipeline.encoder.ensemble: tile embeddings of different models "
                              "do not average; give one encoder checkpoint")
        if e.features:
            raise ConfigError("pipeline.encoder.features: a classifier setting (each cell's "
                              "features); the encoder's tile embeddings are always written")
        if e.model == NO_MODEL:  # tiles read for the label-free cellularity, not embedded
            plan.skipped["tile_embedding"] = f"pipeline.encoder.model is {NO_MODEL!r}"
        else:
            from engine.models import create_model

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

            plan.mil, card = load_mil(pc.cellularity_checkpoint, cfg.storage)
            if (card.get("instances") or "tiles") != "tiles":
                raise ConfigError(f"pipeline.cellularity_checkpoint: {pc.cellularity_checkpoint}"
                                  f" was trained on a slide's {card['instances']}, not its "
                                  "tile embeddings")
            plan.run.append("cellularity:abmil")
    return plan


@dataclass
class Resources:
    """Actor pools of both branches, sized so that all their minimums fit the cluster at once
    (two datasets run side by side and neither knows of the other)."""

    plan: dict[str, int]        # branch -> planning actors (0 CPUs: short, bursty work)
    readers: dict[str, int]     # branch -> CPU actors (detection, or reading + area masks)
    cpu: float                  # CPUs per CPU actor, and per model actor without GPUs
    gpu: dict[str, float]       # branch -> GPUs per model actor (0 without GPUs)
    models: dict[str, int]      # branch -> model actors
    host: dict[str, float]      # branch -> CPUs left free for a GPU model actor's host work


def cpu_classifier_note(cfg: Config, gpus: float, branches: tuple[str, ...],
                        stages: StagePlan) -> str | None:
    """What to say where the shipped classifier will run in floating point on a cluster
    without GPUs: its int8 build (`deepheme-resnext50-int8`) runs it 1.5-2.4x faster on the
    CPUs measured. None elsewhere."""
    c = cfg.pipeline.classifier
    if "cells" not in branches or gpus or "cells" in stages.cpu_models \
            or c.model != "deepheme-resnext50" or c.checkpoint or c.ensemble:
        return None
    return ("note: no GPU, so the cell classifier runs on the CPUs; its int8 build runs it "
            "1.5-2.4x faster there (pipeline.classifier.model: deepheme-resnext50-int8; README "
            "\"CPU-only nodes: int8\")")


def plan_resources(cpus: int, gpus: float, pc, branches: tuple[str, ...],
                   encoder: bool, n_slides: int,
                   cpu_models: frozenset = frozenset()) -> Resources:
    """CPU actors take what the model actors leave: on a GPU node all but one CPU (the
    driver's), the ``host_cpus`` of each model actor on a GPU (as many as fit beside one CPU
    actor per branch) and those of model actors that run on CPU (``cpu_models``: an int8
    classifier); both branches split them by ``pipeline.cells_cpu_share``. On a small CPU-only
    machine, where one actor per pool would not fit, every actor asks for a fraction of a CPU.
    Model actors on one GPU share it."""
    stage = {"cells": pc.classifier, "tiles": pc.encoder}
    models = {b: stage[b].concurrency if b == "cells" or encoder else 0 for b in branches}
    n_models = sum(models.values())
    on_cpu = {b for b in branches if not gpus or b in cpu_models}
    n_cpu_models = sum(models[b] for b in on_cpu)
    on_gpu = [b for b in branches if b not in on_cpu and models[b]]
    want = sum(stage[b].host_cpus * models[b] for b in on_gpu)
    spare = max(0, cpus - (1 if gpus else 0) - n_cpu_models - len(branches))
    scale = min(1.0, spare / want) if want else 0.0
    host = {b: stage[b].host_cpus * scale if b in on_gpu else 0.0 for b in branches}
    kept = sum(host[b] * models[b] for b in on_gpu)
    total = pc.read_concurrency or max(len(branches), int(cpus - (1 if gpus else 0)
                                                          - n_cpu_models - kept))
    total = max(total, len(branches))
    readers = {b: total for b in branches}
    if len(branches) == 2:
        readers["cells"] = min(total - 1, max(1, round(total * pc.cells_cpu_share)))
        readers["tiles"] = total - readers["cells"]
    needed = total + n_cpu_models
    cpu = min(1.0, cpus / max(needed, 1))
    gpu = {b: 0.0 if b in on_cpu else min(stage[b].num_gpus,
                                          gpus / max(n_models - n_cpu_models, 1))
           for b in branches}
    plan = {b: max(1, min(n_slides, readers[b] // 2)) for b in branches}
    return Resources(plan, readers, cpu, gpu, models, host)


def host_bundles(res: Resources, branches: tuple[str, ...]) -> list[dict[str, float]]:
    """One placement-group bundle per model actor on a GPU that keeps host CPUs: its share of
    a GPU and its ``host_cpus`` (`plan_resources`), to be held on one node."""
    return [{"GPU": res.gpu[b], "CPU": res.host[b]} for b in branches
            for _ in range(res.models[b]) if res.gpu[b] and res.host[b]]


def reserve_host_cpus(res: Resources, branches: tuple[str, ...], timeout_s: float = 600.0):
    """A placement group of `host_bundles`, ready before any actor starts (None without
    bundles): the model actors start inside it, so the CPUs `plan_resources` kept free for
    their host work lie on their GPU's node. Counting them cluster-wide only left them free
    somewhere: on a cluster of several nodes the CPU actors could take every core of a GPU
    node. A model actor outside one would have to ask Ray for its CPU, and could wait for
    ever on a node whose cores the CPU actors had taken first.

    Raises:
        HemeflowError: the cluster did not make room within ``timeout_s`` (an autoscaler
            still adding the GPU nodes the plan counted, or GPUs another job holds).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = host_bundles(res, branches)
    if not bundles:
        return None
    pg = placement_group(bundles, strategy="PACK", name="hemeflow-model-actors")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise HemeflowError(
            f"the cluster did not make room for the model actors within {timeout_s:.0f} s: "
            f"{bundles} (a GPU share and pipeline.*.host_cpus each, on one node). Are the "
            "GPU nodes up, and free of other jobs? host_cpus: 0 asks for no CPU")
    return pg


def actor_pool(n: int, grow_to: int | None = None, calls: int = 1) -> ray.data.ActorPoolStrategy:
    """A pool of ``n`` actors; with ``grow_to``, one that may grow to that many when CPUs come
    free (the other branch has finished and its actors are gone). ``calls``: Ray Data calls an
    actor takes at once, of which one runs the function at a time (the others fetch their
    input or store their output meanwhile)."""
    many = {"max_concurrent_calls_per_actor": calls} if calls > 1 else {}
    if not grow_to or grow_to <= n:
        return ray.data.ActorPoolStrategy(size=max(1, n), **many)
    return ray.data.ActorPoolStrategy(min_size=max(1, n), max_size=grow_to, **many)


def _chunks(items: list, n: int):
    n = n if n > 0 else max(len(items), 1)
    for i in range(0, len(items), n):
        yield items[i : i + n]


def slide_shards(n_slides: int, readers: int, most: int = 16) -> int:
    """Ways to split each slide's tasks so that ``n_slides`` give every CPU actor about two
    blocks: 1 for an archive with twice as many slides as actors, up to ``most`` for one slide.
    Each shard plans its slide again (a thumbnail and a few tiles), little next to its tasks."""
    return min(most, max(1, -(-2 * readers // max(n_slides, 1))))


NETWORK_READ_THREADS = 4  # `read_threads_for`: a reader's threads on a network file system


def read_threads_for(uris: list[str]) -> int:
    """``pipeline.read_threads`` 0's choice (auto) for slides at ``uris``: ``NETWORK_READ_THREADS``
    where one is read straight from a network file system (NFS, SMB, a FUSE mount:
    `engine.slides.storage.network_filesystem`), each of whose reads waits on a round trip
    (benchmarks/read_tiles.py --mount-latency-ms: x1.68 through a mount holding each read 2 ms);
    else 1, as the area masks hold the GIL (a local disk; an S3 slide, read from a local copy)."""
    return NETWORK_READ_THREADS if on_network_filesystem(uris) else 1


# the seconds between Ray Data's progress logs where stdout is no terminal (Ray's default: 10)
RAY_PROGRESS_INTERVAL_ENV = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"


def quiet_ray_data_progress() -> bool:
    """Turn Ray Data's progress off where stdout is no terminal (`ray job submit`'s logs, a
    batch script's file), unless ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` asks for it; True
    where turned off. There Ray logs each stream's state every 10 s, 9-11 lines a stream:
    6,500-8,000 lines an hour of a run's two streams, where the job's own lines (a line a
    slide, a progress line a minute) are what a lab reads. A terminal keeps Ray's bars."""
    if sys.stdout.isatty() or RAY_PROGRESS_INTERVAL_ENV in os.environ:
        return False
    ray.data.DataContext.get_current().enable_progress_bars = False
    # and its warning that they are off, which names a setting of the job's own process
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return True


def branch_dataset(branch: str, items: list[dict], cfg: Config, mpp: MppOverrides,
                   res: Resources, encoder: bool, allow_untrained: bool,
                   reserved=None, read_threads: int = 1, attempts=None) -> ray.data.Dataset:
    """One branch's stream: plan each slide, expand its tasks, then CPU and model actors;
    ``reserved``: `reserve_host_cpus`' placement group, where the model actors start;
    ``read_threads``: each tile reader's and cell detector's (`read_threads_for` where the
    config says 0); ``attempts``: the run's `Attempts` actor, which fails a slide whose plan
    keeps killing its process.

        cells: PlanTasks ─► DetectCells (CPU) ─► ClassifyCells (model)
        tiles: PlanTasks ─► ReadTiles (CPU)   ─► EncodeTiles (model, when it has weights)
    """
    pc = cfg.pipeline
    grow = sum(res.readers.values())  # a branch left alone takes the other's CPUs
    k = slide_shards(len(items), grow, pc.max_slide_shards)
    items = [{**item, "shard": i, "shards": k} for item in items for i in range(k)]
    ds = ray.data.from_items(items).flat_map(
        PlanTasks, fn_constructor_args=(cfg, mpp, branch, encoder, attempts),
        compute=actor_pool(res.plan[branch]),
        num_cpus=0)
    if branch == "cells":
        c = pc.classifier
        ds = ds.map_batches(DetectCells, fn_constructor_args=(cfg, read_threads, attempts),
                            batch_size=pc.read_batch_size,
                            compute=actor_pool(res.readers[branch], grow), num_cpus=res.cpu)
        return model_step(ds, ClassifyCells, (c.model, c.checkpoint, allow_untrained, c.tta,
                                              cfg.storage, c.compile, c.batch_size, c.ensemble,
                                              c.amp, c.threads, c.features, c.platelets,
                                              c.cuda_graphs),
                          c, res, branch, reserved)
    e = pc.encoder
    ds = ds.map_batches(ReadTiles, fn_constructor_args=(cfg, encoder, read_threads, attempts),
                        batch_size=pc.tile_read_batch_size,
                        compute=actor_pool(res.readers[branch], grow), num_cpus=res.cpu)
    if encoder:
        ds = model_step(ds, EncodeTiles, (e.model, e.checkpoint, allow_untrained, cfg.storage,
                                          e.compile, e.batch_size, e.amp, e.threads,
                                          e.cuda_graphs),
                        e, res, branch, reserved)
    return ds


def model_step(ds: ray.data.Dataset, step, args: tuple, stage, res: Resources, branch: str,
               reserved=None) -> ray.data.Dataset:
    """``ds`` through a pool of model actors (``step``: `ClassifyCells` or `EncodeTiles`;
    ``stage``: its `ModelStage` config), each taking whole blocks as Arrow tables: the actor
    reads the crops or tiles in place, where re-batching them to a row count, or into numpy,
    would copy each. The actor runs its own forward passes of ``batch_size`` rows.

    Ray Data's public ``map_batches`` refuses whole blocks (``batch_size=None``) to an actor
    that asks for GPUs, lest one batch overfill the GPU; ``map_batches_internal``, its
    developer API for the same call without that check (``map_groups`` uses it so), takes
    them. A model actor on a GPU takes its host CPUs inside ``reserved``, the placement group
    that holds them on its GPU's node (`reserve_host_cpus`); outside one (no host CPUs) it
    asks Ray for none, lest it wait for ever on a node whose cores the CPU actors took.
    """
    gpus = res.gpu[branch]
    extra, cpus = {}, 0.0 if gpus else res.cpu
    if reserved is not None and gpus and res.host[branch]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # (a Ray remote argument without a named parameter in map_batches: revisit when
        # Ray Data drops them, 2.64 by its deprecation warning)
        extra["scheduling_strategy"] = PlacementGroupSchedulingStrategy(reserved)
        cpus = res.host[branch]
    return ds.map_batches_internal(
        step, fn_constructor_args=args, batch_size=None, batch_format="pyarrow",
        compute=actor_pool(stage.concurrency, calls=stage.calls_in_flight),
        num_gpus=gpus, num_cpus=cpus, **extra)


def _consume(branch: str, ds: ray.data.Dataset, agg: Aggregator, metrics: RunMetrics,
             stop: threading.Event) -> None:
    t0 = time.perf_counter()
    add = agg.add_cells if branch == "cells" else agg.add_tiles
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        if stop.is_set():  # the other branch failed, or the job is stopped: leave, which
            break  # shuts this stream down
        with metrics.lock:
            first = metrics.first_batch(branch, t0)
            metrics.add_batch(batch)
            if branch == "cells":
                # a task's rows may span batches: each counts 1 / the rows of its task
                share = 1.0 / np.maximum(batch["n_in_task"], 1)
                metrics.count("cell_tiles", float(np.sum(share[batch["task"] >= 0])))
                n = int(np.isin(batch["kind"], (KIND_CELL, KIND_PLATELET)).sum())
                name = "cells"
            else:
                n, name = int(np.sum(batch["task"] >= 0)), "tiles"
            metrics.count(name, n)
            if first:  # what came with the start-up, for steady-state rates
                metrics.first_items[name] = metrics.first_items.get(name, 0) + n
        add(batch)
    with metrics.lock:
        metrics.add_wall(branch, time.perf_counter() - t0)


def slow_worker_start(module: str = "torch") -> str | None:
    """Why a local Ray's workers would start slowly, or None: ``PYTHONDONTWRITEBYTECODE`` is
    set and ``module`` (torch) was installed without its bytecode (the set-up's
    ``--no-compile``), so each worker compiles torch, Ray and timm from source as it starts,
    and keeps none of it (on a 2-core machine, importing the three took 12.6 s this way and
    5.3 s with their bytecode)."""
    import importlib.util

    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return None
    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec else None
    if not origin or not origin.endswith(".py") or \
            os.path.exists(importlib.util.cache_from_source(origin)):
        return None
    return (f"PYTHONDONTWRITEBYTECODE is set and {module} has no compiled bytecode: every Ray "
            f"worker compiles it from source as it starts (seconds each); unset it for one run "
            f"(env -u PYTHONDONTWRITEBYTECODE ...) and Python keeps the bytecode")


def run_pipeline(entries: list[FileEntry], output: str, cfg: Config, mpp: MppOverrides,
                 allow_untrained: bool = False, log=print,
                 metrics: RunMetrics | None = None,
                 specimens: Specimens | None = None,
                 cases: dict[str, str] | None = None, listed_now: bool = True,
                 series_beside: dict[str, list[FileEntry]] | None = None) -> list[dict]:
    """Process every entry not yet committed under ``output``; returns the new status rows.
    ``listed_now``: the entries' sizes and ETags are a listing's made for this run, so a slide
    whose file differs from its entry as it commits changed as it was read (`Aggregator`:
    ``SlideBeingWritten``); not so for an inventory's table, which gives its own.
    ``series_beside``: by the URI of each DICOM series read through one of its files, the
    files named like DICOM listed beside it, so that one of them written as the slide was read
    counts as its change (`engine.slides.dicom.series_changed`).
    ``specimens``: each slide's specimen type, which decides the stages that apply to it
    (`engine.specimen`; unknown for all when None). ``cases``: the case each slide belongs
    to, by URI, recorded in its slides row (none where missing).

    Each branch (cells, tiles) is one dataset over the pending slides (or over each
    ``pipeline.slides_per_chunk`` of them), so its model actors load once; both run at once,
    each consumed on its own thread into one ``Aggregator``. ``metrics``, when given, is filled
    with where the time went (``RunMetrics``)."""
    metrics = metrics if metrics is not None else RunMetrics()
    metrics.t_start = time.time()
    stages = resolve_stages(cfg, allow_untrained)
    for name, why in stages.skipped.items():
        log(f"stage skipped: {name}: {why}")
    for note in stages.notes:
        log(note)
    store = OutputStore(output, cfg.storage)
    cleaned = store.clean_partial()
    if cleaned:
        log(f"removed partial outputs of {len(cleaned)} uncommitted slide(s)")
    if note := store.foreign_note():
        log(note)
    done = store.committed()
    pending = [e for e in entries if slide_id_for(e.uri) not in done]
    # how a slide's file changed since it was listed: a series' digest is no object's ETag
    listed = {e.uri: dataclasses.replace(e, etag=None) if (e.etag or "").startswith(SERIES_TAG)
              else e for e in pending}
    log(f"{len(entries)} slide(s): {len(entries) - len(pending)} already committed, "
        f"{len(pending)} to process")
    specimens = specimens or Specimens()
    kinds = collections.Counter(specimens.of(e.uri) for e in pending)
    if kinds:
        log("specimen types: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            + (" (every configured stage runs on these, and their cell detection looks for no "
               "nuclei paler than the threshold, which smears need: give --specimen or a "
               "specimen column)" if UNKNOWN in kinds else ""))
    pc = cfg.pipeline
    configured = tuple(b for b in ("cells", "tiles") if b in pc.stages)
    # only the branches some pending slide takes: an archive of sections starts no classifier
    # and gives the tile readers every CPU (slides no branch applies to still pass through
    # the configured ones, to be committed as skipped)
    needed = {b for k in kinds for b in branches_for(k, configured, stages.encoder)}
    branches = tuple(b for b in configured if b in needed) or configured
    read_threads = pc.read_threads or read_threads_for([e.uri for e in pending])
    if read_threads > 1 and not pc.read_threads:
        log(f"slides read from a network file system: {read_threads} threads per tile "
            "reader and cell detector, each read a round trip (pipeline.read_threads 0: auto)")
    for b in sorted(set(configured) - set(branches)):
        log(f"branch {b}: not run, no slide to process takes it ("
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")")
    agg = Aggregator(store, cfg.hash(), stages.run, sorted(stages.skipped), stages.model_codes,
                     pc.min_nucleated, branches, log, mil=stages.mil,
                     mil_bags=(pc.cellularity_bags, pc.cellularity_bag_size),
                     max_ood_percent=pc.max_ood_percent, embeddings=stages.encoder,
                     max_out_of_focus_percent=pc.max_out_of_focus_percent,
                     count_out_of_focus=pc.count_out_of_focus,
                     red_cell_diameter_um=pc.red_cell_diameter_um,
                     lobe_merge_um=pc.lobe_merge_um, stain=stages.stain,
                     write_threads=cfg.storage.write_threads, total=len(pending),
                     changed=functools.partial(_changed, listed, series_beside or {},
                                               cfg.storage) if listed_now else None)
    try:
        _run_branches(agg, pending, cfg, mpp, metrics, specimens, cases, stages, branches,
                      allow_untrained, log, read_threads)
    except BaseException:
        agg.close(raise_failed=False)  # the writes under way finish; the first error stands
        raise
    agg.close()  # the writes under way finish, or the first that failed is raised
    return agg.summary


def _changed(listed: dict[str, FileEntry], beside: dict[str, list[FileEntry]], storage,
             uri: str) -> str | None:
    """How the slide at ``uri`` changed since ``listed`` (its entry) says, or None (the
    `Aggregator`'s ``changed``): a DICOM series' by its files (``beside``)."""
    if uri not in listed:
        return None
    if uri in beside:
        return series_changed(listed[uri], beside[uri], storage)
    return changed_since_listed(listed[uri], storage)


# how long a run stopped on a storage that stopped answering (`stop_if_stalled`) waits for
# its streams: their reads are known to hang, and a batch that comes after the stop is not
# committed anyway (`_consume`), so the whole `stop_grace_s` only kept the job 8 s longer
STALLED_GRACE_S = 2.0


def end_streams() -> int:
    """Shut down the Ray Data streams this process runs (a job's process runs its own only),
    each with its operators' actors; returns how many. A stream is an executor thread named
    ``StreamingExecutor-<dataset>``; once shut down it marks its output finished, and a
    consumer waiting on its next batch (`_consume`), which a read that hangs would have held
    for ever, sees the stream end and returns. Left running, a stopped job's stream went on
    calling Ray from its thread after the exit had shut Ray down, and Ray ended the process
    with exit code 1 ("The core worker has already been shutdown"), the job's own code (2,
    130, 143) lost."""
    import inspect

    # force: the actors are killed, a read that hangs with them; with a reason, Ray Data logs
    # the stream as failed, not "finished in N seconds" (each where Ray takes it)
    wanted = {"force": True, "exception": RuntimeError("stopped while a read that hangs held it")}
    ended = 0
    for thread in threading.enumerate():
        shutdown = getattr(thread, "shutdown", None)
        if not thread.name.startswith("StreamingExecutor-") or not callable(shutdown):
            continue
        try:
            takes = inspect.signature(shutdown).parameters
            shutdown(**{k: v for k, v in wanted.items() if k in takes})
            ended += 1
        except Exception as err:  # noqa: BLE001 - the stop goes on; the stream is left
            logging.getLogger(__name__).warning("could not end stream %s: %s", thread.name, err)
    return ended


def _on_daemon(name: str, fn, *args) -> Future:
    """``fn(*args)`` on a daemon thread, as a future. A stopped run (Ctrl-C, SIGTERM) waits
    `engine.watchdog.stop_grace_s` for its branches' streams to end at their next batch, then
    goes: a stream whose next batch a hung read holds (a slide on a stalled mount) kept the job,
    Ctrl-C and all, until that read returned, or for ever. What it left half written is no
    commit."""
    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the future's reader
                future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class StallReport:
    """A line, at most every ``after_s``, while no slide of the run has committed for
    ``after_s`` (`check`, called each second). A run held by a slide whose reading hangs (a
    decoder in a loop, a stalled network mount) said nothing at all until someone looked; it
    now says so, naming the reads under way longest. ``oldest``: those reads, each
    ``(what, seconds)`` (the run's `Attempts`, where the crash guard counts them); with it, a
    run none of whose reads has gone on that long is slow, not held, and nothing is said
    (one long slide, its reads coming and going). ``timeout_s``: when such a read is ended
    (`engine.pipeline.steps.attempt`; 0: never), which the line says."""

    LOOK_AGAIN_S = 60.0  # at most, after a look that found no read held so long

    def __init__(self, after_s: float, oldest=None, clock=time.monotonic, timeout_s: float = 0.0):
        self.after_s, self.oldest, self.clock = after_s, oldest, clock
        self.timeout_s = timeout_s
        self.count, self.since, self.next = -1, clock(), 0.0

    def check(self, committed: int) -> str | None:
        """The line due now, if any; ``committed``: the run's slides committed so far."""
        now = self.clock()
        if committed != self.count:
            self.count, self.since, self.next = committed, now, now + self.after_s
            return None
        if not self.after_s or now < self.next:
            return None
        oldest = []
        if self.oldest is not None:
            try:
                oldest = self.oldest()
            except Exception:  # noqa: BLE001 - a report, not the run: said without them
                oldest = []
            if not any(s >= self.after_s for _, s in oldest):
                self.next = now + min(self.LOOK_AGAIN_S, self.after_s / 4)  # slow, not held
                return None
        self.next = now + self.after_s
        under_way = "; ".join(f"{what} for {duration(s)}" for what, s in oldest)
        ended = (f" until its read has gone on {duration(self.timeout_s)} (then it fails "
                 "SlideReadTimeout: pipeline.read_timeout_minutes); to go on sooner"
                 if self.timeout_s else "")
        return (f"warning: no slide committed for {duration(now - self.since)}"
                + (f"; under way longest: {under_way}" if under_way else "")
                + ". A slide whose reading hangs (a decoder in a loop, a stalled network "
                f"mount) holds the run{ended}: stop it (Ctrl-C or `ray job stop`: what is "
                "committed stays) and run again without that slide")


def stop_if_stalled(attempts, agg: Aggregator, items: list[dict], timeout_s: float) -> None:
    """Raise `engine.errors.StorageStalled` where the run's `Attempts` found
    ``HUNG_IN_A_ROW`` slides to hang, no read ending since the first: a mount that stopped
    answering, where each slide left would hang as long, the run going on for days (a slide's
    failure reaches the driver only with its branch's next batch, so the slides' rows would
    tell it late). Every slide found to hang (of ``items``, the chunk's) is committed failed
    first (`Aggregator.fail_held`): a plain rerun goes on without them, and
    ``--retry-failed`` reads them again."""
    try:
        hung = ray.get(attempts.hung_unanswered.remote(), timeout=10)
        if len(hung) < HUNG_IN_A_ROW:
            return
        every = ray.get(attempts.hung.remote(), timeout=10)
    except (ray.exceptions.RayError, TimeoutError):  # asked again in 5 s
        return
    by_name = {k: it for it in items for k in (it["uri"], slide_id_for(it["uri"]))}
    for name in every:  # a plan's slide is its URI; a read's, its slide id
        if (item := by_name.get(name)) is not None:
            planned = crashed_plan(item, Earlier(died=1, hung_s=timeout_s))
            agg.fail_held(planned["slide_id"], planned["plan"])
    raise storage_stalled(hung)


def _run_branches(agg: Aggregator, pending: list[FileEntry], cfg: Config, mpp: MppOverrides,
                  metrics: RunMetrics, specimens: Specimens, cases: dict[str, str] | None,
                  stages, branches: tuple[str, ...], allow_untrained: bool, log,
                  read_threads: int = 1) -> None:
    """`run_pipeline`'s streams: each chunk of the pending slides through its branches, on a
    local Ray or the cluster's."""
    pc = cfg.pipeline
    if not pending or not branches:
        return
    quiet_ray_noise()
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS") and (why := slow_worker_start()):
            log(f"warning: {why}")  # a local Ray's workers take this process's environment
        check_ray_address()
        with keep_sigterm_handler():
            ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    quiet_ray_data_progress()
    resources = ray.cluster_resources()
    res = plan_resources(int(resources.get("CPU", 1)), resources.get("GPU", 0), pc, branches,
                         stages.encoder, min(len(pending), pc.slides_per_chunk or len(pending)),
                         stages.cpu_models)
    if note := cpu_classifier_note(cfg, resources.get("GPU", 0), branches, stages):
        log(note)
    for b in branches:
        cpu_stage, model_stage = ("detect", "classify") if b == "cells" else ("read", "encode")
        metrics.actors.update({f"plan_{b}": res.plan[b], cpu_stage: res.readers[b],
                               model_stage: res.models[b]})
        metrics.phase.update({f"plan_{b}": b, cpu_stage: b, model_stage: b})
    stop = threading.Event()
    reserved = reserve_host_cpus(res, branches)
    # a slide that kills its reader fails, where Ray retried it for ever. On the driver's node,
    # whose loss ends the run anyway: on a worker node it would die with that node's actors
    attempts = ray.remote(num_cpus=0)(Attempts).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote() \
        if pc.crash_guard else None
    stall = StallReport(60.0 * pc.stall_minutes, None if attempts is None else
                        lambda: ray.get(attempts.oldest.remote(), timeout=10),
                        timeout_s=0.0 if attempts is None else 60.0 * pc.read_timeout_minutes)
    asked = itertools.count(1)  # the loop's seconds, for `stop_if_stalled`
    try:
        for chunk in _chunks(pending, pc.slides_per_chunk):
            items = [{"uri": e.uri, "size": e.size, "etag": e.etag,
                      "specimen": specimens.of(e.uri), "case": (cases or {}).get(e.uri)}
                     for e in chunk]
            futures = [_on_daemon(f"branch-{b}", _consume, b,
                                  branch_dataset(b, items, cfg, mpp, res, stages.encoder,
                                                 allow_untrained, reserved, read_threads,
                                                 attempts),
                                  agg, metrics, stop) for b in branches]
            try:
                running = set(futures)
                while running:  # woken each second: a signal's handler runs only then,
                    done, running = wait(running, timeout=1.0,  # in this thread
                                         return_when=FIRST_COMPLETED)
                    if any(f.exception() is not None for f in done):
                        stop.set()
                    if line := stall.check(len(agg.summary)):
                        log(line)
                    if attempts is not None and next(asked) % 5 == 0:  # each 5 s
                        stop_if_stalled(attempts, agg, items, 60.0 * pc.read_timeout_minutes)
            except BaseException as err:  # Ctrl-C, SIGTERM, a stalled storage: the streams
                stop.set()  # end at their next batch, which a read that hangs never brings
                grace = stop_grace_s()
                if isinstance(err, StorageStalled):  # its reads are known to hang
                    grace = min(grace, STALLED_GRACE_S)
                _, held = wait(futures, timeout=grace)
                if held:  # a read that hangs holds their next batch: end their streams
                    ended = end_streams()
                    _, held = wait(held, timeout=grace)
                    log(f"ended {ended} stream(s) of branch(es) held by a read that hangs"
                        + (f"; stopping without {len(held)} whose threads go on" if held
                           else ""))
                    if held:  # their streams' own shutdown, later, would log tracebacks
                        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
                        no_ray_init_again()  # their threads, once Ray has shut down at exit
                raise
            for f in futures:
                f.result()  # re-raise the first failure, once both threads have ended
            agg.flush()  # every slide of the chunk written and committed
            seen = {slide_id_for(e.uri) for e in chunk}
            left = sorted(agg.slides) + sorted(seen - {s["slide_id"] for s in agg.summary})
            if left:  # every task reported, so nothing may remain open
                raise RuntimeError(f"slides left uncommitted: {sorted(set(left))}")
    finally:
        if reserved is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(reserved)
    if cfg.storage.stage_shared and any(is_remote(e.uri) for e in pending):
        # kept after a crash, so that the rerun finds the slides already staged
        log(f"staging: removed {purge_staging(cfg.storage)} staged slide copies")


@ray.remote(num_cpus=0)
def _purge_node(storage) -> int:
    return StagingArea(storage).purge()


def purge_staging(storage, timeout_s: float = 30.0) -> int:
    """Empty the staging folder of every alive node, best effort (a copy in use stays)."""
    refs = [_purge_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(storage) for n in ray.nodes() if n["Alive"]]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    removed = 0
    for ref in ready:
        try:
            removed += ray.get(ref)
        except ray.exceptions.RayError:  # a node that left meanwhile
            pass
    return removed
