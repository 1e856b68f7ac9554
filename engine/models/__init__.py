"""Models: registry of specs built with timm, safetensors checkpoints with cards, batch inference.

>>> from engine.models import create_model, Predictor
>>> model = create_model("deepheme-resnext50")            # the shipped reference checkpoint
>>> probs = Predictor(model).predict(crops)                # crops: (B, 96, 96, 3) uint8

Each name is imported from its module on first use (PEP 562): the registry (`list_models`,
`get_spec`) and the errors come without torch and timm, so a job that lists the models in its
``--help`` answers at once; the factory, checkpoints and inference bring them.
"""

import importlib

_WHERE = {
    "CheckpointError": "engine.errors", "MissingWeights": "engine.errors",
    "read_checkpoint": "engine.models.checkpoint", "write_checkpoint": "engine.models.checkpoint",
    "UNTRAINED_SEED": "engine.models.factory", "LoadedModel": "engine.models.factory",
    "build_module": "engine.models.factory", "create_model": "engine.models.factory",
    "EnsemblePredictor": "engine.models.inference", "Predictor": "engine.models.inference",
    "default_device": "engine.models.inference",
    "ModelSpec": "engine.models.registry", "get_spec": "engine.models.registry",
    "list_models": "engine.models.registry", "register_model": "engine.models.registry",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'engine.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # found here from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
