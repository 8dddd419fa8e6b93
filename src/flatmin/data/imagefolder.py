"""ImageNet-style folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*``, decoded lazily with
PIL. Training: random-resized crop (scale 0.08–1, aspect 3/4–4/3) and a horizontal flip; evaluation:
resize to 256/224 of the crop size and centre crop. Outputs are ImageNet-normalised float tensors."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .loader import _seeded

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def scan(root: Path) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """``(path, class index)`` for every image under ``root``, classes sorted by folder name."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found: imagefolder expects {root.parent}/train/<class>/ "
                                f"and {root.parent}/val/<class>/")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [(path, i) for i, name in enumerate(classes) for path in sorted((root / name).rglob("*"))
               if path.suffix.lower() in EXTENSIONS]
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(EXTENSIONS)}) in class folders under {root}")
    return samples, classes


def _to_tensor(image) -> Tensor:
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root: Path, train: bool, image_size: int = 224, seed: int = 0) -> None:
        self.samples, self.classes = scan(root)
        self.train, self.size, self.seed = train, image_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
            if self.train:
                rng = random.Random(hash((self.seed, self.epoch, index)))
                img = self._random_resized_crop(img, rng)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                img = self._centre_crop(img)
            return _to_tensor(img), label

    def _random_resized_crop(self, img, rng: random.Random):
        from PIL import Image

        width, height = img.size
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        return self._centre_crop(img)

    def _centre_crop(self, img):
        from PIL import Image

        width, height = img.size
        short = max(1, round(self.size * 256 / 224))
        scale = short / min(width, height)
        img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
        width, height = img.size
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


class FolderLoader:
    """The ``BatchLoader`` contract (``set_epoch``, ``len``, iteration) over a lazy ``ImageFolder``."""

    def __init__(self, dataset: ImageFolder, batch_size: int, *, shuffle: bool, seed: int = 0,
                 device: torch.device = torch.device("cpu"), num_workers: int = 0,
                 shard: Tuple[int, int] = (0, 1)) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.device, self.num_workers = device, num_workers
        self.rank, self.world = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.dataset.epoch = epoch

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world
        n = len(self.dataset)
        return n // global_batch if self.world > 1 else -(-n // global_batch)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=_seeded(self.seed, self.epoch)) if self.shuffle else torch.arange(n)
        global_batch = self.batch_size * self.world
        batches = [order[b * global_batch + self.rank * self.batch_size:][: self.batch_size].tolist()
                   for b in range(len(self))]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_imagefolder(data_dir: Optional[str], image_size: int = 224, seed: int = 0):
    root = Path(data_dir) if data_dir else Path("data")
    train = ImageFolder(root / "train", train=True, image_size=image_size, seed=seed)
    val = ImageFolder(root / "val", train=False, image_size=image_size, seed=seed)
    if val.classes != train.classes:
        raise ValueError(f"the class folders of {root / 'train'} and {root / 'val'} differ")
    return train, val
