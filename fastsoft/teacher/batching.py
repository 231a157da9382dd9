"""The teacher pass: the frozen model with the full context, at every scored (answer) position.

For each query the teacher sees ``before + context + after + answer``. With no answer given it generates
its greedy answer, and the final hidden state at each generation step *is* the teacher's distribution
for that answer token (logits = hidden @ lm_head.T), so no second pass is needed. Outputs are final
hidden states; the cache kinds (dense, top-k, sampled, hidden) are derived from them.

Continuous batching across jobs (``teach_jobs``). Every forward step packs, into one row of new tokens:
prefix chunks of newly admitted jobs (``before + context``, encoded once per job), the whole suffix of
each query joining (``after``, plus the answer when it is given: teacher forcing), and one token for each
query still decoding. A finished query leaves at once and a waiting one, of any admitted job, joins at the
next step; a job whose queries are all done frees its memory and the next job is admitted.

Memory: one KV *arena* per job and layer, ``[1, kv_heads, P + S·W, head_dim]`` — the job's prefix (P
tokens) once, then S row slots of width W (one per query in flight). Never a copy of the prefix per query.

Attention of a query token = (its job's prefix, all of it) ⊕ (its own row, causally), computed as two
attentions merged exactly through their log-sum-exp (as ring attention does): no padding of prefixes,
no masked-out work on other rows or other jobs. A prefix chunk is the same with "the prefix before the
chunk" ⊕ "the chunk, causally". The merge runs inside a custom attention function (``fastsoft_teacher``),
registered with transformers and switched on only for the teacher's forward calls (``fastsoft/attention.py``).
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastsoft.data.jobs import Job
from fastsoft.data.templates import Template, encode, end_token_ids, tokenize_query
from fastsoft.errors import FastsoftError
from fastsoft.frozen.attention import attention_implementation, attention_lse, bucket_index, group_by_length
from fastsoft.frozen.layers import fused_layers

TEACHER_ATTENTION = "fastsoft_teacher"


@dataclass
class Taught:
    """One query as the teacher answered it.

    before: ids before the context slot; after: ids between the slot and the answer (the query);
    answer: the scored ids (answer + end token); hidden: ``[len(answer), H]`` fp32 teacher final hidden
    states predicting each answer token.
    """

    before: list[int]
    after: list[int]
    answer: list[int]
    hidden: torch.Tensor


@dataclass(frozen=True)
class Sampling:
    """Generate by sampling instead of greedily: ``temperature``, nucleus ``top_p``, and a seed per job.

    Row ``i`` of job ``j`` draws from its own generator seeded with ``crc32(f"{seeds[j]}:{i}")``, so what it writes
    does not depend on which other rows or jobs share its steps.
    """

    temperature: float
    top_p: float
    seeds: dict[str, int]


def check_length(loaded, job_id: str, length: int, what: str) -> None:
    limit = loaded.max_length
    if limit is not None and length > limit:
        raise FastsoftError(f"job {job_id!r}: {what} is {length} tokens, longer than the model's maximum of {limit}")


def teach(
    loaded,
    template: Template,
    job_id: str,
    context: str,
    queries: list[str],
    answers: list[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> list[Taught]:
    """Teacher hidden states at the answer positions of every query of one job (greedy answers when none are given).

    The simple single-job API over :func:`teach_jobs`; ``batch_size`` is the number of queries in flight.
    """
    result = teach_jobs(
        loaded, template, [Job(job_id, context, queries, answers)], max_new_tokens, max_rows=batch_size
    )[job_id]
    if isinstance(result, FastsoftError):
        raise result
    return result[0]


@torch.no_grad()
def teach_jobs(
    loaded,
    template: Template,
    jobs: list[Job],
    max_new_tokens: int = 64,
    *,
    use_answers: bool = True,
    token_budget: int = 8192,
    max_rows: int = 64,
    max_jobs: int = 8,
    sampling: Sampling | None = None,
) -> dict[str, tuple[list[Taught], list[Taught]] | FastsoftError]:
    """Teach several jobs in one continuous batch.

    Args:
        jobs: the jobs (unique ids). Training queries are teacher-forced on their answers when given and
            ``use_answers``, else answered greedily; eval queries are always answered greedily.
        max_new_tokens: greedy answer budget (an answer ends at an end token or after this many tokens).
        token_budget: new tokens per forward step (a longer prefix is encoded in chunks; a longer single
            query suffix still runs, alone).
        max_rows: queries in flight at once, over all jobs.
        max_jobs: jobs whose KV arenas are held at once.
        sampling: generate every ungiven answer by sampling (:class:`Sampling`) instead of greedily (self-study
            writes its requests this way); ``Taught.answer`` then ends with an end token only when one was drawn.

    Returns:
        ``{job_id: (train, eval)}`` with one :class:`Taught` per query in the request's order, or, for a job
        that cannot be taught (too long for the model), the :class:`FastsoftError` saying why; the other
        jobs are taught regardless.
    """
    if token_budget < 1 or max_rows < 1 or max_jobs < 1:
        raise ValueError("token_budget, max_rows and max_jobs must be positive")
    ends = end_token_ids(loaded)
    results: dict = {}
    pending: deque[_Job] = deque()
    for serial, request in enumerate(jobs):
        try:
            job = _Job.build(
                serial,
                loaded,
                template,
                request,
                request.answers if use_answers else None,
                ends,
                max_new_tokens,
                max_rows,
            )
        except FastsoftError as error:
            results[request.id] = error
            continue
        if sampling is not None:
            for row in job.rows:
                row.generator = torch.Generator().manual_seed(
                    zlib.crc32(f"{sampling.seeds[job.id]}:{row.index}".encode())
                )
        if job.rows:
            pending.append(job)
        else:
            results[request.id] = ([], [])
    active: list[_Job] = []
    with attention_implementation(loaded, TEACHER_ATTENTION, _teacher_attention), fused_layers(loaded):
        while pending or active:
            while pending and len(active) < max_jobs:
                active.append(pending.popleft())
            step = _plan(active, token_budget, max_rows)
            hidden = loaded.decoder(
                input_ids=step.ids[None].to(loaded.device),
                position_ids=step.positions[None].to(loaded.device),
                use_cache=False,
                fastsoft_step=step,
            ).last_hidden_state[0]
            _advance(loaded, step, hidden, ends, max_new_tokens, sampling)
            for job in [j for j in active if j.unfinished == 0]:
                active.remove(job)
                results[job.id] = job.result()
                job.arena_k = job.arena_v = None
    return {request.id: results[request.id] for request in jobs}


# -- host-side state --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Row:
    job: _Job
    index: int  # position in the job's output (train queries first, then eval queries)
    after: list[int]
    forced: list[int] | None  # the given answer (+ end token), teacher-forced
    answer: list[int] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)  # [n, H] fp32 blocks, concatenated at the end
    slot: int = -1
    length: int = 0  # tokens of this row already in the arena
    generator: torch.Generator | None = None  # its own draws when sampling


class _Job:
    def __init__(
        self,
        serial: int,
        job_id: str,
        before: list[int],
        prefix: list[int],
        rows: list[_Row],
        width: int,
        slots: int,
        train_count: int,
    ):
        self.serial, self.id, self.before, self.prefix = serial, job_id, before, prefix
        self.rows, self.width, self.slots, self.train_count = rows, width, slots, train_count
        self.waiting = deque(rows)
        self.decoding: list[_Row] = []  # greedy rows in flight (they feed one token per step)
        self.free = list(range(slots))  # row slots, lowest first
        self.prefilled = 0
        self.unfinished = len(rows)
        self.arena_k: list[torch.Tensor | None] | None = None
        self.arena_v: list[torch.Tensor | None] | None = None
        for row in rows:
            row.job = self

    @classmethod
    def build(
        cls, serial, loaded, template, request: Job, answers: list[str] | None, ends, max_new_tokens, max_rows
    ) -> _Job:
        tokenizer = loaded.tokenizer
        if answers is not None and len(answers) != len(request.queries):
            raise FastsoftError(f"job {request.id!r}: {len(answers)} answers for {len(request.queries)} queries")
        split = [tokenize_query(tokenizer, template, q) for q in [*request.queries, *request.eval_queries]]
        before = split[0][0] if split else []
        prefix = before + encode(tokenizer, request.context)
        rows = []
        for i, (_, after) in enumerate(split):
            if not after:
                raise FastsoftError(
                    f"job {request.id!r}: the template leaves nothing between the context and the answer"
                )
            forced = None
            if answers is not None and i < len(request.queries) and answers[i] is not None:  # None: answer it
                forced = encode(tokenizer, answers[i]) + [ends[0]]
            total = len(prefix) + len(after) + (len(forced) if forced else max_new_tokens)
            check_length(
                loaded, request.id, total, "context + query + answer" if forced else "context + query + answer budget"
            )
            rows.append(_Row(None, i, after, forced))
        width = max((len(r.after) + (len(r.forced) - 1 if r.forced else max_new_tokens - 1) for r in rows), default=1)
        return cls(serial, request.id, before, prefix, rows, width, min(len(rows), max_rows), len(request.queries))

    def arena_length(self) -> int:
        return len(self.prefix) + self.slots * self.width

    def result(self) -> tuple[list[Taught], list[Taught]]:
        taught = [
            Taught(self.before, r.after, r.answer, torch.cat(r.states))
            for r in sorted(self.rows, key=lambda r: r.index)
        ]
        return taught[: self.train_count], taught[self.train_count :]


@dataclass(eq=False)
class _Part:
    """One job's tokens in a step, laid out ``[prefix chunk][joining rows][decoding rows]``."""

    job: _Job
    start: int  # offset of the part in the step's row
    chunk: tuple[int, int] | None = None  # (first prefix position, count)
    joins: list[tuple[_Row, int, int]] = field(default_factory=list)  # (row, offset in the step, tokens)
    decodes: list[tuple[_Row, int]] = field(default_factory=list)  # (row, offset in the step)
    write: torch.Tensor | None = None  # [n] arena positions of the part's tokens
    rows_start: int = 0  # offset of the first row token in the step
    end: int = 0


@dataclass(eq=False)
class _Step:
    parts: list[_Part]
    ids: torch.Tensor  # [Q]
    positions: torch.Tensor  # [Q]
    longest: int = 0  # the largest position in the step
    device_cache: dict = field(default_factory=dict)  # index tensors moved to the device once per step


def _plan(active: list[_Job], budget: int, max_rows: int) -> _Step:
    """Choose this step's tokens: every decoding row's next token, then prefix chunks and joining rows in
    admission order while the token budget and the number of rows in flight allow."""
    decoding = {job: list(job.decoding) for job in active}  # before this step's joins
    used = sum(len(rows) for rows in decoding.values())
    in_flight = used
    parts, ids, positions = [], [], []
    for job in active:
        P = len(job.prefix)
        part = _Part(job, len(ids))
        write = []
        if job.prefilled < P and used < budget:
            count = min(P - job.prefilled, budget - used)
            part.chunk = (job.prefilled, count)
            ids += job.prefix[job.prefilled : job.prefilled + count]
            positions += range(job.prefilled, job.prefilled + count)
            write += range(job.prefilled, job.prefilled + count)
            job.prefilled += count
            used += count
        part.rows_start = len(ids)
        if job.prefilled == P:
            while job.waiting and job.free and in_flight < max_rows:
                row = job.waiting[0]
                tokens = row.after + (row.forced[:-1] if row.forced else [])
                if used + len(tokens) > budget and used > 0:
                    break
                job.waiting.popleft()
                row.slot = job.free.pop(0)
                part.joins.append((row, len(ids), len(tokens)))
                base = P + row.slot * job.width
                ids += tokens
                positions += range(P, P + len(tokens))
                write += range(base, base + len(tokens))
                row.length = len(tokens)
                used += len(tokens)
                in_flight += 1
                if not row.forced:
                    job.decoding.append(row)
        for row in decoding[job]:
            part.decodes.append((row, len(ids)))
            ids.append(row.answer[-1])
            positions.append(P + row.length)
            write.append(P + row.slot * job.width + row.length)
            row.length += 1
        part.end = len(ids)
        if part.end > part.start:
            part.write = torch.tensor(write, dtype=torch.int64)
            parts.append(part)
    return _Step(
        parts,
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(positions, dtype=torch.int64),
        max(positions, default=0),
    )


def _advance(
    loaded, step: _Step, hidden: torch.Tensor, ends: list[int], max_new_tokens: int, sampling: Sampling | None = None
) -> None:
    """Read the step's outputs: teacher-forced rows finish; generating rows take their next token."""
    greedy, at = [], []
    for part in step.parts:
        for row, offset, count in part.joins:
            if row.forced:
                first = offset + len(row.after) - 1
                row.answer = list(row.forced)
                row.states = [hidden[first : first + len(row.forced)].float()]
                _finish(row)
            else:
                greedy.append(row)
                at.append(offset + count - 1)
        for row, offset in part.decodes:
            greedy.append(row)
            at.append(offset)
    if not greedy:
        return
    states = hidden[torch.tensor(at, device=hidden.device)].float()  # [R, H]
    logits = loaded.logits(states)
    if sampling is None:
        tokens = logits.argmax(-1).tolist()
    else:
        tokens = [_sample(logits[i], sampling, row.generator) for i, row in enumerate(greedy)]
    for i, (row, token) in enumerate(zip(greedy, tokens)):
        row.answer.append(token)
        row.states.append(states[i : i + 1])
        if token in ends or len(row.answer) >= max_new_tokens:
            _finish(row)


_NUCLEUS_FIRST = 256  # the most probable tokens looked at first: they hold the nucleus unless the step is very flat


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from ``softmax(logits / T)`` restricted to its top-p nucleus, drawn on the host with ``generator``.
    The nucleus comes from the top 256 (a 20th of sorting all V here) when they reach ``top_p``, else a full sort: the
    same prefix either way."""
    probs = torch.softmax(logits.double().cpu() / sampling.temperature, -1)
    sorted_probs, order = torch.topk(probs, min(_NUCLEUS_FIRST, probs.numel()))  # descending
    mass = sorted_probs.cumsum(0)
    if not float(mass[-1]) >= sampling.top_p:
        sorted_probs, order = probs.sort(descending=True)
        mass = sorted_probs.cumsum(0)
    keep = int((mass < sampling.top_p).sum()) + 1  # the smallest prefix reaching top_p
    nucleus = sorted_probs[:keep]
    return int(order[torch.multinomial(nucleus / nucleus.sum(), 1, generator=generator)])


def _finish(row: _Row) -> None:
    job = row.job
    if not row.forced:
        job.decoding.remove(row)
    job.free.append(row.slot)
    job.free.sort()
    row.slot = -1
    job.unfinished -= 1


# -- the attention --------------------------------------------------------------------------------


def _teacher_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, fastsoft_step: _Step | None = None, **kwargs
):
    """Attention for a teacher step: writes the step's keys/values into the job arenas, then attends each
    token to (its job's prefix) ⊕ (its own row), merged through the log-sum-exp. ``query [1, H, Q, D]``,
    ``key/value [1, KV, Q, D]`` (the step's new tokens only); returns ``[1, Q, H, D]``."""
    if fastsoft_step is None:
        raise FastsoftError("the fastsoft teacher attention runs only inside teach_jobs()")
    window = kwargs.get("sliding_window")
    if window is not None and fastsoft_step.longest >= window:
        raise FastsoftError(
            f"a sequence of {fastsoft_step.longest + 1} tokens exceeds this model's sliding attention window ({window}); "
            "the shared-context teacher supports full attention only"
        )
    layer, step = module.layer_idx, fastsoft_step
    _, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    device = query.device
    for part in step.parts:
        job = part.job
        if job.arena_k is None:
            layers = module.config.num_hidden_layers
            job.arena_k, job.arena_v = [None] * layers, [None] * layers
        if job.arena_k[layer] is None:
            shape = (1, kv_heads, job.arena_length(), dim)
            job.arena_k[layer] = key.new_zeros(shape)
            job.arena_v[layer] = value.new_zeros(shape)
        write = _on(step, ("write", id(part)), part.write, device)
        job.arena_k[layer].index_copy_(2, write, key[:, :, part.start : part.end])
        job.arena_v[layer].index_copy_(2, write, value[:, :, part.start : part.end])

    q = query[0]  # [H, Q, D]
    out_a = torch.zeros(heads, length, dim, device=device, dtype=torch.float32)
    lse_a = torch.full((heads, length), -math.inf, device=device)
    out_b = torch.zeros_like(out_a)
    lse_b = torch.full_like(lse_a, -math.inf)

    # (A) each token against the prefix before it: a chunk sees the prefix positions before the chunk, a row the whole prefix
    for part in step.parts:
        k, v = part.job.arena_k[layer], part.job.arena_v[layer]
        spans = []
        if part.chunk is not None and part.chunk[0] > 0:
            spans.append((part.start, part.rows_start, part.chunk[0]))
        if part.end > part.rows_start and part.job.prefix:
            spans.append((part.rows_start, part.end, len(part.job.prefix)))
        for lo, hi, visible in spans:
            qf = q[:, lo:hi].reshape(kv_heads, groups * (hi - lo), dim)[None]  # GQA folded into the query length
            o, s = attention_lse(qf, k[:, :, :visible], v[:, :, :visible], scale)
            out_a[:, lo:hi] = o[0].reshape(heads, hi - lo, dim)
            lse_a[:, lo:hi] = s[0].reshape(heads, hi - lo)

    # (B1) prefix chunks and joining rows: causal attention within their own new tokens
    pieces = []  # (step offset, tokens)
    for part in step.parts:
        if part.chunk is not None:
            pieces.append((part.start, part.chunk[1]))
        pieces += [(offset, count) for _, offset, count in part.joins]
    for group in group_by_length(pieces):
        _causal_pieces(step, q, key[0], value[0], group, groups, scale, out_b, lse_b)

    # (B2) decoding rows: their one new token against their own row in the arena
    decodes = [(part, row, offset) for part in step.parts for row, offset in part.decodes]
    if decodes:
        _decode_rows(step, q, layer, decodes, kv_heads, groups, scale, out_b, lse_b)

    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    out = (out_a * wa[..., None] + out_b * wb[..., None]) / (wa + wb)[..., None]
    return out.to(query.dtype).transpose(0, 1)[None], None


def _on(step: _Step, name, tensor: torch.Tensor, device) -> torch.Tensor:
    """A host index tensor on the device, moved once per step (every layer reuses it)."""
    cached = step.device_cache.get(name)
    if cached is None:
        cached = step.device_cache[name] = tensor.to(device, non_blocking=True)
    return cached


def _causal_pieces(step, q, key, value, pieces, groups, scale, out_b, lse_b) -> None:
    """Causal self-attention of several runs of consecutive step tokens, padded to one batch."""
    key_name = ("causal", tuple(pieces))
    index = step.device_cache.get(key_name)
    if index is None:
        index = step.device_cache[key_name] = bucket_index(pieces, q.device)
    gather, real, where = index
    heads, dim = q.shape[0], q.shape[-1]
    qb = q[:, gather].transpose(0, 1)  # [B, H, W, D]
    kb = key[:, gather].transpose(0, 1).repeat_interleave(groups, 1)  # [B, H, W, D]
    vb = value[:, gather].transpose(0, 1).repeat_interleave(groups, 1)
    o, s = attention_lse(qb, kb, vb, scale, causal=True)  # right padding is never seen by a real (causal) query
    out_b[:, real] = o.transpose(0, 1).reshape(heads, -1, dim)[:, where].float()
    lse_b[:, real] = s.transpose(0, 1).reshape(heads, -1)[:, where]


def _decode_plan(step: _Step, decodes, device):
    """What every layer's :func:`_decode_rows` needs of the step's decoding rows, made at the first layer: the widest
    row, each job's slot indices, and the rows' offsets in the step and valid-position mask, in job order."""
    plan = step.device_cache.get(("decode_plan",))
    if plan is None:
        width = max(row.length for _, row, _ in decodes)
        by_job: dict[_Job, list] = {}
        for part, row, offset in decodes:
            by_job.setdefault(part.job, []).append((row, offset))
        slots = [
            (job, torch.tensor([r.slot for r, _ in rows], dtype=torch.int64).to(device)) for job, rows in by_job.items()
        ]
        order = [entry for rows in by_job.values() for entry in rows]
        at = torch.tensor([offset for _, offset in order], dtype=torch.int64).to(device)
        lengths = torch.tensor([row.length for row, _ in order], dtype=torch.int64).to(device)
        seen = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [R, L]
        plan = step.device_cache[("decode_plan",)] = (width, slots, at, seen)
    return plan


def _decode_rows(step, q, layer, decodes, kv_heads, groups, scale, out_b, lse_b) -> None:
    """One new token per row against that row's tokens in its job's arena (small: done in fp32 by hand)."""
    heads, dim = q.shape[0], q.shape[-1]
    width, slots, at, seen = _decode_plan(step, decodes, q.device)
    keys, values = [], []
    for job, job_slots in slots:
        P = len(job.prefix)
        for arena, out in ((job.arena_k[layer], keys), (job.arena_v[layer], values)):
            region = arena[0, :, P:].reshape(kv_heads, job.slots, job.width, dim)[:, job_slots, :width]  # [KV, R, L, D]
            if region.shape[2] < width:
                region = F.pad(region, (0, 0, 0, width - region.shape[2]))
            out.append(region)
    k = torch.cat(keys, 1).float()  # [KV, R, L, D], rows in job order
    v = torch.cat(values, 1).float()
    qd = q[:, at].float().reshape(kv_heads, groups, len(at), dim)  # [KV, G, R, D]
    scores = torch.einsum("kgrd,krld->kgrl", qd, k) * scale
    scores = scores.masked_fill(~seen, -math.inf)
    s = torch.logsumexp(scores, -1)  # [KV, G, R]
    o = torch.einsum("kgrl,krld->kgrd", torch.softmax(scores, -1), v)
    out_b[:, at] = o.reshape(heads, len(at), dim)
    lse_b[:, at] = s.reshape(heads, len(at))
