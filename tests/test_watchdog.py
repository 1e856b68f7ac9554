"""`engine.watchdog`: deadlines for work that may hang, on a fake clock."""

import threading
import time

import pytest

from engine.watchdog import (STOP_GRACE_S, Watchdog, in_time, ray_job_stop_wait_s,
                             stop_grace_s)

pytestmark = pytest.mark.timed  # time-outs and waits: in the foreground (conftest)


def test_a_deadline_passed_is_called_once_and_one_unwatched_never():
    now = [0.0]
    dog = Watchdog(clock=lambda: now[0], thread=False)  # `late` is called by hand
    called = []
    late = dog.watch(10.0, lambda: called.append("late"))
    done = dog.watch(10.0, lambda: called.append("done"))
    dog.unwatch(done)
    now[0] = 9.0
    assert dog.late(9.0) == []
    now[0] = 10.0
    for on_late in dog.late(1.0):
        on_late()
    now[0] = 20.0
    assert dog.late(10.0) == [] and called == ["late"]
    dog.unwatch(late)  # after its call: nothing


def test_time_spent_unhurried_counts_against_no_deadline():
    """A slide's download from S3 is slow, not hung: no deadline counts it."""
    now = [0.0]
    dog = Watchdog(clock=lambda: now[0], thread=False)
    dog.watch(10.0, lambda: None)
    with dog.unhurried():
        for _ in range(30):  # 30 s inside
            now[0] += 1.0
            assert dog.late(1.0) == []
    now[0] += 9.0
    assert dog.late(9.0) == []
    now[0] += 1.0
    assert len(dog.late(1.0)) == 1


def test_the_watchdog_thread_calls_on_late_on_time():
    dog = Watchdog()
    dog.TICK_S = 0.05
    fired = threading.Event()
    t0 = time.monotonic()
    dog.watch(0.2, fired.set)
    assert fired.wait(5) and 0.15 < time.monotonic() - t0 < 3


def test_in_time_gives_up_on_a_call_that_hangs_and_goes_on():
    """The inventory's reads: one that hangs (a file on a stalled mount) held the pool's map,
    and its process's exit, for ever. Its item gives ``late``'s row once its call has run
    ``timeout_s``; another thread takes its place, so the items behind it go on."""
    release = threading.Event()

    def read(x):
        if x in (2, 5):
            release.wait()  # hangs
        if x == 7:
            raise ValueError("seven")
        return x * 10

    t0 = time.monotonic()
    got = []
    with pytest.raises(ValueError, match="seven"):
        for row in in_time(read, range(9), 2, 0.5, lambda x, s: f"late {x} after {s}"):
            got.append(row)
    assert got == [0, 10, "late 2 after 0.5", 30, 40, "late 5 after 0.5", 60]
    assert time.monotonic() - t0 < 10
    release.set()
    assert list(in_time(read, range(4), 3, 0.0, lambda x, s: None)) == [0, 10, 20, 30]


def test_in_time_starts_nothing_once_its_caller_stops():
    started = []

    def read(x):
        started.append(x)
        time.sleep(0.05)
        return x

    rows = in_time(read, range(100), 2, 5.0, lambda x, s: None)
    assert next(rows) == 0
    rows.close()  # waits for the calls under way
    n = len(started)
    time.sleep(0.3)
    assert len(started) == n < 10


def test_in_time_does_not_count_a_download_against_the_limit():
    """A slide staged whole from S3 on a slow link is slow, not hung (`Watchdog.unhurried`)."""
    from engine.watchdog import WATCHDOG

    def download(x):
        with WATCHDOG.unhurried():
            time.sleep(2.5)
        return x

    assert list(in_time(download, [1], 1, 0.5, lambda x, s: "late")) == [1]


def test_a_listing_that_goes_on_says_so_until_it_ends(tmp_path, monkeypatch, capsys):
    """On a network mount that stopped answering, the job's listing of its input waited for
    ever and said nothing."""
    import re

    from engine.config import StorageConfig
    from jobs import common

    listed = common.list_files
    monkeypatch.setattr(common, "list_files", lambda *a: time.sleep(3.5) or listed(*a))
    monkeypatch.setattr(common, "LISTING_NOTICE_S", 1.0)
    (tmp_path / "a.svs").write_bytes(b"x")
    got = common.expand_inputs(str(tmp_path), StorageConfig())
    assert [e.uri for e in got] == [str(tmp_path / "a.svs")]
    time.sleep(2.5)  # nothing more once it has ended
    said = capsys.readouterr().err.splitlines()
    assert 1 <= len(said) <= 2, said
    assert re.fullmatch(f"hemeflow: still listing {re.escape(str(tmp_path))} after [12] s: a "
                        "large archive takes long, and a network mount that stopped answering "
                        r"holds the listing for ever \(does `ls` of it answer\?\)", said[0]), said


def test_slides_hung_in_a_row_stop_the_job():
    """On a mount that stopped answering every slide hangs, each failing after its own
    time-out: an archive's run would go on for days. Three in a row stop it; a slide read
    between them says the storage answers."""
    from engine.errors import HUNG_IN_A_ROW, StorageStalled, hung_in_a_row

    hung = "SlideReadTimeout"

    def stop_if_stalled(types, names):  # the job's rows, in the order they ended
        so_far = []
        for t, name in zip(types, names):
            so_far = hung_in_a_row(so_far, name, t == hung)

    for fine in ([], [hung] * (HUNG_IN_A_ROW - 1), [hung, None, hung, hung],
                 [hung, "SlideCorrupt", hung, hung], [hung] * 2 + [None, hung]):
        stop_if_stalled(fine, [f"s{i}" for i in range(len(fine))])
    with pytest.raises(StorageStalled, match=r"^3 slides' reads hung in a row \(failed "
                       r"SlideReadTimeout\), no read ending between them \(b, c, d\): the "
                       "storage they are on seems to have stopped answering, and every slide "
                       "left would hang as long; stopped. What is committed stays: once it "
                       r"answers \(does `ls` of it\?\), run again with --retry-failed \(if it "
                       "does, those slides hang their decoder: leave them out of the "
                       r"input\)$"):
        stop_if_stalled([None, hung, hung, hung], ["a", "b", "c", "d"])


def test_attempts_count_the_slides_hung_since_a_read_last_answered():
    """The pipeline's driver learns of a slide's failure only with its branch's next batch,
    which on a mount where every read hangs may be many slides later: the run's `Attempts`
    counts the slides found to hang since an attempt that read last ended."""
    from engine.pipeline.steps import Attempts

    now = [0.0]
    attempts = Attempts(lambda: now[0])
    for t, slide in [(1, "a"), (2, "b")]:
        now[0] = t
        attempts.begin(("read", slide, 0))
        attempts.timed_out(("read", slide, 0), (slide,), 1800.0)
    assert attempts.hung_unanswered() == ["a", "b"]
    now[0] = 3
    attempts.begin(("read", "a", 1))
    attempts.end(("read", "a", 1), answered=False)  # a's next task, failed unread
    assert attempts.hung_unanswered() == ["a", "b"]
    attempts.begin(("read", "c", 0), ("c",))
    attempts.end(("read", "c", 0))  # a read that ended: the storage answers
    assert attempts.hung_unanswered() == []
    now[0] = 4
    attempts.timed_out(("x", "d", "e"), ("d", "e"), 1800.0)  # a batch of two: neither known
    attempts.timed_out(("/s/f.svs", "cells", 0), ("/s/f.svs",), 1800.0)
    assert attempts.hung_unanswered() == ["/s/f.svs"]
    assert attempts.hung() == ["a", "b", "/s/f.svs"]  # committed failed at a stop


def test_a_failing_call_does_not_end_the_other_deadlines(capsys):
    dog = Watchdog()
    dog.TICK_S = 0.05
    fired = threading.Event()
    dog.watch(0.1, lambda: 1 / 0)
    dog.watch(0.3, fired.set)
    assert fired.wait(5)
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_a_submitted_jobs_stop_fits_in_what_ray_job_stop_gives_it(monkeypatch, capsys):
    """``ray job stop`` sends SIGTERM and, 3 s later (Ray's RAY_JOB_STOP_WAIT_TIME_S), SIGKILL.
    A stopped run waited 10 s for streams a hung read holds, so a job so stopped was always
    killed before it committed what it had and took its mark off the output (checked by hand
    with ``ray job submit`` and ``ray job stop`` on a local cluster: the mark stayed; now it
    leaves). Under ``ray job submit`` the wait ends 2 s before that kill, and the job says, as
    it starts, where that time is short for its stop."""
    from jobs.common import job_main

    @job_main
    def main(argv=None) -> int:
        return 0

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)
    assert ray_job_stop_wait_s() is None and stop_grace_s() == STOP_GRACE_S
    assert main([]) == 0 and "ray job stop" not in capsys.readouterr().err
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as Ray's job supervisor sets
    assert ray_job_stop_wait_s() == 3.0 and stop_grace_s() == 1.0
    assert main([]) == 0
    assert "hemeflow: warning: `ray job stop` would kill this job 3 s after asking it to " \
           "stop (Ray's RAY_JOB_STOP_WAIT_TIME_S)" in capsys.readouterr().err
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "4.5")
    assert stop_grace_s() == 2.5
    # a job's reads in threads (classify_cells', the inventory's) are waited for as long
    rows = in_time(lambda x: time.sleep(30 if x else 0) or x, [0, 1], 2, 0.0, lambda x, s: None)
    assert next(rows) == 0
    t0 = time.monotonic()
    rows.close()  # the call under way never ends in time
    assert 2.0 < time.monotonic() - t0 < 4.5
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "60")  # cluster/runtime_env.yaml's
    assert ray_job_stop_wait_s() == 60.0 and stop_grace_s() == STOP_GRACE_S
    assert main([]) == 0 and "ray job stop" not in capsys.readouterr().err
