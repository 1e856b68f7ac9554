"""Shared fixtures: the real data folder, synthetic slides, a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

# every Ray a test starts is its own: a bare ray.init() (the jobs', Ray Train's, in or out of
# process) would otherwise join the last cluster `ray start` left on this machine, a user's
# included. Tests that mean a cluster name its address.
os.environ["RAY_ADDRESS"] = "local"

# each pytest-xdist worker (the suite's two lanes: pytest_collection_modifyitems) its own temp
# folder, and so its own node-shared staging folder (engine.slides.storage.default_stage_dir):
# a test or job on one purging it took away a copy that a run on the other was between two
# readers of, and it was downloaded twice. Ray keeps the usual one (short socket paths). Others
# may pass through it, as through /tmp, to a folder a test opens to every user (test_bad_inputs)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    os.environ["TMPDIR"] = tempfile.mkdtemp(
        prefix=f"hemeflow-tests-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.chmod(os.environ["TMPDIR"], 0o711)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_unconfigure(config):
    if os.environ.get("PYTEST_XDIST_WORKER") and "hemeflow-tests-" in os.environ["TMPDIR"]:
        shutil.rmtree(os.environ["TMPDIR"], ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WSI = SHARED_DATA / "wsi"


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    if not WSI.is_dir():
        pytest.skip(f"real slide fixtures not found at {WSI} (../shared/data beside the project)")
    return WSI


def smear_like(height: int, width: int, seed: int = 0, tissue=((0.2, 0.2, 0.6, 0.7),)) -> np.ndarray:
    """``(H, W, 3) uint8``: white glass with stained rectangles ``(x0, y0, x1, y1)`` in fractions,
    speckled with dark purple nucleus-like dots."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 242, np.uint8)
    img += rng.integers(0, 8, img.shape, dtype=np.uint8)
    for x0, y0, x1, y1 in tissue:
        ys, ye, xs, xe = int(y0 * height), int(y1 * height), int(x0 * width), int(x1 * width)
        img[ys:ye, xs:xe] = (225, 160, 200)  # eosin-pink / RBC-pink
        n = max(1, (ye - ys) * (xe - xs) // 400)
        cy = rng.integers(ys, ye, n)
        cx = rng.integers(xs, xe, n)
        img[np.clip(cy, 0, height - 1), np.clip(cx, 0, width - 1)] = (90, 40, 130)
    return img


@pytest.fixture(scope="session")
def make_slide(tmp_path_factory):
    """Factory: a JPEG-tiled pyramidal TIFF with MPP in its resolution tags."""
    from engine.slides.writer import write_pyramid_tiff

    def _make(name: str = "synthetic.tif", width: int = 3000, height: int = 2000, mpp: float = 0.5,
              seed: int = 0, **kw) -> Path:
        path = tmp_path_factory.mktemp("slides") / name
        write_pyramid_tiff(smear_like(height, width, seed, **kw), str(path), mpp)
        return path

    return _make


# ports Ray takes by default (GCS, client server, dashboard, dashboard agent, worker range): a
# port handed to `ray start` must not be one of them, or the node refuses to start
_RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, 52366}


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never one of Ray's default ports."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RAY_DEFAULT_PORTS and not 10002 <= port <= 19999:
            return port


def process_cmdlines() -> Iterator[tuple[int, str]]:
    """``(pid, command line)`` of every process, from /proc."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    yield int(name), fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue


def process_tree(*pids: int) -> list[int]:
    """``pids`` and all their descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, stack = [], list(pids)
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def kill_tree(*pids: int) -> None:
    """SIGKILL ``pids`` and all their descendants (`process_tree`)."""
    for pid in set(process_tree(*pids)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def node_ports() -> list[str]:
    """``ray start`` arguments for a node's ports that default to fixed numbers on every node
    (its dashboard agent's HTTP port, where jobs are submitted): a free one each."""
    return [f"--dashboard-agent-listen-port={free_port()}"]


def join_node(ray: str, env: dict, gcs_port: int, head_temp: str, *args: str) -> None:
    """A worker node joined with ``ray start`` to the head of `ray_cluster` on ``gcs_port``,
    ``args`` its own, in a temp dir of its own under the head's (as each machine of a real
    cluster has its own): nodes of one machine sharing the head's each unpacked a submitted
    job's working dir into one folder, a worker of one starting in it while another node's
    agent unpacked it again; a worker that never registered held its actor Ray's 60 s."""
    said = ""
    for _ in range(2):  # once more where its raylet did not register in Ray's 30 s (seen once)
        temp = tempfile.mkdtemp(prefix="n", dir=head_temp)  # short: Ray's socket paths must fit
        node = subprocess.run([ray, "start", f"--address=127.0.0.1:{gcs_port}",
                               f"--temp-dir={temp}", "--node-ip-address=127.0.0.1",
                               "--disable-usage-stats", *node_ports(), *args],
                              env=env, capture_output=True, text=True, timeout=120)
        if node.returncode == 0:
            return
        said += node.stdout[-2000:] + node.stderr[-2000:] + _log_tails(temp, head_temp)
        kill_tree(*(pid for pid, cmd in process_cmdlines() if temp in cmd))  # what it left
    raise AssertionError(said)


def _log_tails(*temps: str) -> str:
    """The last lines of the raylet's and GCS's logs under Ray temp dirs ``temps``."""
    out = []
    for temp in temps:
        for log in sorted(Path(temp).glob("session_latest/logs/*")):
            if log.name.startswith(("raylet.", "gcs_server.")) and log.is_file():
                lines = [line for line in log.read_text(errors="replace").splitlines()
                         if not line.startswith("[state-dump]")]
                out.append(f"\n--- {log}:\n" + "\n".join(lines[-15:]))
    return "".join(out)


@contextlib.contextmanager
def ray_cluster(ray: str, env: dict, gcs_port: int, *head_args: str) -> Iterator[str]:
    """A Ray head started with ``ray start`` on 127.0.0.1:``gcs_port``; yields its temp dir.

    The cluster keeps to itself, beside any other Ray on the machine (a user's, another test's):
    its own temp dir (where ``ray start`` leaves the address a bare ``ray.init()`` would join)
    and its own client-server, dashboard and agent ports. It is stopped by killing its own
    processes (those naming its temp dir or GCS port, and their children): ``ray stop`` would
    kill every Ray on the machine."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
    ports = [f"--ray-client-server-port={free_port()}", *node_ports()]
    if not any(a.startswith("--dashboard-port") for a in head_args):
        ports.append(f"--dashboard-port={free_port()}")
    try:
        head = subprocess.run([ray, "start", "--head", f"--port={gcs_port}", f"--temp-dir={temp}",
                               "--node-ip-address=127.0.0.1", "--disable-usage-stats", *ports,
                               *head_args], env=env, capture_output=True, text=True, timeout=120)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        yield temp
    finally:
        mine = re.compile(rf"{re.escape(temp)}|[:=]{gcs_port}\b")
        kill_tree(*(pid for pid, cmd in process_cmdlines()
                    if pid != os.getpid() and mine.search(cmd)))
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def compiled_without_codegen() -> Iterator[None]:
    """``torch.nn.Module.compile`` (the one call `engine.train.loop.compile_in_place` makes)
    with TorchDynamo's graph capture and AOTAutograd (backend ``aot_eager``), without
    Inductor's code generation: on a CPU that is C++ compiled per graph, 40-55 s of a training
    test's first compile here, and not the GPU's code (Triton) anyway. What a compiled run of
    ours can get wrong (graph breaks, in-place ops under autograd, checkpoint keys, resuming a
    plain run) is in the capture; Inductor itself is run where a test compiles outside this."""
    from unittest import mock

    import torch

    real = torch.nn.Module.compile

    def compile(self, *args, mode=None, **kwargs):  # (mode: Inductor's)
        return real(self, *args, **{**kwargs, "backend": "aot_eager"})

    with mock.patch.object(torch.nn.Module, "compile", compile):
        yield


# the dummy credentials of every S3 test: set in the environment, where botocore's own chain finds
# them, exactly as production reads real ones
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) in this process for every module that drives Ray here (the
    pipeline's, Ray Train's): a start costs seconds of a 2-core machine. Its workers get the dummy
    S3 credentials (a worker's environment is fixed when it starts, before any S3 module's server
    exists). The modules that use it run last (``pytest_collection_modifyitems``): idle, it takes
    a tenth of a core from every test that runs beside it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": S3_TEST_ENV})
    yield
    ray.shutdown()


FOREGROUND = "foreground"  # the xdist group of the tests that need the machine to themselves
BACKGROUND_NICE = 19  # the other worker's, where it cannot have Linux's SCHED_IDLE


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    """The modules that use the shared ``ray_local`` run after all others, in their usual order.

    With the default options (``-n 2 --dist loadgroup``) the suite runs on two workers. The
    tests that start a Ray (marked ``ray``, or on ``ray_local``) or depend on wall-clock time
    (marked ``timed``) are one xdist group, the foreground: they run one after another on one
    worker, each with the machine's CPUs as it expects. The other worker runs the rest, mostly
    single-threaded, at the lowest priority (`give_way`): on the CPU the foreground leaves
    idle, a third of a 2-core machine when the suite ran in one process, without slowing it
    (beside it at the same priority, the Ray tests took twice as long)."""
    def module(item):
        return item.nodeid.split("::", 1)[0]

    shared = {module(i) for i in items if "ray_local" in getattr(i, "fixturenames", ())}
    items[:] = ([i for i in items if module(i) not in shared]
                + [i for i in items if module(i) in shared])
    if config.pluginmanager.hasplugin("xdist"):  # (its marker is unknown without it)
        for item in items:
            if in_foreground(item):
                item.add_marker(pytest.mark.xdist_group(FOREGROUND))


def in_foreground(item) -> bool:
    return bool(item.get_closest_marker("ray") or item.get_closest_marker("timed")
                or "ray_local" in getattr(item, "fixturenames", ()))


def give_way() -> None:
    """This process, each of its threads and whatever they start, at the lowest priority:
    Linux's SCHED_IDLE, which runs only on a CPU nothing else wants (a nice value would not
    do: Ray runs its workers at nice 15, beside which nice 19 still takes a third of a CPU),
    else `BACKGROUND_NICE`. Both are a thread's on Linux, and a new thread or process takes
    its creator's. Neither needs a privilege; going back would, so a worker that gave way
    stays so.

    Its native thread pools (torch's, OpenMP's, BLAS's) get one thread, here and in the
    processes it starts. A pool's threads wait for one another at each operation's end, and at
    this priority one of them is often not run: measured, the suite's PBC benchmark tests took
    275 s on two threads and 170 s on one beside a load of three quarters of both CPUs (16 s
    alone, on either), and the ABMIL fits 37-40 s in the suite, 4 s alone on either."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), BACKGROUND_NICE)
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"  # the pools of libraries not loaded yet, and of child processes
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # those loaded (OpenMP's, BLAS's)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def pytest_runtest_setup(item):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if not in_foreground(item):
        if os.getpriority(os.PRIO_PROCESS, 0) < BACKGROUND_NICE:
            give_way()
    elif item.config.getvalue("loadgroup") and not item.nodeid.endswith(f"@{FOREGROUND}"):
        # pytest-xdist's hook puts a group's name at the end of its tests' ids: where it did
        # not, the foreground tests would run beside one another, at low priority
        pytest.fail(f"pytest-xdist's --dist loadgroup did not put this test in the {FOREGROUND} "
                    "group: with pytest 9.2 it ignores xdist_group (pytest-dev/pytest-xdist"
                    "#1386). Install the test extras' pytest (pip install -e '.[test]'), or "
                    "run with -n 0", pytrace=False)


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 HTTP endpoint (moto server mode) on 127.0.0.1; yields its URL, with the dummy
    credentials (``S3_TEST_ENV``) in the environment meanwhile."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    env = S3_TEST_ENV
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


def upload_tree(client, bucket: str, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


@contextlib.contextmanager
def logged(name: str, level: int, parse: Callable[[str], str | None]) -> Iterator[list[str]]:
    """``parse`` of each message logger ``name`` logs at ``level`` or above meanwhile, where it
    returns one (the logger set to ``level`` meanwhile)."""
    import logging

    lines: list[str] = []

    class Record(logging.Handler):
        def emit(self, record):
            if (line := parse(record.getMessage())) is not None:
                lines.append(line)

    log = logging.getLogger(name)
    handler, before = Record(), log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(before)


def s3_requests(status: bool = False) -> contextlib.AbstractContextManager[list[str]]:
    """The request lines (``GET /bucket/key``) the moto server in this process answers meanwhile;
    with ``status``, each followed by its status code (``GET /bucket/key 206``: a range)."""
    import logging

    def parse(message: str) -> str | None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", message)  # werkzeug's colours
        if '"' not in text:
            return None
        parts = text.split('"')
        line = parts[1].rsplit(" ", 1)[0]
        return f"{line} {parts[2].split()[0]}" if status else line

    return logged("werkzeug", logging.INFO, parse)


def botocore_requests() -> contextlib.AbstractContextManager[list[str]]:
    """The URLs botocore sends requests to meanwhile (its debug log's, in this process)."""
    import logging

    def parse(message: str) -> str | None:
        if message.startswith("Sending http request"):
            return message.split("url=", 1)[1].split(",", 1)[0]
        return None

    return logged("botocore.endpoint", logging.DEBUG, parse)


def sigterm_when(proc: subprocess.Popen, ready, timeout_s: float = 240) -> str:
    """Send ``proc`` (started in a session of its own, text output) SIGTERM once ``ready()``
    or once it has ended, and wait for it; returns what it printed. Its process group is
    killed if it outlives the wait."""
    import time

    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        return "".join(out for out in proc.communicate(timeout=120) if out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def dicom_study(tmp_path_factory):
    """A study's folder with two DICOM series as converters write them: ``a`` (8,192 px, 6
    levels, each file's frames in its Basic Offset Table) and ``b`` (3,000 x 2,000 px, the
    Extended Offset Table); and a folder with ``c``, whose frames no offset table gives."""
    from engine.slides.synthetic import smear_block
    from engine.slides.writer import write_dicom_series

    root = tmp_path_factory.mktemp("dicom")
    image = np.tile(smear_block(0, 2048), (4, 4, 1))
    write_dicom_series(image, str(root / "study"), 0.25, stem="a")
    write_dicom_series(image[:2000, :3000], str(root / "study"), 0.25, offsets="extended",
                       stem="b")
    write_dicom_series(image[:3000, :3000], str(root / "walked"), 0.25, offsets="none", stem="c")
    return root


@contextlib.contextmanager
def hung_pipes(folder: Path, *names: str) -> Iterator[list[Path]]:
    """Named pipes in ``folder`` that no one writes: a read of one waits in its open, as a read
    on a mount that stopped answering does. Each is opened for writing at the end, so that an
    open still waiting (a thread or process of the test's) returns."""
    paths = [folder / name for name in names]
    for p in paths:
        os.mkfifo(p)
    try:
        yield paths
    finally:
        for p in paths:
            with contextlib.suppress(OSError):
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
