"""``create_model(name)``: a registered spec, built with timm, with weights from a checkpoint."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import timm
import torch

from engine.config import StorageConfig
from engine.models import quantize
from engine.models.checkpoint import CheckpointError, MissingWeights, read_checkpoint
from engine.models.ood import PREFIX as OOD_PREFIX
from engine.models.ood import FeatureDensity
from engine.models.registry import ModelSpec, get_spec


@dataclass
class LoadedModel:
    """A built model and what it is.

    Attributes:
        module: the timm ``nn.Module`` in eval mode, float32, on CPU.
        spec: its registry spec.
        class_codes: codes of the output classes, in logit order (empty for encoders).
        card: the checkpoint card (empty for untrained or hub weights).
        weights: where the weights came from: a checkpoint URI, ``hub:<tag>`` or ``untrained``.
        mean, std: input normalisation from timm's data config.
        int8: the int8 body, from an int8 checkpoint (CPU only).
        ood: the training data's feature density, from a checkpoint that carries one.
        temperature: the softmax temperature its final layer was divided by at loading (the
            card's ``temperature.value``; 1: none).
    """

    module: torch.nn.Module
    spec: ModelSpec
    class_codes: tuple[str, ...]
    card: dict = field(default_factory=dict)
    weights: str = "untrained"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    int8: torch.nn.Module | None = None  # int8 body for CPUs, from an int8 checkpoint
    ood: FeatureDensity | None = None  # distance to the training data (engine.models.ood)
    temperature: float = 1.0

    @property
    def trained(self) -> bool:
        return self.weights != "untrained"

    @property
    def num_features(self) -> int:
        return int(self.module.num_features)


# the random weights of an untrained model in a run (--allow-untrained, benchmarks and tests
# only): the same in every actor and process, so such a run's outputs repeat
UNTRAINED_SEED = 0


def build_module(spec: ModelSpec, num_classes: int, pretrained: bool = False) -> torch.nn.Module:
    name = spec.hub_id if pretrained and spec.hub_id else spec.architecture
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                             **dict(spec.timm_kwargs))


def _loaded_module(spec: ModelSpec, num_classes: int, state: dict) -> tuple[torch.nn.Module,
                                                                           list, list]:
    """``spec``'s module holding ``state``, and `load_state_dict`'s missing and unexpected keys.

    Built on the meta device, where no weight is drawn, then given the state's own tensors: on
    a CPU the random initialisation the checkpoint replaces took 0.17 s of ResNeXt-50, 0.7 s of
    ViT-B/14 and 2.7 s of ViT-L/14, in the driver and again in every model actor. Where that
    build fails or leaves a tensor the state does not hold (a buffer that no checkpoint keeps),
    the module is built as usual instead."""
    try:
        with torch.device("meta"):
            module = build_module(spec, num_classes)
    except (RuntimeError, NotImplementedError):  # a build that reads a tensor's values
        module = None
    if module is not None:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected or not any(
                t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
            return module, missing, unexpected
    module = build_module(spec, num_classes)
    return (module, *module.load_state_dict(state, strict=False))


# timm build arguments with which the same weights compute something else (a dilated last
# stage): a checkpoint loads only into the build it was trained in. Others that matter change
# the weights' shapes (a ViT's img_size), which loading the weights checks.
BUILD_KEYS = ("output_stride",)


def build_kwargs(kwargs) -> tuple[tuple[str, object], ...]:
    """The `BUILD_KEYS` among timm build arguments (a dict or pairs), sorted: a card's
    ``timm_kwargs`` (none before cards recorded them) or a spec's."""
    return tuple(sorted((k, v) for k, v in dict(kwargs or {}).items() if k in BUILD_KEYS))


def create_model(name: str, checkpoint: str | None = None, *, class_codes=None,
                 allow_untrained: bool = False, hub: bool = False,
                 storage: StorageConfig | None = None, seed: int | None = None,
                 any_build: bool = False, calibrated: bool = True) -> LoadedModel:
    """Build a registered model with weights.

    Weights come from ``checkpoint`` if given, else the spec's default checkpoint if it exists,
    else the timm hub when ``hub=True`` (needs network), else random init when
    ``allow_untrained=True`` (benchmarks and tests only). ``seed`` fixes that random init without
    touching the caller's random state (the pipeline's actors: the same weights in every process
    and run); ``None`` draws it from torch's global generator.

    ``any_build``: load a checkpoint of the same architecture trained in another build of it
    (`build_kwargs`): a start to fine-tune from, never a model to run.

    ``calibrated``: divide the final layer by the card's softmax temperature
    (`engine.train.calibration.fit_temperature`), as every model that runs is; False gives the
    weights as trained (a start to fine-tune from, or to fit a calibration on).

    Raises:
        ValueError: unknown name (lists the registered ones).
        MissingWeights: no weights and ``allow_untrained`` is False; names the expected file.
        CheckpointError: the checkpoint is pickle, lacks a card, or does not fit the
            architecture or its build.
    """
    spec = get_spec(name)
    uri = checkpoint or _existing(spec.checkpoint_uri())
    if uri is not None:
        state, card = read_checkpoint(uri, storage)
        if card.get("architecture") != spec.architecture:
            raise CheckpointError(f"{uri} holds a {card.get('architecture')!r} model, but "
                                  f"{name!r} is {spec.architecture!r}")
        built, want = build_kwargs(card.get("timm_kwargs")), build_kwargs(spec.timm_kwargs)
        if built != want and not any_build:
            raise CheckpointError(f"{uri} was trained as {spec.architecture} built with "
                                  f"{dict(built)}, but {name!r} builds it with {dict(want)}: "
                                  f"load it as the model it was trained as "
                                  f"({card.get('name', '?')!r})")
        codes = tuple(card.get("class_codes", ()))
        ranges = {k: v for k, v in state.items() if k.startswith(quantize.PREFIX)}
        density = {k: v for k, v in state.items() if k.startswith(OOD_PREFIX)}
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
                 if k not in ranges and k not in density}
        module, missing, unexpected = _loaded_module(
            spec, len(codes) if spec.task == "classification" else 0, state)
        if missing or unexpected:
            raise CheckpointError(f"{uri} does not fit {spec.architecture}: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")
        temperature = card_temperature(card, uri) if calibrated else 1.0
        if temperature != 1.0:
            head = module.get_classifier()
            with torch.no_grad():
                head.weight.div_(temperature)
                if head.bias is not None:
                    head.bias.div_(temperature)
        loaded = _finish(module, spec, codes, card, uri)
        loaded.temperature = temperature
        try:
            loaded.ood = FeatureDensity.from_state(density)
        except ValueError as err:
            raise CheckpointError(f"{uri}: {err}") from err
        scheme = (card.get("quantization") or {}).get("scheme")
        if scheme is not None:
            if scheme != quantize.SCHEME:
                raise CheckpointError(f"{uri}: quantization {scheme!r} is not one this version "
                                      f"runs ({quantize.SCHEME!r})")
            try:
                loaded.int8 = quantize.load_int8(module, ranges, spec.input_px)
            except ValueError as err:
                raise CheckpointError(f"{uri}: {err}") from err
        return loaded
    codes = tuple(class_codes or spec.class_codes)
    n_out = len(codes) if spec.task == "classification" else 0
    if hub and spec.hub_id:
        return _finish(build_module(spec, n_out, pretrained=True), spec, codes, {},
                       f"hub:{spec.hub_id}")
    if not allow_untrained:
        expected = spec.checkpoint_uri() or "(none registered for this model)"
        raise MissingWeights(
            f"model {name!r} has no trained weights: expected checkpoint {expected}. Pass a "
            "checkpoint (--checkpoint / config), or --allow-untrained for benchmarks and tests "
            "only (outputs would be meaningless)")
    if spec.task == "classification" and not codes:
        raise ValueError(f"untrained classifier {name!r} needs class_codes")
    if seed is None:
        return _finish(build_module(spec, n_out), spec, codes, {}, "untrained")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _finish(build_module(spec, n_out), spec, codes, {}, "untrained")


def _existing(uri: str | None) -> str | None:
    if uri is None or "://" in uri:
        return uri
    return uri if os.path.exists(uri) else None


def card_temperature(card: dict, uri: str = "") -> float:
    """The softmax temperature a card records (``temperature.value``), 1 where it has none.

    Raises:
        CheckpointError: a value that is not a positive finite number.
    """
    value = (card.get("temperature") or {}).get("value", 1.0)
    if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise CheckpointError(f"{uri}: temperature {value!r} is not a positive number")
    return float(value)


def _finish(module, spec, codes, card, weights) -> LoadedModel:
    module.eval()
    cfg = timm.data.resolve_model_data_config(module)
    return LoadedModel(module=module, spec=spec, class_codes=tuple(codes), card=card,
                       weights=weights, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
