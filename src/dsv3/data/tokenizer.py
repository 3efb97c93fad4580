"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with DeepSeek-V3 special tokens.

Digits are split one per token (so every number is spelled with the same ten digit tokens), bytes are the
base alphabet (any UTF-8 text round-trips exactly), and the saved directory (``tokenizer.json`` +
``tokenizer_config.json`` with a DeepSeek-V3-style chat template) loads in
``transformers.AutoTokenizer.from_pretrained`` with the same ids.

Ids: 0 BOS ``<｜begin▁of▁sentence｜>``, 1 EOS ``<｜end▁of▁sentence｜>``, 2 pad ``<｜▁pad▁｜>``,
3 ``<｜User｜>``, 4 ``<｜Assistant｜>`` (the ``tiny`` preset's bos/eos/pad ids), then the 256 bytes, then merges.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)  # ids 0..4 in this order

# DeepSeek-V3's chat format, without its tool-calling branches: BOS, system text, then
# <｜User｜>content / <｜Assistant｜>content<｜end▁of▁sentence｜>; a generation prompt appends <｜Assistant｜>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + '" + EOS + "' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)

# Names tried, in order, for a directory whose tokenizer_config.json does not say.
_FALLBACK_SPECIALS = {
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>"),
    "pad": (PAD, "<pad>", "<|pad|>"),
}


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with the ids and chat format the rest of dsv3 uses."""

    def __init__(self, tokenizer: _HFTokenizer, bos_token: str | None = BOS, eos_token: str | None = EOS,
                 pad_token: str | None = PAD, chat_template: str | None = CHAT_TEMPLATE,
                 model_max_length: int = 1024):
        self.tok = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)
        self.pad_id = self._id(pad_token)
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encode / decode ------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; call encode(text, add_bos=False)")
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        if add_bos:
            out = [[self.bos_id] + ids for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    # ---- chat -----------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (dicts with ``role`` and ``content``), as text."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json has none)")
        if self.chat_template == CHAT_TEMPLATE:  # the built-in format needs no template engine
            out = [self.bos_token or ""]
            for m in messages:
                role, content = m["role"], m["content"]
                if role == "system":
                    out.append(content)
                elif role == "user":
                    out.append(USER + content)
                elif role == "assistant":
                    out.append(ASSISTANT + content + EOS)
            if add_generation_prompt:
                out.append(ASSISTANT)
            return "".join(out)
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover
            raise ImportError("rendering this tokenizer's chat_template needs jinja2: pip install jinja2") from e
        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (BOS included by the template), as transformers would give them."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    # ---- files ----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by transformers.AutoTokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        added = {}
        for token in SPECIAL_TOKENS:
            i = self.tok.token_to_id(token)
            if i is not None:
                added[str(i)] = {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "added_tokens_decoder": added,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` from a Hugging Face tokenizer directory (special tokens and chat template
        from ``tokenizer_config.json`` when present)."""
        directory = Path(directory)
        path = directory / "tokenizer.json" if directory.is_dir() else directory
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json here; train one with dsv3.data.train_tokenizer "
                                    "or point at a Hugging Face tokenizer directory")
        tok = _HFTokenizer.from_file(str(path))
        config: dict = {}
        config_path = path.parent / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))

        def special(kind: str) -> str | None:
            value = config.get(f"{kind}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                return value
            return next((t for t in _FALLBACK_SPECIALS[kind] if tok.token_to_id(t) is not None), None)

        template = config.get("chat_template") if config else CHAT_TEMPLATE
        jinja_path = path.parent / "chat_template.jinja"  # where transformers >= 4.43 may save it
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        max_len = config.get("model_max_length", 1024)
        if not isinstance(max_len, int) or max_len > 10**9:
            max_len = 1024
        return cls(tok, special("bos"), special("eos"), special("pad"), template, max_len)


def _byte_level_bpe() -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None,
                    model_max_length: int = 1024) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (deterministic for the same texts); save it to ``out_dir`` if given.

    ``vocab_size`` counts everything: 5 special tokens + 256 bytes + merges (so it must be at least 261).
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} "
                         f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    wrapper = Tokenizer(tok, model_max_length=model_max_length)
    if out_dir is not None:
        wrapper.save(out_dir)
    return wrapper


def train_math_tokenizer(vocab_size: int = 512, n_problems: int = 20_000, seed: int = 0,
                         out_dir: str | Path | None = None) -> Tokenizer:
    """A tokenizer trained on ``n_problems`` training problems of the built-in math corpus."""
    from .math import format_example, generate_problems

    texts = [format_example(p) for p in generate_problems(n_problems, seed=seed, split="train")]
    return train_tokenizer(texts, vocab_size=vocab_size, out_dir=out_dir)
