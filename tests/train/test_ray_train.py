"""The Ray Train path: 2 CPU workers (gloo), and recovery from a killed worker or a lost
controller."""

import os

import pytest

from tests.conftest import SHARED_DATA
from tests.train.test_recipe import _prepare

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not (SHARED_DATA / "pbc").exists(),
                                                  reason="PBC data not present")]


def _once_after_the_first_epoch(config, session, act):
    """Train, calling ``act()`` on rank 0 after its first report, on the first attempt only
    (``config["marker"]``, a file, says it was done)."""
    from engine.train.cell_classifier import train_fold

    marker = config.pop("marker")
    real_report = session.report

    def report(metrics, checkpoint_dir):
        real_report(metrics, checkpoint_dir)
        if session.rank == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            act()

    session.report = report
    train_fold(config, session)


def _crash_once_then_train(config, session):
    """Kill this worker process after its first epoch on the first attempt only."""
    _once_after_the_first_epoch(config, session, lambda: os._exit(1))  # a hard crash


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
    # Ray Train's controller polled its workers every 0.25 s, not 2 (3-4 s less a fit here);
    # the controller reads the driver's value (Ray Train propagates it)
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25"
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in ENV_VARS_TO_PROPAGATE


def _lose_the_controller_once_then_train(config, session):
    """Kill Ray Train's controller actor after the first epoch, on the first attempt only: its
    workers go with it, as when the controller's process or node is lost."""
    import ray
    from ray.train.v2._internal.execution.context import get_train_context

    _once_after_the_first_epoch(config, session, lambda: ray.kill(
        get_train_context().controller_actor, no_restart=True))


def test_a_lost_controller_is_started_again_and_resumes(ray_local, tmp_path, capfd):
    import json

    from engine.pipeline.train import run_ray_training
    from engine.train.loop import TrainSettings

    codes, prepared = _prepare(tmp_path, per_class=10)
    settings = TrainSettings(epochs=3, batch_size=8, num_workers=0)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": settings.__dict__, "marker": str(tmp_path / "lost")}
    # one worker: the controller's loss takes its workers with it however many there are, and
    # each started again is a process importing torch (measured: 95 CPU-seconds with two,
    # 64 with one)
    folder, history = run_ray_training(_lose_the_controller_once_then_train, config,
                                       num_workers=1, use_gpu=False,
                                       storage_path=str(tmp_path / "runs"), name="fold-0",
                                       max_failures=1)
    assert os.path.exists(tmp_path / "lost")  # the controller was killed
    assert "Ray Train's controller for fold-0 was lost (ActorDiedError); starting it again" \
        in capfd.readouterr().err
    with open(os.path.join(folder, "state.json")) as fh:
        assert json.load(fh)["epoch"] == 2  # finished all epochs
    # the new controller took up the run after epoch 0's checkpoint instead of starting over
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.s3
def test_workers_read_the_object_store_and_checkpoint_to_s3(ray_local, tmp_path, s3_server,
                                                            s3_client):
    """What a cluster needs, where a worker on another node reaches neither the driver's disk
    nor its folders: the prepared images travel through Ray's object store, and Ray Train's
    checkpoints go to the output's S3 prefix (`train_cell_classifier` with an s3:// output)."""
    import argparse
    import shutil

    import ray

    from engine.config import StorageConfig
    from engine.pipeline.train import run_ray_training
    from engine.train.cell_classifier import train_fold
    from engine.train.loop import TrainSettings
    from jobs.train_cell_classifier import ray_inputs

    s3_client.create_bucket(Bucket="models")
    codes, prepared = _prepare(tmp_path, per_class=10)
    args = argparse.Namespace(output="s3://models/cluster-run/")
    data, runs = ray_inputs(args, prepared, str(tmp_path / "runs"))
    assert isinstance(data, ray.ObjectRef) and runs == "s3://models/cluster-run/runs"
    assert ray_inputs(argparse.Namespace(output=str(tmp_path)), prepared,
                      str(tmp_path / "runs"))[1] == str(tmp_path / "runs")  # one node: local
    shutil.move(prepared, tmp_path / "gone")  # nothing on the driver's disk is read
    settings = TrainSettings(epochs=2, batch_size=8, num_workers=0)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": data, "fold": 0,
              "settings": settings.__dict__}
    # one worker: it has no other way to the images than the object store (two workers, DDP,
    # are the killed-worker test's; each worker is a process importing torch and timm)
    folder, history = run_ray_training(train_fold, config, num_workers=1, use_gpu=False,
                                       storage_path=runs, name="fold-0",
                                       storage=StorageConfig(endpoint_url=s3_server))
    assert [h["epoch"] for h in history] == [0, 1]
    assert os.path.exists(os.path.join(folder, "best.safetensors"))
    shutil.rmtree(folder)  # a temporary copy of the last checkpoint, the caller's to remove
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="models")["Contents"]]
    assert any(k.startswith("cluster-run/runs/fold-0/") and k.endswith("best.safetensors")
               for k in keys), keys
    assert not (tmp_path / "runs").exists()


def test_a_local_checkpoint_folder_on_a_cluster_of_several_nodes_is_warned_of(
        ray_local, monkeypatch, capsys):
    import ray

    from engine.pipeline.train import warn_if_not_shared

    assert not warn_if_not_shared("/data/runs")  # this one-node Ray
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True},
                                               {"Alive": False}])
    assert warn_if_not_shared("/data/runs")
    assert "/data/runs on a 2-node cluster: every node must mount it" in capsys.readouterr().err


SLEEPING_FIT = """
import sys, tempfile
from engine.pipeline.train import run_ray_training
from jobs.common import job_main

def sleep(config, session):
    import pathlib, time
    pathlib.Path(config["marker"]).touch()  # training
    time.sleep(120)

@job_main
def main():
    run_ray_training(sleep, {"marker": sys.argv[1]}, num_workers=1, use_gpu=False,
                     storage_path=tempfile.mkdtemp(), name="stopped")
    return 0

sys.exit(main())
"""


def test_sigterm_stops_a_training_job_as_ctrl_c_does(ray_local, tmp_path):
    """``ray job stop`` sends SIGTERM: a training driver ended through the handler
    ``ray.init`` had put in (exit 1 here, joining a cluster; an abort, 134, on a Ray of its
    own). The job's own is put back after it: the fit stops through its cleanup and the job
    says so (143)."""
    import subprocess
    import sys

    import ray

    from tests.conftest import ROOT, sigterm_when

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    training = tmp_path / "training"
    proc = subprocess.Popen([sys.executable, "-c", SLEEPING_FIT, str(training)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = sigterm_when(proc, training.exists, timeout_s=180)
    assert training.exists(), out[-3000:]
    assert proc.returncode == 143, out[-3000:]
    assert "hemeflow: stopped (SIGTERM)" in out
