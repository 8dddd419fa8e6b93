"""ImageNet-style image folders, decoded lazily with PIL: ``root/train/<class>/*`` and ``root/val/<class>/*``.

Only the file list is held in memory; each image is decoded when its batch is loaded. ``train/`` is
the training split and ``val/`` the test split. Training images get the standard ImageNet
augmentation, a random-resized crop (area 8–100 %, aspect ratio 3/4–4/3) and a horizontal flip;
evaluation images are resized (short side 256/224 of the crop, never enlarged beyond what the crop
needs) and centre-cropped. Both come out as float tensors (3, size, size), normalised per channel.

The side ``size`` is by default the images' own: the median short side of a fixed sample of the
training images, at most 224 (ImageNet's). The normalisation is by default the training images' own
per-channel mean and std, measured on the same sample; ``normalize="imagenet"`` takes ImageNet's.
Classes are the sub-folder names in sorted order; a class folder of ``train/`` without images is refused.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .loader import Batch, EpochBatches, mix_seed

if TYPE_CHECKING:
    from PIL.Image import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
NORMALIZATIONS = ("data", "imagenet")
# The default side is the images' own, but no larger than ImageNet's crop.
MAX_DEFAULT_SIZE = 224
# Training images, evenly spaced over the sorted list, that set the default size and the statistics.
SAMPLE = 512


def find_images(root: Path, allow_empty: bool = False) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """``(path, class index)`` of every image under ``root/<class>/``, and the sorted class names.
    A class folder without images is refused unless ``allow_empty``."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found: imagefolder expects {root.parent}/train/<class>/ "
                                f"and {root.parent}/val/<class>/ holding images ({', '.join(EXTENSIONS)})")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = []
    for label, name in enumerate(classes):
        found = [(path, label) for path in sorted((root / name).rglob("*"))
                 if path.suffix.lower() in EXTENSIONS and path.is_file()]
        if not found and not allow_empty:
            # A class never seen in training would be silently unlearnable.
            raise ValueError(f"class folder {root / name} holds no images ({', '.join(EXTENSIONS)}): "
                             f"add images or remove the folder")
        samples += found
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(EXTENSIONS)}) in class folders under {root}")
    return samples, classes


def read_image(path: Path, read: Callable[["Image"], Any]) -> Any:
    """``read(image)`` of the image file at ``path`` (opened lazily: a header read costs no decode); a
    one-line ``ValueError`` naming the file if it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            return read(file)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({err})") from None


def open_rgb(path: Path) -> "Image":
    """The image at ``path`` as RGB; a one-line ``ValueError`` naming the file if it is not one."""
    return read_image(path, lambda file: file.convert("RGB"))


def evenly_spaced(samples: List[Tuple[Path, int]], count: int = SAMPLE) -> List[Path]:
    """At most ``count`` paths spread evenly over ``samples``: the list is sorted by class, so each
    class is sampled in proportion to its images."""
    step = max(1, len(samples) // count)
    return [path for path, _ in samples[::step][:count]]


def default_size(samples: List[Tuple[Path, int]]) -> int:
    """The median short side of the sampled images, at most ``MAX_DEFAULT_SIZE``. Reads headers only."""
    sides = [read_image(path, lambda file: min(file.size)) for path in evenly_spaced(samples)]
    return min(MAX_DEFAULT_SIZE, int(np.median(sides)))


@functools.lru_cache(maxsize=8)
def channel_stats(paths: Tuple[Path, ...], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (in [0, 1] units) over every pixel of ``paths``, each image resized
    and centre-cropped to ``size`` as evaluation sees it. Cached: several loads of one folder (an
    ``analyze`` of several runs) compute it once. A channel without spread gets std 1."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for path in paths:
        pixels = np.asarray(resize_centre_crop(open_rgb(path), size), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(0)
        squares += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


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
    """Resize the short side to ``size``·256/224 (256 for 224) and cut the central ``size``×``size``.
    An image whose short side is between ``size`` and that is not resized, only cropped: it is
    enlarged only when it is smaller than the crop."""
    from PIL.Image import Resampling

    width, height = img.size
    short = min(width, height)
    target = min(round(size * 256 / 224), max(short, size))
    if target != short:
        scale = target / short
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        img = img.resize((width, height), Resampling.BILINEAR)
    left, top = round((width - size) / 2), round((height - size) / 2)
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: "Image", mean: np.ndarray = IMAGENET_MEAN, std: np.ndarray = IMAGENET_STD) -> Tensor:
    """An RGB image → float tensor (3, H, W), ``(pixel/255 - mean) / std`` per channel."""
    pixels = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


class ImageFolder(torch.utils.data.Dataset):
    """The images of one split, decoded on access; ``train`` selects the random augmentation.

    ``folder[i]`` is sample ``i`` as seed 0 and epoch 0 augment it; loaders use :meth:`at_epoch`,
    whose samples are augmented by ``(seed, epoch, i)``.
    """

    def __init__(self, root: Union[str, os.PathLike], train: bool, image_size: int = 224,
                 mean: np.ndarray = IMAGENET_MEAN, std: np.ndarray = IMAGENET_STD) -> None:
        self.root = Path(root)
        # val/ (the test split) may lack images of a class; train/ may not.
        self.samples, self.classes = find_images(self.root, allow_empty=not train)
        self.train, self.image_size = train, image_size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.load(index)

    def load(self, index: int, seed: int = 0, epoch: int = 0) -> Tuple[Tensor, int]:
        """Sample ``index``: the decoded (and, for training, augmented) image and its class."""
        from PIL import Image

        path, label = self.samples[index]
        img = open_rgb(path)
        if self.train:
            # A generator per sample: the result depends on (seed, epoch, index) alone, not on
            # which worker process loads it or in what order.
            rng = random.Random(mix_seed(seed, epoch, index))
            img = random_resized_crop(img, self.image_size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = resize_centre_crop(img, self.image_size)
        return to_tensor(img, self.mean, self.std), label

    def at_epoch(self, seed: int, epoch: int) -> "EpochView":
        """This folder as a map-style dataset whose augmentation is that of ``(seed, epoch)``."""
        return EpochView(self, seed, epoch)

    def unaugmented(self) -> "ImageFolder":
        """The same images as evaluation sees them: resized and centre-cropped, no random crop or flip."""
        plain = copy.copy(self)
        plain.train = False
        return plain

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
    """An image-folder data set: lazily decoded splits ``train`` (the ``train/`` folder) and
    ``test`` (the ``val/`` folder). ``preprocessing`` records the size and normalisation used."""

    name: str
    train: ImageFolder
    test: ImageFolder
    classes: List[str]
    num_classes: int
    input_shape: Tuple[int, ...]
    preprocessing: Dict[str, Any] = field(default_factory=dict)


def load_imagefolder(data_dir: Optional[Union[str, os.PathLike]] = None, image_size: Optional[int] = None,
                     normalize: Optional[str] = None) -> FolderDataset:
    """The folders ``data_dir/train`` and ``data_dir/val`` (default ``./data``) as square crops of
    ``image_size`` (default: the images' own size, see the module's docstring), normalised with
    the training images' channel statistics (``normalize="data"``, the default) or ImageNet's."""
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise ValueError(f"image_size={image_size} is not allowed: it must be >= 1 (or unset: the images' own size)")
    normalize = normalize or "data"
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
    root = Path(data_dir) if data_dir is not None else Path("data")
    train = ImageFolder(root / "train", train=True)
    test = ImageFolder(root / "val", train=False)
    if test.classes != train.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(f"the class folders of {root / 'train'} and {root / 'val'} differ: {', '.join(missing)} "
                         f"are in only one of them (every class of val/ needs its folder in train/)")
    size = image_size or default_size(train.samples)
    if normalize == "data":
        mean, std = channel_stats(tuple(evenly_spaced(train.samples)), size)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    for folder in (train, test):
        folder.image_size, folder.mean, folder.std = size, mean, std
    preprocessing = {"image_size": size, "normalize": normalize, "mean": [round(float(m), 6) for m in mean],
                     "std": [round(float(s), 6) for s in std]}
    return FolderDataset("imagefolder", train, test, classes=train.classes, num_classes=len(train.classes),
                         input_shape=(3, size, size), preprocessing=preprocessing)
