"""Deadlines for work that may hang: a decoder in a loop, a read on a network mount that
stopped answering. Neither raises, and neither can be interrupted from Python, so a thread of
the process watches the deadlines and calls the caller's ``on_late`` for each one passed, which
may end the process (`engine.pipeline.steps.attempt`: Ray starts the actor again, and the
retried attempt learns that it hung).

Time spent inside `unhurried` (a download of a whole slide, a wait on another process's
download of it) does not count against any deadline of the process: it has its own time-outs
and retries, and a slow link is not a hang.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
import time
import traceback
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Watchdog:
    """Deadlines, each with what to do when it passes, checked every ``TICK_S`` by a daemon
    thread started with the first (`watch`; with ``thread`` False, by whoever calls `late`)."""

    TICK_S = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic, thread: bool = True):
        self.clock = clock
        self.thread = thread
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._tokens = itertools.count()
        self._paused = 0  # threads inside `unhurried`
        self._thread: threading.Thread | None = None

    def watch(self, timeout_s: float, on_late: Callable[[], None]) -> int:
        """Call ``on_late`` (on the watchdog's thread) once ``timeout_s`` pass without
        `unwatch` of the token returned."""
        token = next(self._tokens)
        with self._lock:
            self._due[token] = (self.clock() + timeout_s, on_late)
            if self._thread is None and self.thread:
                self._thread = threading.Thread(target=self._run, name="hemeflow-watchdog",
                                                daemon=True)
                self._thread.start()
        return token

    def unwatch(self, token: int | None) -> None:
        with self._lock:
            self._due.pop(token, None)

    @contextlib.contextmanager
    def unhurried(self) -> Iterator[None]:
        """A block whose time counts against no deadline (every deadline of the process moves
        on while any thread is inside one)."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1

    def late(self, elapsed: float) -> list[Callable[[], None]]:
        """One look, ``elapsed`` seconds after the last: the ``on_late`` of each deadline
        passed, no longer watched; while a block is `unhurried`, none, and every deadline
        moves ``elapsed`` on."""
        with self._lock:
            if self._paused:
                self._due = {t: (d + elapsed, f) for t, (d, f) in self._due.items()}
                return []
            now = self.clock()
            return [self._due.pop(t)[1] for t in [t for t, (d, _) in self._due.items()
                                                  if d <= now]]

    def _run(self) -> None:
        last = self.clock()
        while True:
            time.sleep(self.TICK_S)
            now = self.clock()
            for on_late in self.late(now - last):
                try:
                    on_late()
                except Exception:  # noqa: BLE001 - a bug there must not end every deadline
                    traceback.print_exc()
            last = now


WATCHDOG = Watchdog()  # the process's


STOP_GRACE_S = 10.0  # how long a stopped job waits for the reads under way (`stop_grace_s`)
RAY_JOB_STOP_WAIT_S = 3.0  # Ray's RAY_JOB_STOP_WAIT_TIME_S where unset (its JobSupervisor's)
STOP_WAIT_WANTED_S = 30.0  # what a job's stop through its cleanup may take, and more


def ray_job_stop_wait_s() -> float | None:
    """The seconds ``ray job stop`` gives this job between its SIGTERM and its SIGKILL, where
    the job was started by ``ray job submit`` (None elsewhere): Ray's
    ``RAY_JOB_STOP_WAIT_TIME_S``, 3 s unless the job's runtime env (or the head's environment)
    sets it. Ray's job supervisor, which sends both signals, starts the job with its own
    environment, so the job reads the same value it does."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set for a submitted job's driver
        return None
    try:
        return float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", RAY_JOB_STOP_WAIT_S))
    except ValueError:
        return RAY_JOB_STOP_WAIT_S


def stop_grace_s() -> float:
    """How long a stopped job waits for the reads under way to end (`STOP_GRACE_S`: `in_time`'s
    calls, `engine.pipeline.run`'s streams), less where ``ray job stop`` kills the job sooner
    (`ray_job_stop_wait_s`, 3 s unless set): 2 s before that kill, so that what they handed in
    commits and the run's mark leaves. Waiting the whole 10 s, a job stopped that way was
    always killed first."""
    wait = ray_job_stop_wait_s()
    return STOP_GRACE_S if wait is None else max(0.5, min(STOP_GRACE_S, wait - 2.0))


def short_stop_wait() -> str | None:
    """A warning, where this job was submitted with ``ray job stop``'s wait for it shorter
    than its stop may take: the job is then killed before it has committed the slides it was
    writing and taken its mark off the output (nothing committed is lost)."""
    wait = ray_job_stop_wait_s()
    if wait is None or wait >= STOP_WAIT_WANTED_S:
        return None
    return (f"warning: `ray job stop` would kill this job {wait:g} s after asking it to stop "
            "(Ray's RAY_JOB_STOP_WAIT_TIME_S), before its stop has committed the slides "
            "under way and taken its mark off the output (what is committed stays either "
            "way); submit it with --runtime-env cluster/runtime_env.yaml, which gives it "
            f"more, or set RAY_JOB_STOP_WAIT_TIME_S to {STOP_WAIT_WANTED_S:g} or more in "
            "the job's runtime env")


def in_time(fn: Callable[[T], R], items: Iterable[T], workers: int, timeout_s: float,
            late: Callable[[T, float], R], name: str = "") -> Iterator[R]:
    """``fn(item)`` of each item, in order, on ``workers`` threads, as a thread pool's ``map``,
    except that an item whose call has run ``timeout_s`` (0: never; time `unhurried` not
    counted: `WATCHDOG`'s deadlines) gives ``late(item, timeout_s)`` instead: its thread is
    left to the call (a daemon: it holds no exit) and another takes its place. A read that
    hangs held `ThreadPoolExecutor.map` for ever, and its process's exit too. An item's
    exception is raised as it is reached. Once the caller stops (the generator closed, or an
    exception), no item starts, and the calls under way are waited for `stop_grace_s` at
    most (on a mount that stopped answering, they never end)."""
    items = list(items)
    cond = threading.Condition()
    todo = iter(range(len(items)))
    done: dict[int, tuple[bool, object]] = {}
    left: set[int] = set()  # items given up on: their threads retire
    stop = False
    threads: dict[int, threading.Thread] = {}  # item under way -> its thread

    def give_up(i: int) -> None:  # on the watchdog's thread
        with cond:
            if i in done or i in left:
                return
            left.add(i)
            threads.pop(i, None)
            done[i] = (True, late(items[i], timeout_s))
            cond.notify_all()
        spawn()  # in its thread's place

    def work() -> None:
        while True:
            with cond:
                i = None if stop else next(todo, None)
                if i is None:
                    return
                threads[i] = threading.current_thread()
            token = WATCHDOG.watch(timeout_s, functools.partial(give_up, i)) \
                if timeout_s else None
            try:
                out: tuple[bool, object] = (True, fn(items[i]))
            except BaseException as err:  # noqa: BLE001 - raised to the caller in order
                out = (False, err)
            WATCHDOG.unwatch(token)
            with cond:
                if i in left:
                    return
                threads.pop(i, None)
                done[i] = out
                cond.notify_all()

    def spawn() -> None:
        threading.Thread(target=work, name=f"{name}-worker", daemon=True).start()

    for _ in range(min(workers, len(items))):
        spawn()
    try:
        for i in range(len(items)):
            with cond:
                while i not in done:
                    cond.wait()
                ok, out = done.pop(i)
            if not ok:
                raise out  # type: ignore[misc]
            yield out  # type: ignore[misc]
    finally:
        with cond:
            stop = True
            under_way = list(threads.values())
        until = time.monotonic() + stop_grace_s()
        for t in under_way:
            t.join(max(0.0, until - time.monotonic()))


@contextlib.contextmanager
def still_going(say: Callable[[float], None], after_s: float) -> Iterator[None]:
    """Call ``say(seconds)`` once the block has run ``after_s``, and again each time it has run
    twice as long as when last said, until it ends: a job waiting on what may never answer (a
    listing on a network mount that stopped answering) said nothing at all."""
    t0 = time.monotonic()
    lock = threading.Lock()
    ended = False

    def late() -> None:
        nonlocal token
        with lock:
            if ended:
                return
            elapsed = time.monotonic() - t0
            say(elapsed)
            token = WATCHDOG.watch(elapsed, late)

    token = WATCHDOG.watch(after_s, late)
    try:
        yield
    finally:
        with lock:
            ended = True
            WATCHDOG.unwatch(token)
