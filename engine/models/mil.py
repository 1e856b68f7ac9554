"""Gated attention-based MIL (Ilse, Tomczak & Welling 2018) for slide- or patient-level targets.

A bag of N instance embeddings ``(N, D)`` -> gated attention weights ``(N,)`` -> weighted mean
``(D,)`` -> linear -> sigmoid (regression, e.g. cellularity in [0, 1]) or class logits. At
inference K random bags of up to ``bag_size`` instances are drawn per slide and the outputs'
mean and standard deviation reported, as the ARUP cellularity method does. Heatmaps use
``attention_scores``: the gated attention branch scores each instance on its own (the softmax
over a bag only rescales them), so every tile or image of a slide or patient gets one, drawn into
a bag or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.config import StorageConfig
from engine.models.checkpoint import CheckpointError, read_checkpoint, write_checkpoint

ARCHITECTURE = "gated-abmil"


class GatedABMIL(nn.Module):
    """``forward(x (B, N, D), mask (B, N) bool | None) -> (out (B, C), attention (B, N))``."""

    def __init__(self, in_dim: int, n_out: int = 1, hidden: int = 128, attn_dim: int = 64,
                 dropout: float = 0.1, task: str = "regression"):
        super().__init__()
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be regression or classification, got {task!r}")
        self.task, self.in_dim, self.n_out = task, in_dim, n_out
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.head = nn.Linear(hidden, n_out)

    def _scores(self, h: torch.Tensor) -> torch.Tensor:
        """Gated attention logits ``(B, N)`` of embedded instances ``h (B, N, H)``."""
        return self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        h = self.embed(x)                                                   # (B, N, H)
        a = self._scores(h)
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        a = torch.softmax(a, dim=1)                                         # (B, N)
        z = torch.einsum("bn,bnh->bh", a, h)                                # (B, H)
        out = self.head(z)
        return (torch.sigmoid(out) if self.task == "regression" else out), a


@dataclass
class MILPrediction:
    """K-bag prediction for one slide or patient: mean and sd over bags (regression: the value;
    classification: class probabilities), and per-instance attention."""

    mean: np.ndarray
    sd: np.ndarray
    attention: np.ndarray
    n_bags: int
    bag_size: int


@torch.inference_mode()
def predict_bags(model: GatedABMIL, instances: np.ndarray, n_bags: int = 10, bag_size: int = 256,
                 seed: int = 0) -> MILPrediction:
    """K resampled bags (without replacement inside a bag) through the model."""
    model.eval()
    rng = np.random.default_rng(seed)
    n = len(instances)
    size = min(bag_size, n)
    attn_sum, attn_cnt = np.zeros(n), np.zeros(n)
    outs = []
    x_all = torch.as_tensor(np.asarray(instances, np.float32))
    for _ in range(n_bags):
        idx = rng.choice(n, size, replace=False)
        out, a = model(x_all[idx][None])
        out = out[0] if model.task == "regression" else torch.softmax(out[0], -1)
        outs.append(out.numpy())
        attn_sum[idx] += a[0].numpy()
        attn_cnt[idx] += 1
    outs = np.stack(outs)
    return MILPrediction(outs.mean(0), outs.std(0), attn_sum / np.maximum(attn_cnt, 1), n_bags,
                         size)


@torch.inference_mode()
def attention_scores(model: GatedABMIL, instances: np.ndarray, chunk: int = 65536
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Every instance's attention logit ``(N,)`` and its relative attention ``(N,)``: ``N`` x
    the softmax over all ``N``, so 1 is an average instance and 3 one that weighs three times
    as much in any bag it is drawn into with the others."""
    model.eval()
    x = torch.as_tensor(np.asarray(instances, np.float32))
    scores = torch.cat([model._scores(model.embed(x[lo : lo + chunk][None]))[0]
                        for lo in range(0, len(x), chunk)]) if len(x) else torch.zeros(0)
    relative = torch.softmax(scores.double(), 0) * len(x)
    return scores.float().numpy(), relative.float().numpy()


def save_mil(model: GatedABMIL, uri: str, card: dict, storage: StorageConfig | None = None):
    card = {**card, "architecture": ARCHITECTURE, "task": model.task, "in_dim": model.in_dim,
            "n_out": model.n_out, "hidden": model.embed[0].out_features,
            "attn_dim": model.attn_v.out_features}
    write_checkpoint(model.state_dict(), card, uri, storage)


def load_mil(uri: str, storage: StorageConfig | None = None) -> tuple[GatedABMIL, dict]:
    state, card = read_checkpoint(uri, storage)
    if card.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{uri} is not an ABMIL checkpoint ({card.get('architecture')})")
    model = GatedABMIL(card["in_dim"], card["n_out"], card["hidden"], card["attn_dim"],
                       task=card["task"])
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), card
