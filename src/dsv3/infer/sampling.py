"""Per-request sampling: parameters, logits processing (penalties, temperature, top-k, top-p), seeded draws.

Every row of a batch carries its own parameters and its own `torch.Generator`, and draws its own uniforms
from it, so a seeded request gives the same tokens whatever else is in the batch. Tokens are drawn by
inverse CDF from one uniform per token; a greedy row is the distribution that puts all its mass on the
argmax, which lets the speculative acceptance rule treat greedy and sampled rows alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request torch.Generator: same seed -> same output whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings (output text excludes the stop string)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI semantics, range [-2, 2]
    frequency_penalty: float = 0.0
    n: int = 1  # independent samples of one prompt
    logprobs: int | None = None  # None: none; k (0..20): chosen token's logprob + top-k alternatives

    def validate(self) -> None:
        """Raise ValueError("<field> must be ..., got ...") for the first bad field."""

        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)")
        need(self.seed is None or is_int(self.seed), "seed", "an integer or None")
        need(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
             "stop", "a list of non-empty strings")
        need(isinstance(self.stop_token_ids, (list, tuple)) and all(is_int(t) and t >= 0
                                                                    for t in self.stop_token_ids),
             "stop_token_ids", "a list of token ids >= 0")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             "a number in [-2, 2]")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "a number in [-2, 2]")
        need(is_int(self.n) and self.n >= 1, "n", "an integer >= 1")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first, len == params.logprobs


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one sequence; without a seed, seeded from torch's global RNG (so
    `torch.manual_seed` makes unseeded requests reproducible too)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


def child_seed(seed: int | None, index: int) -> int | None:
    """Seed of choice `index` of an n > 1 request: choice 0 keeps the request's seed, so n = 1 and the first
    of n agree; the others get distinct, well-mixed seeds."""
    if seed is None or index == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (2**63)


class RowParams:
    """The sampling parameters of B rows as tensors, built once per step."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.params = params
        self.greedy = [p.greedy for p in params]
        self.all_greedy = all(self.greedy)
        self.any_penalty = any(p.penalised for p in params)
        self.any_top_k = any(p.top_k > 0 and not p.greedy for p in params)
        self.any_top_p = any(p.top_p < 1 and not p.greedy for p in params)
        f32 = dict(dtype=torch.float32, device=device)
        self.temperature = torch.tensor([p.temperature for p in params], **f32)
        self.top_p = torch.tensor([p.top_p for p in params], **f32)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        self.presence = torch.tensor([p.presence_penalty for p in params], **f32)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], **f32)

    def repeat(self, s: int) -> "RowParams":
        """Each row repeated s times in a row (for [B, S, V] logits flattened to [B * S, V])."""
        return RowParams([p for p in self.params for _ in range(s)], self.temperature.device)


def token_counts(histories: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float counts of each token id in each row's history."""
    counts = torch.zeros(len(histories), vocab, dtype=torch.float32, device=device)
    width = max((len(h) for h in histories), default=0)
    if width:
        ids = torch.zeros(len(histories), width, dtype=torch.long, device=device)
        ones = torch.zeros(len(histories), width, dtype=torch.float32, device=device)
        for r, h in enumerate(histories):
            if h:
                ids[r, : len(h)] = torch.tensor(h, device=device)
                ones[r, : len(h)] = 1
        counts.scatter_add_(1, ids, ones)
    return counts


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """OpenAI semantics: logit[j] -= frequency * count[j] + presence * (count[j] > 0), count over the
    tokens generated so far (not the prompt). logits [R, V] fp32."""
    return logits - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0).float()


def probabilities(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """The distribution each row samples from, [R, V] fp32 (rows sum to 1): softmax(logits / temperature),
    restricted to the top_k tokens, then to the smallest set of most likely tokens whose mass reaches
    top_p, renormalised. A greedy row (temperature 0) is one-hot on its argmax."""
    logits = logits.float()
    R, V = logits.shape
    probs = torch.zeros(R, V, dtype=torch.float32, device=logits.device)
    greedy = torch.tensor(rows.greedy, device=logits.device)
    if rows.all_greedy:
        return probs.scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    t = torch.where(greedy, 1.0, rows.temperature)
    scaled = logits / t[:, None]
    if rows.any_top_k:
        k = torch.where((rows.top_k > 0) & ~greedy, rows.top_k.clamp(max=V), V)
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [R, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))  # ties with the k-th token are kept
    p = scaled.softmax(dim=-1)
    if rows.any_top_p:
        sorted_p, order = p.sort(dim=-1, descending=True)
        top_p = torch.where(greedy, 1.0, rows.top_p)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]  # keep the smallest prefix reaching top_p
        drop[:, 0] = False
        p = torch.zeros_like(p).scatter_(1, order, sorted_p.masked_fill(drop, 0.0))
        p = p / p.sum(-1, keepdim=True)
    if any(rows.greedy):
        one_hot = probs.scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        p = torch.where(greedy[:, None], one_hot, p)
    return p


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [R, V] (need not be normalised), u [R] uniforms in [0, 1) -> ids [R].
    A token with zero probability is never drawn."""
    cdf = probs.cumsum(dim=-1)
    x = (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def uniforms(generators: list[torch.Generator | None], count: int, device: torch.device) -> torch.Tensor:
    """[R, count] uniforms, row r from its own generator (None: a greedy row that needs none -> 0.5)."""
    out = torch.full((len(generators), count), 0.5)
    for r, g in enumerate(generators):
        if g is not None:
            out[r] = torch.rand(count, generator=g)
    return out.to(device)


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """log_softmax of the model's logits [R, V] (before penalties and temperature): the chosen token's
    logprob and the k best alternatives per row."""
    lp = logits.float().log_softmax(dim=-1)
    chosen_lp = lp.gather(1, chosen[:, None]).squeeze(1).tolist()
    if k:
        top_lp, top_ids = lp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
    else:
        tops = [[] for _ in chosen_lp]
    return [TokenLogprob(int(c), float(v), t) for c, v, t in zip(chosen.tolist(), chosen_lp, tops)]
