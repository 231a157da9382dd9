"""Self-study: the frozen model writes a job's training queries itself, so a context alone is enough.

After Cartridges (Eyuboglu et al. 2025): each synthetic query pairs a chunk of the context with one seed instruction
(a factual question, a summary or restructuring request, a use case, a question joining two facts); the model, shown
only the chunk and the instruction through its own chat template, writes the request by sampling. The teacher then
answers every kept request with the *whole* context, as it answers hand-written queries.

- **Chunks** (:func:`plan`): first the fewest windows of the largest size in :data:`CHUNK_TOKENS` that cover the
  whole context (so any ``count`` at least that number covers all of it), then rounds of a seeded shuffle of
  half-overlapping windows of every size (capped at the context's length).
- **Writing** (:func:`synthesize`): one continuous batch over every job being admitted (``teach_jobs`` with
  :class:`~fastsoft.teacher.batching.Sampling`): each distinct chunk is one batch entry whose prefix is encoded once,
  its requests are rows. Each request draws from its own generator seeded by the job's seed and its index, so the same
  seed gives the same requests in another process or after ``--resume``.
- **Topic queries** (:mod:`fastsoft.teacher.topics`): two template questions about each name, number and identifier
  of the context, made without the model; they come first and pass the same filters (kind ``"topic"``, the span of
  the phrase's first occurrence).
- **Filters** (:func:`keep_requests`): empty, truncated (no end token within the budget), echoes of the
  instruction, duplicate and near-duplicate requests (ROUGE-L F >= :data:`NEAR_DUPLICATE`), verbatim copies of the
  chunk, and any that repeat a held-out query.
"""

from __future__ import annotations

import bisect
import json
import random
import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field

from fastsoft.data.jobs import Job
from fastsoft.data.templates import Template, encode, end_token_ids, make_template
from fastsoft.errors import FastsoftError
from fastsoft.teacher.batching import Sampling, teach_jobs
from fastsoft.teacher.topics import phrase_of, topic_queries
from fastsoft.text import rouge_l

# The seed instructions: the request must make sense without the excerpt (the student sees only σ and the request).
SEED_KINDS = {
    "fact": (
        "Write one question about a specific fact in the text above. Name what it is about, so that the question "
        "makes sense on its own. Write only the question."
    ),
    "detail": "Write one question about a number, a name, a place or a date given in the text above. Write only the question.",
    "summary": (
        "Write one request asking for a short summary of what the text above says about one of its topics. Name the "
        "topic. Write only the request."
    ),
    "structure": (
        "Write one request asking to list or organise some of the information in the text above, for example as a "
        "list of items or steps. Name the topic. Write only the request."
    ),
    "use": (
        "Write one question that someone who needs the information in the text above for a practical purpose would "
        "ask. Write only the question."
    ),
    "combine": (
        "Write one question whose answer needs two different facts from the text above. Write only the question."
    ),
}
# Examples in the instructions were tried and dropped: SmolLM2-135M copied their made-up names into its questions.
# factual questions most often: held-out use is mostly questions; the other kinds add variety
KIND_CYCLE = ("fact", "detail", "summary", "fact", "combine", "detail", "structure", "fact", "use")
CHUNK_TOKENS = (128, 256, 512)
NEAR_DUPLICATE = 0.8  # ROUGE-L F of two requests' words at or above which the later one is dropped
ECHO = 0.5  # ROUGE-L F with its own seed instruction at or above which a request only repeats the instruction
COPY_SHARE = 0.9  # a request whose words are this share of a contiguous run of the chunk's words copies it
MIN_WORDS = 3
DROP_REASONS = ("empty", "truncated", "echoes_instruction", "duplicate", "near_duplicate", "copies_context", "held_out")


@dataclass(frozen=True)
class SynthesisSettings:
    """How requests are written (part of the cache fingerprint; how many a job gets is in its digest)."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 48

    def fingerprint(self) -> dict:
        kinds, chunks = (
            list(KIND_CYCLE),
            list(CHUNK_TOKENS),
        )  # lists: the fingerprint is compared after a JSON round trip
        return {**asdict(self), "kinds": kinds, "chunks": chunks, "near_duplicate": NEAR_DUPLICATE}


@dataclass(frozen=True)
class Synthetic:
    """One kept request: its text, its seed kind and the context token span ``[start, end)`` it was written from."""

    query: str
    kind: str
    start: int
    end: int


@dataclass
class Synthesis:
    """A job's requests: the kept ones in order, and how many were dropped for each reason."""

    kept: list[Synthetic]
    dropped: dict[str, int] = field(default_factory=dict)


def plan(context_tokens: int, count: int, seed: int) -> list[tuple[str, int, int]]:
    """``count`` requests as ``(kind, start, end)``: windows of every chunk size covering the context, in turn."""
    if context_tokens < 1 or count < 1:
        return []
    rng = random.Random(f"selfstudy:{seed}")

    def spread(size: int, pieces: int) -> list[tuple[int, int]]:  # windows from one end to the other
        starts = sorted({round(i * (context_tokens - size) / max(1, pieces - 1)) for i in range(pieces)})
        return [(start, start + size) for start in starts]

    largest = min(max(CHUNK_TOKENS), context_tokens)
    cover = spread(largest, -(-context_tokens // largest))  # the fewest windows that cover the context: first
    windows = []
    for size in sorted({min(s, context_tokens) for s in CHUNK_TOKENS}):
        windows += spread(size, max(1, -(-2 * context_tokens // size) - 1))  # half-overlapping
    rng.shuffle(cover)
    order = cover[:]
    while len(order) < count:
        batch = windows[:]
        rng.shuffle(batch)
        order += batch
    kinds = list(KIND_CYCLE)
    rng.shuffle(kinds)
    return [(kinds[i % len(kinds)], *order[i]) for i in range(count)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _copies(request: list[str], chunk: list[str]) -> bool:
    """Whether the request's words are mostly one contiguous run of the chunk's words (a copied sentence)."""
    if len(request) < MIN_WORDS:
        return False
    best, previous = 0, [0] * (len(chunk) + 1)
    for word in request:  # longest common contiguous run, by dynamic programming
        current = [0] * (len(chunk) + 1)
        for j, other in enumerate(chunk, start=1):
            if word == other:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best >= COPY_SHARE * len(request)


def keep_requests(
    requests: list[tuple[str, bool, str, int, int]], chunks: dict[tuple[int, int], str], held_out: list[str]
) -> Synthesis:
    """Filter written requests ``(text, ended, kind, start, end)`` in order; ``chunks`` maps spans to their text.

    Drops, in this order of checks: ``empty`` (under :data:`MIN_WORDS` words), ``truncated`` (no end token),
    ``echoes_instruction`` (repeats its seed instruction, or speaks of "the text above"), ``held_out`` (a held-out
    query, or a near-duplicate of one), ``duplicate`` and ``near_duplicate`` (of a request
    kept earlier; topic queries, which share their template's words, only as exact duplicates), ``copies_context``
    (a run of the chunk's words, not a request about it).
    """
    kept: list[Synthetic] = []
    kept_words: list[str] = []
    written_words: list[str] = []  # near-duplicates are judged among model-written requests only: templates share words
    dropped: Counter = Counter()
    held = [" ".join(_words(q)) for q in held_out]
    for text, ended, kind, start, end in requests:
        text = " ".join(text.split())
        words = _words(text)
        norm = " ".join(words)
        if len(words) < MIN_WORDS:
            reason = "empty"
        elif not ended:
            reason = "truncated"
        elif kind in SEED_KINDS and (rouge_l(norm, " ".join(_words(SEED_KINDS[kind]))) >= ECHO or "text above" in norm):
            reason = "echoes_instruction"  # it talks about the task, not about the context
        elif any(norm == h or (_near(norm, h) if kind != "topic" else _near_topic(text, h)) for h in held):
            reason = "held_out"
        elif norm in kept_words:
            reason = "duplicate"
        elif kind != "topic" and any(_near(norm, k) for k in written_words):
            reason = "near_duplicate"
        elif _copies(words, _words(chunks[(start, end)])):
            reason = "copies_context"
        else:
            kept.append(Synthetic(text, kind, start, end))
            kept_words.append(norm)
            if kind != "topic":
                written_words.append(norm)
            continue
        dropped[reason] += 1
    return Synthesis(kept, {reason: dropped[reason] for reason in DROP_REASONS})


def _near(words: str, other: str) -> bool:
    return rouge_l(words, other) >= NEAR_DUPLICATE


def _near_topic(query: str, held: str) -> bool:
    """A topic question is near a held-out query only if that query names the same phrase (the templates' own words
    alone would make "What is Corrin?" near "What is the harbour?")."""
    phrase = " ".join(_words(phrase_of(query) or query))
    return f" {phrase} " in f" {held} " and _near(" ".join(_words(query)), held)


def _token_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each character span ``[start, end)`` of ``text``, the tokens ``[first, last)`` of ``encode(text)`` that
    hold it."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: count the tokens of what precedes
        out = []
        for start, end in spans:
            first = len(encode(tokenizer, text[:start].rstrip()))
            out.append((first, max(first + 1, len(encode(tokenizer, text[:end])))))
        return out
    ends, starts = [e for _, e in offsets], [s for s, _ in offsets]
    out = []
    for start, end in spans:
        first = bisect.bisect_right(ends, start)  # the first token ending after ``start``
        out.append((first, max(bisect.bisect_left(starts, end), first + 1)))
    return out


def synthesize(
    loaded,
    template: Template,
    jobs: list[tuple[Job, int, int]],
    settings: SynthesisSettings,
    *,
    topics: dict[str, int] | None = None,
    token_budget: int = 8192,
    max_rows: int = 64,
) -> dict[str, Synthesis | FastsoftError]:
    """Write and filter ``count`` requests for each ``(job, seed, count)``, all jobs in one continuous batch, after
    ``topics[job id]`` topic queries (:func:`~fastsoft.teacher.topics.topic_queries`; none when absent).

    Returns ``{job id: Synthesis}``, or the :class:`FastsoftError` of a job that cannot be synthesised (its chunks too
    long for the model); the other jobs are synthesised regardless. Nothing is written to disk here.
    """
    tokenizer = loaded.tokenizer
    frame = make_template(tokenizer, "template", template.kind)  # the request prompt: chunk, then the instruction
    entries, spans, seeds, chunk_text, asked = [], {}, {}, {}, {}
    for job, seed, count in jobs:
        ids = encode(tokenizer, job.context)
        questions = topic_queries(job.context, (topics or {}).get(job.id, 0))
        spans_of = _token_spans(tokenizer, job.context, [(t.start, t.end) for _, t in questions])
        asked[job.id] = [(query, True, "topic", *span) for (query, _), span in zip(questions, spans_of)]
        rows: dict[tuple[int, int], list[tuple[int, str]]] = {}
        for index, (kind, start, end) in enumerate(plan(len(ids), count, seed)):
            rows.setdefault((start, end), []).append((index, kind))
        spans_used = [*rows, *[(start, end) for *_, start, end in asked[job.id]]]
        chunk_text[job.id] = {span: tokenizer.decode(ids[span[0] : span[1]]).strip() for span in spans_used}
        for (start, end), members in rows.items():
            key = f"{job.id}\x00{start}:{end}"  # internal id of one chunk's batch entry
            entries.append(Job(key, chunk_text[job.id][(start, end)], [SEED_KINDS[k] for _, k in members]))
            spans[key] = (job.id, start, end, members)
            seeds[key] = zlib.crc32(f"{seed}:{start}:{end}".encode())
    sampling = Sampling(settings.temperature, settings.top_p, seeds)
    written = (
        teach_jobs(
            loaded, frame, entries, settings.max_tokens, token_budget=token_budget, max_rows=max_rows, sampling=sampling
        )
        if entries
        else {}
    )
    ends = set(end_token_ids(loaded))
    requests: dict[str, list] = {job.id: [None] * count for job, _, count in jobs}
    errors: dict[str, FastsoftError] = {}
    for key, result in written.items():
        job_id, start, end, members = spans[key]
        if isinstance(result, FastsoftError):
            errors[job_id] = FastsoftError(f"job {job_id!r}: self-study cannot write requests: {result}")
            continue
        for (index, kind), taught in zip(members, result[0]):
            ended = bool(taught.answer) and taught.answer[-1] in ends
            text = tokenizer.decode(taught.answer[:-1] if ended else taught.answer, skip_special_tokens=True)
            requests[job_id][index] = (text, ended, kind, start, end)
    out: dict[str, Synthesis | FastsoftError] = {}
    for job, _, _ in jobs:
        made = [*asked[job.id], *requests[job.id]]
        out[job.id] = errors.get(job.id) or keep_requests(made, chunk_text[job.id], job.eval_queries)
    return out


# -- a job with its synthetic queries -------------------------------------------------------------------------

QUERIES_FILE, SYNTHESIS_FILE = "synthetic_queries.jsonl", "synthesis.json"


def _held_out_units(kept: list[Synthetic]) -> list:
    """Which queries are held out together: a topic's two questions, and with them every written request that names
    the topic's phrase (one would give the others away); any other request alone (its index)."""
    phrases = {}
    for s in kept:
        if s.kind == "topic" and phrase_of(s.query):
            phrases.setdefault(" ".join(_words(phrase_of(s.query))), (s.start, s.end))
    units = []
    for i, s in enumerate(kept):
        if s.kind == "topic":
            units.append((s.start, s.end))
            continue
        padded = f" {' '.join(_words(s.query))} "
        units.append(next((unit for phrase, unit in phrases.items() if f" {phrase} " in padded), i))
    return units


def expand(job: Job, synthesis: Synthesis | None, eval_fraction: float, seed: int) -> tuple[Job, str]:
    """The job to train: its own queries plus the kept synthetic ones, and where its held-out queries come from.

    Held-out queries are the job's ``eval_queries`` when given (``"eval_queries"``); otherwise a seeded share of the
    synthetic queries (``"synthetic"``), which then never train; with no synthesis, a share of the job's own queries
    as before (``"queries"``); ``"none"`` when there is nothing to hold out. Given answers stay with their queries;
    synthetic queries are answered by the teacher (``None`` in ``answers``).
    """
    kept = synthesis.kept if synthesis else []
    synthetic = [s.query for s in kept]
    if not synthetic:
        split = job.with_eval_split(eval_fraction, seed)
        source = "eval_queries" if job.eval_queries else ("queries" if split.eval_queries else "none")
        return split, source
    held: list[str] = []
    unit_of = _held_out_units(kept)
    units = list(dict.fromkeys(unit_of))
    if not job.eval_queries and len(units) >= 2:
        random.Random(f"{seed}:{job.id}:selfstudy").shuffle(units)
        out = set(units[: max(1, round(eval_fraction * len(units)))])
        held = [q for q, unit in zip(synthetic, unit_of) if unit in out]
        synthetic = [q for q, unit in zip(synthetic, unit_of) if unit not in out]
    answers = None if job.answers is None else [*job.answers, *[None] * len(synthetic)]
    expanded = Job(job.id, job.context, [*job.queries, *synthetic], answers, job.eval_queries or held)
    return expanded, "eval_queries" if job.eval_queries else ("synthetic" if held else "none")


def save(folder, synthesis: Synthesis, held_out: list[str], stamp: dict) -> None:
    """``folder/synthetic_queries.jsonl`` (one kept request a line, with its span, kind and split), then
    ``folder/synthesis.json`` (``stamp``, the counts): written last, it marks the pair complete."""
    from fastsoft.io.atomic import write_json, write_text

    held = set(held_out)
    lines = [json.dumps({**asdict(s), "split": "eval" if s.query in held else "train"}) for s in synthesis.kept]
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / QUERIES_FILE, "".join(line + "\n" for line in lines))
    write_json(folder / SYNTHESIS_FILE, {**stamp, "kept": len(synthesis.kept), "dropped": synthesis.dropped})


def load(folder, stamp: dict) -> Synthesis | None:
    """The synthesis :func:`save` wrote with the same ``stamp``, or None (absent, incomplete or for other settings)."""
    try:
        meta = json.loads((folder / SYNTHESIS_FILE).read_text())
        lines = (folder / QUERIES_FILE).read_text().splitlines()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or {k: meta.get(k) for k in stamp} != stamp:
        return None
    try:
        kept = [json.loads(line) for line in lines if line.strip()]
        synthesis = Synthesis([Synthetic(k["query"], k["kind"], k["start"], k["end"]) for k in kept], meta["dropped"])
    except (ValueError, KeyError, TypeError):
        return None
    return synthesis if len(synthesis.kept) == meta.get("kept") else None
