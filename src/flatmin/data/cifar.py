"""CIFAR-10 and CIFAR-100 from the standard python-pickle archive or its extracted folder.

The images stay uint8 (N, 3, 32, 32) in memory, a quarter of the float size (150 MB for CIFAR-10's
train set instead of 600 MB); :class:`Normalize` turns each batch into floats standardised per
channel, on the batch's device. Training batches then get the usual augmentation (:class:`Augment`):
a random 32×32 crop of the image zero-padded by 4, a horizontal flip, and optionally Cutout.

The archives are python pickles, and unpickling runs code: read only archives from the official
source (https://www.cs.toronto.edu/~kriz/cifar.html).
"""
from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .augment import cutout, random_crop_flip
from .dataset import Dataset

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant keeps what, and its channel statistics (of the training images)."""

    archive: str
    folder: str  # the folder the archive extracts to
    train_parts: Tuple[str, ...]
    test_parts: Tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


LAYOUTS: Dict[str, Layout] = {
    "cifar10": Layout("cifar-10-python.tar.gz", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), b"labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Layout("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
                       (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class Normalize:
    """uint8 images → floats in [0, 1] → standardised per channel, on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self.mean.to(x.device)) / self.std.to(x.device)


class Augment:
    """Random crop with zero padding 4 and a horizontal flip, then optional Cutout, on normalised
    batches. The padding is black in pixel space, as when padding before normalising."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], cutout_size: int = 0) -> None:
        self.fill = [-m / s for m, s in zip(mean, std)]  # what a 0 pixel becomes once normalised
        self.cutout_size = cutout_size

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        x = random_crop_flip(x, generator, padding=4, fill=self.fill)
        return cutout(x, generator, self.cutout_size) if self.cutout_size else x


def _unpickle(handle: IO[bytes], where: str, layout: Layout) -> Dict[bytes, object]:
    try:
        batch = pickle.load(handle, encoding="bytes")
    except Exception:  # truncated or foreign data makes pickle raise almost any kind of error
        raise ValueError(f"{where} is damaged or not a CIFAR python batch: download {layout.archive} again") from None
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        raise ValueError(f"{where} is not a CIFAR python batch: it lacks the keys b'data' and {layout.label_key!r}")
    return batch


def _read_folder(folder: Path, layout: Layout) -> Dict[str, Dict[bytes, object]]:
    batches = {}
    for part in layout.train_parts + layout.test_parts:
        path = folder / part
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the folder {folder} is incomplete; extract "
                                    f"{layout.archive} there again")
        with open(path, "rb") as handle:
            batches[part] = _unpickle(handle, str(path), layout)
    return batches


def _read_archive(archive: Path, layout: Layout) -> Dict[str, Dict[bytes, object]]:
    batches = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for part in layout.train_parts + layout.test_parts:
                member = tar.extractfile(f"{layout.folder}/{part}")
                if member is None:
                    raise KeyError(f"{layout.folder}/{part}")
                batches[part] = _unpickle(member, f"{archive}:{layout.folder}/{part}", layout)
    except KeyError as err:
        raise ValueError(f"{archive} lacks {err.args[0]}: it is incomplete or not {layout.archive}; "
                         f"download it again") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{archive} is damaged ({type(err).__name__}: {err}); download {layout.archive} "
                         f"again") from None
    return batches


def _stack(raw: Dict[str, Dict[bytes, object]], parts: Sequence[str], layout: Layout) -> Tuple[Tensor, Tensor]:
    """The images (N, 3, 32, 32) uint8 and labels (N,) int64 of the batches ``parts``, in order."""
    images, labels = [], []
    for part in parts:
        data, label = np.asarray(raw[part][b"data"]), np.asarray(raw[part][layout.label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(label) != len(data):
            raise ValueError(f"CIFAR batch {part} holds data {data.dtype}{list(data.shape)} and {len(label)} "
                             f"labels: expected uint8 [N, 3072] and N labels")
        if len(label) and not (0 <= label.min() and label.max() < layout.num_classes):
            raise ValueError(f"CIFAR batch {part} has labels outside 0..{layout.num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are channel-major: 1024 R, 1024 G, 1024 B
        labels.append(label.astype(np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(name: str, data_dir: Optional[Union[str, os.PathLike]] = None, cutout_size: int = 0) -> Dataset:
    """``cifar10`` or ``cifar100`` from ``data_dir`` (default ``./data``): the extracted folder if
    present, else the ``.tar.gz`` archive. ``cutout_size > 0`` adds Cutout to the augmentation."""
    layout = LAYOUTS[name]
    root = Path(data_dir) if data_dir is not None else Path("data")
    folder, archive = root / layout.folder, root / layout.archive
    if folder.is_dir():
        raw = _read_folder(folder, layout)
    elif archive.is_file():
        raw = _read_archive(archive, layout)
    else:
        raise FileNotFoundError(f"{name} not found in {root.absolute()}: download {layout.archive} from {URL} "
                                f"and put it, or the folder {layout.folder}/ it extracts to, in that folder")
    train_x, train_y = _stack(raw, layout.train_parts, layout)
    test_x, test_y = _stack(raw, layout.test_parts, layout)
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes=layout.num_classes, input_shape=(3, 32, 32),
                   augment=Augment(layout.mean, layout.std, cutout_size), transform=Normalize(layout.mean, layout.std))
