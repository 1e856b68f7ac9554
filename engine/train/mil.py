"""Training ABMIL on bags (slides' tile embeddings or patients' cell embeddings). Pure torch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.mil import GatedABMIL


def train_mil(bags: list[np.ndarray], targets: np.ndarray, task: str, n_classes: int = 1,
              epochs: int = 60, lr: float = 2e-4, weight_decay: float = 1e-4,
              bag_size: int = 256, seed: int = 0, hidden: int = 128) -> tuple[GatedABMIL, list]:
    """One random bag of up to ``bag_size`` instances per slide per step (batch of one bag, as
    Ilse et al.); regression targets in [0, 1], classification targets class indices.

    Returns:
        ``(model in eval mode, per-epoch mean loss)``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GatedABMIL(bags[0].shape[1], 1 if task == "regression" else n_classes, hidden,
                       task=task)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for _ in range(epochs):
        model.train()
        losses = []
        for i in rng.permutation(len(bags)):
            bag = bags[i]
            idx = rng.choice(len(bag), min(bag_size, len(bag)), replace=False)
            out, _ = model(torch.as_tensor(bag[idx], dtype=torch.float32)[None])
            if task == "regression":
                loss = F.mse_loss(out[0, 0], torch.tensor(float(targets[i])))
            else:
                loss = F.cross_entropy(out, torch.tensor([int(targets[i])]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    return model.eval(), history
