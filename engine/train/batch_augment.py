"""The DeepHeme augmentation recipe on whole batches, in torch, on the training device.

`engine.train.augment` runs the recipe with albumentations, one image at a time in DataLoader
processes. On a GPU those processes can bound training: with 15 of them the reference ResNeXt-50
trained at about 2.4k crops/s of 96 px on an H100, where it runs inference at 26.5k/s alone.
`BatchAugment` draws the same
transforms from the same ranges (`RECIPE`) for a whole batch of uint8 images already on the
device: one resampling for rotation, shear, scale, flips and the centre crop (``grid_sample``
with reflected borders), then brightness and contrast, hue, saturation and value, HED stain
jitter and Gaussian noise, each applied to a random share of the batch as its probability says.

It follows albumentations' definitions (brightness by the maximum, hue in OpenCV's 0-180 units,
saturation and value shifted on 0-255, noise standard deviation as a share of 255) without
reproducing its pixels: interpolation and rounding differ, and each step clips to 0-255 in
floats instead of rounding to uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB) as rows, as in skimage.color.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


@dataclass(frozen=True)
class Recipe:
    """Ranges and probabilities of the training augmentation (both implementations read it)."""

    affine_p: float = 0.9
    rotate: tuple[float, float] = (-180.0, 180.0)  # degrees
    shear: tuple[float, float] = (-8.0, 8.0)  # degrees, x and y drawn apart
    scale: tuple[float, float] = (0.9, 1.1)  # x and y drawn apart
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    brightness: float = 0.15  # beta in U(-b, b), times 255
    contrast: float = 0.15  # alpha in 1 + U(-c, c)
    brightness_contrast_p: float = 0.7
    hue: int = 6  # OpenCV hue units (2 degrees each)
    saturation: int = 12  # on 0-255
    value: int = 6  # on 0-255
    hsv_p: float = 0.5
    hed_sigma: float = 0.05
    hed_p: float = 0.5
    noise_std: tuple[float, float] = (0.01, 0.04)  # share of 255
    noise_p: float = 0.3


RECIPE = Recipe()
# --colour strong: stain and colour drawn far wider (hue +-30 degrees, saturation +-40, stain
# amounts +-10 %), for a model that should keep its calls across labs' stains and scanners;
# the shape ranges are the standard recipe's
STRONG_COLOUR = Recipe(brightness=0.2, contrast=0.3, brightness_contrast_p=0.8, hue=15,
                       saturation=40, value=15, hsv_p=0.8, hed_sigma=0.1, hed_p=0.8)
RECIPES = {"standard": RECIPE, "strong": STRONG_COLOUR}


class BatchAugment:
    """``(B, H, W, 3) uint8`` images on any device -> ``(B, 3, crop, crop) float32`` in 0-255,
    augmented by `RECIPE` (each image its own draw) and centre-cropped to ``crop_px``.

    Args:
        crop_px: output side; the inputs carry a margin around it (144 px for 96) so rotations
            rarely reach the border, which is reflected where they do.
        generator: a ``torch.Generator`` on the images' device, for reproducible draws.
    """

    def __init__(self, crop_px: int = 96, recipe: Recipe = RECIPE,
                 generator: torch.Generator | None = None):
        self.crop_px, self.recipe, self.generator = crop_px, recipe, generator

    def _u(self, n: int, lo: float, hi: float, device) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, device=device, generator=self.generator)

    def _p(self, n: int, p: float, device) -> torch.Tensor:
        return torch.rand(n, device=device, generator=self.generator) < p

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) uint8 images, got {tuple(images.shape)} "
                             f"{images.dtype}")
        x = images.permute(0, 3, 1, 2).float()
        x = self.geometry(x)
        x = self.brightness_contrast(x)
        x = self.hsv_shift(x)
        x = self.hed_jitter(x)
        return self.noise(x)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Rotation, shear and scale about the centre (probability ``affine_p``), flips, and the
        centre crop, as one bilinear resampling."""
        r, dev = self.recipe, x.device
        n, _, h, w = x.shape
        c = self.crop_px
        on = self._p(n, r.affine_p, dev)

        def draw(lo_hi, off):  # a value per image where the affine applies, else ``off``
            return torch.where(on, self._u(n, *lo_hi, dev), off)

        angle = draw(r.rotate, 0.0) * (math.pi / 180)
        tan_x, tan_y = (torch.tan(-draw(r.shear, 0.0) * (math.pi / 180)) for _ in range(2))
        scale = torch.stack([draw(r.scale, 1.0), draw(r.scale, 1.0)], -1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        one = torch.ones_like(cos)
        # albumentations' forward map about the centre: Shear(x, y) @ R(angle) @ Scale(x, y),
        # with its signs (shear angles negated, rotation [[cos, sin], [-sin, cos]])
        shear_m = torch.stack([torch.stack([one, tan_x], -1), torch.stack([tan_y, one], -1)], -2)
        rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        m = shear_m @ rot * scale[:, None, :]
        det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]  # 2x2 inverse in closed form
        inv = torch.stack([torch.stack([m[:, 1, 1], -m[:, 0, 1]], -1),
                           torch.stack([-m[:, 1, 0], m[:, 0, 0]], -1)], -2) / det[:, None, None]
        flip = torch.stack([torch.where(self._p(n, r.hflip_p, dev), -1.0, 1.0),
                            torch.where(self._p(n, r.vflip_p, dev), -1.0, 1.0)], -1)
        inv = inv * flip[:, None, :]  # flips act on the output: columns of M^-1 F
        # grid_sample's normalised coordinates (align_corners=False): the output's base grid is
        # 2q/c and an input offset q' sits at 2q'/w, so the input point is (c/w) M^-1 F base
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, :2] = inv[:, 0] * (c / w)
        theta[:, 1, :2] = inv[:, 1] * (c / h)
        grid = F.affine_grid(theta, [n, 3, c, c], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                            align_corners=False)
        return out.clamp_(0, 255)

    def brightness_contrast(self, x: torch.Tensor) -> torch.Tensor:
        r, dev, n = self.recipe, x.device, len(x)
        on = self._p(n, r.brightness_contrast_p, dev)
        alpha = torch.where(on, 1 + self._u(n, -r.contrast, r.contrast, dev), 1.0)
        beta = torch.where(on, self._u(n, -r.brightness, r.brightness, dev) * 255, 0.0)
        return (x * alpha[:, None, None, None] + beta[:, None, None, None]).clamp_(0, 255)

    def hsv_shift(self, x: torch.Tensor) -> torch.Tensor:
        """Hue, saturation and value shifted by U(-limit, limit) each (grey pixels keep their
        zero saturation, as in albumentations)."""
        r, dev, n = self.recipe, x.device, len(x)
        on = self._p(n, r.hsv_p, dev)
        dh, ds, dv = (torch.where(on, self._u(n, -lim, lim, dev), 0.0).view(n, 1, 1)
                      for lim in (r.hue, r.saturation, r.value))
        hue, sat, val = rgb_to_hsv(x)
        hue = torch.remainder(hue + 2 * dh, 360.0)  # OpenCV hue units are 2 degrees
        sat = torch.where(sat > 0, (sat + ds).clamp(0, 255), sat)
        val = (val + dv).clamp(0, 255)
        return torch.where(on[:, None, None, None], hsv_to_rgb(hue, sat, val), x)

    def hed_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Tellez et al. 2018: each stain's optical density scaled by U(1-s, 1+s), shifted by
        U(-s, s) (as `engine.train.augment.HEDJitter`)."""
        r, dev, n = self.recipe, x.device, len(x)
        on = self._p(n, r.hed_p, dev)
        s = r.hed_sigma
        alpha = torch.where(on[:, None], self._u(3 * n, 1 - s, 1 + s, dev).view(n, 3), 1.0)
        beta = torch.where(on[:, None], self._u(3 * n, -s, s, dev).view(n, 3), 0.0)
        to_hed = torch.as_tensor(HED_FROM_RGB, device=dev)
        to_rgb = torch.as_tensor(RGB_FROM_HED, device=dev)
        od = -torch.log((x + 1.0) / 256.0)  # (B, 3, H, W)
        hed = torch.einsum("bchw,cd->bdhw", od, to_hed) * alpha[:, :, None, None] \
            + beta[:, :, None, None]
        rgb = 256.0 * torch.exp(-torch.einsum("bdhw,dc->bchw", hed, to_rgb)) - 1.0
        return torch.where(on[:, None, None, None], rgb.clamp_(0, 255), x)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        r, dev, n = self.recipe, x.device, len(x)
        on = self._p(n, r.noise_p, dev)
        std = torch.where(on, self._u(n, *r.noise_std, dev) * 255, 0.0)
        z = torch.randn(x.shape, device=dev, generator=self.generator)
        return (x + z * std[:, None, None, None]).clamp_(0, 255)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, 3, H, W)`` RGB on 0-255 -> hue in degrees [0, 360), saturation and value on 0-255
    (OpenCV's definitions for 8-bit images, hue in degrees instead of half-degrees)."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    mn, _ = x.min(1)
    d = v - mn
    s = torch.where(v > 0, 255 * d / v.clamp(min=1e-6), 0.0)
    safe = d.clamp(min=1e-6)
    h = torch.where(v == r, 60 * (g - b) / safe,
                    torch.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = torch.where(d > 0, torch.remainder(h, 360.0), 0.0)
    return h, s, v


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`: ``(B, 3, H, W)`` on 0-255 (channel n of (R, G, B) is
    ``v - v s max(0, min(k, 4 - k, 1))`` with ``k = (n' + h / 60) mod 6``, n' = 5, 3, 1)."""
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=h.device).view(1, 3, 1, 1)
                        + (h / 60)[:, None], 6)
    weight = torch.minimum(k, 4 - k).clamp(0, 1)
    return v[:, None] - (v * s / 255)[:, None] * weight
