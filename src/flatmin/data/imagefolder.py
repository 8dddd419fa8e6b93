"""ImageNet-style image folders, decoded lazily with PIL: ``root/train/<class>/*`` and ``root/val/<class>/*``.

Only the file list is held in memory; each image is decoded when its batch is loaded. Training
images get the standard ImageNet augmentation, a random-resized crop (area 8–100 %, aspect ratio
3/4–4/3) and a horizontal flip; validation images are resized (short side 256/224 of the crop) and
centre-cropped. Both come out as float tensors (3, size, size) normalised with the ImageNet channel
statistics. Classes are the sub-folder names in sorted order.
"""
from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .loader import Batch, EpochBatches, mix_seed

if TYPE_CHECKING:
    from PIL.Image import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def find_images(root: Path) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """``(path, class index)`` of every image under ``root/<class>/``, and the sorted class names."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found: imagefolder expects {root.parent}/train/<class>/ "
                                f"and {root.parent}/val/<class>/ holding images ({', '.join(EXTENSIONS)})")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).rglob("*"))
               if path.suffix.lower() in EXTENSIONS and path.is_file()]
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(EXTENSIONS)}) in class folders under {root}")
    return samples, classes


def random_resized_crop(img: "Image", size: int, rng: random.Random, scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> "Image":
    """A random crop of ``scale`` of the area and aspect ratio in ``ratio`` (log-uniform), resized
    to ``size``×``size``. After 10 misses (crops that do not fit), the largest central crop with
    an aspect ratio in ``ratio``, as torchvision does."""
    from PIL.Image import Resampling

    width, height = img.size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            break
    else:
        w, h = width, height
        if width / height < ratio[0]:
            h = round(width / ratio[0])
        elif width / height > ratio[1]:
            w = round(height * ratio[1])
        left, top = (width - w) // 2, (height - h) // 2
    # Resizing straight from the box reads the source once, with PIL's antialiasing.
    return img.resize((size, size), Resampling.BILINEAR, box=(left, top, left + w, top + h))


def resize_centre_crop(img: "Image", size: int) -> "Image":
    """Resize the short side to ``size``·256/224 (256 for 224) and cut the central ``size``×``size``."""
    from PIL.Image import Resampling

    width, height = img.size
    scale = round(size * 256 / 224) / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((width, height), Resampling.BILINEAR)
    left, top = round((width - size) / 2), round((height - size) / 2)
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: "Image") -> Tensor:
    """An RGB image → float tensor (3, H, W) normalised with the ImageNet mean and std."""
    pixels = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


class ImageFolder(torch.utils.data.Dataset):
    """The images of one split, decoded on access; ``train`` selects the random augmentation.

    ``folder[i]`` is sample ``i`` as seed 0 and epoch 0 augment it; loaders use :meth:`at_epoch`,
    whose samples are augmented by ``(seed, epoch, i)``.
    """

    def __init__(self, root: Union[str, os.PathLike], train: bool, image_size: int = 224) -> None:
        self.root = Path(root)
        self.samples, self.classes = find_images(self.root)
        self.train, self.image_size = train, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.load(index)

    def load(self, index: int, seed: int = 0, epoch: int = 0) -> Tuple[Tensor, int]:
        """Sample ``index``: the decoded (and, for training, augmented) image and its class."""
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as file:
                img = file.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path} is not a readable image ({err})") from None
        if self.train:
            # A generator per sample: the result depends on (seed, epoch, index) alone, not on
            # which worker process loads it or in what order.
            rng = random.Random(mix_seed(seed, epoch, index))
            img = random_resized_crop(img, self.image_size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = resize_centre_crop(img, self.image_size)
        return to_tensor(img), label

    def at_epoch(self, seed: int, epoch: int) -> "EpochView":
        """This folder as a map-style dataset whose augmentation is that of ``(seed, epoch)``."""
        return EpochView(self, seed, epoch)

    def shard(self, rank: int, world: int) -> "ImageFolder":
        """Every ``world``-th sample from ``rank`` on: the ranks' shards cover the folder once."""
        part = copy.copy(self)
        part.samples = self.samples[rank::world]
        return part


class EpochView(torch.utils.data.Dataset):
    """An :class:`ImageFolder` fixed at one ``(seed, epoch)``. A fresh one per epoch, so that worker
    processes never rely on state changed after they started."""

    def __init__(self, folder: ImageFolder, seed: int, epoch: int) -> None:
        self.folder, self.seed, self.epoch = folder, seed, epoch

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.folder.load(index, self.seed, self.epoch)


class FolderLoader(EpochBatches):
    """The :class:`~flatmin.data.loader.BatchLoader` contract over a lazily decoded :class:`ImageFolder`.

    Each epoch runs a ``torch.utils.data.DataLoader`` over the epoch's batches with ``num_workers``
    worker processes; a training folder's random crops and flips are seeded per sample by
    ``(seed, epoch, index)``, so the batches do not depend on the number of workers.
    """

    def __init__(self, dataset: ImageFolder, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, device: Union[str, torch.device] = "cpu", num_workers: int = 0,
                 shard: Tuple[int, int] = (0, 1)) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} is not allowed: it must be >= 0")
        super().__init__(len(dataset), batch_size, shuffle, drop_last, seed, shard)
        self.dataset = dataset
        self.device = torch.device(device)
        self.num_workers = num_workers

    def _batches(self, start_batch: int) -> Iterator[Batch]:
        batches = [index.tolist() for _, index in self._indices(start_batch, torch.device("cpu"))]
        loader = torch.utils.data.DataLoader(self.dataset.at_epoch(self.seed, self.epoch), batch_sampler=batches,
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        try:
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except ValueError as err:
            lines = str(err).strip().splitlines()
            if self.num_workers and len(lines) > 1:  # raised in a worker: torch wraps it in the worker's traceback
                raise ValueError(lines[-1].removeprefix("ValueError: ")) from None
            raise


@dataclass
class FolderDataset:
    """An image-folder data set: lazily decoded train and test (``val/``) splits."""

    name: str
    train: ImageFolder
    test: ImageFolder
    classes: List[str]
    num_classes: int
    input_shape: Tuple[int, ...]


def load_imagefolder(data_dir: Optional[Union[str, os.PathLike]] = None, image_size: int = 224) -> FolderDataset:
    """The folders ``data_dir/train`` and ``data_dir/val`` (default ``./data``), crops of ``image_size``."""
    if image_size < 1:
        raise ValueError(f"image_size={image_size} is not allowed: it must be >= 1")
    root = Path(data_dir) if data_dir is not None else Path("data")
    train = ImageFolder(root / "train", train=True, image_size=image_size)
    test = ImageFolder(root / "val", train=False, image_size=image_size)
    if test.classes != train.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(f"the class folders of {root / 'train'} and {root / 'val'} differ: {', '.join(missing)} "
                         f"are in only one of them")
    return FolderDataset("imagefolder", train, test, classes=train.classes, num_classes=len(train.classes),
                         input_shape=(3, image_size, image_size))
