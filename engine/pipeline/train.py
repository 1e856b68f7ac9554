"""Ray Train wiring for the pure-torch recipes in ``engine.train``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable

import ray
import ray.train
import ray.train.torch
import torch

from engine.pipeline.address import check_ray_address, keep_sigterm_handler, quiet_ray_noise

HEALTH_CHECK_INTERVAL_S = 0.25  # Ray Train's controller's polling interval (`run_ray_training`)


class RaySession:
    """`engine.train.loop.Session` on a Ray Train worker (DDP via ``prepare_model``)."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._restored = None

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def restore_dir(self) -> str | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        self._restored = ckpt.to_directory()  # a local copy that outlives this call
        return self._restored


def _worker_entry(config: dict) -> None:
    fn = config.pop("_train_fn")
    # large inputs (bags of embeddings) travel as object refs: fetched once per worker
    config = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in config.items()}
    fn(config, RaySession())


def start_ray(log_to_driver: bool = True) -> None:
    """Join the cluster a job was submitted to (``RAY_ADDRESS``, as ``ray job submit`` sets) or
    start a local Ray, with its dashboard on 127.0.0.1 only: Ray Train's placement-group
    cleaner asks the dashboard's state API whether the run's controller is alive, and without
    it logs a warning every second and cannot free a lost controller's CPUs (about 1 s more
    to start here)."""
    quiet_ray_noise()
    if not ray.is_initialized():
        check_ray_address()
        with keep_sigterm_handler():
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1",
                     log_to_driver=log_to_driver)


def warn_if_not_shared(folder: str) -> bool:
    """Say so on stderr (and return True) where Ray Train is to checkpoint to a local folder on a
    cluster of several nodes: it fails at the first checkpoint of a worker on another node
    unless every node mounts that folder."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        print(f"hemeflow: warning: Ray Train checkpoints to the local folder {folder} on a "
              f"{nodes}-node cluster: every node must mount it (NFS); otherwise give the job an "
              "s3:// output", file=sys.stderr, flush=True)
    return nodes > 1


def _remove_placement_groups(before: set[str]) -> None:
    """Remove the placement groups made since ``before`` (`ray.util.placement_group_table`'s
    ids): a lost Ray Train controller's, whose CPUs a new controller's workers need. Ray
    Train's own cleaner does this only where the dashboard's state API answers, and a
    placement group outlives the actor that made it."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, row in ray.util.placement_group_table().items():
        if pg_id not in before and row.get("state") != "REMOVED":
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            except Exception:  # removed meanwhile (by Ray Train's cleaner)
                pass


def run_ray_training(train_fn: Callable[[dict, object], None], config: dict, *, num_workers: int,
                     use_gpu: bool, storage_path: str, name: str, cpus_per_worker: float = 1,
                     max_failures: int = 2, storage=None) -> tuple[str, list[dict]]:
    """Run ``train_fn(config, session)`` on ``num_workers`` Ray Train workers.

    A worker that dies is replaced and training resumes from the last reported checkpoint, up to
    ``max_failures`` times; so is Ray Train's controller actor (a new one takes up the run
    under the same name), up to ``max_failures`` times more. Rerunning with the same
    ``storage_path`` and ``name`` resumes too.
    Ray Train writes its checkpoints to ``storage_path``: a local folder on one machine (or one
    every node mounts), an ``s3://`` prefix (reached with ``storage``'s endpoint and region,
    credentials from each node's environment) on a cluster, where a worker on another node
    could not write to the driver's disk. Large inputs go in ``config`` as object refs
    (``ray.put``), never as a path on the driver's disk.

    Returns:
        ``(local folder of the last checkpoint, metrics history)``; for an ``s3://``
        ``storage_path`` the folder is a new temporary one, for the caller to remove.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray()
    # Ray Train's controller polls its workers every 2 s and waits out a poll at each step of
    # a run's start and end: 3-4 s of a short fit's 10-12 here. Its polls are tiny tasks, and
    # a worker is marked dead only after its poll has hung for 10 minutes
    # (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S), not after missed polls, so a shorter interval
    # costs nothing; a value set in the environment wins
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    remote = "://" in storage_path
    if remote:
        import pyarrow.fs

        from engine.config import StorageConfig
        from engine.slides.storage import get_filesystem

        fs, path = get_filesystem(storage_path, storage or StorageConfig())
        where = {"storage_path": path,
                 "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}
    else:
        where = {"storage_path": os.path.abspath(storage_path)}
        warn_if_not_shared(where["storage_path"])
    for attempt in range(max_failures + 1):
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config={**config, "_train_fn": train_fn},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=name, **where,
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        groups = set(ray.util.placement_group_table())
        try:
            result = trainer.fit()
            break
        except ray.exceptions.ActorDiedError as e:
            # Ray Train's controller actor is lost (its process killed, its node gone, or
            # its worker process dead at start-up): its workers go with it, and FailureConfig,
            # which restarts workers, cannot help. A new controller under the same name takes
            # up the run's last checkpoint in storage_path.
            if attempt == max_failures or getattr(e, "actor_init_failed", False):
                raise  # an error in the controller's own set-up would come again
            _remove_placement_groups(groups)
            print(f"hemeflow: Ray Train's controller for {name} was lost "
                  f"({type(e).__name__}); starting it again from the last checkpoint "
                  f"({attempt + 1} of {max_failures})", file=sys.stderr, flush=True)
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} finished without a checkpoint: {result.error}")
    local = tempfile.mkdtemp(prefix=f"hemeflow-{name}-") if remote else os.path.join(
        where["storage_path"], f"{name}-final")
    shutil.rmtree(local, ignore_errors=True)
    result.checkpoint.to_directory(local)
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None \
        else []
    return local, history
