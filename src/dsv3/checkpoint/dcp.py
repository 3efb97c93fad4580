"""Distributed training checkpoints: torch.distributed.checkpoint (DCP) for the sharded model and optimizer,
plus a Hugging Face export of the full model written once, by rank 0.

    RUN/checkpoints/step-000200/   dcp/.metadata, dcp/__{rank}_0.distcp   every rank's shards (model + AdamW)
                                   config.json, model.safetensors, ...    the full model, HF format (loads anywhere)
                                   trainer_state.json                     step, data position, RNG, args, "format"

DCP stores each tensor as pieces of its global shape, so a checkpoint written by N processes loads into any
other number of processes or mesh (each rank reads the pieces it now owns) and into one process without a
process group. One-process checkpoints (dsv3.train.state: optimizer.safetensors) resume in N processes through
`load_full_optimizer`. Multi-node runs need the run directory on a filesystem every node sees.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..model.transformer import DeepseekV3
from .hf import _materialise_leftover_buffers

DCP_DIR = "dcp"


def is_dcp_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR / ".metadata").exists()


def gather_full_model(model: torch.nn.Module, par) -> DeepseekV3 | None:
    """The sharded model's full weights as a plain DeepseekV3 on rank 0's CPU (None on other ranks).
    Collective: every rank must call it. Needs the whole model to fit in rank 0's CPU memory."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not par.is_main:
        return None
    cfg = model.config
    with torch.device("meta"):
        plain = DeepseekV3(cfg)
    plain.load_state_dict(full, strict=False, assign=True)  # strict=False: non-persistent buffers are not in it
    if cfg.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathered state is missing {missing[:5]}")
    _materialise_leftover_buffers(plain, torch.device("cpu"))
    return plain


def save_distributed(run_dir: Path, step: int, model, optimizer, tokenizer, trainer_state: dict, par,
                     keep_last: int = 3) -> Path:
    """Write RUN/checkpoints/step-N from every rank (collective): DCP shards, then rank 0 adds the HF export and
    the trainer state and renames the temporary directory into place, as `dsv3.train.state.save_checkpoint`."""
    from ..train.state import MODEL_FILES, rng_state

    ckpts = run_dir / "checkpoints"
    final, tmp = ckpts / f"step-{step:06d}", ckpts / f".tmp-step-{step:06d}"
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / DCP_DIR))
    plain = gather_full_model(model, par)
    if par.is_main:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format": "dcp", "world_size": par.world_size, "ep": par.ep}
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, **meta, "rng": rng_state()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for name in MODEL_FILES:  # the run directory mirrors the latest model
            if (final / name).exists():
                shutil.copy2(final / name, run_dir / f".{name}.tmp")
                (run_dir / f".{name}.tmp").replace(run_dir / name)
        for old in sorted(ckpts.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    par.barrier()
    return final


def load_dcp(ckpt: Path, model, optimizer) -> None:
    """Load a DCP checkpoint's model and optimizer into `model` (sharded or plain) and `optimizer`, resharding
    from whatever mesh wrote it. Works in one process without a process group too."""
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is an intended use, not a surprise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(Path(ckpt) / DCP_DIR),
                 no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def load_full_optimizer(model, optimizer, state: dict[int, dict[str, torch.Tensor]]) -> None:
    """Load full (unsharded) AdamW state keyed by parameter index (the one-process checkpoint layout) into the
    optimizer of a sharded model: every rank keeps the pieces of the tensors it owns."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, full, i = [], {}, 0
    for g in optimizer.param_groups:
        fqns = []
        for p in g["params"]:
            fqns.append(names[id(p)])
            if i in state:
                full[names[id(p)]] = state[i]
            i += 1
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": fqns})
    set_optimizer_state_dict(model, optimizer, {"state": full, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
