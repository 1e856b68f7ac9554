"""A job's first request to each bucket of an object store: made once, quick to give up where
the store cannot be used at all, so that a wrong ``--s3-endpoint`` is named in seconds.

botocore retries a connection that fails four times, backing off up to 15 s, and waits for each
to open: a mistyped endpoint was named after 5-11 s where nothing listened on its port, and after
about 35 s where a firewall dropped the packets. Mid-run those retries are what a job wants (a
store's blip must not fail its slides); at the start, a store that cannot be reached at all is a
setting to correct. So, within `checking_first_contact` (every job's driver:
`jobs.common.job_main`; never Ray's workers), the first use of each bucket with each storage
setting (`engine.slides.storage.get_filesystem`, `engine.models.checkpoint`) is preceded by one
``exists`` (a HEAD on the key, or a one-key listing) on a client of its own, which tries
``TRIES`` times and gives each ``CONNECT_S`` to connect. A store that answers anything, a
refusal or a 404 included, is reached, and so is one that answers slowly (a read timeout): the
job's own clients go on with it, as before. Only a store that cannot be used at all
(`unusable`: no connection, no credentials, an unknown profile) stops the job.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import fsspec


def unusable(err: BaseException) -> str | None:
    """What to check where ``err`` says object storage cannot be used at all (the endpoint
    unreachable, no credentials found, an unknown AWS profile), or None."""
    boto = sys.modules.get("botocore.exceptions")  # loaded by s3fs; never imported here
    if boto is None or not isinstance(err, boto.BotoCoreError):
        return None
    if isinstance(err, (boto.EndpointConnectionError, boto.ConnectTimeoutError)):
        return "is --s3-endpoint (storage.endpoint_url) right, and the server up?"
    if isinstance(err, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return ("give credentials in the environment (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY), an AWS profile (--s3-profile), or --s3-anon for a "
                "public bucket")
    if isinstance(err, boto.ProfileNotFound):
        return "the profiles are in ~/.aws/config and ~/.aws/credentials"
    return None


class FirstContact:
    """The buckets this process has reached, and whether to check the others (see the module)."""

    CONNECT_S = 5.0  # TCP's own first two SYN retransmits (after 1 and 3 s) fit in it
    READ_S = 15.0  # an answer slower than this: the store is there, and the job goes on
    TRIES = 2  # a second, after botocore's back-off (under a second): a DNS blip at a pod's start

    def __init__(self):
        self.checking = False
        self._reached: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def check(self, fs: fsspec.AbstractFileSystem, path: str, options: dict) -> None:
        """Raise botocore's error where the store of ``fs`` (built with ``options``) behind
        ``path`` cannot be used; once per bucket and options, and only while ``checking``."""
        if not self.checking:
            return
        key = (repr(sorted(options.items())), path.split("/", 1)[0])
        with self._lock:
            if key in self._reached:
                return
            probe = type(fs)(**options, skip_instance_cache=True, config_kwargs={
                "connect_timeout": self.CONNECT_S, "read_timeout": self.READ_S,
                "retries": {"total_max_attempts": self.TRIES}})
            probe.retries = 1  # s3fs's own retries (of timeouts and dropped connections)
            try:
                probe.exists(path)
            except Exception as err:  # noqa: BLE001 - raised where the store cannot be used
                if unusable(err) is not None:
                    raise
            self._reached.add(key)


FIRST_CONTACT = FirstContact()


def check(fs: fsspec.AbstractFileSystem, path: str, options: dict) -> None:
    """`FirstContact.check` of this process's `FIRST_CONTACT`."""
    FIRST_CONTACT.check(fs, path, options)


@contextlib.contextmanager
def checking_first_contact() -> Iterator[None]:
    """Within: each bucket's first use in this process is checked (`FirstContact`)."""
    before, FIRST_CONTACT.checking = FIRST_CONTACT.checking, True
    try:
        yield
    finally:
        FIRST_CONTACT.checking = before
