"""LLaVA-NeXT / LLaVA-OneVision anyres packing as index maps, so that pruning can act on the
packed sequence.

An image becomes crops (its processor's output): crop 0 the whole image resized to the
tower's size, then a ``rows × cols`` grid of crops of the image resized and padded to the best
of ``image_grid_pinpoints``. The language model sees (HF ``pack_image_features``): crop 0's
tokens, then the grid's tokens stitched into one ``rows·s × cols·s`` patch map (s patches a side
per crop), the padding rows or columns cut off (unpadding) — LLaVA-OneVision (``anyres_max_N``)
then resizes the projected map bilinearly when it holds over ~N crops' patches
(``downscaled_size``) — read row by row with one ``image_newline`` token after each row.

``unpadded_grid`` gives the patch map as indices into the image's crop tokens flattened
crop-major (crop c, patch t → c·s² + t); ``with_newlines`` the packed sequence, ``NEWLINE``
(−1) where ``image_newline`` goes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEWLINE = -1


def grid_shape(image_size: tuple[int, int], grid_pinpoints, crop_size: int) -> tuple[int, int]:
    """(rows, cols) of grid crops the processor makes for an image of ``image_size`` (height, width)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(tuple(int(v) for v in image_size), grid_pinpoints)
    return height // crop_size, width // crop_size


def unpad(patch_map: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """``patch_map`` [H, W] without the rows or columns that cover the processor's padding
    (the image was scaled to fit H×W, aspect ratio kept, and centred)."""
    height, width = (int(v) for v in image_size)
    rows, cols = patch_map.shape
    if width / height > cols / rows:  # wider than the map: padding above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return patch_map[pad:rows - pad]
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return patch_map[:, pad:cols - pad]


def unpadded_grid(image_size: tuple[int, int], grid_pinpoints, crop_size: int, side: int) -> torch.Tensor:
    """[h, w] int64: the unpadded patch map of an image's grid crops, as crop-token indices."""
    rows, cols = grid_shape(image_size, grid_pinpoints, crop_size)
    per_crop = side * side
    grid = torch.arange(per_crop, per_crop * (1 + rows * cols)).view(rows, cols, side, side)
    return unpad(grid.permute(0, 2, 1, 3).reshape(rows * side, cols * side), image_size)


def with_newlines(first: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """[T] int64: ``first`` [N], then ``grid`` [h, w] row by row, ``NEWLINE`` after each row."""
    newlines = torch.full((grid.shape[0], 1), NEWLINE)
    return torch.cat([first, torch.cat([grid, newlines], dim=1).flatten()])


def downscaled_size(grid: tuple[int, int], side: int, max_crops: int) -> tuple[int, int] | None:
    """LLaVA-OneVision's ``anyres_max_N`` (N = ``max_crops``): the size the unpadded ``grid``
    (h, w) is resized to when it holds over 1.1² · N crops' patches; None when it is kept."""
    ratio = math.sqrt(grid[0] * grid[1] / (max_crops * side**2))
    return (int(grid[0] // ratio), int(grid[1] // ratio)) if ratio > 1.1 else None


def downscale(values: torch.Tensor, per_crop: int, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, N + h'·w', C]: crop 0's ``per_crop`` (N) values, then the ``grid`` map of ``values``
    [B, P·N, C] (rows of crop-token indices) resized bilinearly to ``size`` (h', w'), row by row."""
    mapped = values[:, grid].permute(0, 3, 1, 2)  # [B, C, h, w]
    resized = F.interpolate(mapped, list(size), mode="bilinear").flatten(2).transpose(1, 2)
    return torch.cat([values[:, :per_crop], resized], dim=1)


def insert_newlines(tokens: torch.Tensor, layout: torch.Tensor, kept: torch.Tensor | None,
                    newline: torch.Tensor) -> torch.Tensor:
    """[B, K + R, H]: ``tokens`` [B, K, H] (the kept visual tokens of ``layout``, in its order;
    ``kept`` [B, K] their indices among its visual tokens, None for all) with ``newline`` [H]
    after each of the R rows, as in ``layout`` (on the host). Every row keeps its newline, even
    one whose tokens were all pruned."""
    batch, count, hidden = tokens.shape
    is_newline = layout == NEWLINE
    newlines_before = torch.cumsum(is_newline, 0)[~is_newline].to(tokens.device)  # per visual token
    if kept is None:
        kept = torch.arange(count, device=tokens.device).expand(batch, count)
    positions = torch.arange(count, device=tokens.device) + newlines_before[kept]
    out = newline.to(tokens.dtype).expand(batch, count + int(is_newline.sum()), hidden).clone()
    return out.scatter_(1, positions[..., None].expand(-1, -1, hidden), tokens)
