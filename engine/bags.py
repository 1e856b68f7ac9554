"""Per-patient bags of single-cell images (CellaVision-style exports) for slide-level MIL.

A folder holds one sub-folder per patient: ``<root>/<patient_id>/…/*.jpg``. Deeper folders (cell
types, dates) are allowed and ignored: every image under a patient is one instance of that
patient's bag. Each image is resampled from ``source_mpp`` to the encoder's µm/px, centre-cropped
to its input size and embedded by a registered cell encoder: by default the reference DeepHeme
checkpoint's penultimate features, as in DinoBloom- and DeepAPL-style AML subtyping.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_image_path(parts: list[str]) -> bool:
    """Whether the file at ``parts`` (its path's parts below a slide's or patient's folder) is
    one of its images: an image by its suffix, neither hidden nor in a hidden folder (a
    viewer's ``.thumbnails``, say)."""
    return not any(p.startswith(".") for p in parts) and parts[-1].lower().endswith(
        IMAGE_SUFFIXES)


def images_below(folder: str) -> list[str]:
    """The images (`is_image_path`) anywhere below the local ``folder``, sorted."""
    paths = []
    for d, subfolders, files in os.walk(folder):
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]  # as on S3
        paths += [os.path.join(d, f) for f in files if is_image_path([f])]
    return sorted(paths)


def find_patient_images(root: str) -> dict[str, list[str]]:
    """``patient_id -> sorted image paths`` for a local folder of patient sub-folders (hidden
    files and folders left out: a viewer's ``.thumbnails``, say).

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no patient with images.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"not a folder: {root} (expected <id>/…/<image> under it: a "
                                "folder per slide or patient)")
    bags: dict[str, list[str]] = {}
    for patient in sorted(os.listdir(root)):
        folder = os.path.join(root, patient)
        if patient.startswith(".") or not os.path.isdir(folder):
            continue
        paths = images_below(folder)
        if paths:
            bags[patient] = paths
    if not bags:
        raise FileNotFoundError(f"no <patient_id>/…/<image> files under {root}")
    return bags


def embed_patient_bags(bags: dict[str, list[str]], model: str = "deepheme-resnext50",
                       checkpoint: str | None = None, source_mpp: float = 0.1,
                       batch_size: int = 128, allow_untrained: bool = False,
                       storage=None) -> dict[str, np.ndarray]:
    """``patient_id -> (n_images, D) float32`` pooled features of ``model``.

    Raises:
        MissingWeights: the encoder has no weights and ``allow_untrained`` is False.
    """
    from engine.classes import DEEPHEME_CODES
    from engine.models import Predictor, create_model
    from engine.train.data import load_cell_images

    loaded = create_model(model, checkpoint, allow_untrained=allow_untrained,
                          class_codes=DEEPHEME_CODES, storage=storage)
    predictor = Predictor(loaded)
    spec = loaded.spec
    out = {}
    for patient, paths in bags.items():
        feats = []
        for i in range(0, len(paths), batch_size):
            images = load_cell_images(paths[i:i + batch_size], source_mpp, spec.input_mpp,
                                      spec.input_px)
            feats.append(predictor.embed(images))
        out[patient] = np.concatenate(feats).astype(np.float32)
    return out
