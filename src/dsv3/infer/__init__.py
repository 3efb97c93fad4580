"""Inference: `generate` (the simple reference path) and the serving `Engine` (paged latent cache,
continuous batching, per-request sampling, MTP speculative decoding)."""

from .engine import Engine, EngineFull, RequestOutput, RequestTooLong, SamplingParams, SequenceOutput, TokenLogprob
from .generate import generate

__all__ = ["Engine", "EngineFull", "RequestOutput", "RequestTooLong", "SamplingParams", "SequenceOutput",
           "TokenLogprob", "generate"]
