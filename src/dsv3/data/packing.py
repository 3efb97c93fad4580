"""Packing token documents into fixed-length training rows, deterministically and resumably.

`PackedStream` lays documents end to end (``BOS doc EOS BOS doc EOS ...``) and cuts rows of ``seq_len + 1``
tokens (inputs ``row[:-1]``, labels ``row[1:]``). Its position is a small state dict (documents consumed
plus the tokens pulled but not yet emitted), so a stream rebuilt from the same source and loaded from a
saved state yields exactly the batches the old one would have. Every rank builds the same global batch of
``batch_size * world_size`` rows and keeps its own slice, so ranks never overlap and together cover it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .math import format_example, format_prompt, iter_problems
from .sources import DataError

Document = Sequence[int]


class MathStream:
    """Token lists of ``format_example(problem) + EOS`` for ``iter_problems(seed, split, ...)``; seekable.

    With ``answers_only``, the prompt's tokens are marked for no loss by storing them as ``-(id + 1)``;
    `split_loss_mask` turns a packed batch back into (tokens, mask).
    """

    def __init__(self, tokenizer, seed: int = 0, step_weights=None, split: str = "train", steps=None,
                 answers_only: bool = False, worked: str = "columns"):
        self.tokenizer, self.seed, self.split = tokenizer, seed, split
        self.steps, self.step_weights, self.answers_only, self.worked = steps, step_weights, answers_only, worked
        next(iter_problems(seed, split, steps, step_weights, worked=worked))  # validate the arguments now

    def iter_from(self, start: int) -> Iterator[list[int]]:
        eos = self.tokenizer.eos_id
        for problem in iter_problems(self.seed, self.split, self.steps, self.step_weights, start, self.worked):
            ids = self.tokenizer.encode(format_example(problem)) + [eos]
            if self.answers_only:  # the prompt's tokens are an exact prefix of the example's
                n = len(self.tokenizer.encode(format_prompt(problem.question)))
                ids[:n] = [-t - 1 for t in ids[:n]]
            yield ids

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(0)


def math_stream(tokenizer, seed: int = 0, step_weights=None, split: str = "train", steps=None,
                answers_only: bool = False, worked: str = "columns") -> MathStream:
    """The built-in math corpus as an endless, seekable stream of token lists (each ends with EOS)."""
    return MathStream(tokenizer, seed, step_weights, split, steps, answers_only, worked)


def split_loss_mask(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, True where the token is trained on) from a batch that may hold ``-(id + 1)`` markers."""
    masked = batch < 0
    return torch.where(masked, -batch - 1, batch), ~masked


def document_ids(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Document number of every token of packed rows [B, T]: a new document starts at each BOS (tokens before
    a row's first BOS, the tail of a document begun in the row before, are document 0)."""
    return (tokens == bos_id).cumsum(1)


class PackedStream:
    """Fixed-length rows of ``seq_len + 1`` tokens from a stream of token documents.

    ``documents`` may be
      - a sequence of token lists (cycled endlessly; reshuffled every epoch when ``shuffle_seed`` is set),
      - a seekable source: an object with ``iter_from(start)`` (like `math_stream`) or a callable
        ``start -> iterator``, resumed in O(1),
      - any other iterable; resuming then replays it from a fresh iterator (pass a fresh one on resume).
    Each document becomes ``[BOS] + doc + [EOS]`` (BOS only when ``bos_id`` is given; either is not
    doubled when the document already has it).
    ``mode="concat"`` (default) cuts the token stream into rows regardless of document boundaries;
    ``mode="pad"`` starts rows at document starts, fills a row with whole documents and pads the rest
    with ``pad_id`` (a document longer than a row is split over rows); mask labels equal to ``pad_id``.
    """

    def __init__(self, documents: Sequence[Document] | Callable[[int], Iterable[Document]] | Iterable[Document],
                 seq_len: int, *, eos_id: int, bos_id: int | None = None, pad_id: int | None = None,
                 rank: int = 0, world_size: int = 1, mode: str = "concat", shuffle_seed: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if mode not in ("concat", "pad"):
            raise ValueError(f"mode must be 'concat' or 'pad', got {mode!r}")
        if mode == "pad" and pad_id is None:
            raise ValueError("mode='pad' needs pad_id")
        self.seq_len, self.rank, self.world_size, self.mode = seq_len, rank, world_size, mode
        self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, pad_id
        self.shuffle_seed = shuffle_seed
        self._source = documents
        if isinstance(documents, Sequence) and not isinstance(documents, (str, bytes)):
            if len(documents) == 0:
                raise DataError("PackedStream got an empty list of documents")
            self._kind = "sequence"
        elif hasattr(documents, "iter_from") or callable(documents):
            self._kind = "seekable"
        elif isinstance(documents, Iterable):
            self._kind = "iterable"
        else:
            raise TypeError(f"documents must be a sequence, a callable start -> iterator or an iterable, "
                            f"got {type(documents).__name__}")
        self._doc_index = 0  # documents pulled from the source so far
        self._buf: list[int] = []  # tokens pulled but not yet emitted
        self._rows = 0  # global rows emitted so far
        self._it: Iterator[Document] | None = None
        self._it_pos = 0  # documents pulled through self._it
        self._perm: tuple[int, list[int]] | None = None  # (epoch, order) cache for shuffled sequences

    # ---- documents ------------------------------------------------------------------------------------
    def _sequence_doc(self, i: int) -> Document:
        n = len(self._source)
        epoch, j = divmod(i, n)
        if self.shuffle_seed is None:
            return self._source[j]
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(n))
            random.Random(f"{self.shuffle_seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._source[self._perm[1][j]]

    def _next_doc(self) -> Document:
        if self._kind == "sequence":
            doc = self._sequence_doc(self._doc_index)
        else:
            if self._it is None:
                self._open(self._doc_index)
            doc = self._pull()
        self._doc_index += 1
        return doc

    def _pull(self) -> Document:
        """The next document of the open iterator; a finite re-iterable is started over when it ends."""
        try:
            doc = next(self._it)
        except StopIteration:
            if self._kind == "seekable" or iter(self._source) is self._source:
                raise DataError("the document stream ended; give an endless source, or a list (which is "
                                "cycled)") from None
            self._it = iter(self._source)
            try:
                doc = next(self._it)
            except StopIteration:
                raise DataError("the document source is empty") from None
        self._it_pos += 1
        return doc

    def _open(self, start: int) -> None:
        """Position the source iterator at document ``start``."""
        src = self._source
        if self._kind == "seekable":
            self._it = iter(src.iter_from(start) if hasattr(src, "iter_from") else src(start))
            self._it_pos = start
            return
        if iter(src) is src:  # a one-shot iterator: it only goes forward
            if self._it_pos > start:
                raise DataError("cannot rewind a one-shot document iterator; to resume, pass a fresh iterator, "
                                "a list, or a callable start -> iterator")
            self._it = src
        else:  # a re-iterable: replay from its start
            self._it, self._it_pos = iter(src), 0
        while self._it_pos < start:
            self._pull()

    def _wrap(self, doc: Document) -> list[int]:
        tokens = [int(t) for t in doc]
        if self.bos_id is not None and (not tokens or tokens[0] != self.bos_id):
            tokens.insert(0, self.bos_id)
        if not tokens or tokens[-1] != self.eos_id:
            tokens.append(self.eos_id)
        return tokens

    # ---- rows -----------------------------------------------------------------------------------------
    def _next_row(self) -> list[int]:
        width = self.seq_len + 1
        if self.mode == "concat":
            while len(self._buf) < width:
                self._buf.extend(self._wrap(self._next_doc()))
            row, self._buf = self._buf[:width], self._buf[width:]
        else:
            row = []
            while len(row) < width:
                if not self._buf:
                    self._buf = self._wrap(self._next_doc())
                space = width - len(row)
                if len(self._buf) <= space or not row:
                    row += self._buf[:space]
                    self._buf = self._buf[space:]
                else:
                    row += [self.pad_id] * space
        self._rows += 1
        return row

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """This rank's ``[batch_size, seq_len + 1]`` slice of the next global batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = [self._next_row() for _ in range(batch_size * self.world_size)]
        mine = rows[self.rank * batch_size:(self.rank + 1) * batch_size]
        return torch.tensor(mine, dtype=torch.long)  # [B, T+1]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch(batch_size)

    # ---- resumable position ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "seq_len": self.seq_len, "mode": self.mode, "doc_index": self._doc_index,
                "buffer": list(self._buf), "rows": self._rows, "shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seq_len", "mode", "shuffle_seed"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"saved data-loader state has {key}={state.get(key)!r} but this stream has "
                                f"{getattr(self, key)!r}; resume with the same data settings")
        self._doc_index = int(state["doc_index"])
        self._buf = [int(t) for t in state["buffer"]]
        self._rows = int(state["rows"])
        if self._kind != "sequence":
            self._open(self._doc_index)
