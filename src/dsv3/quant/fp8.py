"""FP8 (e4m3) block quantisation as DeepSeek-V3 uses it: 128x128 blocks for weights, 1x128 tiles for activations.

Scales are fp32 and stored as `scale_inv` (the factor that brings FP8 values back to real ones), so
dequantised = fp8.float() * scale_inv, block by block. Edges that are not multiples of the block size form
partial blocks (the 576-row `kv_a_proj_with_mqa` of V3 has a last row block of 64). Pure torch; any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_TINY = 1e-12  # amax floor: an all-zero block gets a tiny (not zero) scale, so 0 / scale stays 0


def _pad_to(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing len(sizes) dims of x up to `sizes`."""
    pad: list[int] = []
    for have, want in zip(reversed(x.shape[-len(sizes):]), reversed(sizes), strict=True):
        pad += [0, want - have]
    return F.pad(x, pad) if any(pad) else x


def _pair(block: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    br, bc = (block, block) if isinstance(block, int) else tuple(block)
    if br < 1 or bc < 1:
        raise ValueError(f"block sizes must be positive, got {block!r}")
    return int(br), int(bc)


def weight_scale_shape(shape: tuple[int, ...] | torch.Size, block: int | tuple[int, int] = 128) -> tuple[int, ...]:
    """Shape of the scale_inv of a weight of `shape` ([..., R, C] -> [..., ceil(R/br), ceil(C/bc)])."""
    br, bc = _pair(block)
    *lead, R, C = shape
    return (*lead, math.ceil(R / br), math.ceil(C / bc))


def quantize_weight_blocks(w: torch.Tensor, block: int | tuple[int, int] = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] -> (fp8 e4m3 [..., R, C], scale_inv fp32 [..., ceil(R/block), ceil(C/block)]).

    Each block is scaled so its absolute maximum maps to 448: scale_inv = amax / 448. `block` may be an int
    or (rows, cols) as in a checkpoint's `quantization_config.weight_block_size`.
    """
    if w.dim() < 2:
        raise ValueError(f"quantize_weight_blocks needs a matrix [..., R, C], got shape {tuple(w.shape)}")
    br, bc = _pair(block)
    *lead, R, C = w.shape
    Rb, Cb = math.ceil(R / br), math.ceil(C / bc)
    x = _pad_to(w.detach().float(), (Rb * br, Cb * bc))
    x = x.reshape(*lead, Rb, br, Cb, bc)  # [..., Rb, br, Cb, bc]
    amax = x.abs().amax(dim=(-3, -1)).clamp(min=_TINY)  # [..., Rb, Cb]
    scale_inv = amax / FP8_MAX
    q = (x / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, Rb * br, Cb * bc)[..., :R, :C].contiguous()
    return q, scale_inv.contiguous()


def dequantize_weight_blocks(fp8: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = 128,
                             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of quantize_weight_blocks: block (i, j) of fp8 times scale_inv[i, j], computed in fp32, as `dtype`."""
    if fp8.dim() < 2:
        raise ValueError(f"dequantize_weight_blocks needs a matrix [..., R, C], got shape {tuple(fp8.shape)}")
    br, bc = _pair(block)
    want = weight_scale_shape(fp8.shape, (br, bc))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)} but a weight of shape {tuple(fp8.shape)} "
                         f"with {br}x{bc} blocks needs {want}")
    *lead, R, C = fp8.shape
    Rb, Cb = want[-2:]
    x = _pad_to(fp8.float(), (Rb * br, Cb * bc)).reshape(*lead, Rb, br, Cb, bc)
    x = x * scale_inv.float()[..., :, None, :, None]  # [..., Rb, br, Cb, bc]
    return x.reshape(*lead, Rb * br, Cb * bc)[..., :R, :C].to(dtype).contiguous()


def quantize_activation_tiles(x: torch.Tensor, tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (fp8 e4m3 [..., D], scale_inv fp32 [..., ceil(D/tile)]): one scale per 1 x `tile` tile."""
    *lead, D = x.shape
    n = math.ceil(D / tile)
    t = _pad_to(x.detach().float(), (n * tile,)).reshape(*lead, n, tile)  # [..., n, tile]
    scale_inv = t.abs().amax(dim=-1).clamp(min=_TINY) / FP8_MAX  # [..., n]
    q = (t / scale_inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(*lead, n * tile)[..., :D].contiguous(), scale_inv


def dequantize_activation_tiles(fp8: torch.Tensor, scale_inv: torch.Tensor, tile: int = 128,
                                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of quantize_activation_tiles: tile k of each row times scale_inv[..., k] (fp32 math), as `dtype`."""
    *lead, D = fp8.shape
    n = math.ceil(D / tile)
    if tuple(scale_inv.shape) != (*lead, n):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)} but activations of shape {tuple(fp8.shape)} "
                         f"with 1x{tile} tiles need {(*lead, n)}")
    t = _pad_to(fp8.float(), (n * tile,)).reshape(*lead, n, tile) * scale_inv.float()[..., None]
    return t.reshape(*lead, n * tile)[..., :D].to(dtype).contiguous()
