"""Training documents from files: plain text, JSONL, and Hugging Face `datasets` (offline).

- ``*.txt`` (or any other non-JSON file): documents separated by one or more blank lines.
- ``*.jsonl`` / ``*.json`` (one JSON object a line, or a .json array of them): the ``text`` field, or
  GSM8K ``question`` + ``answer`` turned into `format_example` text (calculator annotations removed).
- a directory: its ``*.txt``, ``*.jsonl`` and ``*.json`` files, recursively, in sorted order.
- ``hf:NAME[:split]`` or ``hf:NAME:CONFIG:SPLIT``: a dataset saved with ``save_to_disk`` at path NAME, or
  one already in the local `datasets` cache (no download); rows use the same fields as JSONL.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .math import format_example, parse_gsm8k


class DataError(ValueError):
    """Unusable training data (missing file, empty dataset, bad record); the message names the place."""


_JSON_SUFFIXES = {".jsonl", ".json"}
_DIR_SUFFIXES = {".txt", ".jsonl", ".json"}
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


def record_to_text(rec: object, where: str) -> str:
    """The training text of one JSON record / dataset row: ``text``, or GSM8K ``question`` + ``answer``."""
    if isinstance(rec, dict):
        text = rec.get("text")
        if isinstance(text, str):
            if not text.strip():
                raise DataError(f"{where}: the 'text' field is empty")
            return text
        if "question" in rec and "answer" in rec:
            return format_example(parse_gsm8k(rec["question"], rec["answer"], where))
    fields = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise DataError(f"{where}: no usable fields (need a string 'text', or GSM8K 'question' and 'answer'; "
                    f"found {fields})")


def _read_text(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [doc.strip("\n") for doc in _BLANK_LINES.split(text) if doc.strip()]


def _read_jsonl(path: Path) -> list[str]:
    if path.suffix.lower() == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        try:  # a .json file holding one array of records
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return [record_to_text(rec, f"{path}[{i}]") for i, rec in enumerate(records)]
    return [record_to_text(rec, where) for where, rec in iter_jsonl(path)]


def iter_jsonl(path: Path):
    """(``file:line``, record) for each non-blank line of a JSONL file; bad JSON names the line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}); expected one JSON object per line") from None


def _load_hf(spec: str) -> list[str]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec!r}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], None, "train"
    if len(parts) == 2:
        split = parts[1]
    elif len(parts) == 3:
        config, split = parts[1], parts[2]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local paths and the cache only; never download
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} needs the Hugging Face `datasets` package: pip install datasets") from None
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(name)[split]
        elif Path(name).is_dir() and (Path(name) / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types for "not found / not cached"
        raise DataError(f"{spec!r}: could not load the dataset offline ({type(e).__name__}: {e}); give a local "
                        "path or a dataset already in the datasets cache") from None
    return [record_to_text(row, f"{spec}[{i}]") for i, row in enumerate(ds)]


def _expand(path_spec: str) -> list[Path]:
    path = Path(path_spec)
    if not path.exists():
        raise DataError(f"{path_spec}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _DIR_SUFFIXES)
        if not files:
            raise DataError(f"{path_spec}: directory has no .txt, .jsonl or .json files")
        return files
    return [path]


def load_documents(paths: str | Iterable[str]) -> list[str]:
    """All documents of ``paths`` (files, directories, ``hf:`` specs), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError("no data paths given")
    docs: list[str] = []
    for spec in paths:
        if spec.startswith("hf:"):
            found = _load_hf(spec)
        else:
            found = []
            for file in _expand(spec):
                found += _read_jsonl(file) if file.suffix.lower() in _JSON_SUFFIXES else _read_text(file)
        if not found:
            raise DataError(f"{spec}: no documents (the data is empty)")
        docs += found
    return docs
