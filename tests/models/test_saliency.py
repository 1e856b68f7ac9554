"""Saliency of the shipped classifier on real held-out cells: the maps point at what decided
each call (blanking their top pixels takes the call away; blanking the least salient does
not), and they sit on the centred cell, not the background."""

import numpy as np
import pytest

from engine.models import create_model
from engine.models.saliency import cam_layer, deletion_drop, grad_cam, saliency, smooth_grad
from engine.train.data import load_cell_images
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "pbc" / "labels.csv").exists(),
                                reason="PBC data not present")


@pytest.fixture(scope="module")
def cells():
    """Two held-out images of each code (the reference checkpoint never trained on them), as
    the classifier sees them: 96 px at 0.25 µm/px, the cell in the middle."""
    from tests.models.test_mil_bags import _held_out_images

    by_code: dict[str, list[str]] = {}
    for path, code in _held_out_images():
        by_code.setdefault(code, []).append(path)
    paths = [p for code in sorted(by_code) for p in by_code[code][:2]]
    return create_model("deepheme-resnext50"), load_cell_images(paths, 0.1, 0.25, 96)


def _centre_share(maps: np.ndarray, radius: float = 24) -> tuple[np.ndarray, float]:
    """Each map's share inside the central disk (where PBC centres its cell), and the disk's
    share of the crop."""
    h, w = maps.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    centre = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= radius ** 2
    return (maps * centre).sum((1, 2)) / np.maximum(maps.sum((1, 2)), 1e-9), centre.mean()


@pytest.mark.parametrize("method", ["gradcam", "smoothgrad"])
def test_maps_point_at_what_decided_the_call(cells, method):
    model, images = cells
    if method == "smoothgrad":  # 4 noisy passes per crop on half the crops: CPU time
        images = images[::2]
    kwargs = {"samples": 4} if method == "smoothgrad" else {}
    maps, called = saliency(method, model, images, **kwargs)
    assert maps.shape == images.shape[:3] and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.max((1, 2)) > 0.99).all()
    top = deletion_drop(model, images, maps, called)
    least = deletion_drop(model, images, 1 - maps, called)
    rng = np.random.default_rng(0)
    scattered = deletion_drop(model, images, rng.random(maps.shape).astype(np.float32), called)
    # measured: top 0.66 (both methods), least -0.01 / 0.02, scattered 0.34 / 0.36
    assert top.mean() > scattered.mean() + 0.15, (top.mean(), scattered.mean())
    assert least.mean() < 0.1 and top.mean() > 0.5, (least.mean(), top.mean())
    share, area = _centre_share(maps)  # measured 0.44 / 0.51 of the maps in 20 % of the crop
    assert share.mean() > 1.6 * area, share.mean()


def test_targets_layers_and_refusals(cells):
    model, images = cells
    images = images[:6]
    assert cam_layer(model) == "layer3"  # 6 x 6 at 96 px; layer4's 3 x 3 says less
    own, called = grad_cam(model, images)
    same, again = grad_cam(model, images, target=called)
    np.testing.assert_allclose(own, same, atol=1e-5)
    assert (called == again).all()
    other = (called + 1) % len(model.class_codes)
    theirs, explained = grad_cam(model, images, target=other)
    assert (explained == other).all() and np.abs(theirs - own).mean() > 0.05
    with pytest.raises(ValueError, match="2 targets for 6 crops"):
        grad_cam(model, images, target=[0, 1])
    with pytest.raises(ValueError, match=r"target class indices must lie in \[0, 11\)"):
        smooth_grad(model, images, target=[11] * 6, samples=1)
    with pytest.raises(ValueError, match="no layer 'layer9'; its stages: .*'layer3', 'layer4'"):
        grad_cam(model, images, layer="layer9")
    with pytest.raises(ValueError, match="unknown saliency method 'occlusion'"):
        saliency("occlusion", model, images)
    encoder = create_model("dinov2-tiny", allow_untrained=True)
    with pytest.raises(ValueError, match="not a classifier"):
        grad_cam(encoder, images)
