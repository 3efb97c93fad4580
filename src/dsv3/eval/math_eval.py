"""Held-out loss and math accuracy (exact match of the final `#### N` answer, greedy decoding)."""

from __future__ import annotations

import torch

from ..infer.generate import generate
from ..model.transformer import cross_entropy


@torch.no_grad()
def heldout_loss(model, batches: list[torch.Tensor], bos_id: int | None = None) -> float:
    """Mean next-token cross-entropy of the main head over fixed held-out batches [B, T+1] (on the trained
    tokens only when the batches mark prompts with -(id + 1)). With `bos_id`, attention stays inside each
    packed document (a new one at each BOS), as in training with the document mask."""
    if not batches:
        return float("nan")
    from ..data.packing import document_ids, split_loss_mask

    losses = []
    for b in batches:
        tokens, trained = split_loss_mask(b.to(model.device))  # answers-only batches carry their loss mask
        labels = tokens[:, 1:].masked_fill(~trained[:, 1:], -100)
        inputs = tokens[:, :-1]
        if bos_id is None:
            logits = model(inputs)
        else:
            logits = model.forward_train(inputs, mtp=False, documents=document_ids(inputs, bos_id)).logits
        losses.append(cross_entropy(logits, labels).item())
    return sum(losses) / len(losses)


@torch.no_grad()
def solve(model, tokenizer, questions: list[str], max_new_tokens: int = 256, batch_size: int = 64) -> list[str]:
    """Greedy completions (text after the prompt, up to EOS) for each question."""
    from ..data.math import format_prompt

    outs: list[str] = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        prompts = [tokenizer.encode(format_prompt(q), add_bos=True) for q in chunk]
        limit = min(max_new_tokens, model.config.max_position_embeddings - max(map(len, prompts)))
        new = generate(model, prompts, limit, eos_token_id=tokenizer.eos_id)
        outs += [_until_answer(tokenizer.decode([t for t in ids if t != tokenizer.eos_id])) for ids in new]
    return outs


def _until_answer(text: str) -> str:
    """Cut a completion after its first `#### N` line, so a made-up follow-on problem is never graded."""
    at = text.find("####")
    if at < 0:
        return text
    end = text.find("\n", at)
    return text if end < 0 else text[:end]


def evaluate_math(model, tokenizer, problems, max_new_tokens: int | None = None, batch_size: int = 64,
                  return_completions: bool = False) -> dict:
    """{"task": "math", "n", "accuracy", "by_steps": {"1": a1, ...}} on `problems` (MathProblem list)."""
    from ..data.math import grade

    if max_new_tokens is None:  # room for the longest reference solution, plus slack
        max_new_tokens = max(len(tokenizer.encode(" " + p.solution)) for p in problems) + 16
    was_training = model.training
    model.eval()
    try:
        completions = solve(model, tokenizer, [p.question for p in problems], max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    correct = [grade(c, p.answer) for c, p in zip(completions, problems)]
    by: dict[str, list[bool]] = {}
    for p, ok in zip(problems, correct):
        by.setdefault(str(p.steps), []).append(ok)
    res = {"task": "math", "n": len(problems), "accuracy": sum(correct) / max(1, len(correct)),
           "by_steps": {k: sum(v) / len(v) for k, v in sorted(by.items(), key=lambda kv: int(kv[0]))}}
    if return_completions:
        res["completions"] = completions
        res["correct"] = correct
    return res
