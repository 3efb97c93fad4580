"""`dsv3 plot RUN_DIR`: loss curves, MaxVio and per-layer expert-load heatmaps from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    recs = [r for r in read_metrics(run_dir) if not r.get("skipped")]
    if not recs:
        raise ValueError(f"{run_dir}/metrics.jsonl has no completed steps")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    steps = [r["step"] for r in recs]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r["loss"] for r in recs], label="train loss (main head)")
    axes[0].plot(steps, [r["mtp_loss"] for r in recs], label="MTP loss", alpha=0.8)
    ev = [r for r in recs if "eval_loss" in r]
    if ev:
        axes[0].plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[0].set_title("loss")
    acc = [r for r in recs if "eval_by_steps" in r]
    for k in sorted({k for r in acc for k in r["eval_by_steps"]}, key=int):
        axes[1].plot([r["step"] for r in acc], [r["eval_by_steps"].get(k, np.nan) for r in acc], "o-",
                     label=f"{k}-step")
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out math accuracy")
    if acc:
        axes[1].legend()
    axes[2].plot(steps, [r["max_vio"] for r in recs])
    axes[2].set_xlabel("step")
    axes[2].set_title("MaxVio (mean over MoE layers)")
    fig.tight_layout()
    fig.savefig(out_dir / "training.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "training.png")

    n_layers = len(recs[-1].get("expert_load", []))
    if n_layers:
        fig, axes = plt.subplots(n_layers, 1, figsize=(10, 2.2 * n_layers), squeeze=False)
        for i in range(n_layers):
            load = np.array([r["expert_load"][i] for r in recs]).T  # [experts, steps]
            im = axes[i, 0].imshow(load * load.shape[0], aspect="auto", cmap="coolwarm", vmin=0, vmax=2,
                                   extent=[steps[0] - 0.5, steps[-1] + 0.5, load.shape[0] - 0.5, -0.5],
                                   interpolation="nearest")  # each step's column centred on its step number
            axes[i, 0].set_ylabel(f"MoE layer {i}\nexpert")
            fig.colorbar(im, ax=axes[i, 0], label="load / mean")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load per layer over training (1 = perfectly balanced)")
        fig.tight_layout()
        fig.savefig(out_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "expert_load.png")
    return written
