"""Held-out evaluation of a soft prompt against the full-context teacher.

Reported per job: token KL(teacher || student) with σ (``kl_soft``) and with no context at all
(``kl_none``), the share of that no-context gap closed (``gap_closed = 1 - kl_soft / kl_none``),
top-1 agreement at the teacher-forced answer positions, and on free greedy generation the exact-match
rate and ROUGE-L against the teacher's own answers. KL = 0 on training queries says nothing about
held-out ones: these are computed on the eval queries only.
"""

from __future__ import annotations

import torch

from fastsoft.eval.generate import answer_text, generate_batch_ids
from fastsoft.eval.metrics import rouge_l
from fastsoft.teacher.batching import Taught
from fastsoft.train.packing import Segment, pack_shared, scored_hidden


@torch.no_grad()
def token_kl(
    loaded, prompt: torch.Tensor | None, queries: list[Taught], temperature: float = 1.0, share_prefix: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token KL(teacher || student) ``[N]`` at every answer position of ``queries`` (teacher-forced), with the
    student's and the teacher's argmax ids ``[N]``. ``prompt [P, H]`` stands in the context's place; None: no context.
    ``share_prefix``: the template head's keys and values computed once (:mod:`fastsoft.prefix`), σ once for all
    the queries (:func:`fastsoft.train.packing.pack`).
    Memory: ``[N, V]`` fp32 logits (N is a few held-out answers)."""
    slot = None if prompt is None else 0
    length = 0 if prompt is None else prompt.shape[0]
    segments = [Segment(slot, q.before, q.after, q.answer) for q in queries]
    packed = pack_shared(loaded, segments, length, share=share_prefix)
    prompts = torch.zeros(1, 0, loaded.hidden_size) if prompt is None else prompt[None]
    student = torch.log_softmax(loaded.logits(scored_hidden(loaded, prompts, packed)) / temperature, -1)  # [N, V]
    teacher = torch.log_softmax(
        loaded.logits(torch.cat([q.hidden for q in queries]).to(loaded.device)) / temperature, -1
    )
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl, student.argmax(-1), teacher.argmax(-1)


def evaluate(
    loaded,
    prompt: torch.Tensor,
    queries: list[Taught],
    context_length: int,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    share_prefix: bool = True,
) -> dict:
    """Metrics of ``prompt [P, H]`` on teacher-answered held-out ``queries`` (with teacher hidden states)."""
    if not queries:
        return {"eval_queries": 0, "compression_ratio": context_length / prompt.shape[0]}
    kl_soft, student_top1, teacher_top1 = token_kl(loaded, prompt, queries, temperature, share_prefix)
    kl_none, _, _ = token_kl(loaded, None, queries, temperature, share_prefix)
    soft, none = float(kl_soft.mean()), float(kl_none.mean())
    # all queries' answers decoded as one batch (a few rows): one decoder call per step instead of one per query
    answers = generate_batch_ids(loaded, prompt, [(q.before, q.after) for q in queries], max_new_tokens, share_prefix)
    matches, rouges, samples = [], [], []
    for q, ids in zip(queries, answers):
        reference, produced = answer_text(loaded, q.answer), answer_text(loaded, ids)
        matches.append(float(produced == reference))
        rouges.append(rouge_l(produced, reference))
        samples.append({"teacher": reference, "student": produced})
    return {
        "eval_queries": len(queries),
        "kl_soft": soft,
        "kl_none": none,
        "gap_closed": 1.0 - soft / none if none > 0 else float("nan"),
        "top1_agreement": float((student_top1 == teacher_top1).float().mean()),
        "exact_match": sum(matches) / len(matches),
        "rouge_l": sum(rouges) / len(rouges),
        "compression_ratio": context_length / prompt.shape[0],
        "samples": samples,
    }
