"""MTP speculative decoding: the MTP module drafts, the main model verifies, the acceptance rule decides.

The depth-1 MTP module at position i combines the main model's final hidden at i with the embedding of token
i+1 and predicts token i+2. A running sequence of n tokens has its main cache filled for positions 0..n-2
(token n-1 is the one to feed next) and knows the main hiddens up to n-2, so the module at position n-2
drafts token n. Further drafts re-apply the module to its own output hidden and draft. The main model then
runs tokens n-1, d_n, ..., d_{n+k-1} in one forward, which gives its distributions p_0..p_k for tokens
n..n+k, and `accept` keeps a prefix of the drafts plus one token of its own.

The module has its own attention, so it has its own latent cache layer. Its latents at a position are only
exact once the main hidden there is known, i.e. after verification: each step first stores the latents of
the positions verified in the previous step ("catch-up"; only the latents, the rest of the module need not
run there), then drafts. Latents that recursive drafting wrote from its own hidden are overwritten then.

For greedy requests with k = 1 the engine folds drafting into verification instead
(`DeepseekV3.verify_and_draft`, `Engine._greedy_speculative_step`): one forward per step.
"""

from __future__ import annotations

import torch

from .sampling import RowParams, apply_penalties, probabilities, sample_from, token_counts


def accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
           u_resample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023), batched.

    p [B, k+1, V]: the target distributions at the k draft positions and the one after; q [B, k, V]: the
    draft distributions the drafts [B, k] were drawn from; u_accept [B, k], u_resample [B] uniforms in [0, 1).
    Draft j is accepted with probability min(1, p_j(d) / q_j(d)) while all before it were; at the first
    rejection the token is drawn from norm(max(0, p_j - q_j)); when all k are accepted, a bonus token is drawn
    from p_k. Each emitted token is then distributed exactly as p. Greedy rows pass one-hot p and q: a draft is
    kept iff it is the argmax, and the replacement is the argmax.
    Returns (number of drafts accepted [B], the extra token [B]).
    """
    B, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    ok = u_accept.to(p.device) * q_d < p_d  # u < p/q, without dividing (q_d > 0: d was drawn from q)
    n_acc = ok.long().cumprod(dim=-1).sum(dim=-1)  # [B]
    rows = torch.arange(B, device=p.device)
    target = p[rows, n_acc]  # [B, V]: p at the first rejected position, or p_k
    q_pad = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)  # q_k = 0: the bonus draws from p_k itself
    resid = (target - q_pad[rows, n_acc]).clamp_min(0)
    empty = resid.sum(-1, keepdim=True) <= 0  # p == q up to rounding: then p itself is the right law
    resid = torch.where(empty, target, resid)
    return n_acc, sample_from(resid, u_resample)


def _draw(logits: torch.Tensor, rows: RowParams | None, histories: list[list[int]] | None, u: torch.Tensor,
          vocab: int):
    """Draft tokens [B] and their distribution q [B, V] (None for all-greedy rows: argmax)."""
    if rows is None:
        return logits.argmax(-1), None
    x = logits.float()
    if rows.any_penalty:
        x = apply_penalties(x, token_counts(histories, vocab, x.device), rows)
    q = probabilities(x, rows)
    return sample_from(q, u), q


@torch.inference_mode()
def draft(model, cache, seqs, k: int, rows: RowParams | None, u_draft: torch.Tensor):
    """Catch up the MTP cache and draft k tokens for each running sequence.

    Each seq has: tokens (all tokens, the last one not yet fed), blocks (block table), mtp_len (MTP latents
    stored for positions < mtp_len) and pending_hidden [n-1-mtp_len, H] (main hiddens at positions
    mtp_len..n-2), and output (generated tokens, for penalties). rows: the sampling parameters (None when
    every row is greedy without penalties); u_draft [B, k] uniforms. Returns drafts [B, k] (long) and the
    draft distributions q [B, k, V] (None when rows is None).
    """
    device = model.device
    vocab = model.config.vocab_size
    tables = [s.blocks for s in seqs]
    # 1. catch-up and the first draft in one forward: positions mtp_len..n-2 of each sequence (the last one
    # drafts token n). Rows with fewer positions are left-padded with copies of their first one, written to
    # the scratch block, so the draft is always the last column.
    width = max(len(s.tokens) - 1 - s.mtp_len for s in seqs)
    scratch = cache.scratch_slot()
    ids, prev, pos, slots = [], [], [], []
    for s in seqs:
        span = range(s.mtp_len, len(s.tokens) - 1)
        pad = width - len(span)
        ids.append([s.tokens[span[0] + 1]] * pad + s.tokens[span[0] + 1:])
        pos.append([span[0]] * pad + list(span))
        slots.append([scratch] * pad + cache.slots(s.blocks, span))
        h = s.pending_hidden  # [len(span), H]
        prev.append(torch.cat((h[:1].expand(pad, -1), h)) if pad else h)
    L = max(p[-1] for p in pos) + 1
    view = cache.view(None, cache.read_index(tables, L), slots)
    logits, prev_h = model.forward_mtp_cached(torch.tensor(ids, device=device), torch.stack(prev),
                                              torch.tensor(pos, device=device), view, max_position=L - 1)
    logits, prev_h = logits[:, -1], prev_h[:, -1:]
    histories = [list(s.output) for s in seqs] if rows is not None and rows.any_penalty else None
    positions = [p[-1] for p in pos]
    drafts, qs = [], []
    for j in range(k):
        if j:  # 2. re-apply the module to its own hidden and the previous draft, one position further
            positions = [p + 1 for p in positions]
            L = max(positions) + 1
            view = cache.view(None, cache.read_index(tables, L),
                              [cache.slots(t, [p]) for t, p in zip(tables, positions)])
            logits, prev_h = model.forward_mtp_cached(drafts[-1][:, None], prev_h,
                                                      torch.tensor(positions, device=device)[:, None], view,
                                                      max_position=L - 1)
            logits = logits[:, 0]
        d, q = _draw(logits, rows, histories, u_draft[:, j], vocab)
        drafts.append(d)
        qs.append(q)
        if histories is not None:
            histories = [h + [t] for h, t in zip(histories, d.tolist())]
    q = None if rows is None else torch.stack(qs, dim=1)
    return torch.stack(drafts, dim=1), q
