"""Offline checkpoint conversion: FP8 (block-scaled e4m3) Hugging Face checkpoints -> bf16 ones.

`convert_fp8_to_bf16` streams shard by shard on the CPU: each output shard holds the same tensors as its input
shard, minus the `_scale_inv` entries, with FP8 weights dequantised to bf16 (other tensors keep their dtype).
Everything else in the directory (tokenizer files, generation config, code) is copied; config.json loses its
`quantization_config`. Peak memory is about one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import read_config_dict
from .hf import (
    CONFIG_NAME,
    INDEX_NAME,
    CheckpointError,
    SafetensorsDir,
    atomic_save_file,
    atomic_write_text,
    checkpoint_dir,
    weight_block_size,
)


def convert_fp8_to_bf16(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Write a bf16 copy of the FP8 checkpoint in src_dir to dst_dir (created if needed); returns dst_dir.

    Raises CheckpointError for a missing/corrupt input or an FP8 weight without its `_scale_inv`.
    """
    src = checkpoint_dir(src_dir)
    dst = Path(dst_dir)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"convert_fp8_to_bf16 needs a different output directory than its input ({src})")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"output {dst} exists and is not a directory")
    cfg = read_config_dict(src / CONFIG_NAME)
    ckpt = SafetensorsDir(src, block=weight_block_size(cfg.get("quantization_config")))
    ckpt.check_fp8()  # fail before writing anything
    dst.mkdir(parents=True, exist_ok=True)

    # Everything that is not weights or config travels unchanged (tokenizer, generation config, code, README).
    weight_files = {f.name for f in ckpt.files} | {INDEX_NAME, CONFIG_NAME}
    for p in sorted(src.iterdir()):
        if p.name in weight_files:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, dirs_exist_ok=True)
        else:
            shutil.copy2(p, dst / p.name)

    weight_map: dict[str, str] = {}
    total = 0
    n_tensors = sum(len(ckpt.keys_in[f]) for f in ckpt.files)
    try:
        with tqdm(total=n_tensors, desc="fp8 -> bf16", unit="tensor", disable=not progress) as bar:
            for f in ckpt.files:
                bar.set_postfix_str(f.name)
                out: dict[str, torch.Tensor] = {}
                for key in ckpt.keys_in[f]:
                    bar.update(1)
                    if ckpt.is_scale(key):
                        continue
                    t = ckpt.get(key, torch.bfloat16) if ckpt.is_fp8(key) else ckpt.get_raw(key)
                    out[key] = t
                    weight_map[key] = f.name
                    total += t.numel() * t.element_size()
                atomic_save_file(out, dst / f.name)
                del out
    finally:
        ckpt.close()

    if ckpt.index is not None:
        metadata = {**ckpt.index.get("metadata", {}), "total_size": total}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(dst / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    cfg.pop("quantization_config", None)
    for name in ("torch_dtype", "dtype"):
        if name in cfg:
            cfg[name] = "bfloat16"
    atomic_write_text(dst / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
    return dst
