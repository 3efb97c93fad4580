"""ModelConfig: the fields of Hugging Face's DeepseekV3Config under the same names, presets, config.json in/out."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model (the message names the field and the fix)."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # Legacy (`rope_scaling`, what DeepSeek ships) or newer (`rope_parameters`, transformers >= 5) RoPE settings;
    # whichever was read is written back. `rope` gives the merged view the model uses.
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    quantization_config: dict | None = None
    model_type: str = "deepseek_v3"
    architectures: list[str] | None = None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, kept for the round trip

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope(self) -> dict:
        """RoPE settings merged from either format: rope_type, rope_theta, and YaRN keys when present."""
        src = self.rope_parameters or self.rope_scaling or {}
        out = dict(src)
        out["rope_type"] = src.get("rope_type", src.get("type", "default"))
        out.setdefault("rope_theta", self.rope_theta)
        out.pop("type", None)
        if out["rope_type"] == "yarn":
            out.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return out

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rope = self.rope
        if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
            m = yarn_mscale(rope["factor"], rope["mscale_all_dim"])
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return (
            bool(self.n_routed_experts)
            and i >= self.first_k_dense_replace
            and (i - self.first_k_dense_replace) % self.moe_layer_freq == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be a positive integer or null (no query compression), got {self.q_lora_rank!r}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.scoring_func in ("sigmoid", "softmax"),
             f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        need(self.hidden_act == "silu", f"only hidden_act='silu' is supported, got {self.hidden_act!r}")
        need(0 <= self.first_k_dense_replace, "first_k_dense_replace must be >= 0")
        need(self.moe_layer_freq >= 1, "moe_layer_freq must be >= 1")
        E = self.n_routed_experts or 0
        if E:
            k = self.num_experts_per_tok
            need(isinstance(k, int) and 1 <= k <= E,
                 f"num_experts_per_tok must be between 1 and n_routed_experts={E}, got {k!r}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            g = self.n_group or 1
            tg = self.topk_group or g
            need(E % g == 0, f"n_routed_experts={E} is not divisible by n_group={g}; pick a divisor")
            need(1 <= tg <= g, f"topk_group={tg} must be between 1 and n_group={g}")
            need(tg * (E // g) >= k,
                 f"the {tg} kept groups hold only {tg * (E // g)} experts, fewer than num_experts_per_tok={k}; "
                 "raise topk_group or lower num_experts_per_tok")
            if g > 1 and self.scoring_func == "sigmoid":
                need(E // g >= 2, f"group-limited routing scores each group by its top-2 experts, so each of the "
                     f"{g} groups needs at least 2 experts (n_routed_experts={E})")
        rope = self.rope
        need(rope["rope_type"] in ("default", "yarn"),
             f"rope type {rope['rope_type']!r} is not supported (use 'default' or 'yarn')")
        if rope["rope_type"] == "yarn":
            need(rope.get("factor", 0) and rope["factor"] >= 1, f"YaRN factor must be >= 1, got {rope.get('factor')!r}")

    # ---- config.json in/out -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = copy.deepcopy(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        # head_dim / qk_head_dim are derived (transformers recomputes them); keeping them could go stale.
        extra = {k: v for k, v in d.items() if k not in names and k not in ("head_dim", "qk_head_dim")}
        # transformers >= 5 spells the dtype `dtype`; older files `torch_dtype`.
        if "dtype" in extra:  # one dtype field only, so a stale copy can never win
            dtype = extra.pop("dtype")
            known.setdefault("torch_dtype", dtype)
        # rope_theta may live inside rope_parameters
        rp = known.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in known:
            known["rope_theta"] = rp["rope_theta"]
        if "num_mtp_layers" in extra and "num_nextn_predict_layers" not in known:
            known["num_nextn_predict_layers"] = extra.pop("num_mtp_layers")
        for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
            if key in known and not isinstance(known[key], int):
                raise ConfigError(f"{key} must be an integer, got {known[key]!r}")
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # wrong value types surface here
            raise ConfigError(f"invalid config: {e}") from None

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        if d["rope_parameters"] is None:
            d.pop("rope_parameters")
        for k in ("quantization_config", "torch_dtype", "architectures"):
            if d[k] is None:
                d.pop(k)
        d.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        d.update(copy.deepcopy(self.extra))
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_config_dict(path)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])


def read_config_dict(path: Path) -> dict:
    """The JSON object in a config file, with clear errors for a missing file, bad JSON or a non-object."""
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return d


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_V3_ROPE = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # Trains in minutes on 2 CPU cores (see `make demo`).
    "tiny": dict(
        vocab_size=1024, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=6, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=1.0, num_nextn_predict_layers=1, max_position_embeddings=1024,
        rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        # V3's std 0.006 suits its 7168-wide layers; at width 192 it leaves attention logits near zero for
        # hundreds of steps (demo recipe, 1150 steps: 11.7% on 1-step problems with 0.05 and the document mask,
        # 4.0% with 0.006 and no mask)
        initializer_range=0.05,
    ),
    # For benchmarks: ~106M parameters.
    "small": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=4096,
    ),
    # For bandwidth-bound CPU decoding: ~1.24B parameters + 0.11B MTP (2.7 GB in bf16, more than CPU caches hold),
    # ~0.24B activated per token (6 of 64 routed experts + 1 shared).
    "medium": dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=512,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=4096,
    ),
    "deepseek-v3": dict(rope_scaling=_V3_ROPE, initializer_range=0.006,
                        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2,
        routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        num_nextn_predict_layers=0, max_position_embeddings=163840, bos_token_id=100000,
        eos_token_id=100001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
}
