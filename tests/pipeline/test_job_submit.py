"""`ray job submit --working-dir` against a local head whose dashboard listens on 127.0.0.1."""

import os
import secrets
import subprocess
import sys

import polars as pl
import pytest

from tests.conftest import ROOT, free_port, ray_cluster
from tests.pipeline.conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def test_ray_job_submit_runs_process_slides(smear_slide, tmp_path):
    gcs, dash = free_port(), free_port()
    # token authentication (Ray's default): a fresh token shared by the head and the CLI
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # as with an activated virtual environment: the job's `python` is this one
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    with ray_cluster(RAY, env, gcs, f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                     "--num-cpus=2", "--include-dashboard=true"):
        address = f"http://127.0.0.1:{dash}"
        out = tmp_path / "out"
        # without --no-wait the CLI streams the job's logs until it ends and exits 1 if it
        # failed: one process, where polling `ray job status` spent a CPU importing ray each time
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "-m",
             "jobs.process_slides", "--input", str(smear_slide), "--output", str(out),
             "--config", tiny_config(tmp_path), "--allow-untrained"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        logs = submit.stdout + submit.stderr  # the CLI logs its own lines to stderr
        assert submit.returncode == 0, logs[-3000:]
        assert "raysubmit_" in logs and "succeeded" in logs.lower(), logs[-3000:]
        assert "1 ok, 0 failed of 1 processed" in logs
        st = pl.read_parquet(f"{out}/slide_status/*.parquet")
        assert st["status"].to_list() == ["ok"] and st["n_cells"][0] > 10
