"""How far a long run is: the line a job prints at most once a minute (`Progress`)."""

from __future__ import annotations

import collections
import time


def duration(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 05 min``, ``7 min``, ``40 s``: a run's time, to the unit that
    matters."""
    s = max(int(round(seconds)), 0)
    if s >= 86_400:
        return f"{s // 86_400} d {s % 86_400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min" if s >= 60 else f"{s} s"


class Progress:
    """How far a run over many slides is, said at most every ``every_s``: slides committed
    of ``total``, the rate over the last ``window_s`` (a run slows and speeds with the
    slides' sizes) and the time left at that rate. An archive's run takes hours or days, and
    a line per slide says neither how far it is nor when it ends."""

    def __init__(self, total: int, every_s: float = 60.0, window_s: float = 600.0,
                 clock=time.monotonic, what: str = "slides"):
        self.total, self.every_s, self.window_s, self.clock = total, every_s, window_s, clock
        self.what = what  # what is counted: slides committed, files read
        self.done, self.t0 = 0, clock()
        self.last = self.t0
        self.times: collections.deque[float] = collections.deque([self.t0])

    def tick(self) -> str | None:
        """One slide committed; the progress line when one is due (never for the last)."""
        now = self.clock()
        self.done += 1
        self.times.append(now)
        while len(self.times) > 2 and now - self.times[0] > self.window_s:
            self.times.popleft()
        if self.done >= self.total or now - self.last < self.every_s:
            return None
        self.last = now
        span = now - self.times[0]
        per_s = (len(self.times) - 1) / span if span > 0 else 0.0
        left = f"; about {duration((self.total - self.done) / per_s)} left" if per_s else ""
        return (f"progress: {self.done:,} of {self.total:,} {self.what} "
                f"({100 * self.done / self.total:.1f} %) in {duration(now - self.t0)}; "
                f"{3600 * per_s:,.0f} {self.what}/h over the last {duration(span)}{left}")
