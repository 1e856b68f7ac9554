"""Pipeline steps that fail on purpose, and a probe actor, for the tests that run them on Ray.

They live here, not in a test module: Ray imports a class's module in each process that runs
it, again in each process it starts again, and a test module's imports (the jobs, torch, timm)
cost a 2-core machine about 4 s a process, where this module's cost half a second."""

import os
import time

from engine.pipeline.steps import DetectCells, PlanTasks, ReadTiles


class KillsItsPlanner:
    """A slide plan that kills its process on a slide named ``poison`` (as a file that crashes
    a native decoder does), else `PlanSlide`'s."""

    def __init__(self, plan):
        self.plan = plan

    def __call__(self, row):
        if "poison" in row["uri"]:
            os._exit(1)
        return self.plan(row)


class PlanTasksKilledByPoison(PlanTasks):
    def __init__(self, *args):
        super().__init__(*args)
        self.plan = KillsItsPlanner(self.plan)


class DetectKilledByPoison(DetectCells):
    """Cell detection whose read of a slide named ``poison`` kills its process."""

    def _read(self, t):
        if "poison" in str(t["uri"]):
            os._exit(1)
        return super()._read(t)


class DetectHungOnPoison(DetectCells):
    """Cell detection whose read of a slide named ``poison`` never returns."""

    def _read(self, t):
        while "poison" in str(t["uri"]):
            time.sleep(1)
        return super()._read(t)


class ReadHungOnPoison(ReadTiles):
    """Encoder-tile reading whose read of a slide named ``poison`` never returns."""

    def _reading(self, batch, i):
        while "poison" in str(batch["uri"][i]):
            time.sleep(1)
        return super()._reading(batch, i)


class HangsAfterSaying:
    """A batch step whose call never returns (a read on a mount that stopped answering), having
    written its process id to ``said`` as it began."""

    def __init__(self, said: str):
        self.said = said

    def __call__(self, batch):
        with open(self.said, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(3600)
        return batch


class Probe:
    def restarted(self) -> bool:
        import warnings

        from engine.pipeline.steps import restarted

        with warnings.catch_warnings(record=True) as said:  # nothing in the run's log
            warnings.simplefilter("always")
            got = restarted()
        return [str(w.message) for w in said] or got

    def die(self):
        os._exit(1)

    def attempt(self, attempts, key) -> int:
        from engine.pipeline.steps import attempt

        with attempt(attempts, key) as earlier:
            return earlier.died

    def hang(self, attempts, key, slides, timeout_s: float, hang: bool):
        """An attempt that never ends where ``hang``, else its `Earlier`."""
        from engine.pipeline.steps import attempt

        with attempt(attempts, key, slides, timeout_s) as earlier:
            while hang:
                time.sleep(1)
            return earlier.died, earlier.hung_s
