"""The Ray Train path: 2 CPU workers (gloo), and recovery from a killed worker."""

import os

import pytest

from tests.conftest import SHARED_DATA
from tests.train.test_recipe import _prepare

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not (SHARED_DATA / "pbc").exists(),
                                                  reason="PBC data not present")]


def _crash_once_then_train(config, session):
    """Kill this worker process after its first epoch on the first attempt only."""
    from engine.train.cell_classifier import train_fold

    marker = config.pop("marker")
    real_report = session.report

    def report(metrics, checkpoint_dir):
        real_report(metrics, checkpoint_dir)
        if session.rank == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # a hard crash: no cleanup, no exception

    session.report = report
    train_fold(config, session)


def test_two_cpu_workers_with_a_killed_worker_resume(ray_local, tmp_path):
    from engine.pipeline.train import run_ray_training
    from engine.train.loop import TrainSettings

    codes, prepared = _prepare(tmp_path, per_class=10)
    settings = TrainSettings(epochs=3, batch_size=8, num_workers=0)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": settings.__dict__, "marker": str(tmp_path / "crashed")}
    folder, history = run_ray_training(_crash_once_then_train, config, num_workers=2,
                                       use_gpu=False, storage_path=str(tmp_path / "runs"),
                                       name="fold-0", max_failures=2)
    assert os.path.exists(tmp_path / "crashed")  # the crash happened
    assert os.path.exists(os.path.join(folder, "best.safetensors"))
    import json

    with open(os.path.join(folder, "state.json")) as fh:
        assert json.load(fh)["epoch"] == 2  # finished all epochs after resuming
    # the new worker group resumed after epoch 0 (its checkpoint) instead of starting over
    assert [h["epoch"] for h in history] == [1, 2]
