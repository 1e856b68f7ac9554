"""Models: registry of specs built with timm, safetensors checkpoints with cards, batch inference.

>>> from engine.models import create_model, Predictor
>>> model = create_model("deepheme-resnext50")            # the shipped reference checkpoint
>>> probs = Predictor(model).predict(crops)                # crops: (B, 96, 96, 3) uint8
"""

from engine.models.checkpoint import (CheckpointError, MissingWeights, read_checkpoint,
                                      write_checkpoint)
from engine.models.factory import UNTRAINED_SEED, LoadedModel, build_module, create_model
from engine.models.inference import EnsemblePredictor, Predictor, default_device
from engine.models.registry import ModelSpec, get_spec, list_models, register_model

__all__ = ["CheckpointError", "EnsemblePredictor", "LoadedModel", "MissingWeights", "ModelSpec",
           "Predictor", "UNTRAINED_SEED", "build_module", "create_model", "default_device",
           "get_spec", "list_models", "read_checkpoint", "register_model", "write_checkpoint"]
