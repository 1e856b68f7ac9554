"""RunMetrics: busy time from the steps' `_t_<stage>` columns, utilisation, the bounding stage."""

import time

import numpy as np
import pytest

from engine.pipeline.run import RunMetrics
from engine.pipeline.steps import stamp


def test_stamp_spreads_a_batch_time_over_its_rows():
    t0 = time.perf_counter() - 0.5
    out = stamp({"task": np.arange(4)}, "read", t0)
    assert out["_t_read"].shape == (4,) and out["_t_read"].sum() == pytest.approx(0.5, abs=0.05)


def test_utilisation_and_bounding_stage():
    m = RunMetrics(actors={"read": 4, "encode": 1}, phase={"read": "tiles", "encode": "tiles"})
    m.add_wall("tiles", 10.0)
    for _ in range(5):
        m.add_batch({"_t_read": np.full(10, 0.6), "_t_encode": np.full(10, 0.1), "x": np.ones(10)})
    assert m.busy == pytest.approx({"read": 30.0, "encode": 5.0})
    assert m.utilisation() == {"read": 0.75, "encode": 0.5}
    assert m.bounding() == {"tiles": "read"}
    assert "read 75% busy on 4" in m.line()


def test_startup_bounds_a_branch_that_mostly_waited_for_its_first_batch():
    m = RunMetrics(actors={"encode": 1}, phase={"encode": "tiles"})
    t0 = time.perf_counter() - 8.0
    firsts = [m.first_batch("tiles", t0) for _ in range(3)]  # once per branch run
    assert firsts == [True, False, False]
    m.add_wall("tiles", 10.0)
    m.add_batch({"_t_encode": np.full(4, 0.5)})
    assert m.startup_share()["tiles"] == pytest.approx(0.8, abs=0.02)
    assert m.as_dict()["startup_s"]["tiles"] == pytest.approx(8.0, abs=0.2)
    assert m.bounding() == {"tiles": "startup"}


def test_actor_start_up_is_reported_per_stage():
    m = RunMetrics(t_start=1000.0)
    out = stamp({"task": np.arange(3)}, "encode", time.perf_counter(),
                ready=(1012.5, 8.0, 5.25, 1.5, 0.75))
    assert not any(k.startswith(("_w_", "_m_", "_l_")) for k in stamp(
        {"task": np.arange(2)}, "read", time.perf_counter(), ready=(1003.0, 0.2, 0.0, 0.0, 0.0)))
    m.add_batch(out)
    m.add_batch({"_r_encode": np.array([0.0, 1014.0]), "_i_encode": np.array([0.0, 9.5]),
                 "_r_read": np.array([1003.0]), "_i_read": np.array([0.2]),
                 "_w_read": np.array([0.0])})  # 0: rows that do not carry the stamp
    assert m.ready_s() == {"encode": [12.5, 14.0], "read": [3.0, 3.0]}
    assert m.as_dict()["actor_init_s"] == {"encode": 9.5, "read": 0.2}
    # of its 8.0 s start: 5.25 warming up, 1.5 importing, 0.75 making the model
    assert m.as_dict()["model_warmup_s"] == {"encode": 5.2}
    assert m.as_dict()["model_import_s"] == {"encode": 1.5}
    assert m.as_dict()["model_load_s"] == {"encode": 0.8}
    assert "actors ready by encode 14.0 s, read 3.0 s" in m.line()
    assert "encode started in 9.5 s (imports 1.5, model 0.8, warm-up 5.2)" in m.line()
    assert "read started" not in m.line()


def test_a_local_ray_whose_workers_would_compile_their_imports_is_said(tmp_path, monkeypatch):
    """PYTHONDONTWRITEBYTECODE with a module installed without its bytecode: each worker would
    compile it from source; with the bytecode there, or without the setting, nothing is said."""
    import py_compile
    import sys

    from engine.pipeline.run import slow_worker_start

    (tmp_path / "bulky_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    why = slow_worker_start("bulky_mod")
    assert why and why.startswith("PYTHONDONTWRITEBYTECODE is set and bulky_mod has no compiled")
    assert slow_worker_start("no_such_module_here") is None
    assert slow_worker_start("sys") is None  # built in: nothing to compile
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")
    assert slow_worker_start("bulky_mod") is None
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    py_compile.compile(str(tmp_path / "bulky_mod.py"))
    assert slow_worker_start("bulky_mod") is None
    assert "bulky_mod" not in sys.modules  # looked up, never imported
