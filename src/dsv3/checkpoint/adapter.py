"""All Hugging Face <-> dsv3 state-dict name mapping lives here.

dsv3 names equal the Hugging Face checkpoint names except for the routed experts, which dsv3 keeps stacked
for grouped GEMMs (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) while
checkpoints hold one matrix per expert (`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`).
MTP layers in released checkpoints also carry copies of the embedding and output head
(`model.layers.{n}.embed_tokens.weight`, `model.layers.{n}.shared_head.head.weight`); dsv3 shares the main
model's, so these are written as copies and accepted (not required) on load.
"""

from __future__ import annotations

import re

import torch

from ..config import ModelConfig

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_MTP_COPY = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")


def is_mtp_copy(cfg: ModelConfig, hf_key: str) -> bool:
    """True for the duplicated embedding/head an MTP layer carries in released checkpoints."""
    m = _MTP_COPY.match(hf_key)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


def hf_keys_for(key: str, shape: torch.Size) -> list[str]:
    """The checkpoint key(s) that make up dsv3 tensor `key` of `shape`."""
    m = _STACKED.match(key)
    if not m:
        return [key]
    prefix, kind = m.groups()
    names = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    return [f"{prefix}.{e}.{n}.weight" for e in range(shape[0]) for n in names]


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """dsv3 state dict -> Hugging Face checkpoint tensors (per-expert matrices, MTP copies added)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _STACKED.match(key)
        if not m:
            out[key] = t
            continue
        prefix, kind = m.groups()
        if kind == "gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}.{e}.up_proj.weight"] = up[e]
        else:
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
    for k in range(cfg.num_nextn_predict_layers):
        i = cfg.num_hidden_layers + k
        out[f"model.layers.{i}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
        out[f"model.layers.{i}.shared_head.head.weight"] = state["lm_head.weight"]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_tensor(key: str, shape: torch.Size, get) -> torch.Tensor:
    """Assemble dsv3 tensor `key` from checkpoint tensors; get(hf_key) returns one (already dequantised)."""
    m = _STACKED.match(key)
    if not m:
        return get(key)
    prefix, kind = m.groups()
    if kind == "gate_up_proj":
        return torch.stack([torch.cat((get(f"{prefix}.{e}.gate_proj.weight"), get(f"{prefix}.{e}.up_proj.weight")))
                            for e in range(shape[0])])
    return torch.stack([get(f"{prefix}.{e}.down_proj.weight") for e in range(shape[0])])


def from_hf(hf: dict[str, torch.Tensor], model_state_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (in memory) -> dsv3 state dict for a model whose state has these shapes."""
    return {k: from_hf_tensor(k, s, hf.__getitem__) for k, s in model_state_shapes.items()}


def to_transformers(model, attn_implementation: str | None = None):
    """transformers' DeepseekV3ForCausalLM holding the same config and weights, in memory.

    Its in-memory layout equals dsv3's (stacked experts), so no renaming is needed; it has no MTP layers.
    Used as the oracle in the tests and as the peer in the benchmarks.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = model.config.to_dict()
    d["num_key_value_heads"] = d["num_attention_heads"]  # transformers repeats K/V otherwise
    hf_cfg = DeepseekV3Config(**{k: v for k, v in d.items() if k != "architectures"})
    if attn_implementation:
        hf_cfg._attn_implementation = attn_implementation
    hf = DeepseekV3ForCausalLM(hf_cfg)
    n = model.config.num_hidden_layers
    ours = {k: v for k, v in model.state_dict().items()
            if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"transformers layout mismatch: missing {missing}, unexpected {unexpected}")
    return hf.to(model.dtype).eval()
