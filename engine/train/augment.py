"""DeepHeme-style augmentation with albumentations: shape (rotation, flips, shear, scale) and
colour (brightness, contrast, hue, noise, stain jitter), then the centre crop the model sees.

Images are augmented at a margin (144 px for a 96 px crop) so rotations never bring in borders.
The ranges live in `engine.train.batch_augment.RECIPE`, which the batch version on the training
device (`BatchAugment`) draws from too.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would phone PyPI otherwise

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np

from engine.train.batch_augment import HED_FROM_RGB, RECIPE, RGB_FROM_HED, Recipe


class HEDJitter(A.ImageOnlyTransform):
    """Stain jitter in optical-density HED space (Tellez et al. 2018): each stain channel is scaled
    by U(1-sigma, 1+sigma) and shifted by U(-sigma, sigma). About 10x faster than ``A.HEStain``,
    which matters when augmentation bounds the GPU."""

    def __init__(self, sigma: float = 0.05, p: float = 0.5):
        super().__init__(p=p)
        self.sigma = sigma

    def get_params_dependent_on_data(self, params, data):
        rng = self.random_generator
        return {"alpha": rng.uniform(1 - self.sigma, 1 + self.sigma, 3).astype(np.float32),
                "beta": rng.uniform(-self.sigma, self.sigma, 3).astype(np.float32)}

    def apply(self, img, alpha=None, beta=None, **params):
        od = -np.log((img.astype(np.float32) + 1.0) / 256.0)      # (H, W, 3) optical density
        hed = od @ HED_FROM_RGB * alpha + beta
        rgb = 256.0 * np.exp(-(hed @ RGB_FROM_HED)) - 1.0
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self):
        return ("sigma",)


def train_transform(crop_px: int = 96, r: Recipe = RECIPE) -> A.Compose:
    return A.Compose([
        A.Affine(rotate=r.rotate, shear=r.shear, scale=r.scale,
                 border_mode=cv2.BORDER_REFLECT_101, p=r.affine_p),
        A.HorizontalFlip(p=r.hflip_p),
        A.VerticalFlip(p=r.vflip_p),
        A.CenterCrop(crop_px, crop_px),
        A.RandomBrightnessContrast(brightness_limit=r.brightness, contrast_limit=r.contrast,
                                   p=r.brightness_contrast_p),
        A.HueSaturationValue(hue_shift_limit=r.hue, sat_shift_limit=r.saturation,
                             val_shift_limit=r.value, p=r.hsv_p),
        HEDJitter(sigma=r.hed_sigma, p=r.hed_p),
        A.GaussNoise(std_range=r.noise_std, p=r.noise_p),
    ])


def eval_transform(crop_px: int = 96) -> A.Compose:
    return A.Compose([A.CenterCrop(crop_px, crop_px)])
