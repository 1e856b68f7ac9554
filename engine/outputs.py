"""Writing Parquet and small text files to a local folder or S3, atomically per file.

A local file is written under a temporary name and renamed into place; an S3 object appears whole
on its single PUT. Readers therefore never see half a file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import StorageConfig
from engine.errors import OutputFull
from engine.slides.storage import call_with_retries, get_filesystem, is_remote, normalize_uri


def run_stamp() -> str:
    """A name part for what one run writes: UTC time to the second (names sort in the order
    runs began), then random hex, so two runs begun in the same second never share one."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def join_uri(base: str, *parts: str) -> str:
    return "/".join([normalize_uri(base).rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Write ``data`` to ``uri`` so that it appears whole or not at all."""
    if is_remote(uri):
        fs, path = get_filesystem(uri, storage)
        call_with_retries(lambda: fs.pipe_file(path, data), storage, "upload")
        return
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    tmp = f"{uri}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, uri)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a full disk kept it, and lost the space
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputFull(f"{uri}: no space left on its disk ({err.strerror}): free some, or "
                             "write to another output, and run again; what was written whole "
                             "before stays") from err
        if isinstance(err, OSError) and err.filename == tmp and err.errno is not None:
            # the file asked for, not its temporary name (a folder the job may not write)
            raise type(err)(err.errno, err.strerror, uri) from err
        raise


TMP_MARK = ".tmp-"  # a local file being written: `write_bytes` names it <name>.tmp-<hex>


def write_parquet(table: pa.Table, uri: str, storage: StorageConfig,
                  row_group_size: int | None = None) -> None:
    """One Parquet file (zstd), written atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes(uri, buf.getvalue(), storage)
