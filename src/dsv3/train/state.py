"""Training checkpoints: a Hugging Face-format model directory plus the training state, written atomically.

    RUN/checkpoints/step-000200/   config.json, model.safetensors, tokenizer files (loads anywhere)
                                   optimizer.safetensors   AdamW moments (fp32, or bf16), flattened by parameter index
                                   trainer_state.json      step, RNG states, data position, schedule, args
Runs of several processes write the sharded layout of dsv3.checkpoint.dcp instead; `load_training_state` reads
either, so a run can resume with a different number of processes.
The router correction biases are buffers in model.safetensors. The run directory itself always holds a copy
of the latest model files, so any command taking --checkpoint accepts a run directory.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = float(v)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict, meta: dict) -> dict[int, dict[str, torch.Tensor]]:
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = torch.tensor(v, dtype=torch.float32)
    return state


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    opt.load_state_dict({"state": _optimizer_state(tensors, meta), "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model, optimizer, tokenizer, trainer_state: dict,
                    keep_last: int = 3) -> Path:
    """Write RUN/checkpoints/step-N (temp name, then rename), refresh the run-dir model files, prune old ones."""
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step:06d}"
    tmp = ckpts / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "optimizer": meta, "rng": rng_state()}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    # the run directory mirrors the latest model (copy to temp names, then rename over the old files)
    for name in MODEL_FILES:
        if (final / name).exists():
            shutil.copy2(final / name, run_dir / f".{name}.tmp")
            (run_dir / f".{name}.tmp").replace(run_dir / name)
    for old in sorted(ckpts.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").exists() else []
    return found[-1] if found else None


def load_training_state(ckpt: Path, optimizer, model=None) -> dict:
    """Restore the optimizer and RNG from a checkpoint; returns the trainer state (step, data position, args).

    Reads both layouts whatever the process count now: this module's (one process) and the sharded DCP one
    (dsv3.checkpoint.dcp, written by several processes; also restores the model's weights). `model` is needed
    for DCP checkpoints and for sharded (multi-process) models.
    """
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("format") == "dcp":
        from ..checkpoint.dcp import load_dcp

        load_dcp(ckpt, model, optimizer)
    else:
        from torch.distributed.tensor import DTensor

        tensors, meta = load_file(str(ckpt / "optimizer.safetensors")), state.pop("optimizer")
        if model is not None and any(isinstance(p, DTensor) for p in model.parameters()):
            from ..checkpoint.dcp import load_full_optimizer

            load_full_optimizer(model, optimizer, _optimizer_state(tensors, meta))
        else:
            _load_optimizer(optimizer, tensors, meta)
    set_rng_state(state.pop("rng"))
    return state
