"""FP8 (e4m3) block quantisation: 128x128 weight blocks and 1x128 activation tiles with fp32 scales."""

from .fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_activation_tiles,
    dequantize_weight_blocks,
    quantize_activation_tiles,
    quantize_weight_blocks,
    weight_scale_shape,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_activation_tiles",
    "dequantize_weight_blocks",
    "quantize_activation_tiles",
    "quantize_weight_blocks",
    "weight_scale_shape",
]
