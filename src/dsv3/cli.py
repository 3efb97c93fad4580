"""`dsv3` command line: info, init, convert (train, eval and plot come from dsv3.train; generate, chat and serve
from dsv3.serve)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESETS, ConfigError, ModelConfig


def _config_from_args(args) -> ModelConfig:
    if args.config:
        return ModelConfig.from_json(args.config)
    if args.preset:
        return ModelConfig.preset(args.preset)
    return ModelConfig.from_json(Path(args.checkpoint) / "config.json")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def cmd_info(args) -> int:
    from .sizing import count_parameters

    cfg = _config_from_args(args)
    info = count_parameters(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ratio = info["full_kv_bytes_per_token"] / info["kv_cache_bytes_per_token"]
    print(f"parameters total           {info['params_total']:>20,}  ({_human(info['params_total'])})")
    print(f"  main model               {info['params_main']:>20,}  ({_human(info['params_main'])})")
    print(f"  MTP modules              {info['params_mtp']:>20,}  ({_human(info['params_mtp'])})")
    print(f"  router bias buffers      {info['router_bias_buffers']:>20,}")
    print(f"activated per token        {info['params_activated_per_token']:>20,}  "
          f"({_human(info['params_activated_per_token'])})")
    print(f"latent KV cache per token  {info['kv_cache_bytes_per_token']:>20,} bytes (bf16, "
          f"{info['kv_cache_values_per_token_per_layer']} values/layer)")
    print(f"full K/V would cost        {info['full_kv_bytes_per_token']:>20,} bytes ({ratio:.1f}x more)")
    return 0


def cmd_init(args) -> int:
    import torch

    from .model import DeepseekV3

    cfg = ModelConfig.preset(args.preset)
    torch.manual_seed(args.seed)
    model = DeepseekV3(cfg)
    model.reset_parameters(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok = _default_tokenizer(cfg)
    if tok is not None:
        tok.save(out)
    print(f"wrote a randomly initialised {args.preset} checkpoint to {out}")
    return 0


def _default_tokenizer(cfg: ModelConfig):
    """The built-in math-corpus tokenizer at the config's vocabulary size (None if that cannot be built)."""
    from .data.tokenizer import train_math_tokenizer

    try:
        return train_math_tokenizer(vocab_size=min(cfg.vocab_size, 8192))
    except ValueError:  # a vocabulary too small for byte-level BPE
        return None


def cmd_convert(args) -> int:
    from .checkpoint.convert import convert_fp8_to_bf16

    convert_fp8_to_bf16(args.src, args.dst, progress=True)
    print(f"wrote bf16 checkpoint to {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and KV-cache size of a config")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a config.json file")
    src.add_argument("--preset", choices=list(PRESETS))
    src.add_argument("--checkpoint", help="a checkpoint directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    init = sub.add_parser("init", help="write a randomly initialised checkpoint")
    init.add_argument("--preset", required=True, choices=list(PRESETS))
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_init)

    conv = sub.add_parser("convert", help="checkpoint conversions")
    conv_sub = conv.add_subparsers(dest="conversion", required=True)
    f2b = conv_sub.add_parser("fp8-to-bf16", help="dequantise an FP8 checkpoint on the CPU, shard by shard")
    f2b.add_argument("--in", dest="src", required=True)
    f2b.add_argument("--out", dest="dst", required=True)
    f2b.set_defaults(func=cmd_convert)

    for register in _extensions():
        register(sub)
    return p


def _extensions():
    """Subcommands that live beside their code (train, eval, plot; generate, chat, serve)."""
    from .plan import register as plan_register
    from .serve.cli import register as serve_register

    regs = [serve_register, plan_register]
    try:
        from .train.cli import register as train_register

        regs.append(train_register)
    except ImportError:
        pass
    return regs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # errors a user can cause carry their own class names (CheckpointError, DataError)
        if type(e).__name__.endswith("Error") and type(e).__module__.startswith("dsv3"):
            print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
