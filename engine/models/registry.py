"""Model specs registered by name, as timm does: ``create_model("deepheme-resnext50")``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from engine.errors import ConfigError

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


@dataclass(frozen=True)
class ModelSpec:
    """What a registered model is.

    Attributes:
        name: registry name.
        architecture: timm model name.
        task: ``classification`` (class probabilities) or ``embedding`` (pooled features).
        input_px: square input side in pixels.
        input_mpp: µm per pixel the model expects.
        class_codes: default class codes (a checkpoint card overrides them).
        checkpoint: default weights: a safetensors URI, or a file name inside the package's
            ``checkpoints/`` folder; None if the project ships none.
        hub_id: timm pretrained tag, used only when asked to fetch from the hub (online machines).
        timm_kwargs: extra arguments for ``timm.create_model``.
        description: one line for ``list_models``.
    """

    name: str
    architecture: str
    task: str
    input_px: int
    input_mpp: float
    class_codes: tuple[str, ...] = ()
    checkpoint: str | None = None
    hub_id: str | None = None
    timm_kwargs: tuple[tuple[str, object], ...] = field(default_factory=tuple)
    description: str = ""

    def checkpoint_uri(self) -> str | None:
        """The default checkpoint as a URI (package-relative names resolved), or None."""
        if self.checkpoint is None:
            return None
        if "://" in self.checkpoint or os.path.isabs(self.checkpoint):
            return self.checkpoint
        return os.path.join(CHECKPOINT_DIR, self.checkpoint)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; ValueError lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; registered models: {list_models()}") from None


_CELL = dict(task="classification", input_px=96, input_mpp=0.25)
register_model(ModelSpec(
    "deepheme-resnext50", "resnext50_32x4d", **_CELL,
    checkpoint="deepheme-resnext50.safetensors",
    description="DeepHeme cell classifier: ResNeXt-50 32x4d on 96x96 crops at 0.25 um/px"))
register_model(ModelSpec(
    "deepheme-resnext50-int8", "resnext50_32x4d", **_CELL,
    checkpoint="deepheme-resnext50-int8.safetensors",
    description="the shipped DeepHeme classifier in int8, for CPU-only nodes (its body runs in "
                "int8 on the CPU, x2.4 its bf16 rate on 2 AVX512 cores): the reference's "
                "weights with activation ranges calibrated on 512 of its training images"))
register_model(ModelSpec(
    "deepheme-resnext50-os16", "resnext50_32x4d", **_CELL,
    timm_kwargs=(("output_stride", 16),),
    description="ResNeXt-50 32x4d with its last stage dilated (output stride 16): a 6x6 final "
                "map of a 96 px crop where the plain one has 3x3 (no shipped weights)"))
register_model(ModelSpec(
    "deepheme-resnet18", "resnet18", **_CELL,
    description="smaller cell classifier for quick experiments (no shipped weights)"))
register_model(ModelSpec(
    "deepheme-tiny", "test_resnet", **_CELL,
    description="tiny test classifier (tests and benchmarks; random weights)"))

_TILE = dict(task="embedding", input_px=224, input_mpp=2.0)
for size, arch in (("s", "vit_small_patch14_dinov2"), ("b", "vit_base_patch14_dinov2"),
                   ("l", "vit_large_patch14_dinov2")):
    register_model(ModelSpec(
        f"dinov2-vit{size}14", arch, **_TILE, hub_id=f"{arch}.lvd142m",
        timm_kwargs=(("img_size", 224),),
        description=f"DINOv2 ViT-{size.upper()}/14 tile encoder, pooled features at 224 px"))
register_model(ModelSpec(
    "dinov2-tiny", "test_vit", **_TILE, timm_kwargs=(("img_size", 224), ("patch_size", 14)),
    description="tiny ViT tile encoder (tests and benchmarks; random weights)"))
