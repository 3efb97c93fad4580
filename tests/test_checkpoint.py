"""Hugging Face checkpoint I/O: round trips through transformers and dsv3, sharding, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_oracle import random_model, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3 import ConfigError, DeepseekV3
from dsv3.checkpoint import adapter
from dsv3.checkpoint.hf import CheckpointError, load_pretrained, save_pretrained


def assert_same_state(a: DeepseekV3, b: DeepseekV3) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, (k, sa[k].dtype, sb[k].dtype)
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def model() -> DeepseekV3:
    return random_model(tiny_config(), seed=1)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the saved checkpoint for tests that damage it."""
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def _keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# ---- round trips -------------------------------------------------------------------------------------------
def test_save_layout(saved, model):
    files = sorted(p.name for p in saved.iterdir())
    assert files == ["config.json", "model.safetensors"]  # single file, no temporaries left behind
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    n = model.config.num_hidden_layers
    assert "model.layers.2.mlp.experts.7.gate_proj.weight" in keys  # per-expert names
    assert "model.layers.2.mlp.experts.gate_up_proj" not in keys
    assert f"model.layers.{n}.eh_proj.weight" in keys  # MTP layer with its embed/head copies
    assert f"model.layers.{n}.embed_tokens.weight" in keys
    assert f"model.layers.{n}.shared_head.head.weight" in keys
    assert f"model.layers.{n}.mlp.experts.0.down_proj.weight" in keys
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_hidden_layers"] == n
    assert cfg["torch_dtype"] == "float32"


def test_transformers_loads_what_we_save(saved, model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_load_pretrained_is_bit_exact(saved, model):
    loaded = load_pretrained(saved)
    assert_same_state(model, loaded)
    n = model.config.num_hidden_layers
    sd = loaded.state_dict()
    assert torch.equal(sd[f"model.layers.{n}.eh_proj.weight"], model.state_dict()[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(loaded.mtp[0].mlp.gate.e_score_correction_bias, model.mtp[0].mlp.gate.e_score_correction_bias)
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)  # non-persistent, recomputed
    assert not loaded.training
    x = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(model.forward_train(x).mtp_logits[0], loaded.forward_train(x).mtp_logits[0])
    # the classmethod delegates here too
    assert_same_state(model, DeepseekV3.from_pretrained(saved))


def test_sharded_save_loads_identically(model, tmp_path):
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards
    hf_keys = adapter.to_hf(model.state_dict(), model.config)
    assert set(index["weight_map"]) == set(hf_keys)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf_keys.values())
    for name in shards:  # each shard holds what the index says
        assert all(index["weight_map"][k] == name for k in _keys(path / name))
    assert_same_state(model, load_pretrained(path))
    # saving again as one file replaces the shards (no stale index to confuse loaders)
    save_pretrained(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_state(model, load_pretrained(path))


def test_load_dtype_keeps_router_fp32(saved, model):
    loaded = load_pretrained(saved, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.config.torch_dtype == "bfloat16"
    for k, t in loaded.state_dict().items():
        want = torch.float32 if k.endswith(("mlp.gate.weight", "e_score_correction_bias")) else torch.bfloat16
        assert t.dtype == want, k
        assert torch.equal(t, model.state_dict()[k].to(want)), k
    assert loaded.rotary.inv_freq.dtype == torch.float32


def test_bf16_model_round_trip(model, tmp_path):
    bf = random_model(tiny_config(), seed=3).to(torch.bfloat16)
    for layer in bf.model.layers[1:]:  # as the loader keeps them
        layer.mlp.gate.float()
    save_pretrained(bf, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert_same_state(bf, loaded)


def test_saved_config_states_the_weights_dtype(tmp_path):
    m = random_model(tiny_config(torch_dtype="bfloat16"), seed=4)  # fp32 weights, stale dtype in the config
    m.config.extra["dtype"] = "bfloat16"
    save_pretrained(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and "dtype" not in cfg
    assert m.config.torch_dtype == "bfloat16"  # the model's own config is left alone


def test_tied_embeddings_round_trip(tmp_path):
    m = random_model(tiny_config(tie_word_embeddings=True), seed=2)
    save_pretrained(m, tmp_path)
    assert "lm_head.weight" not in _keys(tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_state(m, loaded)


def test_mtp_copies_are_optional(ckpt, model):
    n = model.config.num_hidden_layers
    tensors = load_file(ckpt / "model.safetensors")
    del tensors[f"model.layers.{n}.embed_tokens.weight"], tensors[f"model.layers.{n}.shared_head.head.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert_same_state(model, load_pretrained(ckpt))


# ---- errors -------------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope"):
        load_pretrained(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{ this is not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        load_pretrained(ckpt)


def test_config_invalid_values(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_group"] = 3  # 8 experts cannot split into 3 groups
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="n_routed_experts=8 is not divisible by n_group=3"):
        load_pretrained(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.0001, 0.0])
def test_truncated_file(ckpt, keep):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_pretrained(ckpt)


def test_wrong_shape(ckpt):
    key = "model.layers.0.self_attn.q_b_proj.weight"
    tensors = load_file(ckpt / "model.safetensors")
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key} in model.safetensors: expected \[96, 32\], got \[95, 32\]"):
        load_pretrained(ckpt)


def test_wrong_expert_shape(ckpt):
    key = "model.layers.1.mlp.experts.5.down_proj.weight"
    tensors = load_file(ckpt / "model.safetensors")
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key} in model.safetensors: expected \[64, 32\], got \[32, 64\]"):
        load_pretrained(ckpt)


def test_missing_keys_are_listed(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    gone = sorted(k for k in tensors if k.startswith("model.layers.1.mlp.experts."))  # 24 tensors
    for k in gone:
        del tensors[k]
    del tensors["model.norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="25 missing tensor") as e:
        load_pretrained(ckpt)
    msg = str(e.value)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in msg and "and 15 more" in msg and str(ckpt) in msg


def test_unexpected_key(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*model.layers.0.self_attn.surprise.weight \(in model"):
        load_pretrained(ckpt)


def test_index_points_at_missing_shard(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"index.json points at shard.*{victim}"):
        load_pretrained(tmp_path)


def test_index_disagrees_with_shards(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    names = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = next(n for n in names if n != index["weight_map"]["model.norm.weight"])
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight -> model-"):
        load_pretrained(tmp_path)


def test_save_over_a_file_fails_cleanly(model, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_pretrained(model, f)


def test_index_not_json(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="index.json is not valid JSON"):
        load_pretrained(tmp_path)


def test_load_maps_few_shards_at_a_time(model, tmp_path, monkeypatch):
    from dsv3.checkpoint import hf

    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    opened = []
    real = hf.SafetensorsDir._handle

    def spy(self, f):
        out = real(self, f)
        opened.append(len(self._open))
        return out

    monkeypatch.setattr(hf.SafetensorsDir, "_handle", spy)
    assert_same_state(model, load_pretrained(tmp_path))
    assert opened and max(opened) <= 2


def test_checkpoint_without_mtp_layer(ckpt, model):
    n = model.config.num_hidden_layers
    tensors = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if not k.startswith(f"model.layers.{n}.")}
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="set num_nextn_predict_layers to 0"):
        load_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (ckpt / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(ckpt)
    assert loaded.mtp == []
    x = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
