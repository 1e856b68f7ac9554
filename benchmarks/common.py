"""What the benchmark scripts share: where and how a result is written."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def result_head(name: str) -> dict:
    """The fields every CPU benchmark's result opens with: its name, the hardware
    (``cpu<N>``, the file name's), the processor and today's date."""
    return {"benchmark": name, "hardware": f"cpu{os.cpu_count()}",
            "cpu": platform.processor() or platform.machine(),
            "date": dt.date.today().isoformat()}


def write_result(result: dict, name: str, tag: str = "", echo: bool = True) -> str:
    """Write ``result`` to ``benchmarks/results/<name>[-<tag>].json`` (printing it as JSON first
    with ``echo``); returns the path."""
    if echo:
        print(json.dumps(result, indent=2))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}{'-' + tag if tag else ''}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    return path


def moto_server(bucket: str):
    """A moto S3 server in a process of its own on 127.0.0.1, with ``bucket`` made and dummy
    credentials in the environment; returns ``(process, endpoint URL, boto3 client)``: kill
    the process when done."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    # its own process: a server thread in this one would share the GIL with the clients
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket=bucket)
            return server, endpoint, client
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto did not start")


def delayed_endpoint(endpoint: str, delay_ms: float) -> tuple[subprocess.Popen, str]:
    """A proxy in a process of its own on 127.0.0.1 in front of ``endpoint`` (a local server:
    moto's) that holds each request ``delay_ms`` before passing it on, as a store across a
    network answers after a round trip where moto on this machine answers at once; returns
    ``(process, its endpoint URL)``: kill the process when done. Each chunk a client sends
    waits, so only a request's first arrives late where it fits in one (a GET's, a HEAD's);
    put large objects through the store's own endpoint."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = int(endpoint.rsplit(":", 1)[1])
    proxy = subprocess.Popen([sys.executable, "-c", "from benchmarks.common import _proxy; "
                              f"_proxy({port}, {target}, {delay_ms / 1000})"], cwd=ROOT)
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proxy, f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    proxy.kill()
    raise RuntimeError("the delaying proxy did not start")


def _proxy(port: int, target: int, delay_s: float) -> None:
    import asyncio

    async def pipe(reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_r, server_w, delay_s), pipe(server_r, client_w, 0))

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def add_mount_arg(parser, what: str = "the slide") -> None:
    """``--mount-latency-ms``: ``what`` read through a `delayed_mount` holding each open and
    read that long (a network file system)."""
    parser.add_argument("--mount-latency-ms", type=float,
                        help=f"read {what} through a FUSE mount holding each open and read this "
                             "long (a network file system)")


def delayed_mount(source: str, point: str, delay_ms: float) -> subprocess.Popen:
    """``source`` mounted read-only at ``point`` through FUSE (file system type
    ``fuse.hemeflow-delayed``), in a process of its own that holds each open and each read
    ``delay_ms``, as a network file system (NFS, SMB) answers after a round trip where a local
    disk answers at once. Needs ``/dev/fuse``, libfuse 2 (Debian: ``apt-get install fuse3
    libfuse2``) and fusepy (``pip install fusepy``), none of them a dependency of hemeflow.
    Unmount with `unmount`."""
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as err:
        raise SystemExit(f"a delayed mount needs fusepy and libfuse 2 ({err}): pip install "
                         "fusepy; apt-get install fuse3 libfuse2") from None
    os.makedirs(point, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", "from benchmarks.common import _mount; "
                             f"_mount({source!r}, {point!r}, {delay_ms / 1000})"], cwd=ROOT)
    for _ in range(100):
        with open("/proc/self/mounts") as fh:
            if f" {point} fuse." in fh.read():
                return proc
        if proc.poll() is not None:
            raise RuntimeError(f"the delayed mount did not start (exit {proc.returncode})")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the delayed mount did not start")


def unmount(point: str, proc: subprocess.Popen) -> None:
    """Unmount a `delayed_mount`; lazily where a process still holds a file open there (a
    Ray worker not yet ended), so that no dead mount is left behind."""
    if subprocess.run(["fusermount", "-u", point], check=False,
                      stderr=subprocess.DEVNULL).returncode:
        subprocess.run(["fusermount", "-uz", point], check=False)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    try:
        os.rmdir(point)  # the empty mount point `delayed_mount` made
    except OSError:
        pass  # still mounted (lazily), or not made there


def _mount(source: str, point: str, delay_s: float) -> None:
    import errno

    from fuse import FUSE, FuseOSError, Operations

    class Delayed(Operations):
        def _path(self, path):
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._path(path))
            except FileNotFoundError:
                raise FuseOSError(errno.ENOENT) from None
            return {k: getattr(st, k) for k in ("st_atime", "st_ctime", "st_gid", "st_mode",
                                                "st_mtime", "st_nlink", "st_size", "st_uid")}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._path(path))]

        def open(self, path, flags):
            time.sleep(delay_s)
            return os.open(self._path(path), flags)

        def read(self, path, size, offset, fh):
            time.sleep(delay_s)
            return os.pread(fh, size, offset)

        def release(self, path, fh):
            os.close(fh)

    FUSE(Delayed(), point, foreground=True, ro=True, nothreads=False,
         fsname="hemeflow-delayed", subtype="hemeflow-delayed")
