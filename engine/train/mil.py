"""Training ABMIL on bags (slides' tile embeddings or patients' cell embeddings). Pure torch.

``mil_train_loop`` is written against a `Session` (``engine.train.loop``): it runs in this process
(``train_mil``) or on Ray Train workers (``engine.pipeline.train.run_ray_training``), reports every
few epochs with a resumable checkpoint, and splits each epoch's bags evenly over the workers
(DDP).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.models.mil import GatedABMIL
from engine.train.loop import LocalSession, load_train_state, save_train_state, unwrap


def _model(config: dict) -> GatedABMIL:
    n_out = 1 if config["task"] == "regression" else config["n_classes"]
    return GatedABMIL(config["bags"][0].shape[1], n_out, config.get("hidden", 128),
                      task=config["task"])


def mil_train_loop(config: dict, session) -> None:
    """One random bag of up to ``bag_size`` instances per step (batch of one bag, as Ilse et al.).

    ``config`` keys: ``bags`` (list of ``(n_i, D)`` arrays), ``targets`` (regression in [0, 1],
    or class indices), ``task``, ``n_classes``, ``epochs``, ``lr``, ``weight_decay``,
    ``bag_size``, ``seed``, optional ``hidden`` and ``checkpoint_every`` (epochs, default 5; the
    last epoch always checkpoints).
    """
    bags, targets, task = config["bags"], np.asarray(config["targets"]), config["task"]
    seed, bag_size = config.get("seed", 0), config.get("bag_size", 256)
    torch.manual_seed(seed)
    model = session.prepare_model(_model(config))
    opt = torch.optim.AdamW(model.parameters(), lr=config.get("lr", 2e-4),
                            weight_decay=config.get("weight_decay", 1e-4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    start = 0
    restore = session.restore_dir()
    if restore:
        start = load_train_state(restore, model, opt, sched)[0]["epoch"] + 1
    per_rank = len(bags) // session.world_size  # equal step counts keep DDP in lockstep
    epoch_losses: list[float] = []  # since the last report
    for epoch in range(start, config.get("epochs", 60)):
        order = np.random.default_rng([seed, epoch]).permutation(len(bags))
        mine = order[session.rank * per_rank:(session.rank + 1) * per_rank]
        rng = np.random.default_rng([seed, epoch, session.rank])
        model.train()
        losses = []
        for i in mine:
            bag = bags[i]
            idx = rng.choice(len(bag), min(bag_size, len(bag)), replace=False)
            x = torch.as_tensor(bag[idx], dtype=torch.float32, device=session.device)[None]
            out, _ = model(x)
            if task == "regression":
                y = torch.tensor([float(targets[i])], device=session.device)
                loss = F.mse_loss(out[:, 0], y)
            else:
                loss = F.cross_entropy(out, torch.tensor([int(targets[i])],
                                                         device=session.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(float(np.mean(losses)))
        last = epoch == config.get("epochs", 60) - 1
        if not last and (epoch + 1) % config.get("checkpoint_every", 5):
            continue  # a report synchronises the workers (about 2 s on Ray Train): every few
        metrics = {"epoch": epoch, "loss": epoch_losses[-1], "epoch_losses": epoch_losses}
        epoch_losses = []
        with tempfile.TemporaryDirectory() as tmp:
            if session.rank == 0:
                save_train_state(tmp, model, opt, sched, {"epoch": epoch},
                                 dict(unwrap(model).state_dict()))
            session.report(metrics, tmp if session.rank == 0 else None)


def load_trained(config: dict, checkpoint_dir: str) -> GatedABMIL:
    """The model of ``mil_train_loop``'s last checkpoint, in eval mode."""
    model = _model(config)
    model.load_state_dict(load_file(os.path.join(checkpoint_dir, "best.safetensors")))
    return model.eval()


def train_mil(bags: list[np.ndarray], targets: np.ndarray, task: str, n_classes: int = 1,
              epochs: int = 60, lr: float = 2e-4, weight_decay: float = 1e-4,
              bag_size: int = 256, seed: int = 0, hidden: int = 128) -> tuple[GatedABMIL, list]:
    """``mil_train_loop`` in this process (CPU, or CUDA when present).

    Returns:
        ``(model in eval mode, per-epoch mean loss)``.
    """
    config = {"bags": bags, "targets": targets, "task": task, "n_classes": n_classes,
              "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "bag_size": bag_size,
              "seed": seed, "hidden": hidden}
    with tempfile.TemporaryDirectory(prefix="hemeflow-mil-") as root:
        session = LocalSession(root, log=lambda _: None)
        mil_train_loop(config, session)
        model = load_trained(config, session.restore_dir())
    return model.to("cpu"), [v for h in session.history for v in h["epoch_losses"]]
