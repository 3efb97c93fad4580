"""Decoder block, Multi-Token Prediction module, and the DeepseekV3 model.

Module names follow the Hugging Face checkpoint names (`model.embed_tokens`, `model.layers.{i}.self_attn...`,
`lm_head`); MTP module k lives at `model.layers.{num_hidden_layers + k}` as in the released weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .attention import MLA
from .layers import MLP, Linear, RMSNorm, RotaryEmbedding, native_cpu_gemv
from .moe import Experts, MoE, Router, RoutingStats


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        # MTP modules (layer_idx >= num_hidden_layers) use an MoE block whenever the model has experts.
        mtp = layer_idx >= cfg.num_hidden_layers
        moe = bool(cfg.n_routed_experts) if mtp else cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmuls=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmuls=True)

    def _mlp(self, x, stats):
        return self.mlp(x, stats) if isinstance(self.mlp, MoE) else self.mlp(x)

    def forward(self, h, y, cos, sin, mask=None, stats: list[RoutingStats] | None = None, cache=None):
        """The block's input arrives as h + y: the residual stream h and the previous block's output y not yet
        added (None for the first block), and its output leaves the same way, so that each add of the residual
        stream runs with the norm after it (RMSNorm's residual: one pass in CPU training). Returns (h', y')."""
        h, x = (h, self.input_layernorm(h)) if y is None else self.input_layernorm(h, y)
        h, x = self.post_attention_layernorm(h, self.self_attn(x, cos, sin, mask, cache))
        return h, self._mlp(x, stats)

    def forward_absorbed(self, h, cos, sin, cache, positions, mask, absorbed=None):
        h = h + self.self_attn.forward_absorbed(self.input_layernorm(h), cos, sin, cache, positions, mask, absorbed)
        return h + self._mlp(self.post_attention_layernorm(h), None)


def _checkpointed(layer: DecoderLayer, h, y, cos, sin, mask, stats: list[RoutingStats] | None):
    """layer(h, y, ...) under activation checkpointing (torch.utils.checkpoint, non-reentrant): only the inputs
    are kept, and the backward runs the block again to rebuild what it needs. The routing statistics come back as
    an output of the first run, so the backward's rerun adds none to `stats`."""

    def run(h, y):
        block_stats = None if stats is None else []
        return *layer(h, y, cos, sin, mask, block_stats), block_stats

    h, y, block_stats = torch.utils.checkpoint.checkpoint(run, h, y, use_reentrant=False)
    if stats is not None:
        stats.extend(block_stats)
    return h, y


class SharedHead(nn.Module):
    """The MTP module's own final norm; the output head itself is the main model's lm_head (shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Depth-k MTP module: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_{k-1})]), one decoder block, then
    shared_head.norm and the shared output head. Embedding and head are the main model's (shared)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmuls=True)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmuls=True)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, emb: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(prev)), dim=-1))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i) for i in range(n)]
            + [MTPLayer(cfg, n + k) for k in range(cfg.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T, V] main head
    hidden: torch.Tensor  # [B, T, H] after the final norm
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, V], position i predicts t_{i+k+1}
    routing: list[RoutingStats] = field(default_factory=list)  # one per MoE layer of the main model
    mtp_routing: list[RoutingStats] = field(default_factory=list)


class DeepseekV3(nn.Module):
    """DeepSeek-V3 (and V2-style) causal LM. `model(input_ids)` -> logits [B, T, V].

    `forward_train(input_ids)` also returns the MTP logits and the routing statistics for training.
    Build big configs on the meta device (`with torch.device("meta"): DeepseekV3(cfg)`): no memory is used
    until the weights are loaded.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        self._compiled = None  # the compiled bodies of forward_cached, forward_mtp_cached, verify_and_draft
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:
            self.reset_parameters()

    # ---- construction ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Normal(0, initializer_range) for all matrices, ones for norms, zero router biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Router)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, Experts):
                for p in (m.gate_up_proj, m.down_proj):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            if isinstance(m, Router) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()
        self.rotary.reset_parameters()

    # Plain lists: slicing the ModuleList would build a new ModuleList on every call (every decoding step).
    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.model.layers)[: self.config.num_hidden_layers]

    @property
    def mtp(self) -> list[MTPLayer]:
        return list(self.model.layers)[self.config.num_hidden_layers:]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def prepare_kernels(self) -> None:
        """Build dsv3's CPU kernels now (once per machine, 10-20 s) if this model decodes with them (bf16 on
        CPU), rather than inside the first request or compiled call. Cheap when built or not needed."""
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            kernels.available()

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: "LatentCache | None" = None) -> torch.Tensor:
        """Logits [B, T, V]. attention_mask [B, T] (1 = token, 0 = right padding) is optional; with a
        `cache`, the latents of positions 0..T-1 are stored for decoding with `forward_cached` (prefill)."""
        return self._forward(input_ids, attention_mask, cache=cache).logits

    def forward_train(self, input_ids: torch.Tensor, mtp: bool = True,
                      documents: torch.Tensor | None = None, recompute: bool = False) -> ForwardOutput:
        """Main logits, MTP logits per depth (position i of depth k predicts token i+k+1) and routing stats.

        documents [B, T] (optional): a document number per token of packed rows; attention then stays inside
        each document, as at inference, where every prompt starts a fresh context.
        recompute: activation checkpointing per decoder block (MTP blocks too): each block keeps only its inputs
        for the backward, which runs the block's forward again (the same numbers, ~1/3 more compute).
        """
        return self._forward(input_ids, None, with_stats=True, mtp=mtp, documents=documents, recompute=recompute)

    @staticmethod
    def _padding_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """[B, 1, T, T] causal mask over right-padded rows (True = may attend), or None when nothing is padded."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
        mask = (causal[None] & attention_mask.bool()[:, None, :])[:, None]  # [B, 1, T, T]
        return mask | torch.eye(T, dtype=torch.bool, device=mask.device)  # padded rows stay finite

    @staticmethod
    def _document_mask(documents: torch.Tensor, T: int) -> torch.Tensor:
        """[B, 1, T, T] causal mask that keeps every token inside its own document (documents [B, T])."""
        causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
        return (causal[None] & (documents[:, :, None] == documents[:, None, :]))[:, None]

    def _forward(self, input_ids, attention_mask=None, with_stats=False, mtp=False, cache=None,
                 documents=None, recompute=False) -> ForwardOutput:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None]
        cos, sin = self.rotary(positions)
        mask = self._padding_mask(attention_mask, T) if documents is None else self._document_mask(documents, T)
        stats: list[RoutingStats] | None = [] if with_stats else None
        emb = self.model.embed_tokens(input_ids)
        h, y = emb, None
        recompute = recompute and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                h, y = _checkpointed(layer, h, y, cos, sin, mask, stats)
            else:
                h, y = layer(h, y, cos, sin, mask, stats, None if cache is None else cache.latent[i])
        _, hidden = self.model.norm(h, y)
        out = ForwardOutput(logits=self.lm_head(hidden), hidden=hidden, routing=stats or [])
        if mtp:
            prev = hidden
            for k, layer in enumerate(self.mtp, start=1):
                if T - k < 1:
                    break
                x = layer.combine(emb[:, k:], prev[:, : T - k])
                mstats: list[RoutingStats] = []
                mtp_mask = None if mask is None else mask[..., : T - k, : T - k]
                args = (x, None, cos[:, : T - k], sin[:, : T - k], mtp_mask, mstats)
                x, y = _checkpointed(layer, *args) if recompute else layer(*args)
                _, prev = layer.shared_head.norm(x, y)
                out.mtp_logits.append(self.lm_head(prev))
                out.mtp_routing.extend(mstats)
        return out

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                mtp: bool = False) -> torch.Tensor:
        """Full-path prefill of right-padded prompts input_ids [B, T] (attention_mask [B, T], 1 = token):
        stores the latents of every position in `cache` and returns the final hidden [B, T, H] without
        applying the head (the caller picks the rows it needs logits for).

        With `mtp`, the first MTP module's latents are stored too (in cache.latent[num_hidden_layers]), for
        positions 0..T-2: its input at position i combines the main hidden at i with the embedding of token
        i+1. Only its latents are needed for later drafting, so the rest of the module is not run.
        """
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None]
        cos, sin = self.rotary(positions)
        mask = self._padding_mask(attention_mask, T)
        h, y = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            h, y = layer(h, y, cos, sin, mask, None, cache.latent[i])
        _, hidden = self.model.norm(h, y)
        if mtp and T > 1:
            self.store_mtp_latents(input_ids[:, 1:], hidden[:, :-1], positions[:, :-1].expand(B, -1), cache)
        return hidden

    # ---- latent-cache decoding -----------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  mtp: bool = False) -> "LatentCache":
        """An empty latent cache for `forward_cached`, in `dtype` (default: the model's; fp32 on CPU).

        The absorbed attention core runs in the cache's dtype, so the cache also holds each layer's W_UK / W_UV
        in that dtype, taken from the current weights: make a new cache after changing them. On CPU fp32 is
        the faster choice: at decode sizes fp32 BLAS runs these small batched products several times faster
        than the bf16 path (whose fixed cost per call dominates), and the cached rows need no conversion at
        each step. The values are the same: bf16 latents and weights are exact in fp32, and accumulation is
        fp32 either way. It costs twice the cache memory and an fp32 copy of kv_b_proj per cache.
        With `mtp`, the cache has one more layer per MTP module (after the main layers), for drafting.
        """
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        layers = self.layers + (self.mtp if mtp else [])
        cache = LatentCache(self.config, batch, max_len, dtype, self.device, len(layers) - len(self.layers))
        with torch.no_grad():
            cache.absorbed = [layer.self_attn.absorbed_weights(dtype) for layer in layers]
        return cache

    @staticmethod
    def _cached_mask(positions: torch.Tensor, max_position: int | None) -> torch.Tensor | int:
        """The attention mask [B, S, L] for new tokens at positions [B, S], or the int L when none is needed."""
        B, S = positions.shape
        L = (int(positions.max()) if max_position is None else max_position) + 1
        if S == 1 and (B == 1 or bool((positions == L - 1).all())):
            return L  # every query sees all of slots 0..L-1: no mask to build or apply
        slots = torch.arange(L, device=positions.device)
        return slots[None, None, :] <= positions[:, :, None]  # [B, S, L]

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: "LatentCache",
                       return_hidden: bool = False, max_position: int | None = None):
        """Run new tokens input_ids [B, S] at positions [B, S] through the absorbed path with the latent cache.

        Each query attends to cache slots <= its own position. Returns logits [B, S, V] (and the final hidden).
        `max_position` = positions.max(), when the caller knows it, saves reading it back from the device.
        """
        B, S = positions.shape
        mask = self._cached_mask(positions, max_position)
        body = self._cached_body
        if self._compiled:
            body, input_ids, positions = self._compiled[0], _dense(input_ids), _dense(positions)
        # one token: every matmul is a matrix-vector product; ATen's kernels beat oneDNN's for all but the head.
        # The switch stays outside the compiled region (Dynamo cannot trace it); compiled graphs call ATen's
        # matmuls, which read it when they run.
        with native_cpu_gemv(B * S == 1 and positions.device.type == "cpu"):
            hidden = body(input_ids, positions, cache.latent, cache.absorbed, mask)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def _cached_body(self, input_ids, positions, latents, absorbed, mask):
        """forward_cached without the head: embedding, rotary, the main layers over the latent cache, final norm.
        What `compile_decode` compiles; absorbed may be None (then each layer takes W_UK / W_UV from its weight)."""
        cos, sin = self.rotary(positions)
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer.forward_absorbed(h, cos, sin, latents[i], positions, mask, absorbed[i] if absorbed else None)
        return self.model.norm(h)

    def forward_mtp_cached(self, input_ids: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor, cache,
                           depth: int = 0, max_position: int | None = None):
        """One MTP module over new positions with its own latent cache layer, for drafting.

        positions [B, S]; prev [B, S, H]: the hidden the module combines at each position (the main model's
        final hidden there, or this module's own output when re-applied); input_ids [B, S]: the token one
        ahead of each position. Attends to the module's cache slots <= each position (cache.latent[
        num_hidden_layers + depth]). Returns logits [B, S, V] for the token two ahead and the module's
        hidden after shared_head.norm [B, S, H].
        """
        B, S = positions.shape
        mask = self._cached_mask(positions, max_position)
        idx = self.config.num_hidden_layers + depth
        absorbed = cache.absorbed[idx] if cache.absorbed else None
        body = self._mtp_cached_body
        if self._compiled:
            body, input_ids, positions, prev = self._compiled[1], _dense(input_ids), _dense(positions), _dense(prev)
        with native_cpu_gemv(B * S == 1 and positions.device.type == "cpu"):
            hidden = body(input_ids, prev, positions, cache.latent[idx], absorbed, mask, idx)
        return self.lm_head(hidden), hidden

    def _mtp_cached_body(self, input_ids, prev, positions, latent, absorbed, mask, idx: int):
        """forward_mtp_cached without the head (MTP module at model.layers[idx]); what `compile_decode` compiles."""
        cos, sin = self.rotary(positions)
        layer = self.model.layers[idx]
        x = layer.combine(self.model.embed_tokens(input_ids), prev)
        x = layer.forward_absorbed(x, cos, sin, latent, positions, mask, absorbed)
        return layer.shared_head.norm(x)

    def verify_and_draft(self, input_ids: torch.Tensor, positions: torch.Tensor, cache,
                         max_position: int | None = None):
        """One greedy speculative step with one draft, in one forward (what the engine runs when every
        sequence decodes greedily): the main model verifies, the MTP module drafts the next token.

        input_ids [B, 2] = (t_{n-1}, d_n): each sequence's last token and its draft of t_n, at positions
        [B, 2] = (n-1, n). The main model gives its own tokens g_n, g_{n+1} (argmax); the draft is accepted iff
        d_n == g_n. The MTP module then runs at both positions (main hiddens there, tokens g_n, g_{n+1}) into
        its cache layer (cache.latent[num_hidden_layers]) and drafts from the position that is now the last
        verified one: n when accepted, else n-1 (position n's rows, main and MTP, are then overwritten by the
        next step). Returns logits [B, 2, V], picks [B, 4] long = (g_n, g_{n+1}, accepted 0/1, next draft),
        and the main model's final hidden [B, H] at the last verified position (n-1 + accepted).
        """
        if max_position is None:
            max_position = int(positions.max())
        body = self._verify_draft_body
        if self._compiled:
            body, input_ids, positions = self._compiled[2], _dense(input_ids), _dense(positions)
        return body(input_ids, positions, cache.latent, cache.absorbed, max_position)

    def _verify_draft_body(self, input_ids, positions, latents, absorbed, max_position: int):
        idx = self.config.num_hidden_layers
        mask = self._cached_mask(positions, max_position)  # [B, 2, L], built inside the compiled graph
        hidden = self._cached_body(input_ids, positions, latents, absorbed, mask)  # [B, 2, H]
        logits = self.lm_head(hidden)
        target = logits.argmax(dim=-1)  # [B, 2]
        accepted = (target[:, 0] == input_ids[:, 1]).long()  # [B]
        mtp = self._mtp_cached_body(target, hidden, positions, latents[idx], absorbed[idx] if absorbed else None,
                                    mask, idx)
        last = accepted[:, None, None].expand(-1, 1, hidden.shape[-1])  # column of the last verified position
        nxt = self.lm_head(mtp.gather(1, last)).argmax(dim=-1)  # [B, 1]
        return logits, torch.cat((target, accepted[:, None], nxt), dim=1), hidden.gather(1, last)[:, 0]

    def compile_decode(self, enable: bool = True, **options) -> "DeepseekV3":
        """Opt in to torch.compile for the latent-cache decode path (`forward_cached`, `forward_mtp_cached`,
        `verify_and_draft`; so `dsv3.generate`, the engine's decode / verify steps and MTP drafting). Returns self.

        Compiles everything but the output head (`verify_and_draft`, which returns tokens, takes its heads in;
        for one token on CPU the oneDNN switch stays outside too) with dynamic shapes, so the growing context
        length does not recompile. The first call of each new kind (batch-1 decode, batched decode, verify,
        draft, fused verify-and-draft) compiles, which takes tens of seconds; results equal
        eager decoding up to floating-point summation order. Prefill and training stay eager.
        `options` go to torch.compile (default dynamic=True, and inductor's C++ wrapper on CPU: the generated
        code then calls its kernels from C++ rather than Python, ~1 ms less per `small` decode step on 2 cores);
        enable=False goes back to eager.
        """
        if not enable:
            self._compiled = None
            return self
        if self._compiled is not None and not options:
            return self  # already compiled: keep the graphs
        inductor = {"cpp_wrapper": True} if self.device.type == "cpu" else {}
        self.prepare_kernels()  # not while Dynamo traces the first call
        options = {"dynamic": True, **options, "options": {**inductor, **options.get("options", {})}}
        self._compiled = tuple(torch.compile(f, **options)
                               for f in (self._cached_body, self._mtp_cached_body, self._verify_draft_body))
        return self

    def store_mtp_latents(self, input_ids: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor, cache,
                          depth: int = 0) -> None:
        """Store only the MTP module's latents at positions [B, S] (inputs as in forward_mtp_cached)."""
        idx = self.config.num_hidden_layers + depth
        layer = self.model.layers[idx]
        cos, sin = self.rotary(positions)
        x = layer.input_layernorm(layer.combine(self.model.embed_tokens(input_ids), prev))
        layer.self_attn.store_latent(x, cos, sin, cache.latent[idx], positions)

    # ---- checkpoints -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "DeepseekV3":
        from ..checkpoint.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_bytes: int = 2 << 30) -> None:
        from ..checkpoint.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    def num_parameters(self) -> dict:
        from ..sizing import count_parameters

        return count_parameters(self.config)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t with row-major strides, also along size-1 dims (a slice like ids[:, -1:] keeps its parent's stride
    there), so a compiled graph's stride guards do not recompile for the same shapes."""
    return t.contiguous().view(-1).view(t.shape)


class LatentCache:
    """Per layer one buffer latent[i] [B, max_len, kv_lora_rank + qk_rope_head_dim] = [norm(c_kv) | rotated k_pe]
    (the main layers, then `mtp_layers` MTP modules).

    Keeping both parts in one row lets decoding score a query against them in one matmul; kv[i] [B, max_len,
    kv_lora_rank] and pe[i] [B, max_len, qk_rope_head_dim] are views of the two parts.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device, mtp_layers: int = 0):
        n, r = cfg.num_hidden_layers + mtp_layers, cfg.kv_lora_rank
        self.max_len = max_len
        self.latent = [torch.zeros(batch, max_len, r + cfg.qk_rope_head_dim, dtype=dtype, device=device)
                       for _ in range(n)]
        self.kv = [t[..., :r] for t in self.latent]
        self.pe = [t[..., r:] for t in self.latent]
        self.absorbed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (W_UK, W_UV^T) per layer: new_cache

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latent)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", overwrite_logits: bool = False) -> torch.Tensor:
    """Token cross-entropy of logits [..., V] against labels [...] in fp32, as F.cross_entropy(logits.float(), ...)
    computes it (labels equal to ignore_index count for nothing; "mean" divides by the others, "sum" does not),
    but a block of rows at a time: no fp32 copy of the logits, log-softmax or its gradient is ever whole. For the
    `small` preset's 8 x 1024 x 8192 bf16 logits that is ~800 MB less memory and 0.17 s instead of 0.29-0.5 s per
    forward + backward on the 2-core CPU; the gradient is the same fp32 softmax - one-hot, rounded once. On CPUs
    with dsv3's kernels a row at a time, in one pass each way (0.04 s there).

    overwrite_logits: the backward writes the logits' gradient over the logits rather than into a new buffer (for
    callers that do not read the logits after backward, as training does): one logits-sized allocation less, which
    on CPU the allocator often had to fault in afresh (0.017 s when it need not, up to 0.1 s when it did, 128 MB of
    bf16 logits); a second backward through the same graph (retain_graph) then raises."""
    flat, target = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    total = _BlockwiseCrossEntropy.apply(flat, target, ignore_index, overwrite_logits)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    return total / (target != ignore_index).sum()  # 0 / 0 = nan when every label is ignored, as F.cross_entropy


class _BlockwiseCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of logits [N, V], ~4M logits (16 MB in fp32, cache-sized) at a time on CPU and
    ~32M on GPUs, where each block costs a few kernel launches (V3's 129k vocabulary: 256 rows per block). On
    CPUs with dsv3's kernels, one pass over each row each way instead (kernels/cpu_cross_entropy.cpp)."""

    BLOCK = 1 << 22
    GPU_BLOCK = 1 << 25

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, overwrite: bool = False):
        ctx.overwrite, ctx.spent = overwrite, False
        keep = labels != ignore_index
        target = labels.masked_fill(~keep, 0)
        ctx.kernel = kernels.cross_entropy_ok(logits)
        if ctx.kernel:
            lse = kernels.cross_entropy_lse(logits)
        else:
            block = _BlockwiseCrossEntropy.BLOCK if logits.device.type == "cpu" else _BlockwiseCrossEntropy.GPU_BLOCK
            ctx.rows = max(1, block // logits.shape[1])
            lse = torch.cat([torch.logsumexp(b.float(), -1) for b in logits.split(ctx.rows)])
        picked = logits.gather(1, target[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, target, keep, lse)
        return torch.where(keep, lse - picked, 0.0).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.spent:
            raise RuntimeError("cross_entropy(..., overwrite_logits=True) backward ran already: its gradient was "
                               "written over the logits, so a second backward (retain_graph) cannot run")
        ctx.spent = ctx.overwrite
        logits, target, keep, lse = ctx.saved_tensors
        scale = grad * keep  # [N]: zero on ignored rows
        if ctx.kernel:
            return kernels.cross_entropy_grad(logits, lse, target, scale.float(), ctx.overwrite), None, None, None
        dlogits = logits if ctx.overwrite else torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.rows):
            e = min(s + ctx.rows, logits.shape[0])
            p = (logits[s:e].float() - lse[s:e, None]).exp_()  # softmax (out of place: fp32 logits are not copied)
            p[torch.arange(e - s, device=p.device), target[s:e]] -= 1
            dlogits[s:e] = p.mul_(scale[s:e, None])
        return dlogits, None, None, None
