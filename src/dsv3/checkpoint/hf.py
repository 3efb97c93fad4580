"""Hugging Face checkpoints: safetensors load/save (single file or sharded), FP8 block-scaled weights, MTP layer.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards named
`model-00001-of-0000N.safetensors` listed in `model.safetensors.index.json`. Tensor names follow the released
DeepSeek-V3 weights; `adapter` maps them to dsv3's state dict (stacked experts, MTP copies).

Loading builds the model on the meta device and materialises it tensor by tensor, reading each shard through
safetensors' memory map, so peak memory stays near the size of the finished model. FP8 (e4m3) weights come
with a sibling `<name>_scale_inv` (fp32, one scale per 128x128 block) and are dequantised on the way in.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model.transformer import DeepseekV3
from ..quant.fp8 import dequantize_weight_blocks, weight_scale_shape
from . import adapter

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}  # safetensors dtype names of block-scaled FP8 weights
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# transformers keeps these fp32 whatever the model dtype (`_keep_in_fp32_modules_strict`); so does dsv3.
_KEEP_FP32 = re.compile(r"(\.mlp\.gate\.weight|\.e_score_correction_bias)$")
_MAX_LISTED = 10


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and key(s)."""


def _listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", and {len(items) - limit} more" if len(items) > limit else "")


def weight_block_size(quantization_config: dict | None) -> tuple[int, int]:
    size = (quantization_config or {}).get("weight_block_size") or [128, 128]
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise CheckpointError(f"quantization_config.weight_block_size must be [rows, cols], got {size!r}")
    return int(size[0]), int(size[1])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory, checked to exist and to hold a config.json."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the checkpoint directory (with config.json and "
                              "*.safetensors)")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path / CONFIG_NAME} not found: a Hugging Face checkpoint directory needs a "
                              "config.json beside its safetensors files")
    return path


# ---- reading -------------------------------------------------------------------------------------------
class SafetensorsDir:
    """The tensors of a checkpoint directory, read lazily shard by shard.

    Opening reads only the safetensors headers (names, shapes, dtypes) and checks that every file is whole
    and that the index agrees with the shards. `get` reads one tensor, dequantising FP8 weights with their
    `_scale_inv`. At most `max_open` shards are memory-mapped at a time.
    """

    def __init__(self, path: str | os.PathLike, block: tuple[int, int] = (128, 128), max_open: int = 2):
        self.path = Path(path)
        self.block = block
        self.max_open = max_open
        self.index: dict | None = None
        self.files = self._find_files()
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.st_dtype: dict[str, str] = {}
        self.keys_in: dict[Path, list[str]] = {}
        for f in self.files:
            handle = self._open_file(f)
            keys = list(handle.keys())
            self.keys_in[f] = keys
            for k in keys:
                if k in self.file_of:
                    raise CheckpointError(f"tensor {k!r} is stored twice: in {self.file_of[k]} and in {f}")
                sl = handle.get_slice(k)
                self.file_of[k] = f
                self.shape[k] = tuple(sl.get_shape())
                self.st_dtype[k] = sl.get_dtype()
            del handle
        if self.index is not None:
            wrong = [f"{k} -> {name}" for k, name in self.index["weight_map"].items()
                     if k not in self.file_of or self.file_of[k].name != name]
            if wrong:
                raise CheckpointError(f"{self.path / INDEX_NAME} lists {len(wrong)} tensor(s) that are not in the "
                                      f"shard it names: {_listing(wrong)}")
        self._open: OrderedDict[Path, object] = OrderedDict()

    def _find_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                self.index = json.loads(index.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{index} is not valid JSON: {e}") from None
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} is not a safetensors index: it needs a 'weight_map' object "
                                      "mapping tensor names to shard file names")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                keys = [k for k, n in weight_map.items() if n == missing[0]]
                raise CheckpointError(f"{index} points at shard(s) that do not exist: {_listing(missing)} "
                                      f"(e.g. {keys[0]!r} is mapped to {missing[0]})")
            return [self.path / n for n in names]
        if (self.path / WEIGHTS_NAME).is_file():
            return [self.path / WEIGHTS_NAME]
        found = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
        if found:
            return found
        raise CheckpointError(f"no weights in {self.path}: expected {WEIGHTS_NAME}, or {INDEX_NAME} with its "
                              "shards")

    @staticmethod
    def _open_file(f: Path):
        try:
            return safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            size = f.stat().st_size if f.exists() else 0
            raise CheckpointError(f"{f} is truncated or corrupt ({size} bytes; safetensors says: {e}); "
                                  "download or save it again") from None

    def _handle(self, f: Path):
        if f in self._open:
            self._open.move_to_end(f)
            return self._open[f]
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)
        handle = self._open[f] = self._open_file(f)
        return handle

    def close(self) -> None:
        self._open.clear()

    # ---- what is stored -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.file_of)

    def is_fp8(self, key: str) -> bool:
        return self.st_dtype[key] in _FP8_DTYPES

    def is_scale(self, key: str) -> bool:
        """A `<weight>_scale_inv` whose weight is stored too (a scale alone is an ordinary, unexpected key)."""
        return key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in self.file_of

    def tensor_keys(self) -> list[str]:
        """Stored keys other than FP8 scales."""
        return [k for k in self.file_of if not self.is_scale(k)]

    def check_fp8(self, keys: Iterable[str] | None = None) -> None:
        """Every FP8 weight has a `_scale_inv` of the right shape; raise naming the key and file otherwise."""
        for k in self.file_of if keys is None else keys:
            if not self.is_fp8(k):
                continue
            sk = k + SCALE_SUFFIX
            if sk not in self.file_of:
                raise CheckpointError(f"FP8 weight {k!r} in {self.file_of[k]} has no {sk!r}: cannot dequantise it "
                                      "without its block scales")
            want = weight_scale_shape(self.shape[k], self.block)
            if self.shape[sk] != want:
                raise CheckpointError(f"{sk!r} in {self.file_of[sk]} has shape {list(self.shape[sk])}, expected "
                                      f"{list(want)} for weight {k!r} of shape {list(self.shape[k])} with "
                                      f"{self.block[0]}x{self.block[1]} blocks")

    # ---- reading ------------------------------------------------------------------------------------
    def get_raw(self, key: str) -> torch.Tensor:
        f = self.file_of[key]
        try:
            return self._handle(f).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {key!r} from {f} (truncated or corrupt?): {e}") from None

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key` as `dtype` (None: as stored; FP8 weights are dequantised, to bf16 unless told)."""
        if self.is_fp8(key):
            self.check_fp8([key])
            scale = self.get_raw(key + SCALE_SUFFIX)
            return dequantize_weight_blocks(self.get_raw(key), scale, self.block, dtype or torch.bfloat16)
        t = self.get_raw(key)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def default_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: that of the embedding (bf16 for FP8 checkpoints)."""
        key = "model.embed_tokens.weight"
        st = self.st_dtype.get(key)
        if st is None:  # fall back to the commonest floating dtype among non-FP8 tensors
            counts: dict[str, int] = {}
            for k, d in self.st_dtype.items():
                if d in _ST_DTYPES and not self.is_scale(k):
                    counts[d] = counts.get(d, 0) + 1
            st = max(counts, key=counts.get) if counts else "BF16"
        return _ST_DTYPES.get(st, torch.bfloat16)


# ---- loading -------------------------------------------------------------------------------------------
def _expected_hf(model: DeepseekV3, cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Checkpoint key -> shape the model needs, and the keys that may be present but are not needed."""
    state = model.state_dict()  # meta tensors: shapes only
    shapes = {k: tuple(t.shape) for k, t in adapter.to_hf(state, cfg).items()}
    optional = {k for k in shapes if adapter.is_mtp_copy(cfg, k)}
    if cfg.tie_word_embeddings and "lm_head.weight" in state:  # tied: the head may be stored too
        shapes["lm_head.weight"] = tuple(state["lm_head.weight"].shape)
        optional.add("lm_head.weight")
    return shapes, optional


def _layer_index(key: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _check_keys(ckpt: SafetensorsDir, cfg: ModelConfig, expected: dict[str, tuple[int, ...]],
                optional: set[str]) -> None:
    stored = ckpt.tensor_keys()
    stored_set = set(stored)
    missing = [k for k in expected if k not in stored_set and k not in optional]
    unexpected = [f"{k} (in {ckpt.file_of[k].name})" for k in stored if k not in expected]
    wrong = [f"{k} in {ckpt.file_of[k].name}: expected {list(expected[k])}, got {list(ckpt.shape[k])}"
             for k in stored if k in expected and ckpt.shape[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) the model has no place for: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {_listing(wrong)}")
    n = cfg.num_hidden_layers
    if missing and all(_layer_index(k) is not None and _layer_index(k) >= n for k in missing):
        problems.append(f"only the MTP layer(s) (model.layers.{n}.* and up) are absent, as in checkpoints re-saved "
                        "by transformers; set num_nextn_predict_layers to 0 in config.json to load without them")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match its config.json: " + "; ".join(problems))


def _set_tensor(model: torch.nn.Module, key: str, t: torch.Tensor) -> None:
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if name in mod._parameters:
        old = mod._parameters[name]
        setattr(mod, name, torch.nn.Parameter(t, requires_grad=old.requires_grad if old is not None else True))
    elif name in mod._buffers:
        setattr(mod, name, t)
    else:  # pragma: no cover - state_dict keys always name a parameter or buffer
        raise KeyError(key)


def _materialise_leftover_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (not in checkpoints, e.g. RoPE inv_freq) are still on meta: allocate, recompute."""
    owners = []
    for mod in model.modules():
        meta = [n for n, b in mod._buffers.items() if b is not None and b.is_meta]
        for n in meta:
            b = mod._buffers[n]
            setattr(mod, n, torch.zeros(b.shape, dtype=b.dtype, device=device))
        if meta:
            owners.append(mod)
    for mod in owners:
        # Only modules holding nothing loaded may recompute themselves (reset_parameters would clobber weights).
        loaded = list(mod.parameters(recurse=False)) + [
            b for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        if loaded or not hasattr(mod, "reset_parameters"):  # pragma: no cover - no such module in dsv3 today
            raise RuntimeError(f"{type(mod).__name__} has non-persistent buffers that load_pretrained cannot "
                               "recompute; give it a reset_parameters() that only fills them")
        mod.reset_parameters()
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:  # pragma: no cover - would be a bug in the key bookkeeping above
        raise RuntimeError(f"tensors left unmaterialised after loading: {_listing(left)}")


@torch.no_grad()
def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> DeepseekV3:
    """Load a Hugging Face DeepSeek-V3 checkpoint directory into a DeepseekV3 (eval mode).

    dtype None keeps the checkpoint's dtype (bf16 for FP8 checkpoints, which are dequantised); a name such as
    "bfloat16" works too. The router weight and correction bias stay fp32. Raises CheckpointError (file and
    keys named) for missing, corrupt or mismatching weights and ConfigError for a bad config.json.
    """
    path = checkpoint_dir(path)
    device = torch.device(device)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16' or 'float32'")
        dtype = getattr(torch, dtype)
    cfg = ModelConfig.from_json(path / CONFIG_NAME)
    ckpt = SafetensorsDir(path, block=weight_block_size(cfg.quantization_config))
    try:
        dtype = dtype or ckpt.default_dtype()
        # The loaded weights are dequantised: the model is no longer an FP8 one.
        cfg = cfg.replace(quantization_config=None, torch_dtype=dtype_name(dtype))
        with torch.device("meta"):
            model = DeepseekV3(cfg)
        expected, optional = _expected_hf(model, cfg)
        _check_keys(ckpt, cfg, expected, optional)
        ckpt.check_fp8()

        state = model.state_dict()
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        # Read in shard order so each shard is mapped once (experts split across shards are the exception).
        order = {f: i for i, f in enumerate(ckpt.files)}
        keys = sorted(state, key=lambda k: order[ckpt.file_of[adapter.hf_keys_for(k, state[k].shape)[0]]])
        for key in keys:
            want = torch.float32 if _KEEP_FP32.search(key) else dtype
            t = adapter.from_hf_tensor(key, state[key].shape, lambda k, want=want: ckpt.get(k, want))
            _set_tensor(model, key, t.to(device))
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        _materialise_leftover_buffers(model, device)
    finally:
        ckpt.close()
    return model.eval()


# ---- saving --------------------------------------------------------------------------------------------
def _owned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with its own storage (safetensors refuses views and shared storage)."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())


def atomic_save_file(tensors: dict[str, torch.Tensor], dest: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(dest: Path, text: str) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split keys (in order) into shards of at most max_shard_bytes (a bigger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for k, n in sizes.items():
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += n
    return shards


def shard_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def remove_stale_weights(path: Path, keep: set[str]) -> None:
    """Delete weight files of an earlier save in `path` that the new one does not use."""
    for p in path.iterdir():
        if p.name in keep:
            continue
        if p.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.match(p.name):
            p.unlink()


def save_pretrained(model: DeepseekV3, path: str | os.PathLike, max_shard_bytes: int = 2 << 30) -> None:
    """Write `model` as a Hugging Face checkpoint: config.json plus safetensors (sharded above max_shard_bytes).

    Keys are the released checkpoint's (per-expert matrices, MTP layer with its embedding/head copies), so the
    directory loads in `transformers.AutoModelForCausalLM.from_pretrained` and in `load_pretrained`. Every
    file is written under a temporary name and renamed into place.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = model.state_dict()
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise CheckpointError(f"cannot save: tensors still on the meta device (never loaded): {_listing(meta)}")
    hf = adapter.to_hf(state, cfg)
    shards = plan_shards({k: t.numel() * t.element_size() for k, t in hf.items()}, max_shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    for keys, name in zip(shards, names, strict=True):
        atomic_save_file({k: _owned_copy(hf[k]) for k in keys}, path / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in hf.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    remove_stale_weights(path, set(names) | ({INDEX_NAME} if len(shards) > 1 else set()))
    # The dtype written is the weights' (a stale `dtype` key would win over `torch_dtype` in transformers).
    extra = {k: v for k, v in cfg.extra.items() if k != "dtype"}
    cfg.replace(torch_dtype=dtype_name(model.model.embed_tokens.weight.dtype), extra=extra).to_json(path / CONFIG_NAME)


__all__ = ["CheckpointError", "SafetensorsDir", "checkpoint_dir", "load_pretrained", "save_pretrained"]
