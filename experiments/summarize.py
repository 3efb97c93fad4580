"""Print a markdown table comparing run directories: held-out loss, accuracy by steps (from eval.json when
there), MaxVio."""

import json
import sys
from pathlib import Path


def summarize(run: Path) -> dict:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if not r.get("skipped")]
    ev = [r for r in recs if "eval_loss" in r]
    tail = recs[-50:]
    last = ev[-1] if ev else {}
    # accuracy: the final `dsv3 eval` (experiments/common.sh writes eval.json), else the last in-training one
    final = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    return {"run": run.name, "steps": recs[-1]["step"], "eval_loss": last.get("eval_loss"),
            "by_steps": final.get("by_steps", last.get("eval_by_steps", {})),
            "max_vio_last50": sum(r["max_vio"] for r in tail) / len(tail),
            "tokens_per_s": sorted(r["tokens_per_s"] for r in recs)[len(recs) // 2]}


if __name__ == "__main__":
    rows = [summarize(Path(p)) for p in sys.argv[1:]]
    keys = sorted({k for r in rows for k in r["by_steps"]}, key=int)
    print("| run | steps | held-out loss | MaxVio (last 50 steps) | " + " | ".join(f"{k}-step acc" for k in keys)
          + " | tokens/s |")
    print("|---" * (5 + len(keys)) + "|")
    for r in rows:
        accs = " | ".join(f"{r['by_steps'].get(k, float('nan')):.1%}" for k in keys)
        print(f"| {r['run']} | {r['steps']} | {r['eval_loss']:.4f} | {r['max_vio_last50']:.3f} | {accs} | "
              f"{r['tokens_per_s']:.0f} |")
