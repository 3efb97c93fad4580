"""`dsv3 generate`, `dsv3 chat` and `dsv3 serve`: the inference engine from the command line."""

from __future__ import annotations

import argparse
import os
import sys
import time

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a Hugging Face-format checkpoint directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: as stored)")
    p.add_argument("--no-speculative", dest="speculative", action="store_false", default=None,
                   help="do not draft tokens with the checkpoint's MTP module (on when it has one)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster tokens after a warm-up of a minute or so")


def _add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int, n: bool) -> None:
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=max_tokens,
                   help=f"most new tokens per reply (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    if n:
        p.add_argument("--n", type=int, default=1, help="independent samples of the prompt")


def register(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt, streaming the text to the terminal")
    _add_engine_flags(gen)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text (BOS is prepended)")
    what.add_argument("--prompt-ids", help="prompt token ids, e.g. '0 17 42' (for a checkpoint without a tokenizer)")
    _add_sampling_flags(gen, max_tokens=128, n=True)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the checkpoint's chat template (/clear, /exit)")
    _add_engine_flags(chat)
    chat.add_argument("--system", default=None, help="a system prompt")
    _add_sampling_flags(chat, max_tokens=512, n=False)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/ (default: $DSV3_API_KEY, else none)")
    serve.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="most requests queued for a batch slot; more are refused with 429")
    serve.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: the engine's)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)


def _engine(args, **kwargs):
    import torch

    from ..infer.engine import Engine

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Engine.from_checkpoint(args.checkpoint, dtype=dtype, device=args.device, speculative=args.speculative,
                                  compile=args.compile, **kwargs)


def _params(args, max_tokens: int | None = None):
    from ..infer.engine import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens if max_tokens is None else max_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=list(args.stop), n=getattr(args, "n", 1),
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    params.validate()
    return params


def _run_one(engine, prompt_ids: list[int], params, on_output=None):
    """Step the engine until this request finishes; ``on_output`` sees every RequestOutput as it comes.
    Ctrl-C aborts the request (its cache blocks freed) and re-raises."""
    rid = engine.add_request(prompt_ids, params)
    try:
        while True:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if on_output is not None:
                    on_output(out)
                if out.finished:
                    return out
    except BaseException:
        engine.abort(rid)
        raise


def _summary(engine, final, seconds: float) -> str:
    tokens = sum(len(s.token_ids) for s in final.outputs)
    reasons = ",".join(sorted({s.finish_reason or "?" for s in final.outputs}))
    line = f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tok/s, finish: {reasons}"
    stats = engine.stats
    if stats.get("spec_drafted"):
        line += f", MTP acceptance {stats['acceptance_rate']:.0%}"
    return line + "]"


def cmd_generate(args) -> int:
    engine = _engine(args, max_batch=max(1, args.n))
    tok = engine.tokenizer
    if args.prompt is not None:
        if tok is None:
            raise ValueError(f"{args.checkpoint} has no tokenizer.json: pass token ids with --prompt-ids instead")
        ids = tok.encode(args.prompt, add_bos=tok.bos_id is not None)
    else:
        try:
            ids = [int(x) for x in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be whitespace- or comma-separated integers, got "
                             f"{args.prompt_ids!r}") from None
        if not ids:
            raise ValueError("--prompt-ids needs at least one token id")
    params = _params(args)
    as_ids = args.prompt is None  # ids in, ids out

    def show(seq) -> str:
        return "".join(f" {t}" for t in seq.delta_token_ids) if as_ids else seq.delta_text

    start = time.perf_counter()
    if params.n == 1:  # stream the one continuation as it is decoded
        print(args.prompt if args.prompt is not None else " ".join(map(str, ids)), end="", flush=True)
        if as_ids:
            print(" |", end="", flush=True)
        final = _run_one(engine, ids, params,
                         lambda out: print(show(out.outputs[0]), end="", flush=True))
        print()
    else:  # n samples: print each whole, in order
        final = _run_one(engine, ids, params)
        for seq in final.outputs:
            text = " ".join(map(str, seq.token_ids)) if as_ids else seq.text
            print(f"--- sample {seq.index} ({seq.finish_reason}) ---")
            print((args.prompt or "") + text)
    print(_summary(engine, final, time.perf_counter() - start), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    engine = _engine(args, max_batch=1)
    tok = engine.tokenizer
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json, which dsv3 chat needs for its chat template")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"chatting with {engine.model_name}; /clear forgets the conversation, /exit quits")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            messages = list(system)
            print("(conversation cleared)", flush=True)
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        room = engine.max_context - len(ids)
        if room <= 0:
            messages.pop()
            print(f"(the conversation is {len(ids)} tokens, the context holds {engine.max_context}: "
                  "/clear to start again)", file=sys.stderr, flush=True)
            continue
        shown: list[str] = []  # what the user saw, kept if they interrupt the reply
        try:
            final = _run_one(engine, ids, _params(args, max_tokens=min(args.max_tokens, room)),
                             lambda out, shown=shown: _show(out.outputs[0].delta_text, shown))
        except KeyboardInterrupt:
            print(" [interrupted]", flush=True)
            messages.append({"role": "assistant", "content": "".join(shown)})
            continue
        except ValueError as e:  # too long for the cache, or a refused parameter: say so and go on
            messages.pop()
            print(f"(error: {e})", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        if final.outputs[0].finish_reason == "length":
            print(f"(reply cut at {len(final.outputs[0].token_ids)} tokens: raise --max-tokens)", file=sys.stderr,
                  flush=True)
        messages.append({"role": "assistant", "content": final.outputs[0].text})
    return 0


def _show(text: str, shown: list[str]) -> None:
    shown.append(text)
    print(text, end="", flush=True)


def cmd_serve(args) -> int:
    import uvicorn

    from .app import create_app

    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    kwargs = {} if args.num_blocks is None else {"num_blocks": args.num_blocks}
    engine = _engine(args, max_batch=args.max_batch, max_waiting=args.max_waiting, **kwargs)
    app = create_app(engine, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes)
    if args.host not in _LOOPBACK and not args.api_key:
        print(f"dsv3 serve: warning: listening on {args.host} without --api-key; anyone who can reach this "
              "address can use the model", file=sys.stderr)
    print(f"dsv3 serve: model {engine.model_name!r} at http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
