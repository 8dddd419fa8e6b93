"""Batched image augmentation on the training device: random crop with padding, horizontal flip
and Cutout, all drawn from a given generator (so a batch's augmentation is reproducible)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int, fill: Sequence[float]) -> Tensor:
    """Pad ``x`` (N, C, H, W) by ``padding`` with the per-channel ``fill``, crop back to H×W at a
    random offset per image, and mirror each image left-right with probability 1/2."""
    n, c, h, w = x.shape
    padded = x.new_empty(n, c, h + 2 * padding, w + 2 * padding)
    padded[:] = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing on (N, H, W) positions gives (N, H, W, C): move channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def cutout(x: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """Zero one ``size``×``size`` square per image at a uniformly random centre (clipped at the
    borders), as in DeVries & Taylor 2017; applied to normalised images, 0 is the mean colour."""
    n, _, h, w = x.shape
    centre = torch.stack([torch.randint(0, h, (n,), generator=generator),
                          torch.randint(0, w, (n,), generator=generator)]).to(x.device)
    top, left = centre[0] - size // 2, centre[1] - size // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + size)
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + size)
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(mask[:, None], 0.0)
