"""A Ray cluster of three nodes on this machine, started as separate processes with `ray start`:
a head that takes no work (its dashboard on 127.0.0.1, where jobs are submitted) and two 4-CPU
worker nodes (either can host every actor of both branches, as an autoscaler's replacement node
would). process_slides runs over 30 slides as users run it on a cluster, through
`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`; one worker node's
processes (its raylet and everything under it) are SIGKILLed mid-run. The job, or a rerun on the
surviving node, must leave every slide's rows exactly once. The same job submitted again is then
stopped with `ray job stop` as it runs: it must end through its own cleanup."""

import collections
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import warnings

import polars as pl
import pytest

from tests.conftest import (ROOT, free_port, join_node, process_cmdlines, process_tree,
                            ray_cluster)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
N_SLIDES = 30
CONFIG = """
pipeline:
  read_concurrency: 1
  classifier: {model: deepheme-tiny, batch_size: 64}
  encoder: {model: none}  # tiles read, not embedded: one model actor less to start
"""


def _raylet_pid(node_manager_port: int) -> int:
    for pid, cmd in process_cmdlines():
        if "raylet" in cmd.split(" ", 1)[0] and f"--node_manager_port={node_manager_port}" in cmd:
            return pid
    raise AssertionError(f"no raylet on node manager port {node_manager_port}")


@pytest.fixture()
def slides(tmp_path):
    from engine.slides.synthetic import smear_block
    from engine.slides.writer import write_pyramid_tiff

    folder = tmp_path / "in"
    folder.mkdir()
    write_pyramid_tiff(smear_block(0), str(folder / "smear-00.tif"), 0.25)
    for i in range(1, N_SLIDES):
        os.link(folder / "smear-00.tif", folder / f"smear-{i:02d}.tif")
    return folder


def test_killing_a_worker_node_loses_nothing(slides, tmp_path):
    gcs, dash, node1 = free_port(), free_port(), free_port()
    # token authentication (Ray's default): one fresh token for the nodes, the driver and the CLI
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # as with an activated virtual environment: the job's `python` is this one
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           # the GCS marks the killed node dead after 3 failed health checks 1 s apart, where
           # Ray's 5 checks 3 s apart left the run waiting 15 s on its lost actors (a refused
           # check fails at once; a busy node's would time out only after Ray's 10 s)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    with ray_cluster(RAY, env, gcs, "--num-cpus=0", f"--dashboard-port={dash}",
                     "--dashboard-host=127.0.0.1", "--include-dashboard=true") as temp:
        for port in (node1, free_port()):  # one after the other: two at once time out here
            join_node(RAY, env, gcs, temp, "--num-cpus=4", f"--node-manager-port={port}")
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(CONFIG)
        out = tmp_path / "out"
        args = ["-m", "jobs.process_slides", "--input", str(slides), "--output", str(out),
                "--config", str(cfg), "--allow-untrained"]
        # without --no-wait the CLI streams the job's logs until it ends and exits 1 if it
        # failed: one process, where polling `ray job status` spent a CPU importing ray each time
        submit = subprocess.Popen(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
             "--runtime-env", "cluster/runtime_env.yaml", "--", "python", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and submit.poll() is None:
            if len(list((out / "slide_status").glob("*.parquet"))) >= 3:
                break
            time.sleep(0.05)  # slides commit in bursts: kill inside one, not after the last
        victims = process_tree(_raylet_pid(node1))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        committed_at_kill = len(list((out / "slide_status").glob("*.parquet")))
        assert committed_at_kill < N_SLIDES, "the run finished before the kill"
        try:
            logs = submit.communicate(timeout=300)[0]  # the CLI's own lines and the job's
        except subprocess.TimeoutExpired:
            submit.kill()
            logs = submit.communicate()[0]
        assert "raysubmit_" in logs, logs[-3000:]  # it went through the job server
        print(f"killed {len(victims)} processes of worker node 1 with {committed_at_kill} "
              f"slides committed; the submitted job exited {submit.returncode}")
        if submit.returncode != 0 or f"{N_SLIDES} ok" not in logs:
            rerun = subprocess.run([sys.executable, *args], cwd=ROOT,
                                   env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"},
                                   capture_output=True, text=True, timeout=600)
            assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
            assert "already committed" in rerun.stdout
        else:
            assert "succeeded" in logs.lower(), logs[-3000:]
        assert _committed_whole(out) == N_SLIDES
        # the same job again, to an output of its own, stopped as it runs: over 5 times the
        # slides, so that it still runs when the stop lands (the CLI takes seconds to start,
        # and under CI's load a run of 30 ended within them, the SIGTERM reaching its exit)
        many = tmp_path / "many"
        many.mkdir()
        for i in range(5 * N_SLIDES):
            os.link(slides / "smear-00.tif", many / f"smear-{i:03d}.tif")
        stopped = tmp_path / "stopped"
        args[args.index(str(out))], args[args.index(str(slides))] = str(stopped), str(many)
        assert 0 < _stop_a_submitted_job(f"http://127.0.0.1:{dash}", env, args, stopped) \
            < 5 * N_SLIDES


def _committed_whole(out) -> int:
    """How many slides ``out`` holds, each ok and once, in every table."""
    status = pl.read_parquet(f"{out}/slide_status/*.parquet")
    assert (status["status"] == "ok").all()
    assert status["slide_id"].n_unique() == len(status)
    for table in ("slides", "cells", "differentials"):
        ids = sorted(p.stem for p in (out / table).glob("*.parquet"))
        assert ids == sorted(status["slide_id"]), table
    cells = pl.read_parquet(f"{out}/cells/*.parquet")
    assert cells.select("slide_id", "cell_id").is_duplicated().sum() == 0
    # one slide's pixels under 30 names: every slide found the same cells, once
    counts = cells.group_by("slide_id").len()["len"]
    assert counts.n_unique() == 1 and counts[0] > 10
    return len(status)


def _stop_a_submitted_job(address: str, env: dict, args: list[str], out) -> int:
    """``ray job stop`` end to end, on a job submitted as the README's commands submit it,
    once it has committed a slide; returns the slides it committed. Ray's job supervisor sends
    the job's process group SIGTERM, and SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (the runtime
    env's 60 s; a stop that waited past Ray's own 3 s was killed with its mark still on the
    output, `engine.watchdog.ray_job_stop_wait_s`). The job stops through its cleanup inside
    that wait: it says so, its mark leaves the output, what it committed is whole
    (`_committed_whole`), and Ray reads it STOPPED. Until this test, checked only by hand."""
    def ray_job(*cmd: str) -> str:
        done = subprocess.run([RAY, "job", *cmd], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    status = out / "slide_status"
    said = ray_job("submit", "--address", address, "--no-wait", "--working-dir", ".",
                   "--runtime-env", "cluster/runtime_env.yaml", "--", "python", *args)
    (job,) = set(re.findall(r"raysubmit_\w+", said))
    deadline = time.time() + 300
    while time.time() < deadline and not any(status.glob("*.parquet")):
        time.sleep(0.05)  # until it has committed a slide
    t = time.time()
    state = ray_job("stop", "--address", address, job)  # waits for the job to end
    stop_s = time.time() - t
    logs = ray_job("logs", "--address", address, job)
    # STOPPED, not SUCCEEDED: the run had not ended (the slides under way may commit as it
    # stops; a run again does the rest)
    assert f"Job '{job}' was stopped" in state, state + logs[-3000:]
    assert "hemeflow: stopped (SIGTERM): what it committed stays" in logs, logs[-3000:]
    assert "Total Progress" not in logs  # Ray Data's progress, off where stdout is a pipe
    assert stop_s < 60  # within the runtime env's wait: ended by the job itself, not SIGKILL
    assert not (out / "_running").exists() or not any((out / "_running").iterdir())
    committed = _committed_whole(out)
    print(f"`ray job stop` after the first commit: ended in {stop_s:.1f} s, {committed} of "
          f"{args[args.index('--input') + 1]}'s slides committed")
    return committed


@pytest.mark.s3
def test_fine_tuning_across_two_nodes_checkpoints_to_s3(tmp_path, s3_server, s3_client):
    """train_cell_classifier as a lab runs it on a cluster: submitted with `ray job submit` to
    a head that takes no work, one Ray Train worker on each of two 2-CPU nodes (each needs 2
    CPUs), the prepared images through the object store and the epoch checkpoints on S3."""
    from tests.conftest import S3_TEST_ENV, SHARED_DATA

    if not (SHARED_DATA / "pbc" / "labels.csv").exists():
        pytest.skip("PBC data not present")
    gcs, dash = free_port(), free_port()
    env = {**os.environ, **S3_TEST_ENV, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    s3_client.create_bucket(Bucket="cluster-models")
    with ray_cluster(RAY, env, gcs, "--num-cpus=0", f"--dashboard-port={dash}",
                     "--dashboard-host=127.0.0.1", "--include-dashboard=true") as temp:
        for _ in range(2):
            join_node(RAY, env, gcs, temp, "--num-cpus=2")
        submit = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
                  "python", "-m", "jobs.train_cell_classifier", "--data",
                  str(SHARED_DATA / "pbc"), "--output", "s3://cluster-models/cluster", "--work",
                  str(tmp_path / "work"), "--arch", "deepheme-tiny", "--epochs", "1",
                  "--limit-per-class", "8", "--loader-workers", "0", "--batch-size", "16",
                  "--workers", "2", "--cpus-per-worker", "2", "--no-ood", "--s3-endpoint",
                  s3_server]
        job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        logs = job.stdout + job.stderr
        if job.returncode != 0 and "TrainController" in logs and "never ran" in logs:
            # Ray Train's controller actor lost before it started: its worker process died
            # at start-up ("connection error code 2"), seen in two clean-clone CI runs on the
            # 2-core machine (sessions 30 and 32), before any of the job's code ran. The job
            # now starts a new controller itself (`run_ray_training`, tested in
            # tests/train/test_ray_train.py); should that one be lost too, a lab submits
            # again, and the job takes up the same output.
            # said as a warning, which the run's summary shows even when the test passes. The
            # likely cause, found in session 48: the nodes shared one temp dir, and a worker
            # started in the job's working dir while another node unpacked it again
            # (`join_node` now gives each node its own); kept in case it was not the only one
            warnings.warn("the controller's worker died before it ran; submitting again:\n"
                          + logs[-1500:])
            job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=600)
            logs = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in logs.lower(), logs[-3000:]
    assert "testing-secret-value" not in logs
    assert "training on CPU workers: give --gpus" in logs  # a CPU head: GPUs must be asked for
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="cluster-models")["Contents"]}
    assert {"cluster/fold-0/model.safetensors", "cluster/model.json",
            "cluster/test/labels.csv"} <= keys
    assert any(k.startswith("cluster/runs/fold-0-") and "/checkpoint_" in k
               for k in keys), sorted(keys)


PROBE = """
import json, sys
import ray
from ray.util.placement_group import placement_group_table
from jobs import process_slides

code = process_slides.main(sys.argv[1:])
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
actors = [(a["ActorClassName"], a["Address"]["NodeID"])
          for a in ray._private.state.actors().values()]
groups = [{"state": g["state"], "bundles": list(g["bundles"].values()),
           "nodes": list(g["bundles_to_node_id"].values())}
          for g in placement_group_table().values() if g["name"] == "hemeflow-model-actors"]
print("PROBE", json.dumps({"code": code, "nodes": nodes, "actors": actors, "groups": groups}))
"""


def test_a_gpu_model_actor_keeps_its_host_cpu_on_its_gpus_node(slides, tmp_path):
    """A GPU node (2 CPUs, one GPU as Ray counts it: the model runs on this CPU) beside a CPU
    node (2 CPUs), and a head that takes no work, running the cells branch. The plan keeps
    one CPU for the classifier actor's host work and sizes detection to the other two (one
    stays the driver's); the placement group holding
    that CPU with the GPU puts it on the GPU's node, where counting CPUs cluster-wide could
    leave it on the CPU node. The group is removed when the run ends."""
    gcs = free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with ray_cluster(RAY, env, gcs, "--num-cpus=0") as temp:
        for extra in (["--num-gpus=1"], []):
            join_node(RAY, env, gcs, temp, "--num-cpus=2", *extra)
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("pipeline:\n  stages: [cells]\n"
                       "  classifier: {model: deepheme-tiny, batch_size: 64}\n")
        names = sorted(p.name for p in slides.iterdir())[:4]
        listed = tmp_path / "four.txt"
        listed.write_text("".join(f"{slides / n}\n" for n in names))
        run = subprocess.run(
            [sys.executable, "-c", PROBE, "--input", str(listed), "--output",
             str(tmp_path / "out"), "--config", str(cfg), "--allow-untrained"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, capture_output=True,
            text=True, timeout=600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert run.returncode == 0 and line, run.stdout[-3000:] + run.stderr[-3000:]
    got = json.loads(line[len("PROBE "):])
    assert got["code"] == 0 and "4 ok" in run.stdout
    gpu_node = next(n for n, r in got["nodes"].items() if r.get("GPU"))
    on = collections.Counter(node for cls, node in got["actors"] if "DetectCells" in cls)
    model_nodes = {node for cls, node in got["actors"] if "ClassifyCells" in cls}
    assert model_nodes == {gpu_node}
    assert sum(on.values()) == 2 and on[gpu_node] <= 1, on  # 2 CPUs there, one is the host's
    assert got["groups"] == [{"state": "REMOVED", "bundles": [{"CPU": 1.0, "GPU": 1.0}],
                              "nodes": [gpu_node]}], got["groups"]
