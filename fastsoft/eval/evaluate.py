"""Held-out evaluation of a soft prompt against the full-context teacher.

Reported per job: token KL(teacher || student) with σ (``kl_soft``) and with no context at all
(``kl_none``), the share of that no-context gap closed (``gap_closed = 1 - kl_soft / kl_none``),
top-1 agreement at the teacher-forced answer positions, and on free greedy generation the exact-match
rate and ROUGE-L against the teacher's own answers. KL = 0 on training queries says nothing about
held-out ones: these are computed on the eval queries only.

Memory does not grow with the number of queries beyond what is kept per query (the teacher's hidden states, the
per-token results ``[N]``, the answers): the queries stream through the student in chunks of at most
:data:`TOKEN_BUDGET` packed tokens, their logits in blocks of :data:`LOGIT_BYTES`, and greedy decoding runs
:data:`fastsoft.eval.generate.BATCH_ROWS` rows at a time.
"""

from __future__ import annotations

import torch

from fastsoft.eval.generate import BATCH_ROWS, answer_text, generate_batch_ids
from fastsoft.frozen.packing import Segment, pack_shared, scored_hidden
from fastsoft.teacher.batching import Taught
from fastsoft.text import rouge_l

# Packed tokens a chunk of queries may take through the student (training's default --token-budget): the forward's
# activations scale with it, not with the number of queries.
TOKEN_BUDGET = 4096
# Bytes of one [C, V] fp32 logits block (C = 128 rows at V = 32k, 27 at 152k); token_kl keeps three alive at most.
# 16 MiB as in ops/reference.py: under glibc's largest mmap threshold (32 MiB), freed blocks are reused, not mapped
# afresh (64 MiB blocks took twice the time here, most of it page faults).
LOGIT_BYTES = 16 * 2**20


def query_chunks(segments: list[Segment], prompt_length: int, token_budget: int = TOKEN_BUDGET) -> list[slice]:
    """Consecutive runs of ``segments`` whose lengths (:meth:`Segment.length`, an upper bound on their packed row)
    add up to at most ``token_budget``; a segment longer than that alone goes in a chunk of its own."""
    chunks, start, used = [], 0, 0
    for index, segment in enumerate(segments):
        length = segment.length(prompt_length)
        if index > start and used + length > token_budget:
            chunks.append(slice(start, index))
            start, used = index, 0
        used += length
    return chunks + ([slice(start, len(segments))] if start < len(segments) else [])


def _kl_block(loaded, student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """KL(teacher || student) ``[C]`` and the student's and teacher's argmax ``[C]`` of ``C`` scored rows
    (hidden states ``[C, H]`` each). Memory: three ``[C, V]`` fp32 blocks at most (in-place arithmetic, with the
    same numbers as ``(t.exp() * (t - s)).sum(-1)``)."""
    student = torch.log_softmax(loaded.logits(student) / temperature, -1)
    teacher = torch.log_softmax(loaded.logits(teacher) / temperature, -1)
    top1 = student.argmax(-1), teacher.argmax(-1)
    difference = torch.sub(teacher, student, out=student)
    return teacher.exp_().mul_(difference).sum(-1), *top1


@torch.no_grad()
def token_kl(
    loaded,
    prompt: torch.Tensor | None,
    queries: list[Taught],
    temperature: float = 1.0,
    share_prefix: bool = True,
    token_budget: int = TOKEN_BUDGET,
    logit_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token KL(teacher || student) ``[N]`` at every answer position of ``queries`` (teacher-forced), with the
    student's and the teacher's argmax ids ``[N]``. ``prompt [P, H]`` stands in the context's place; None: no context.
    ``share_prefix``: the template head's keys and values computed once (:mod:`fastsoft.frozen.prefix`), σ once a chunk
    (:func:`fastsoft.frozen.packing.pack`).

    The queries go through the student in consecutive chunks (:func:`query_chunks`, ``token_budget`` packed tokens
    each), their scored rows through the lm_head in blocks of ``logit_rows`` rows (default: :data:`LOGIT_BYTES` of
    fp32 logits; the last block fewer). The blocks change no number; the chunks change each token's KL by rounding only
    (the student's GEMMs see other shapes): ~1e-6 relative on the tiny model, and none while the queries fit one chunk.
    Memory: one packed row of at most ``token_budget`` tokens (or one longer query) and three ``[logit_rows, V]``
    fp32 blocks at a time, whatever the number of queries; the results ``[N]`` are all that is kept."""
    slot = None if prompt is None else 0
    length = 0 if prompt is None else prompt.shape[0]
    rows = logit_rows or max(1, LOGIT_BYTES // (4 * loaded.vocab_size))
    prompts = torch.zeros(1, 0, loaded.hidden_size) if prompt is None else prompt[None]
    segments = [Segment(slot, q.before, q.after, q.answer) for q in queries]
    # the results [N], allocated once up front: small tensors kept from every block would sit between the blocks'
    # freed logits and keep the process from reusing that memory (its peak then grew with the queries)
    total = sum(len(q.answer) for q in queries)
    kl = torch.empty(total, device=loaded.device)
    student_top1, teacher_top1 = (torch.empty(total, dtype=torch.long, device=loaded.device) for _ in range(2))
    done = 0

    def head(student: torch.Tensor, teacher: torch.Tensor) -> None:
        nonlocal done
        for results, part in zip((kl, student_top1, teacher_top1), _kl_block(loaded, student, teacher, temperature)):
            results[done : done + len(part)] = part
        done += len(student)

    # scored rows carried over to the next chunk: every block but the last is exactly `rows` rows, so the lm_head sees
    # one GEMM shape (each new shape costs oneDNN ~0.5 MB of cached primitive) and its freed blocks are reused
    carry_student = carry_teacher = torch.zeros(0, loaded.hidden_size, device=loaded.device)
    for chunk in query_chunks(segments, length, token_budget):
        packed = pack_shared(loaded, segments[chunk], length, share=share_prefix)
        student = torch.cat([carry_student, scored_hidden(loaded, prompts, packed)])  # [k + n, H]
        teacher = torch.cat([carry_teacher] + [q.hidden.to(loaded.device) for q in queries[chunk]])  # [k + n, H]
        full = len(student) // rows * rows
        for start in range(0, full, rows):
            head(student[start : start + rows], teacher[start : start + rows])
        carry_student, carry_teacher = student[full:], teacher[full:]
    if len(carry_student):
        head(carry_student, carry_teacher)
    return kl, student_top1, teacher_top1


def evaluate(
    loaded,
    prompt: torch.Tensor,
    queries: list[Taught],
    context_length: int,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    share_prefix: bool = True,
    token_budget: int = TOKEN_BUDGET,
    batch_rows: int = BATCH_ROWS,
) -> dict:
    """Metrics of ``prompt [P, H]`` on teacher-answered held-out ``queries`` (with teacher hidden states).

    The means are over all answer tokens (KL, top-1) or queries (exact match, ROUGE-L), whatever the chunking.
    ``samples`` keeps every query's teacher and student answer text (linear in text; the report's summary leaves it
    out). Memory: that of :func:`token_kl` (``token_budget``) and of :func:`generate_batch_ids` (``batch_rows``),
    whatever the number of queries."""
    if not queries:
        return {"eval_queries": 0, "compression_ratio": context_length / prompt.shape[0]}
    kl_soft, student_top1, teacher_top1 = token_kl(loaded, prompt, queries, temperature, share_prefix, token_budget)
    kl_none, _, _ = token_kl(loaded, None, queries, temperature, share_prefix, token_budget)
    soft, none = float(kl_soft.mean()), float(kl_none.mean())
    # answers decoded batch_rows at a time: one decoder call per step for a whole batch instead of one per query
    rows = [(q.before, q.after) for q in queries]
    answers = generate_batch_ids(loaded, prompt, rows, max_new_tokens, share_prefix, batch_rows)
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
