"""FP8 block quantisation, loading block-scaled FP8 checkpoints, and the fp8 -> bf16 converter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hf_oracle import random_model, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.checkpoint import adapter
from dsv3.checkpoint.convert import convert_fp8_to_bf16
from dsv3.checkpoint.hf import CheckpointError, load_pretrained
from dsv3.quant import (
    dequantize_activation_tiles,
    dequantize_weight_blocks,
    quantize_activation_tiles,
    quantize_weight_blocks,
)

QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def expand(scale_inv: torch.Tensor, rows: int, cols: int, br: int = 128, bc: int = 128) -> torch.Tensor:
    """The per-element scale: scale_inv[i, j] repeated over block (i, j), cut to [rows, cols]."""
    return scale_inv.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]


def block_amax(x: torch.Tensor, br: int = 128, bc: int = 128) -> torch.Tensor:
    R, C = x.shape
    return torch.stack([torch.stack([x[i:i + br, j:j + bc].abs().max() for j in range(0, C, bc)])
                        for i in range(0, R, br)])


# ---- quantisers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(576, 160), (128, 256), (7, 300), (1, 1)])
def test_weight_blocks_round_trip(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    w[0, 0] = 0.5  # one block with a large outlier
    q, s = quantize_weight_blocks(w)
    R, C = shape
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(R / 128), math.ceil(C / 128))
    torch.testing.assert_close(s, block_amax(w) / 448)  # amax / 448 per block, partial edge blocks included
    assert torch.equal(block_amax(q.float()), torch.full_like(s, 448.0))  # each block's max hits the e4m3 max
    deq = dequantize_weight_blocks(q, s, dtype=torch.float32)
    assert torch.equal(deq, q.float() * expand(s, R, C))  # exactly block * scale_inv
    err = (deq - w).abs() / expand(s * 448, R, C)  # error relative to the block's amax
    assert err.max() <= 2**-4  # 3 mantissa bits
    assert dequantize_weight_blocks(q, s).dtype == torch.bfloat16


def test_weight_blocks_zero_block_and_rectangular():
    w = torch.zeros(200, 130)
    w[150:, :] = torch.randn(50, 130)
    q, s = quantize_weight_blocks(w)
    deq = dequantize_weight_blocks(q, s, dtype=torch.float32)
    assert torch.isfinite(deq).all() and torch.equal(deq[:128], torch.zeros(128, 130))
    q2, s2 = quantize_weight_blocks(w, block=(64, 32))
    assert s2.shape == (4, 5)
    deq2 = dequantize_weight_blocks(q2, s2, (64, 32), torch.float32)
    assert torch.equal(deq2, q2.float() * expand(s2, 200, 130, 64, 32))


def test_weight_blocks_stacked_and_bad_scale():
    w = torch.randn(3, 130, 140)
    q, s = quantize_weight_blocks(w)
    assert s.shape == (3, 2, 2)
    for e in range(3):
        q_e, s_e = quantize_weight_blocks(w[e])
        assert torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8)) and torch.equal(s[e], s_e)
    with pytest.raises(ValueError, match=r"needs \(2, 2\)"):
        dequantize_weight_blocks(q[0], s[0, :1])


@pytest.mark.parametrize("shape", [(2, 5, 256), (3, 200), (4, 1)])
def test_activation_tiles(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    q, s = quantize_activation_tiles(x)
    D = shape[-1]
    n = math.ceil(D / 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (*shape[:-1], n)
    tiles = torch.nn.functional.pad(x, (0, n * 128 - D)).reshape(*shape[:-1], n, 128)
    torch.testing.assert_close(s, tiles.abs().amax(-1) / 448)
    deq = dequantize_activation_tiles(q, s, dtype=torch.float32)
    assert torch.equal(deq, q.float() * s.repeat_interleave(128, -1)[..., :D])
    assert ((deq - x).abs() <= s.repeat_interleave(128, -1)[..., :D] * 448 * 2**-4).all()
    with pytest.raises(ValueError):
        dequantize_activation_tiles(q, s[..., :0])


# ---- a synthetic FP8 checkpoint ---------------------------------------------------------------------------
def fp8_config():
    # hidden 160 and kv_a_proj_with_mqa of 576 rows (kv_lora_rank 512 + rope 64) give partial 128-blocks.
    return tiny_config(hidden_size=160, num_attention_heads=2, q_lora_rank=48, kv_lora_rank=512,
                       qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=192,
                       moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                       num_hidden_layers=2, quantization_config=QUANT, torch_dtype="bfloat16")


def is_quantised(key: str, t: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "shared_head.head", ".mlp.gate.weight")
    return t.dim() == 2 and not any(s in key for s in skip)


def write_fp8_checkpoint(path, n_shards: int = 2, extra_files: bool = True):
    """Save a random model the way DeepSeek ships V3: FP8 matrices + scale_inv, bf16 rest, fp32 biases.

    Returns (model, stored): the checkpoint tensors as written."""
    model = random_model(fp8_config(), seed=5)
    stored: dict[str, torch.Tensor] = {}
    for k, t in adapter.to_hf(model.state_dict(), model.config).items():
        if is_quantised(k, t):
            stored[k], stored[k + "_scale_inv"] = quantize_weight_blocks(t)
        elif k.endswith("e_score_correction_bias"):
            stored[k] = t.float().clone()
        else:
            stored[k] = t.to(torch.bfloat16).clone()
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json(path / "config.json")
    keys = sorted(stored)
    per = math.ceil(len(keys) / n_shards)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i * per:(i + 1) * per]
        save_file({k: stored[k] for k in part}, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    if extra_files:
        (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
        (path / "inference").mkdir()
        (path / "inference" / "README.md").write_text("code")
    return model, stored


def expected_dequantised(stored: dict[str, torch.Tensor], dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Checkpoint key -> the tensor the loader must produce, computed here independently of dsv3.quant."""
    out = {}
    for k, t in stored.items():
        if k.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = stored[k + "_scale_inv"]
            out[k] = (t.float() * expand(s, *t.shape)).to(dtype)
        elif k.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            out[k] = t.float()
        else:
            out[k] = t.to(dtype)
    return out


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    model, stored = write_fp8_checkpoint(path)
    return path, stored


def test_fp8_checkpoint_loads_to_exact_dequantisation(fp8_ckpt):
    path, stored = fp8_ckpt
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (576, 160)  # 4.5 x 1.25 blocks
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)
    loaded = load_pretrained(path)
    assert loaded.config.quantization_config is None and "quantization_config" not in loaded.config.to_dict()
    assert loaded.dtype == torch.bfloat16
    want = expected_dequantised(stored)
    got = adapter.to_hf(loaded.state_dict(), loaded.config)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    assert loaded.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_fp8_checkpoint_in_fp32(fp8_ckpt):
    path, stored = fp8_ckpt
    loaded = load_pretrained(path, dtype=torch.float32)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"  # [160, 64]: a partial row block
    got = adapter.to_hf(loaded.state_dict(), loaded.config)[key]
    assert torch.equal(got, stored[key].float() * expand(stored[key + "_scale_inv"], 160, 64))


def test_fp8_weight_without_scale_is_an_error(tmp_path):
    _, stored = write_fp8_checkpoint(tmp_path, n_shards=1, extra_files=False)
    key = "model.layers.1.self_attn.o_proj.weight"
    del stored[key + "_scale_inv"]
    save_file(stored, tmp_path / "model-00001-of-00001.safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key + "_scale_inv"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"FP8 weight '{key}' in .*model-00001-of-00001.safetensors has no"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=key):
        convert_fp8_to_bf16(tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_fp8_scale_with_wrong_shape(tmp_path):
    _, stored = write_fp8_checkpoint(tmp_path, n_shards=1, extra_files=False)
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    stored[key] = stored[key][:4].clone()
    save_file(stored, tmp_path / "model-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=rf"'{key}' .* has shape \[4, 2\], expected \[5, 2\]"):
        load_pretrained(tmp_path)


# ---- fp8 -> bf16 conversion -------------------------------------------------------------------------------------
def test_convert_fp8_to_bf16(fp8_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    src, stored = fp8_ckpt
    dst = convert_fp8_to_bf16(src, tmp_path / "bf16", progress=False)
    # same shards, same names minus the scales, dequantised to bf16; every other file copied
    assert (dst / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert (dst / "inference" / "README.md").exists()
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    want = expected_dequantised(stored)
    assert set(index["weight_map"]) == set(want)
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(dst / name), "pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == name}
            for k in keys:
                t = f.get_tensor(k)
                assert not k.endswith("_scale_inv") and t.dtype != torch.float8_e4m3fn
                ref = stored[k].float() * expand(stored[k + "_scale_inv"], *t.shape) if k + "_scale_inv" in stored \
                    else stored[k]
                assert torch.equal(t, ref.to(t.dtype)), k
    assert index["metadata"]["total_size"] == sum(
        (t.numel() * 2 if t.dtype == torch.float8_e4m3fn else t.numel() * t.element_size())
        for k, t in stored.items() if not k.endswith("_scale_inv"))

    # dsv3 loads it to exactly what it loads from the FP8 original
    dequantised = load_pretrained(src)
    converted = load_pretrained(dst)
    a, b = dequantised.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

    # and transformers agrees with it, in fp32
    ours = load_pretrained(dst, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dequantised.float()(x)
        torch.testing.assert_close(ours(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(hf(x).logits, ref, atol=1e-5, rtol=0)


def test_convert_refuses_same_directory(fp8_ckpt):
    src, _ = fp8_ckpt
    with pytest.raises(CheckpointError, match="different output directory"):
        convert_fp8_to_bf16(src, src, progress=False)
