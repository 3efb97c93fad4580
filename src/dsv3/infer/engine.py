"""The serving engine: continuous batching over the paged latent cache, per-request sampling, streaming
outputs with incremental detokenisation, and MTP speculative decoding.

Each `step()`:
  1. admits waiting work in arrival order while it fits (max_batch sequences, free cache blocks, a prefill
     token budget): sequences that were preempted first, then new requests;
  2. prefills the admitted prompts in one right-padded batch with the full attention path, storing only
     the latents in the paged cache, and samples each new request's first token (n choices share the
     prompt's blocks);
  3. runs one decoding step for every other running sequence: a single-token absorbed forward, or with
     speculation an MTP draft of k tokens and one absorbed forward that verifies them all;
  4. returns a RequestOutput for every request that produced tokens or finished, and frees the blocks of
     finished sequences.

Blocks are allocated as sequences grow. When the pool runs dry the youngest running sequence is preempted:
its blocks are freed and it is later re-prefilled from its tokens (nothing it generated is lost, and its
random generator carries on, so a seeded request is unaffected). A request is refused up front
(RequestTooLong) when it could not fit even alone.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import PagedLatentCache
from .detok import Detokenizer
from .sampling import (
    RowParams,
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    child_seed,
    logprobs_of,
    new_generator,
    probabilities,
    sample_from,
    token_counts,
    uniforms,
)
from .speculative import accept, draft

__all__ = ["Engine", "EngineFull", "RequestOutput", "RequestTooLong", "SamplingParams", "SequenceOutput",
           "TokenLogprob"]


@dataclass
class SequenceOutput:  # one of the n choices of a request
    index: int
    token_ids: list[int]  # everything generated so far (stop tokens/strings excluded)
    text: str  # decoded text so far ("" when the engine has no tokenizer)
    delta_token_ids: list[int]  # new since the previous RequestOutput of this request
    delta_text: str  # new text since the previous output; never splits a UTF-8 character
    logprobs: list[TokenLogprob] | None  # for token_ids, when asked for
    finish_reason: str | None  # None while running, then "stop" | "length" | "abort"


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]  # len == params.n, ordered by index
    finished: bool  # all n sequences finished


class EngineFull(RuntimeError):
    """The waiting queue is full (max_waiting): try again later."""


class RequestTooLong(ValueError):
    """prompt + max_tokens exceeds the context length or what the cache could ever hold."""


class _Request:
    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, arrival: int, stop_ids: set[int]):
        self.id, self.prompt, self.params, self.arrival, self.stop_ids = rid, prompt, params, arrival, stop_ids
        self.seqs: list[_Seq] = []

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class _Seq:
    """One of a request's n choices: the unit the scheduler runs, preempts and resumes."""

    def __init__(self, req: _Request, index: int, detok: Detokenizer | None):
        p = req.params
        self.req, self.index, self.detok = req, index, detok
        self.age = (req.arrival, index)  # preemption takes the youngest
        self.gen = None if p.greedy else new_generator(child_seed(p.seed, index))
        self.tokens = list(req.prompt)  # prompt + generated; the last one is not in the cache yet
        self.output: list[int] = []  # generated tokens, stop tokens/strings excluded
        self.logprobs: list[TokenLogprob] | None = [] if p.logprobs is not None else None
        self.blocks: list[int] = []
        self.finish_reason: str | None = None
        self.sent_ids = 0  # how much of output / text earlier RequestOutputs carried
        self.sent_text = 0
        self.mtp_len = 0  # speculation: MTP latents stored for positions < mtp_len
        self.pending_hidden: torch.Tensor | None = None  # main hiddens at positions mtp_len..len(tokens)-2
        self.draft: int | None = None  # greedy speculation: the draft of the next token, when already made


class Engine:
    """Continuous-batching inference over a DeepseekV3 model. Single-threaded: one caller at a time."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 16, block_size: int = 16,
                 num_blocks: int | None = None, max_waiting: int = 256, speculative: bool | None = None,
                 num_draft_tokens: int = 1, max_prefill_tokens: int = 8192, compile: bool = False):
        """compile: torch.compile the model's decode path (`DeepseekV3.compile_decode`; it changes `model`
        itself): faster decode steps after a warm-up of tens of seconds per new kind of step."""
        cfg = model.config
        if max_batch < 1 or max_waiting < 0 or max_prefill_tokens < 1:
            raise ValueError(f"max_batch and max_prefill_tokens must be >= 1 and max_waiting >= 0, got "
                             f"{max_batch}, {max_prefill_tokens} and {max_waiting}")
        has_mtp = cfg.num_nextn_predict_layers > 0
        if speculative is None:
            speculative = has_mtp
        if speculative and not has_mtp:
            raise ValueError("speculative decoding drafts with the MTP module, and this model has none "
                             "(config.num_nextn_predict_layers = 0); pass speculative=False")
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.model = model.eval()
        model.prepare_kernels()
        if compile:
            model.compile_decode()
        self.tokenizer = tokenizer
        self.config = cfg
        self.device = model.device
        self.max_context = cfg.max_position_embeddings
        self.max_batch, self.max_waiting, self.max_prefill_tokens = max_batch, max_waiting, max_prefill_tokens
        self.speculative = bool(speculative)
        self.k = num_draft_tokens if self.speculative else 0
        if num_blocks is None:  # max_batch sequences of up to 2048 tokens (or the context), and one of the full
            # context at least, so a request may always ask for the rest of the context
            tokens = max(max_batch * min(self.max_context, 2048), self.max_context + self.k)
            num_blocks = math.ceil(tokens / block_size)
        self.cache = PagedLatentCache(model, num_blocks, block_size, mtp_layers=1 if self.speculative else 0)
        eos = cfg.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.model_name = "dsv3"
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()  # new requests, arrival order
        self._resume: list[_Seq] = []  # preempted sequences, oldest first
        self._running: list[_Seq] = []
        self._done_outputs: list[RequestOutput] = []  # aborted requests, reported by the next step()
        self._arrivals = 0
        self._counters = dict(generated_tokens=0, spec_drafted=0, spec_accepted=0, preemptions=0, steps=0,
                              prefill_tokens=0)

    @classmethod
    def from_checkpoint(cls, path, dtype=None, device="cpu", **kwargs) -> "Engine":
        """Load a checkpoint directory (and its tokenizer.json, when present) into an Engine."""
        from ..data.tokenizer import Tokenizer
        from ..model import DeepseekV3

        model = DeepseekV3.from_pretrained(path, dtype=dtype, device=device)
        tok = Tokenizer.load(path) if (Path(path) / "tokenizer.json").is_file() else None
        engine = cls(model, tok, **kwargs)
        engine.model_name = Path(path).resolve().name
        return engine

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request (it starts at a later step()). Raises ValueError for bad input, RequestTooLong when
        it can never fit, EngineFull when the waiting queue is full."""
        params.validate()
        prompt = list(prompt_token_ids)
        V = self.config.vocab_size
        if not prompt:
            raise ValueError("prompt_token_ids must hold at least one token")
        if not all(isinstance(t, int) and 0 <= t < V for t in prompt):
            raise ValueError(f"prompt_token_ids must be token ids in [0, {V}), got {min(prompt)}..{max(prompt)}")
        P, M, n = len(prompt), params.max_tokens, params.n
        if P + M > self.max_context:
            raise RequestTooLong(f"prompt ({P} tokens) + max_tokens ({M}) = {P + M} exceeds the context length "
                                 f"{self.max_context} (max_position_embeddings): shorten the prompt or lower "
                                 "max_tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this engine has none; use stop_token_ids")
        if n > self.max_batch:
            raise ValueError(f"n must be <= max_batch ({self.max_batch}), got {n}")
        need = n * self.cache.blocks_for(P + M + self.k)
        if need > self.cache.num_blocks:
            raise RequestTooLong(f"this request needs up to {need} cache blocks of {self.cache.block_size} tokens "
                                 f"({n} x (prompt {P} + max_tokens {M}{f' + {self.k} drafts' if self.k else ''})) "
                                 f"but the cache has {self.cache.num_blocks}: lower max_tokens or n, or give the "
                                 "engine more num_blocks")
        if len(self._waiting) >= self.max_waiting:
            raise EngineFull(f"{len(self._waiting)} requests are already waiting (max_waiting="
                             f"{self.max_waiting}); retry later")
        rid = request_id if request_id is not None else uuid.uuid4().hex
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        req = _Request(rid, prompt, params, self._arrivals, stop_ids)
        self._arrivals += 1
        req.seqs = [_Seq(req, i, None if self.tokenizer is None else Detokenizer(self.tokenizer, prompt, params.stop))
                    for i in range(n)]
        self._requests[rid] = req
        self._waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its cache blocks; the next step() reports it with finish_reason "abort".
        An unknown (or already finished) id is a no-op."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req in self._waiting:
            self._waiting.remove(req)
        for s in req.seqs:
            if s in self._running:
                self._running.remove(s)
            if s in self._resume:
                self._resume.remove(s)
            self.cache.release(s.blocks)
            s.blocks = []
            if s.finish_reason is None:
                s.finish_reason = "abort"
                if s.detok is not None:
                    s.detok.finish()
        self._done_outputs.append(self._output(req))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._resume or self._running or self._done_outputs)

    @property
    def stats(self) -> dict:
        c = self._counters
        return dict(running=len(self._running), waiting=len(self._waiting) + len(self._resume),
                    free_blocks=self.cache.num_free, total_blocks=self.cache.num_blocks,
                    block_size=self.cache.block_size, speculative=self.speculative, num_draft_tokens=self.k,
                    acceptance_rate=c["spec_accepted"] / c["spec_drafted"] if c["spec_drafted"] else 0.0, **c)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Blocking convenience: add every prompt, step until they are done, final outputs in prompt order.
        It consumes step()'s outputs, so it is meant for an engine nothing else is streaming from."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # ---- the step -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit and prefill what fits, then one decoding (or draft + verify) step for the other running
        sequences. Returns one RequestOutput per request that produced tokens or finished."""
        self._counters["steps"] += 1
        touched: dict[str, _Request] = {}
        fresh = self._admit_and_prefill(touched)
        self._retire()  # first tokens can finish a sequence (max_tokens 1, a stop token)
        decoding = self._make_room([s for s in self._running if s not in fresh])
        if decoding:
            if self.speculative:
                self._speculative_step(decoding, touched)
            else:
                self._decode_step(decoding, touched)
        self._retire()
        outputs, self._done_outputs = self._done_outputs, []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                self._requests.pop(req.id, None)
        return outputs

    def _retire(self) -> None:
        """Drop finished sequences from the running set and free their blocks."""
        for s in [s for s in self._running if s.finish_reason is not None]:
            self._running.remove(s)
            self.cache.release(s.blocks)
            s.blocks = []

    def _admit_and_prefill(self, touched: dict) -> set:
        """Admit preempted sequences, then new requests, in order while they fit; prefill them together."""
        cache, k = self.cache, self.k
        free = cache.num_free - len(self._running)  # keep a block per running sequence for its growth
        slots = self.max_batch - len(self._running)
        rows: list[tuple[_Seq, list[int]]] = []  # (sequence, tokens to prefill)
        groups: list[_Request] = []
        width = 0

        def fits(n_seqs: int, blocks: int, tokens: int) -> bool:
            padded = (len(rows) + 1) * max(width, tokens)
            return n_seqs <= slots and blocks <= free and (not rows or padded <= self.max_prefill_tokens)

        while self._resume:
            s = self._resume[0]
            need = cache.blocks_for(len(s.tokens) + k)  # prefill n-1 tokens, then decode from n-1 (+ drafts)
            if not fits(1, need, len(s.tokens) - 1):
                break
            self._resume.pop(0)
            rows.append((s, s.tokens[:-1]))
            slots, free, width = slots - 1, free - need, max(width, len(s.tokens) - 1)
        while self._waiting and not self._resume:
            req = self._waiting[0]
            P, n = len(req.prompt), req.params.n
            per_seq = cache.blocks_for(P + 1 + k)
            need = per_seq + (n - 1) * (per_seq - P // cache.block_size)  # the others share full prompt blocks
            if not fits(n, need, P):
                break
            self._waiting.popleft()
            rows.append((req.seqs[0], req.prompt))
            groups.append(req)
            slots, free, width = slots - n, free - need, max(width, P)
        if not rows:
            return set()
        self._prefill(rows)
        fresh = {s for s, _ in rows}
        for s, _ in rows:
            self._running.append(s)
        if groups:  # fork the n choices off the prefilled prompt and sample every first token
            first: list[_Seq] = []
            for req in groups:
                head = req.seqs[0]
                full = len(req.prompt) // cache.block_size
                for s in req.seqs[1:]:
                    s.blocks = cache.share(head.blocks[:full])
                    if len(head.blocks) > full:
                        s.blocks.append(cache.copy(head.blocks[full]))
                    s.mtp_len, s.pending_hidden = head.mtp_len, head.pending_hidden
                    self._running.append(s)
                    fresh.add(s)
                first += req.seqs
            logits = self.model.lm_head(torch.stack([s.pending_hidden[-1] for s in first]))
            self._emit(first, [[t] for t in self._sample(logits, first)], logits[:, None], touched)
        return fresh

    def _prefill(self, rows: list[tuple[_Seq, list[int]]]) -> None:
        cache, model = self.cache, self.model
        lens = [len(t) for _, t in rows]
        B, T = len(rows), max(lens)
        self._counters["prefill_tokens"] += sum(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        scratch = cache.scratch_slot()
        slots, mtp_slots = [], []
        for b, (s, toks) in enumerate(rows):
            ids[b, : len(toks)] = torch.tensor(toks)
            attn[b, : len(toks)] = 1
            s.blocks = cache.allocate(cache.blocks_for(len(toks)))
            own = cache.slots(s.blocks, range(len(toks)))
            slots.append(own + [scratch] * (T - len(toks)))
            mtp_slots.append(own[: len(toks) - 1] + [scratch] * (T - len(toks)))  # positions 0..len-2
        view = cache.view(slots, None, mtp_slots if self.speculative and T > 1 else None)
        hidden = model.prefill(ids.to(self.device), attn.to(self.device), view, mtp=self.speculative)
        for b, (s, toks) in enumerate(rows):
            s.pending_hidden = hidden[b, len(toks) - 1: len(toks)].clone()  # [1, H]
            s.mtp_len = len(toks) - 1

    def _make_room(self, seqs: list[_Seq]) -> list[_Seq]:
        """Give every decoding sequence blocks up to position n-1+k, preempting the youngest when needed.
        Returns the sequences that are still running."""
        cache = self.cache
        for s in sorted(seqs, key=lambda s: s.age):
            if s not in self._running:  # preempted for an older one
                continue
            need = cache.blocks_for(len(s.tokens) + self.k) - len(s.blocks)
            while need > cache.num_free:
                victim = max(self._running, key=lambda v: v.age)
                self._preempt(victim)
                if victim is s:
                    break
            if s in self._running and need > 0:
                s.blocks += cache.allocate(need)
        return [s for s in seqs if s in self._running]

    def _preempt(self, s: _Seq) -> None:
        self._running.remove(s)
        self.cache.release(s.blocks)
        s.blocks, s.pending_hidden, s.mtp_len, s.draft = [], None, 0, None
        self._resume.append(s)
        self._resume.sort(key=lambda v: v.age)
        self._counters["preemptions"] += 1

    # ---- decoding -------------------------------------------------------------------------------------
    def _decode_step(self, seqs: list[_Seq], touched: dict) -> None:
        cache = self.cache
        positions = [len(s.tokens) - 1 for s in seqs]
        L = max(positions) + 1
        tables = [s.blocks for s in seqs]
        view = cache.view([cache.slots(t, [p]) for t, p in zip(tables, positions)], cache.read_index(tables, L))
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = torch.tensor(positions, device=self.device)[:, None]
        logits = self.model.forward_cached(ids, pos, view, max_position=L - 1)  # [B, 1, V]
        self._emit(seqs, [[t] for t in self._sample(logits[:, 0], seqs)], logits, touched)

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """One token per row of logits [B, V] with each sequence's own parameters and generator."""
        params = [s.req.params for s in seqs]
        if all(p.greedy and not p.penalised for p in params):
            return logits.argmax(dim=-1).tolist()
        rows = RowParams(params, logits.device)
        x = logits.float()
        if rows.any_penalty:
            x = apply_penalties(x, token_counts([s.output for s in seqs], x.shape[-1], x.device), rows)
        u = uniforms([s.gen for s in seqs], 1, logits.device)[:, 0]
        return sample_from(probabilities(x, rows), u).tolist()

    def _speculative_step(self, seqs: list[_Seq], touched: dict) -> None:
        cache, k, B = self.cache, self.k, len(seqs)
        params = [s.req.params for s in seqs]
        greedy = all(p.greedy and not p.penalised for p in params)
        if greedy and k == 1:
            return self._greedy_speculative_step(seqs, touched)
        for s in seqs:
            s.draft = None  # drafts come from this step's own drafting below
        rows = None if greedy else RowParams(params, self.device)
        u = uniforms([s.gen for s in seqs], 2 * k + 1, self.device)  # drafts, acceptance, resample
        drafts, q = draft(self.model, cache, seqs, k, rows, u[:, :k])
        # verify: tokens n-1, d_n .. d_{n+k-1} at positions n-1 .. n-1+k in one forward
        starts = [len(s.tokens) - 1 for s in seqs]
        L = max(starts) + k + 1
        tables = [s.blocks for s in seqs]
        view = cache.view([cache.slots(t, range(p, p + k + 1)) for t, p in zip(tables, starts)],
                          cache.read_index(tables, L))
        ids = torch.cat((torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device), drafts), dim=1)
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(k + 1, device=self.device)
        logits, hidden = self.model.forward_cached(ids, pos, view, return_hidden=True, max_position=L - 1)
        if rows is None:
            target = logits.argmax(dim=-1)  # [B, k+1]
            n_acc = (target[:, :k] == drafts).long().cumprod(dim=-1).sum(dim=-1)
            extra = target.gather(1, n_acc[:, None]).squeeze(1)
        else:
            x = logits.float()
            if rows.any_penalty:  # the history at draft position j includes the drafts before it
                hist = [s.output + d[:j] for s, d in zip(seqs, drafts.tolist()) for j in range(k + 1)]
                x = apply_penalties(x.view(B * (k + 1), -1), token_counts(hist, x.shape[-1], x.device),
                                    rows.repeat(k + 1)).view(B, k + 1, -1)
            p = probabilities(x.view(B * (k + 1), -1), rows.repeat(k + 1)).view(B, k + 1, -1)
            n_acc, extra = accept(p, q, drafts, u[:, k:2 * k], u[:, 2 * k])
        n_acc_l, extra_l, drafts_l = n_acc.tolist(), extra.tolist(), drafts.tolist()
        new = [d[:a] + [e] for d, a, e in zip(drafts_l, n_acc_l, extra_l)]
        for b, s in enumerate(seqs):
            s.pending_hidden = hidden[b, : n_acc_l[b] + 1].clone()  # main hiddens at n-1 .. n-1+accepted
            s.mtp_len = starts[b]
        self._counters["spec_drafted"] += B * k
        self._counters["spec_accepted"] += sum(n_acc_l)
        self._emit(seqs, new, logits, touched)

    def _greedy_speculative_step(self, seqs: list[_Seq], touched: dict) -> None:
        """k = 1, every sequence greedy: verification and the next draft in one forward
        (`DeepseekV3.verify_and_draft`), so a step costs one model call, as plain decoding does. Sequences
        without a draft yet (fresh, resumed, or after a step of the general path) catch up and draft first."""
        cache = self.cache
        fresh = [s for s in seqs if s.draft is None]
        if fresh:
            drafts, _ = draft(self.model, cache, fresh, 1, None, torch.zeros(len(fresh), 1))
            for s, d in zip(fresh, drafts[:, 0].tolist()):
                s.draft = d
        starts = [len(s.tokens) - 1 for s in seqs]
        L = max(starts) + 2
        tables = [s.blocks for s in seqs]
        slots = [cache.slots(t, (p, p + 1)) for t, p in zip(tables, starts)]  # main and MTP rows alike
        view = cache.view(slots, cache.read_index(tables, L), slots)
        ids = torch.tensor([[s.tokens[-1], s.draft] for s in seqs], device=self.device)
        pos = torch.tensor([[p, p + 1] for p in starts], device=self.device)
        logits, picks, last_hidden = self.model.verify_and_draft(ids, pos, view, max_position=L - 1)
        new = []
        for b, (s, (g0, g1, acc, nxt)) in enumerate(zip(seqs, picks.tolist())):
            new.append([g0, g1][: 1 + acc])
            s.draft = nxt
            # what the general path needs to take over: MTP latents are exact below the last verified position
            s.pending_hidden, s.mtp_len = last_hidden[b: b + 1].clone(), starts[b] + acc
        self._counters["spec_drafted"] += len(seqs)
        self._counters["spec_accepted"] += sum(len(t) - 1 for t in new)
        self._emit(seqs, new, logits, touched)

    # ---- outputs --------------------------------------------------------------------------------------
    def _emit(self, seqs: list[_Seq], new: list[list[int]], logits: torch.Tensor, touched: dict) -> None:
        """Append each sequence's new tokens (logits [B, >= len(new[b]), V] gave them), stopping at stop
        tokens, stop strings and max_tokens."""
        for b, (s, toks) in enumerate(zip(seqs, new)):
            touched[s.req.id] = s.req
            lps = None
            if s.logprobs is not None:
                lps = logprobs_of(logits[b, : len(toks)], torch.tensor(toks, device=logits.device),
                                  s.req.params.logprobs)
            for j, t in enumerate(toks):
                if self._append(s, t, None if lps is None else lps[j]):
                    break

    def _append(self, s: _Seq, t: int, lp: TokenLogprob | None) -> bool:
        """Add token t to sequence s; True when s is finished."""
        if t in s.req.stop_ids:
            return self._finish(s, "stop")
        if s.detok is not None and s.detok.push(t):
            return self._finish(s, "stop")  # a stop string: text cut before it, the token left out
        s.output.append(t)
        s.tokens.append(t)
        if lp is not None:
            s.logprobs.append(lp)
        self._counters["generated_tokens"] += 1
        if len(s.output) >= s.req.params.max_tokens:
            return self._finish(s, "length")
        return False

    def _finish(self, s: _Seq, reason: str) -> bool:
        s.finish_reason = reason
        s.pending_hidden = None
        if s.detok is not None:
            s.detok.finish()
        return True

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            text = s.detok.text if s.detok is not None else ""
            outs.append(SequenceOutput(
                index=s.index, token_ids=list(s.output), text=text, delta_token_ids=s.output[s.sent_ids:],
                delta_text=text[s.sent_text:], logprobs=None if s.logprobs is None else list(s.logprobs),
                finish_reason=s.finish_reason))
            s.sent_ids, s.sent_text = len(s.output), len(text)
        return RequestOutput(req.id, list(req.prompt), outs, req.finished)
