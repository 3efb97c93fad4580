"""`dsv3.generate`: the simple, batched reference generation path over the latent cache.

The serving engine must agree with this function token for token under greedy decoding.
"""

from __future__ import annotations

import torch

from ..model import DeepseekV3


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]; greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate(model: DeepseekV3, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | list[int] | None = -1
             ) -> list[list[int]]:
    """New token ids for each prompt (prompts may differ in length), decoded with the latent cache.

    Prefill runs the full attention path on the right-padded batch and stores the latents; each decoding
    step then runs the absorbed path. A sequence stops after `max_new_tokens` or at an EOS token
    (`eos_token_id`, default the config's; None disables), which is included in its output.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    cfg = model.config
    V = cfg.vocab_size
    for p in prompts:
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V}), got {min(p)}..{max(p)}")
    if eos_token_id == -1:
        eos_token_id = cfg.eos_token_id
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    lens = [len(p) for p in prompts]
    B, T = len(prompts), max(lens)
    total = T + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context length "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    attn = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, device=device)
        attn[b, : len(p)] = 1
    cache = model.new_cache(B, total)
    logits = model(ids, attention_mask=attn, cache=cache)  # prefill with the full path
    pos = torch.tensor(lens, device=device)
    last = logits[torch.arange(B, device=device), pos - 1]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    steps: list[torch.Tensor] = []  # without EOS nothing is read back until the end (no per-step device sync)
    for step in range(max_new_tokens):
        tok = sample(last, temperature, top_p, gen)
        if eos:
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in eos or len(out[b]) >= max_new_tokens
            if all(done):
                break
        else:
            steps.append(tok)
        if step == max_new_tokens - 1:
            break
        # positions lens + step; the largest is T + step
        last = model.forward_cached(tok[:, None], pos[:, None], cache, max_position=T + step)[:, 0]
        pos = pos + 1
    return out if eos else torch.stack(steps, dim=1).tolist()
