"""One run at a time writes an output (`engine.pipeline.commit.RunLease`): a second run is
refused, naming the first, before it deletes the first's unfinished slides; a run that died
leaves a mark that stops nobody (killed on this host: at once; elsewhere: once it is stale).
And the leftovers a run clears before it starts go in one request."""

import json
import os
import subprocess
import sys
import time

import pytest

from engine.config import StorageConfig
from engine.pipeline.commit import OutputInUse, OutputStore, RunLease

pytestmark = pytest.mark.timed  # time-outs and waits: in the foreground (conftest)


def _mark(store: OutputStore, name: str, **doc) -> str:
    """Another run's mark, written as a run writes its own."""
    store.write_json(RunLease.FOLDER, f"{name}.json", {"job": "process_slides", **doc})
    return f"{store.path.rstrip('/')}/{RunLease.FOLDER}/{name}.json"


def test_a_second_run_is_refused_while_the_first_writes(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    first = RunLease(store, "process_slides")
    with first:
        assert len(os.listdir(tmp_path / "out" / "_running")) == 1
        with pytest.raises(OutputInUse) as refused:
            RunLease(store, "classify_cells").acquire()
        said = str(refused.value)
        assert "is being written by another run: process_slides on" in said
        assert f"(pid {os.getpid()})" in said and first.doc["started_at"] in said
        assert "last heard 0 s ago" in said and "another --output" in said
        # the refused run took its mark back: the first is alone, and still refuses others
        assert os.listdir(tmp_path / "out" / "_running") == [f"{first.run_id}.json"]
    # ended: its mark and folder are gone, and the next run starts
    assert not (tmp_path / "out" / "_running").exists()
    with RunLease(store, "classify_cells"):
        pass


def test_a_run_that_died_stops_nobody(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    # killed on this host: its process is gone, so its mark counts for nothing at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    import socket

    _mark(store, "killed", host=socket.gethostname(), pid=int(dead.stdout))
    # on another host: live until it has not been heard for stale_s
    path = _mark(store, "elsewhere", host="node-7", pid=1)
    with pytest.raises(OutputInUse, match="process_slides on node-7 \\(pid 1\\)"):
        RunLease(store, "process_slides").acquire()
    past = time.time() - 200
    os.utime(path, (past, past))
    with RunLease(store, "process_slides", stale_s=180) as lease:
        assert lease.others() == []
        # both dead runs' marks are cleared by the run that found them
        assert os.listdir(tmp_path / "out" / "_running") == [f"{lease.run_id}.json"]
    # a file there that is no mark is skipped, not a traceback
    (tmp_path / "out" / "_running").mkdir()
    (tmp_path / "out" / "_running" / "notes.json").write_text('{"job": "proc')
    with RunLease(store, "process_slides"):
        pass


def test_a_mark_that_missed_two_beats_is_waited_out_not_refused(tmp_path, capsys):
    """A run killed on another host (a restarted head, a cluster job retried at once) leaves
    a mark that is no longer rewritten: the next run waits for it to lapse."""
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    path = _mark(store, "killed-elsewhere", host="node-7", pid=1)
    past = time.time() - 0.5
    os.utime(path, (past, past))
    waited = []
    lease = RunLease(store, "process_slides", heartbeat_s=0.2, stale_s=1.0)
    lease.acquire(sleep=lambda s: (waited.append(s), time.sleep(s)))
    lease.release()
    assert waited and sum(waited) < 2.0
    assert "last wrote" in capsys.readouterr().err
    # one that beats on is refused at once, without waiting
    _mark(store, "alive-elsewhere", host="node-8", pid=1)
    with pytest.raises(OutputInUse, match="node-8"):
        RunLease(store, "process_slides", heartbeat_s=0.2, stale_s=1.0).acquire(
            sleep=lambda s: pytest.fail("waited for a live run"))


def test_the_mark_is_renewed_while_the_run_goes_on(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    with RunLease(store, "process_slides", heartbeat_s=0.05) as lease:
        path = tmp_path / "out" / "_running" / f"{lease.run_id}.json"
        first = path.stat().st_mtime_ns
        time.sleep(0.3)
        assert path.stat().st_mtime_ns > first
        assert json.loads(path.read_text())["run_id"] == lease.run_id


def test_runs_on_s3_see_each_other_by_the_stores_clock(s3_server, s3_client):
    s3_client.create_bucket(Bucket="lease")
    storage = StorageConfig(endpoint_url=s3_server)
    store = OutputStore("s3://lease/run", storage)
    with RunLease(store, "process_slides"):
        with pytest.raises(OutputInUse, match="s3://lease/run is being written by another"):
            RunLease(OutputStore("s3://lease/run", storage), "process_slides").acquire()
    listed = s3_client.list_objects_v2(Bucket="lease", Prefix="run/_running/")
    assert listed["KeyCount"] == 0
    _mark(store, "elsewhere", host="node-7", pid=1)
    with pytest.raises(OutputInUse, match="node-7"):
        RunLease(store, "process_slides").acquire()
    time.sleep(2.1)  # S3 keeps whole seconds: the mark is 2 s older than the next one written
    with RunLease(store, "process_slides", stale_s=2) as lease:
        assert lease.others() == []


def test_commit_times_and_a_marks_time_are_the_stores_own_on_s3(s3_server, s3_client):
    """What a resumed --reprocess compares (`jobs.process_slides.reprocess_mark`): the time its
    mark was written and each slide's commit since, both by the store's clock."""
    s3_client.create_bucket(Bucket="times")
    store = OutputStore("s3://times/run", StorageConfig(endpoint_url=s3_server))
    assert store.modified("_reprocess", "m.json") is None and store.commit_times() == {}
    store.write_json("_reprocess", "m.json", {})
    begun = store.modified("_reprocess", "m.json")
    assert abs(begun - time.time()) < 60
    s3_client.put_object(Bucket="times", Key="run/slide_status/s1.parquet", Body=b"x")
    times = store.commit_times()
    assert list(times) == ["s1"] and times["s1"] >= begun  # S3 keeps whole seconds


@pytest.mark.parametrize("run", ["run", "run [2]"])
def test_leftovers_on_s3_go_in_one_request(s3_server, s3_client, run):
    """The files of slides that never committed (a crash's, or a --reprocess's) are deleted in
    one batch: one request per file took a reprocessed archive's hours. Under an output named
    like ``run [2]`` too, whose paths s3fs's ``rm`` read as globs: it deleted nothing there, or
    ``run 2``'s files (`engine.slides.storage.remove`); and the run's mark goes at its end."""
    from tests.conftest import s3_requests

    s3_client.create_bucket(Bucket="leftovers")
    store = OutputStore(f"s3://leftovers/{run}", StorageConfig(endpoint_url=s3_server))
    sid = [f"s{i}-{i:012x}" for i in range(30)]  # as `slide_id_for` makes them
    for i in range(30):
        store.write_json("geojson", f"{sid[i]}.geojson", {"type": "FeatureCollection"})
        s3_client.put_object(Bucket="leftovers", Key=f"{run}/cells/{sid[i]}.parquet", Body=b"x")
        s3_client.put_object(Bucket="leftovers", Key=f"run 2/cells/{sid[i]}.parquet", Body=b"x")
    s3_client.put_object(Bucket="leftovers", Key=f"{run}/slide_status/{sid[0]}.parquet",
                         Body=b"x")
    with s3_requests() as requests:
        removed = store.clean_partial()
    assert removed == sorted(sid[1:])
    deletes = [r for r in requests if r.startswith(("DELETE", "POST"))]
    assert len(deletes) == 1, deletes
    left = s3_client.list_objects_v2(Bucket="leftovers", Prefix=f"{run}/")["Contents"]
    assert sorted(o["Key"] for o in left) == [f"{run}/cells/{sid[0]}.parquet",
                                             f"{run}/geojson/{sid[0]}.geojson",
                                             f"{run}/slide_status/{sid[0]}.parquet"]
    other = s3_client.list_objects_v2(Bucket="leftovers", Prefix="run 2/")
    assert other["KeyCount"] == 30  # another output's, whatever this one is named
    with RunLease(store, "process_slides"):
        assert s3_client.list_objects_v2(Bucket="leftovers",
                                         Prefix=f"{run}/_running/")["KeyCount"] == 1
    assert s3_client.list_objects_v2(Bucket="leftovers", Prefix=f"{run}/_running/")[
        "KeyCount"] == 0
    store.uncommit([sid[0]])  # --reprocess: the marker first, then the slide's files
    assert s3_client.list_objects_v2(Bucket="leftovers", Prefix=f"{run}/")["KeyCount"] == 0

def test_a_full_disk_names_the_file_and_leaves_no_half_file_behind(tmp_path, monkeypatch):
    """An output whose disk filled stopped the job with "[Errno 28] No space left on device",
    naming neither the file nor what to do, and left the file it was writing half written
    (``<name>.tmp-<hex>``), holding its space for good: no table reads it, and no run removed
    it. Now the error names the file and says what stays; the half file goes at once, and
    one a killed run left goes with the next run's leftovers."""
    import errno

    from engine.errors import OutputFull
    from engine.outputs import TMP_MARK

    out = tmp_path / "out"
    store = OutputStore(str(out), StorageConfig())
    store.write_json("geojson", "s0-000000000000.geojson", {"cells": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputFull, match=f"^{out}/geojson/s0-000000000000.geojson: no space "
                       "left on its disk "
                       r"\(No space left on device\): free some, or write to another output, "
                       "and run again; what was written whole before stays$") as err:
        store.write_json("geojson", "s0-000000000000.geojson", {"cells": 2})
    assert isinstance(err.value, OSError)  # the jobs' handlers of OSError take it as ever
    assert os.listdir(out / "geojson") == ["s0-000000000000.geojson"]
    assert json.loads((out / "geojson" / "s0-000000000000.geojson").read_text()) == {"cells": 1}
    monkeypatch.undo()
    halves = [out / "cells" / f"s1.parquet{TMP_MARK}0123abcd",
              out / "slide_status" / f"s2.parquet{TMP_MARK}89abcdef"]
    for half in halves:  # a kill mid-write
        half.parent.mkdir(exist_ok=True)
        half.write_bytes(b"PAR1")
    assert store.clean_partial() == ["s0-000000000000"] and not any(h.exists() for h in halves)

    import engine.outputs

    def refused(path, mode="r"):  # a folder this job may not write (root here writes any)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(engine.outputs, "open", refused, raising=False)
    with pytest.raises(PermissionError) as err:  # named as asked for, not by its temporary name
        store.write_json("geojson", "s3.geojson", {})
    assert err.value.filename == f"{out}/geojson/s3.geojson"


def test_a_dry_run_and_a_summary_say_another_run_is_writing(tmp_path, wsi_dir, capsys):
    from jobs import process_slides

    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    with RunLease(store, "process_slides") as lease:
        assert process_slides.main(["--input", str(wsi_dir / "openslide-python/small.svs"),
                                    "--output", str(tmp_path / "out"), "--dry-run"]) == 0
        said = capsys.readouterr().out
        assert f"another run is writing {tmp_path / 'out'}: process_slides on" in said
        assert "a run now would be refused until it ends" in said
        # it looked and left the marks as they were
        assert os.listdir(tmp_path / "out" / "_running") == [f"{lease.run_id}.json"]
        # a summary of the slides committed so far says the run goes on
        from jobs import slide_summary

        store.write_table("slide_status", "s", [{"slide_id": "s", "uri": "/x/s.svs",
                                                  "status": "ok"}])
        assert slide_summary.main(["--output", str(tmp_path / "out")]) == 0
        assert "process_slides on" in (said := capsys.readouterr().out)
        assert "these are the slides it has committed so far" in said


def test_sigterm_stops_a_job_as_ctrl_c_does_and_its_mark_leaves(tmp_path, capsys):
    """``ray job stop`` or a deleted Kubernetes pod send SIGTERM: the job stops through its
    ``finally`` blocks (its mark leaves the output, so a rerun elsewhere need not wait for it
    to lapse) and says so, where it died on the spot."""
    import signal

    from jobs.common import job_main

    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    before = signal.getsignal(signal.SIGTERM)

    @job_main
    def main():
        with RunLease(store, "classify_cells"):
            assert os.listdir(tmp_path / "out" / "_running")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once
        return 0

    t0 = time.perf_counter()
    assert main() == 143 and time.perf_counter() - t0 < 4
    assert "hemeflow: stopped (SIGTERM): what it committed stays" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_running").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # put back as it was
