"""Batched image augmentation: random crop with padding, horizontal flip, and Cutout.

Each function transforms a whole batch (N, C, H, W) with a few tensor ops on the batch's own device.
The random numbers are drawn on the CPU from the given generator, so a generator seeded alike gives
the same augmentation on a CPU and on a GPU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _check_images(x: Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} takes image batches (N, C, H, W), not a tensor of shape {tuple(x.shape)}")


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int, fill: Sequence[float]) -> Tensor:
    """Pad every image by ``padding`` on each side with the per-channel value ``fill``, crop back to
    H×W at a random offset, and mirror it left-right with probability 1/2.

    Draws, in this order: ``randint(0, 2·padding + 1, (2, N))`` (row then column offsets), then
    ``rand(N) < 0.5`` (which images are mirrored).
    """
    _check_images(x, "random_crop_flip")
    n, c, h, w = x.shape
    if padding < 0:
        raise ValueError(f"padding={padding} is not allowed: it must be >= 0")
    if len(fill) != c:
        raise ValueError(f"fill has {len(fill)} values for images of {c} channels: give one per channel")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(x.device)

    fill_value = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    padded = fill_value.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H): padded rows of each crop
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a mirrored crop reads its columns backwards
    images = torch.arange(n, device=x.device)[:, None, None]
    # One gather for the whole batch: indexing the (N, H, W) positions of the channels-last view
    # gives (N, H, W, C); move the channels back in front.
    crops = padded.permute(0, 2, 3, 1)[images, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def cutout(x: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """Zero one ``size``×``size`` square per image, centred on a uniformly random pixel and clipped
    at the borders (DeVries & Taylor 2017). On normalised images zero is the mean colour.

    Draws, in this order: ``randint(0, H, (N,))`` (centre rows), then ``randint(0, W, (N,))``.
    """
    _check_images(x, "cutout")
    if size < 1:
        raise ValueError(f"cutout size={size} is not allowed: it must be >= 1")
    n, _, h, w = x.shape
    top = torch.randint(0, h, (n,), generator=generator).to(x.device) - size // 2
    left = torch.randint(0, w, (n,), generator=generator).to(x.device) - size // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (N, W)
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W): every channel alike
    return x.masked_fill(square, 0)
