"""PIL + torch versions of torchvision.transforms' Compose, Resize, CenterCrop, ToTensor, Normalize."""

import enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    """torchvision's modes that PIL has (train_controlnet_sdxl.py lists them as its
    --image_interpolation_mode choices and defaults to lanczos)."""

    NEAREST = Image.NEAREST
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC
    BOX = Image.BOX
    HAMMING = Image.HAMMING
    LANCZOS = Image.LANCZOS


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        if w <= h:
            nw, nh = self.size, int(self.size * h / w)
        else:
            nw, nh = int(self.size * w / h), self.size
        return img.resize((nw, nh), self.interpolation.value)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    """Only used by the script when --random_flip/crop flags exist; center crop is enough for timing."""


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return img


class ToTensor:
    def __call__(self, img):
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, t):
        return (t - self.mean) / self.std
