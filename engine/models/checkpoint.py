"""Checkpoints as safetensors plus a JSON card; pickle is never loaded.

``model.safetensors`` holds the weights; ``model.json`` beside it says what they are: timm
architecture, class codes, input size and µm/px, preprocessing, training data and metrics.
A checkpoint whose card names ``weights_from`` holds only what it adds to the weights of that
file beside it (`read_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import struct

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from engine import first_contact
from engine.config import StorageConfig, unsupported_storage
from engine.errors import CheckpointError, MissingWeights  # noqa: F401 - theirs to name


def card_path(checkpoint: str) -> str:
    root = checkpoint[: -len(".safetensors")] if checkpoint.endswith(".safetensors") else checkpoint
    return root + ".json"


def _open(uri: str, mode: str, storage: StorageConfig):
    if said := unsupported_storage(uri):
        raise CheckpointError(said)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = storage.fsspec_options(protocol)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if protocol != "file":  # a wrong endpoint named at once (`engine.first_contact`)
        first_contact.check(fs, path, options)
    if "w" in mode and protocol == "file":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return fs.open(path, mode)


def _check_not_pickle(uri: str, head: bytes) -> None:
    """safetensors starts with a little-endian u64 header length and then ``{``."""
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return
    kind = ("a zip/pickle PyTorch checkpoint (torch.save)" if head[:2] == b"PK"
            else "a pickle file" if head[:1] == b"\x80" else "not a safetensors file")
    raise CheckpointError(
        f"{uri} is {kind}; hemeflow loads safetensors only and never unpickles checkpoints. "
        "Convert it where you trust its origin: "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')")


def read_checkpoint(uri: str, storage: StorageConfig | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(state_dict, card)`` from a local path or ``s3://`` URI, refusing pickle."""
    storage = storage or StorageConfig()
    try:
        with _open(uri, "rb", storage) as fh:
            data = fh.read()
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint not found: {uri}") from err
    _check_not_pickle(uri, data[:16])
    try:
        state = load_safetensors_bytes(data)
    except SafetensorError as err:  # a copy cut short, say: it was a traceback
        raise CheckpointError(f"{uri} is damaged or cut short ({len(data):,} bytes; "
                              f"safetensors: {err}): copy it again") from err
    try:
        with _open(card_path(uri), "rb", storage) as fh:
            card = json.loads(fh.read())
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint card missing: {card_path(uri)} (every checkpoint "
                              "travels with a JSON card naming its architecture and classes)"
                              ) from err
    except ValueError as err:  # not JSON, or not UTF-8: the refusal named neither file
        raise CheckpointError(f"checkpoint card {card_path(uri)} is not valid JSON ({err}): "
                              "copy it again with its checkpoint") from err
    if not isinstance(card, dict):
        raise CheckpointError(f"checkpoint card {card_path(uri)} holds a JSON "
                              f"{type(card).__name__}, not an object of the checkpoint's fields")
    if card.get("weights_from"):
        state = {**_base_weights(uri, card, storage), **state}
    return state, card


def _base_weights(uri: str, card: dict, storage: StorageConfig) -> dict[str, torch.Tensor]:
    """The weights a checkpoint that adds to another's starts from: the safetensors file its
    card's ``weights_from`` names beside it, whose SHA-256 must be ``weights_sha256`` (what it
    adds was fitted to those weights: an int8 model's activation ranges, a 14 KB file beside
    the reference's 47 MB, `engine/models/checkpoints/deepheme-resnext50-int8.json`)."""
    name, want = card["weights_from"], card.get("weights_sha256")
    if "/" in name or "\\" in name or name in (".", "..") or not want:
        raise CheckpointError(f"{card_path(uri)}: weights_from must name a file beside it, "
                              f"with its weights_sha256 (got {name!r})")
    base = posixpath.join(posixpath.dirname(uri), name) if "://" in uri else \
        os.path.join(os.path.dirname(uri), name)
    try:
        with _open(base, "rb", storage) as fh:
            data = fh.read()
    except FileNotFoundError as err:
        raise CheckpointError(f"{uri} adds to the weights of {name}, which is not beside it "
                              f"({base})") from err
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{uri} was made for other weights than those of {base} (its "
                              "SHA-256 differs from the card's weights_sha256): make it again "
                              "from that checkpoint")
    _check_not_pickle(base, data[:16])
    return load_safetensors_bytes(data)


def write_checkpoint(state: dict[str, torch.Tensor], card: dict, uri: str,
                     storage: StorageConfig | None = None,
                     dtype: torch.dtype | None = None) -> None:
    """Write weights (optionally cast floating tensors to ``dtype``, e.g. fp16) and the card."""
    storage = storage or StorageConfig()
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    with _open(uri, "wb", storage) as fh:
        fh.write(save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    with _open(card_path(uri), "wb", storage) as fh:
        fh.write(json.dumps(card, indent=2, sort_keys=True, default=str).encode())
