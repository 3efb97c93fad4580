"""Incremental detokenisation for streaming: UTF-8 safe, with stop strings.

Byte-level BPE tokens are bytes, so one character can span tokens: decoding a token sequence that ends
inside a character gives U+FFFD. New text is therefore only released once the decoded tail no longer ends
with U+FFFD (the held tokens are decoded together when the rest of the character arrives). Decoding starts a
few prompt tokens back (as vLLM does) so tokenizers whose decoder depends on the left context (a leading
"▁" space) produce the same text as decoding the whole sequence.

Stop strings: the last (longest stop - 1) characters are held back, because they could be the start of a
stop string that the next token completes; the released text never contains a stop string or a piece of
one. The text is cut where the first stop string begins.
"""

from __future__ import annotations

_CONTEXT = 5  # prompt tokens decoded as left context
_PARTIAL = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already accounted for
        self.read_offset = len(self.ids)
        self.decoded = ""  # generated text with complete characters, cut at a stop string
        self.stopped = False  # a stop string was found
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> bool:
        """Add one generated token; True when this completes a stop string (the text is then final)."""
        if self.stopped or self.finished:
            raise RuntimeError("Detokenizer.push after the sequence ended")
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith(_PARTIAL):
            self._extend(text[len(prefix):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self.stopped

    def _extend(self, delta: str) -> None:
        start = max(0, len(self.decoded) - self.hold)  # a new match must end inside the new text
        self.decoded += delta
        if self.stop:
            hits = [i for i in (self.decoded.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.decoded = self.decoded[: min(hits)]
                self.stopped = True

    def finish(self) -> None:
        """The sequence ended for another reason: decode any held tokens (an incomplete character stays
        U+FFFD) and release the held-back tail."""
        if not self.stopped and not self.finished and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            text = self._decode(self.ids[self.prefix_offset:])
            if len(text) > len(prefix):
                self._extend(text[len(prefix):])
        self.finished = True

    @property
    def text(self) -> str:
        """The text that may be shown now: grows monotonically; final once stopped or finished."""
        if self.stopped or self.finished or not self.hold:
            return self.decoded
        return self.decoded[: max(0, len(self.decoded) - self.hold)]
