"""Static int8 quantization of a classifier's feature extractor for CPU-only nodes.

On a CPU without native bf16 (AVX2, AVX-512 without BF16) the classifier bounds the cells
branch, and int8 convolutions (oneDNN / FBGEMM, the ``x86`` backend) run ResNeXt-50 about 1.5x
faster than float32 at the same predictions. The body (stem, stages, global pool) is quantized
with PyTorch's FX graph mode; the final linear layer stays float32.

Activation ranges come from calibration on real crops (``jobs.quantize_cell_classifier``,
histogram observers) and travel inside the checkpoint beside the float weights, as each
activation's scale and zero point under ``int8.`` (no pickle): loading builds the float model,
prepares the same graph with those numbers in place of observers, and converts (about 2 s for
ResNeXt-50 on 2 cores).
The float weights stay in the file, so the same checkpoint also serves GPUs in float.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch.ao.quantization.observer import ObserverBase

SCHEME = "int8-static-x86-fx"
PREFIX = "int8."
_BACKEND = "x86"


class PooledFeatures(torch.nn.Module):
    """A timm classifier's body: ``(B, 3, S, S)`` -> pooled features ``(B, D)``."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.model = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class StoredQParams(ObserverBase):
    """An activation "observer" that observes nothing: it returns the scale and zero point
    found at calibration (kept as buffers, so they load from the checkpoint). Loading this way
    skips the histogram search, which takes seconds per model at every load."""

    def __init__(self, dtype=torch.quint8, qscheme=torch.per_tensor_affine, **kwargs):
        super().__init__(dtype=dtype)
        self.qscheme = qscheme
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def calculate_qparams(self):
        return self.scale, self.zero_point


def _is_observer(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("activation_post_process")


def prepare_int8(module: torch.nn.Module, input_px: int, stored: bool = False) -> torch.nn.Module:
    """The body of ``module`` (float, eval) with an observer on every activation: histograms
    to calibrate, or with ``stored`` `StoredQParams` to load; ``module`` is not changed."""
    import copy

    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = _BACKEND
    mapping = get_default_qconfig_mapping(_BACKEND)
    if stored:
        default = mapping.global_qconfig
        mapping.set_global(QConfig(activation=StoredQParams.with_args(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine), weight=default.weight))
    body = PooledFeatures(copy.deepcopy(module).float().eval()).eval()
    with warnings.catch_warnings():  # torch.ao's notice that pt2e export is the newer path
        warnings.simplefilter("ignore")
        return prepare_fx(body, mapping, (torch.zeros(1, 3, input_px, input_px),))


@torch.inference_mode()
def calibrate(prepared: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Run normalised ``(B, 3, S, S)`` float batches through the observers; returns the rows."""
    n = 0
    for x in batches:
        prepared(x)
        n += len(x)
    return n


def observer_state(prepared: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each calibrated activation's scale and zero point, keyed ``int8.<observer>.<name>``
    for the checkpoint."""
    out = {}
    for name, obs in prepared.named_modules():
        if _is_observer(name):
            scale, zero_point = obs.calculate_qparams()
            out[f"{PREFIX}{name}.scale"] = scale.detach().float().reshape(1).contiguous()
            out[f"{PREFIX}{name}.zero_point"] = zero_point.detach().long().reshape(1).contiguous()
    return out


def convert_int8(prepared: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared).eval()


def load_int8(module: torch.nn.Module, state: dict[str, torch.Tensor],
              input_px: int) -> torch.nn.Module:
    """The int8 body of the float ``module`` from a checkpoint's ``int8.`` tensors.

    Raises:
        ValueError: the stored scales do not fit this model's graph.
    """
    prepared = prepare_int8(module, input_px, stored=True)
    observers = {n: m for n, m in prepared.named_modules() if _is_observer(n)}
    stored = {k[len(PREFIX):].rsplit(".", 1)[0] for k in state if k.startswith(PREFIX)}
    if stored != set(observers) or not all(isinstance(m, StoredQParams)
                                           for m in observers.values()):
        raise ValueError(f"int8 ranges do not fit this model: {len(stored)} stored, "
                         f"{len(observers)} expected ({sorted(stored ^ set(observers))[:3]} "
                         "differ)")
    for name, obs in observers.items():
        obs.scale.copy_(state[f"{PREFIX}{name}.scale"])
        obs.zero_point.copy_(state[f"{PREFIX}{name}.zero_point"])
    return convert_int8(prepared)
