"""How long a job takes to name object storage it cannot reach: the first listing of an
``s3://`` input at an endpoint where nothing listens (the connection refused) and at one
behind a firewall that drops the packets, with a job's first-contact check
(`engine.first_contact`) against without it (botocore's own retries), in the same process.

    python benchmarks/unreachable_store.py [--cases refused dropped] [--tag T]

Both endpoints are on 127.0.0.1. "dropped": a listening socket whose accept queue is filled
first, so that the kernel drops further connection requests, as a firewall does. Each case is
timed from the listing's start to its error; both sides must end in the error that the jobs
name as a store not reached (`engine.first_contact.unusable`). botocore backs off at random,
so the figure without the check varies from run to run (5-15 s where nothing listens).

Writes benchmarks/results/unreachable_store-<hardware>-<date>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import result_head, write_result  # noqa: E402


@contextlib.contextmanager
def endpoint(case: str):
    """An endpoint URL on 127.0.0.1 at which connections are refused or dropped."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held = []
    if case == "refused":
        server.close()  # nothing listens on the port now
    else:
        server.listen(0)
        for _ in range(3):  # fill its accept queue: later connection requests are dropped
            conn = socket.socket()
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                conn.connect(("127.0.0.1", port))
            held.append(conn)
        time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for conn in held:
            conn.close()
        server.close()


def time_to_error(url: str, checked: bool) -> tuple[float, str]:
    """Seconds until listing ``s3://bucket/slides`` at ``url`` fails, and the error's type."""
    from engine import first_contact
    from engine.config import StorageConfig
    from engine.slides.storage import list_files, storage_failure

    first_contact.FIRST_CONTACT = first_contact.FirstContact()  # no bucket reached yet
    t0 = time.perf_counter()
    try:
        with first_contact.checking_first_contact() if checked else contextlib.nullcontext():
            list_files("s3://bucket/slides", StorageConfig(endpoint_url=url))
    except Exception as err:  # noqa: BLE001 - the error is the measurement
        seconds = time.perf_counter() - t0
        cause = err.__cause__ if storage_failure(err) is None and err.__cause__ else err
        if first_contact.unusable(cause) is None:
            raise RuntimeError(f"not named as a store not reached: {err!r}") from err
        return seconds, type(cause).__name__
    raise RuntimeError(f"{url}: the listing did not fail")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=["refused", "dropped"],
                   default=["refused", "dropped"])
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # any: nothing checks them
        os.environ.setdefault(key, "unused")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    result = result_head("unreachable_store")
    for case in args.cases:
        with endpoint(case) as url:
            baseline, error = time_to_error(url, checked=False)
            checked, error_checked = time_to_error(url, checked=True)
        result[case] = {"baseline_s": round(baseline, 2), "checked_s": round(checked, 2),
                        "speedup": round(baseline / checked, 1), "error": error,
                        "error_checked": error_checked}
    write_result(result, f"unreachable_store-{result['hardware']}-{result['date']}", args.tag)
    return result


if __name__ == "__main__":
    main()
