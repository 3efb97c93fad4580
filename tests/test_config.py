import json
import subprocess
import sys

import pytest

from dsv3 import ConfigError, ModelConfig
from dsv3.cli import main
from dsv3.sizing import count_parameters

V3_JSON = "../shared/configs/deepseek-v3.json"


@pytest.fixture(scope="module")
def v3_path(request):
    from pathlib import Path

    p = Path(request.config.rootdir) / V3_JSON
    if not p.exists():
        p = Path(request.config.rootdir).parent / "shared/configs/deepseek-v3.json"
    return p


def test_v3_config_round_trips_unchanged(v3_path, tmp_path):
    raw = json.loads(v3_path.read_text())
    cfg = ModelConfig.from_json(v3_path)
    assert cfg.rope["rope_type"] == "yarn" and cfg.rope["factor"] == 40
    assert cfg.num_nextn_predict_layers == 1 and cfg.quantization_config["weight_block_size"] == [128, 128]
    assert abs(cfg.softmax_scale - 192**-0.5 * (0.1 * __import__("math").log(40) + 1) ** 2) < 1e-12
    cfg.to_json(tmp_path / "config.json")
    back = json.loads((tmp_path / "config.json").read_text())
    for k, v in raw.items():
        assert back[k] == v, k


def test_newer_rope_parameters_and_unknown_keys_kept(tmp_path):
    d = ModelConfig.preset("tiny").to_dict()
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                            "original_max_position_embeddings": 256}
    d["my_custom_field"] = {"a": 1}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope["rope_type"] == "yarn"
    out = cfg.to_dict()
    assert out["my_custom_field"] == {"a": 1} and out["rope_parameters"] == d["rope_parameters"]
    assert "rope_scaling" not in out


@pytest.mark.parametrize("change,message", [
    (dict(n_routed_experts=10, n_group=4), "not divisible by n_group"),
    (dict(topk_group=5, n_group=4), "topk_group=5"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "fewer than num_experts_per_tok"),
    (dict(num_experts_per_tok=99), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(qk_rope_head_dim=7), "even"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "not supported"),
])
def test_invalid_configs_give_clear_errors(change, message):
    d = ModelConfig.preset("tiny").to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ModelConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_671b_sizes_on_meta_device(v3_path):
    info = count_parameters(ModelConfig.from_json(v3_path))
    assert info["params_main"] == 671_026_404_352
    assert info["router_bias_buffers"] == 14_848
    assert info["kv_cache_bytes_per_token"] == 70_272
    assert info["full_kv_bytes_per_token"] == 61 * 128 * (192 + 128) * 2
    assert 36e9 < info["params_activated_per_token"] < 38e9  # the report: 37B activated


def test_small_preset_is_about_106m_and_v2_lite_about_15_7b():
    assert abs(count_parameters(ModelConfig.preset("small"))["params_main"] - 106e6) < 1e6
    medium = count_parameters(ModelConfig.preset("medium"))
    assert abs(medium["params_main"] - 1.24e9) < 0.01e9 and abs(medium["params_activated_per_token"] - 0.236e9) < 1e6
    lite = count_parameters(ModelConfig.preset("deepseek-v2-lite"))
    assert abs(lite["params_main"] - 15.7e9) < 0.1e9 and lite["router_bias_buffers"] == 0


def test_cli_info_json(v3_path, capsys):
    assert main(["info", "--config", str(v3_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_main"] == 671_026_404_352 and info["kv_cache_bytes_per_token"] == 70_272


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_routed_experts": 10, "n_group": 3}))
    r = subprocess.run([sys.executable, "-m", "dsv3", "info", "--checkpoint", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not divisible by n_group" in r.stderr and "Traceback" not in r.stderr
