"""Each vision tower's own image preprocessing, read from its ``preprocessor_config.json``
(the HF CLIP image-processor fields), done with torch ops (no PIL/torchvision needed):
resize the shortest edge, center-crop, rescale, normalize."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImagePreprocessor:
    def __init__(self, size: int, crop_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD,
                 rescale_factor: float = 1 / 255, resample: str = "bicubic"):
        self.size, self.crop_size = int(size), int(crop_size or size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.rescale_factor, self.resample = float(rescale_factor), resample

    @classmethod
    def from_pretrained(cls, path: str, default_size: int | None = None) -> "ImagePreprocessor":
        """From ``path/preprocessor_config.json``; without one, a CLIP-style processor for
        ``default_size`` (the tower's image size)."""
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.exists(file):
            if default_size is None:
                raise FileNotFoundError(f"{file} is missing and no default image size was given")
            return cls(default_size)
        with open(file) as f:
            cfg = json.load(f)
        size = cfg.get("size", default_size)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = cfg.get("crop_size", size)
        crop = crop.get("height") if isinstance(crop, dict) else crop
        return cls(size, crop, cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD),
                   cfg.get("rescale_factor", 1 / 255))

    def to_dict(self) -> dict:
        return {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": self.size},
                "crop_size": {"height": self.crop_size, "width": self.crop_size}, "image_mean": list(self.mean),
                "image_std": list(self.std), "rescale_factor": self.rescale_factor, "do_resize": True,
                "do_center_crop": True, "do_rescale": True, "do_normalize": True, "resample": 3}

    def __call__(self, images) -> torch.Tensor:
        """[B, 3, crop, crop] float32 from uint8 images: a [3, H, W] / [B, 3, H, W] tensor,
        numpy arrays [H, W, 3], PIL images, or a list of any of these."""
        batch = torch.stack([self._one(img) for img in _as_list(images)])
        return batch

    def _one(self, image) -> torch.Tensor:
        x = _to_chw(image).float()
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x[None], size=(new_h, new_w), mode=self.resample, align_corners=False)[0]
        top, left = (new_h - self.crop_size) // 2, (new_w - self.crop_size) // 2
        x = x[:, top:top + self.crop_size, left:left + self.crop_size]
        x = x.clamp(0, 255) * self.rescale_factor
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


def _as_list(images) -> list:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _to_chw(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W], got {tuple(image.shape)}")
        return image
    array = torch.as_tensor(__import__("numpy").asarray(image))
    if array.dim() != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image array must be [H, W, 3], got {tuple(array.shape)}")
    return array.permute(2, 0, 1)
