"""Data: the built-in math corpus and grader, the BPE tokenizer, file/dataset sources and packing."""

from .math import (
    DOMAINS,
    MathProblem,
    content_key,
    extract_answer,
    format_example,
    format_prompt,
    generate_problems,
    grade,
    iter_problems,
    load_gsm8k_jsonl,
    problem_at,
    split_of,
)
from .packing import MathStream, PackedStream, math_stream
from .sources import DataError, load_documents
from .tokenizer import Tokenizer, train_math_tokenizer, train_tokenizer

__all__ = [
    "DOMAINS", "DataError", "MathProblem", "MathStream", "PackedStream", "Tokenizer", "content_key",
    "extract_answer", "format_example", "format_prompt", "generate_problems", "grade", "iter_problems",
    "load_documents", "load_gsm8k_jsonl", "math_stream", "problem_at", "split_of", "train_math_tokenizer",
    "train_tokenizer",
]
