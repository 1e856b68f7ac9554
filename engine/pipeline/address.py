"""The cluster a job joins: ``RAY_ADDRESS`` checked before ``ray.init`` waits on it, the
job's SIGTERM handler kept across it, no joining it again from a thread left behind, and Ray's
lines that read as problems and are none left out of the job's output."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading

from engine.errors import HemeflowError


class ClusterUnreachable(HemeflowError):
    """Nothing answers at the Ray cluster address the job was given."""


def check_ray_address(timeout_s: float = 5.0) -> None:
    """Refuse a ``RAY_ADDRESS`` at which nothing answers. ``ray.init`` retries such an address
    for ever, printing a 'Failed to connect to GCS' line every few seconds (a typo, or a
    cluster since stopped); here it ends at once. ``ray job submit`` sets a live one; unset,
    ``auto`` and ``local`` are left to Ray.

    Raises:
        ClusterUnreachable: no TCP connection to the address's host and port in ``timeout_s``.
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return  # a form Ray may know and this does not: left to it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterUnreachable(
            f"no Ray cluster answers at RAY_ADDRESS={address} ({err}): start it (ray start "
            "--head on that host), correct the address, or unset RAY_ADDRESS to run on a Ray "
            "of this machine's own") from None


@contextlib.contextmanager
def keep_sigterm_handler():
    """Put the job's own SIGTERM handler back after what runs inside (``ray.init``, which puts
    in Ray's: a ``sys.exit`` from Python, and from its core an abort, exit 134), so that SIGTERM
    stops a job as Ctrl-C does (`jobs.common.job_main`)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def no_ray_init_again() -> None:
    """Let no thread of this process start or join Ray from now on. A stopped run may leave
    behind a stream that a read that hangs holds and that shutting down did not end
    (`engine.pipeline.run.end_streams`); once the interpreter's exit has shut Ray down,
    their threads' next call of Ray's API joined the cluster again (Ray's auto-init; on a
    machine's own Ray it would start a new one), from an interpreter that was ending: the
    job's exit was held up, and once crashed (SIGSEGV, where the stop's exit code was due).
    The calls now fail in those threads, which nothing waits for. Ray's switch,
    ``RAY_ENABLE_AUTO_CONNECT=0``, is read once at its import; this sets what it sets (left
    alone where a Ray release has it no more)."""
    from ray._private import auto_init_hook

    if hasattr(auto_init_hook, "enable_auto_connect"):
        auto_init_hook.enable_auto_connect = False


# Ray's lines that read as a problem in a run's log and are none: logger -> a part of the line
RAY_NOISE = {
    # the cells and tiles streams run side by side by design, and Ray Data keeps its own log
    # file for one at a time
    "ray.data._internal.logging": " registers for logging while another dataset ",
    # the local Ray a job starts on 127.0.0.1 for itself has Ray's token auth, by Ray's default
    "ray._private.authentication.authentication_token_setup":
        "Token authentication is enabled for this Ray cluster",
}


class _Unsaid(logging.Filter):
    """Drops a logger's records whose message holds ``part``."""

    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in record.getMessage()


def quiet_ray_noise() -> None:
    """Leave `RAY_NOISE`'s lines out of the job's output (once per process)."""
    for name, part in RAY_NOISE.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Unsaid) for f in log.filters):
            log.addFilter(_Unsaid(part))
