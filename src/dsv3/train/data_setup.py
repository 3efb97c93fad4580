"""What the trainer reads: the tokenizer, the packed training stream, held-out batches and eval problems."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..data.math import generate_problems
from ..data.packing import PackedStream, math_stream
from ..data.sources import DataError, load_documents
from ..data.tokenizer import Tokenizer, train_math_tokenizer, train_tokenizer

HELDOUT_BATCHES, HELDOUT_BATCH_SIZE = 4, 16


@dataclass
class TrainData:
    tokenizer: Tokenizer
    train: PackedStream
    heldout_batches: list[torch.Tensor]
    eval_problems: list | None  # MathProblem list for accuracy, when training on the built-in corpus


@functools.lru_cache(maxsize=4)
def _math_tokenizer(vocab_size: int) -> Tokenizer:
    return train_math_tokenizer(vocab_size=vocab_size)  # deterministic, so safe to reuse within a process


def _error(msg: str) -> Exception:
    from .trainer import TrainError

    return TrainError(msg)


def build_data(args, cfg: ModelConfig, checkpoint_dir: str | Path | None, rank: int = 0,
               world_size: int = 1) -> TrainData:
    """Several processes: each reads its `rank`-th slice of every global batch from the training stream (whose
    position is global, so it resumes in any process count); held-out data is read whole (rank 0 evaluates)."""
    try:
        docs = load_documents(args.data) if args.data else None
    except DataError as e:
        raise _error(str(e)) from None
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    elif checkpoint_dir is not None and (Path(checkpoint_dir) / "tokenizer.json").exists():
        tok = Tokenizer.load(checkpoint_dir)
    elif docs is not None:
        tok = train_tokenizer(docs, vocab_size=cfg.vocab_size)
    else:
        tok = _math_tokenizer(cfg.vocab_size)
    if tok.vocab_size > cfg.vocab_size:
        raise _error(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}; "
                     "use a config with a larger vocab_size or a smaller tokenizer")
    kw = dict(seq_len=args.seq_len, eos_id=tok.eos_id, bos_id=tok.bos_id)
    shard = dict(rank=rank, world_size=world_size)
    if docs is None:
        weights = args.step_weights
        answers_only = args.loss_on == "answers"
        stream = dict(seed=args.seed, answers_only=answers_only, worked=args.worked)
        train = PackedStream(math_stream(tok, step_weights=weights, **stream), **kw, **shard)
        held = PackedStream(math_stream(tok, split="test", **stream), **kw)
        problems = generate_problems(args.eval_problems, seed=args.seed, split="test") if args.eval_problems else None
    else:
        encoded = [tok.encode(d) for d in docs]
        n_held = min(len(encoded) // 20, 200)  # 5% (at most 200 documents) held out for the eval loss
        if len(encoded) - n_held < 1:
            raise _error("the training data has no documents left after holding out an evaluation set")
        train = PackedStream(encoded[n_held:], shuffle_seed=args.seed, **kw, **shard)
        held = PackedStream(encoded[:n_held] or encoded[:1], **kw)
        problems = None
    heldout = [held.next_batch(HELDOUT_BATCH_SIZE) for _ in range(HELDOUT_BATCHES)]
    return TrainData(tokenizer=tok, train=train, heldout_batches=heldout, eval_problems=problems)
