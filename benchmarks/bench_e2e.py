"""End to end: the shared-context teacher and packed multi-slot training, each side by side with its naive
counterpart in one run.

(a) Teacher, measured against the naive per-query full-context forward (the token ratio bounds the gain:
    (32 · (2048 + 96)) / (2048 + 32 · 96) = 13.4×). One job: |context| = 2048 tokens, 32 queries,
    query 48 + answer 48 tokens (47 + the end token), answers given (teacher forcing), hidden states at
    the answer positions (what the cache is built from). Providers: naive per query; naive in
    right-padded batches of 8; the context's KV cache repeated over the 32 queries with plain
    transformers (the foundation's teacher: 10.2× the naive one on an H100, our anchor); fastsoft ``teach_jobs``. Then the greedy
    variant (48 generated tokens): naive per query (prefill + cached greedy decode) vs fastsoft.
(b) Training throughput in scored tokens/s against PEFT prompt tuning (``PromptTuningConfig``, 32 virtual
    tokens, padded batches of 8, full logits, eager forward KL against the same cached dense teacher on
    the answer tokens, ``torch.optim.Adam``). 64 sequences per job: queries spread evenly over 16–512
    tokens, answers 32 tokens (31 + end). fastsoft: the same minibatches of 8, packed with no padding,
    fused softmax-KL, the prompt bank's Adam with the same settings, σ first (where PEFT puts it), same
    initial prompt: the two loss curves must coincide (up to bf16 noise). Then 4 jobs in 4 slots at once,
    each step packing all four jobs' minibatches (PEFT holds one prompt per model: it runs jobs one after
    the other, so its throughput is the 1-job figure).

Model (GPU): Llama-3.2-1B-shaped, random init (H 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192,
V 128256, tied embeddings), bf16, sdpa for the baselines. Tokens are words of a word-level tokenizer
(``t<id>``), so lengths are exact.

    python benchmarks/bench_e2e.py                 # GPU (about 2.5 minutes on an H100, estimated)
    python benchmarks/bench_e2e.py --cpu-small     # tiny random model on CPU, seconds (tests/e2e/test_benchmarks.py)

Writes ``benchmarks/results/e2e-<device>.json`` (after the teacher section, again after training) and the
``.png`` (loss curves side by side; without matplotlib: skipped, one line says so), and prints a table;
with ``--out DIR`` also there (``--cpu-small --out DIR``: only there). A baseline that does not run is
listed with its reason in the table and in the JSON's ``skipped``.

GPU time, estimated for an H100 (no GPU run yet): start-up and the model 25 s; teacher forcing 6 calls of
each of 4 methods, ~15 s; greedy: naive per query 32 × (prefill + 48 cached decode steps at ~15 ms) ≈ 25 s
after a one-query warm-up, fastsoft ~5 s; training: the fused loss's Triton compile and autotune ~30 s on a
cold cache, 24 steps each of 1 job, 4 jobs and PEFT ~15 s; about 2.5 minutes in all.

PEFT on a machine without it (nothing can be downloaded on the GPU machine): carry its wheel in ``.whl/``
(``bash benchmarks/fetch_gpu_wheels.sh --image-packages``; ``benchmarks/gpu_run.sh`` installs what is
there). Run by hand, a pure-Python ``.whl/peft-*.whl`` or ``benchmarks/wheels/peft-*.whl`` is imported
straight from the zip. Its dependencies (accelerate, psutil, huggingface_hub, safetensors, pyyaml,
packaging, tqdm) come with transformers and accelerate.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)
from common import ERRORED, ROOT, skip, sync, timed  # noqa: E402

VARIANTS = {
    "gpu": dict(
        model=dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            rope_theta=500000.0,
            initializer_range=0.02,
        ),
        dtype=torch.bfloat16,
        cache_dtype="bf16",
        teacher=dict(context=2048, queries=32, query=48, answer=48, greedy_new=48, reps=5),
        training=dict(
            sequences=64,
            shortest=16,
            longest=512,
            answer=32,
            prompt=32,
            batch=8,
            epochs=3,
            jobs=4,
            context=512,
            lr=1e-2,
        ),
        targets=dict(teacher=12.0, training=3.0),
    ),
    "cpu-small": dict(
        model=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            initializer_range=0.2,
        ),
        dtype=torch.float32,
        cache_dtype="fp32",
        teacher=dict(context=192, queries=8, query=12, answer=12, greedy_new=6, reps=1),
        training=dict(
            sequences=12, shortest=8, longest=48, answer=4, prompt=4, batch=4, epochs=3, jobs=2, context=32, lr=5e-2
        ),
        targets=dict(teacher=12.0, training=3.0),
    ),
}
EOS, PAD = 1, 2  # ids of the end and padding tokens (0 is unknown); every other id i is the word "t<i>"


# ------------------------------------------------------------------------------------------------------
# model, tokens, timing
# ------------------------------------------------------------------------------------------------------


def make_model(spec: dict, device: torch.device):
    """A random-init Llama of the variant's shape with a word-level tokenizer (the word ``t<id>`` is token id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fastsoft.frozen.loading import LoadedModel

    shape = spec["model"]
    vocab = {"<unk>": 0, "<eos>": EOS, "<pad>": PAD, **{f"t{i}": i for i in range(3, shape["vocab_size"])}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(
        **shape,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=EOS,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(spec["dtype"]).requires_grad_(False).eval()
    model.generation_config.eos_token_id = EOS
    return LoadedModel(
        model=model, tokenizer=tokenizer, path="random-init", fingerprint=f"bench-{shape['hidden_size']}"
    )


def words(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def random_ids(generator: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


def plain_template():
    from fastsoft.data.templates import Template

    return Template(head="", middle="", tail="", placement="template", kind="plain")  # prefix = the context's tokens


# ------------------------------------------------------------------------------------------------------
# (a) the teacher
# ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def naive_forced(loaded, prompts, answers, batch: int = 1):
    """Each ``context + query + answer`` forward on its own (or in right-padded batches): hidden states at the answer positions."""
    device, out = loaded.device, []
    for start in range(0, len(prompts), batch):
        rows = [p + a for p, a in zip(prompts[start : start + batch], answers[start : start + batch])]
        width = max(map(len, rows))
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        hidden = loaded.decoder(
            input_ids=ids, attention_mask=mask if batch > 1 else None, use_cache=False
        ).last_hidden_state
        for i, (p, a) in enumerate(zip(prompts[start : start + batch], answers[start : start + batch])):
            out.append(hidden[i, len(p) - 1 : len(p) + len(a) - 1])
    return out


@torch.no_grad()
def repeated_prefix_cache(loaded, context, queries, answers):
    """The foundation's teacher: the context encoded once, its DynamicCache repeated over every query, one padded forward."""
    device, P = loaded.device, len(context)
    cache = loaded.kv_cache(loaded.decoder(input_ids=torch.tensor([context], device=device), use_cache=True))
    rows = copy.deepcopy(cache)
    rows.batch_repeat_interleave(len(queries))
    suffixes = [q + a for q, a in zip(queries, answers)]
    width = max(map(len, suffixes))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in suffixes], device=device)
    real = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in suffixes], device=device)
    mask = torch.cat([torch.ones(len(suffixes), P, dtype=torch.long, device=device), real], 1)
    positions = P + torch.arange(width, device=device).expand(len(suffixes), width)
    hidden = loaded.decoder(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **loaded.kv_cache_arg(rows)
    ).last_hidden_state
    return [hidden[i, len(q) - 1 : len(q) + len(a) - 1] for i, (q, a) in enumerate(zip(queries, answers))]


@torch.no_grad()
def naive_greedy(loaded, prompts, new_tokens: int):
    """Per query: prefill the full prompt, then greedy decoding with transformers' cache."""
    device, out = loaded.device, []
    for prompt in prompts:
        step = loaded.decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        answer = []
        for i in range(new_tokens):
            token = int(loaded.logits(step.last_hidden_state[0, -1]).argmax())
            answer.append(token)
            if token == EOS or i == new_tokens - 1:
                break
            step = loaded.decoder(
                input_ids=torch.tensor([[token]], device=device),
                use_cache=True,
                **loaded.kv_cache_arg(loaded.kv_cache(step)),
            )
        out.append(answer)
    return out


def bench_teacher(loaded, spec: dict) -> dict:
    from fastsoft.data.jobs import Job
    from fastsoft.teacher.batching import teach_jobs

    cfg, device, vocab = spec["teacher"], loaded.device, loaded.vocab_size
    gen = torch.Generator().manual_seed(1)
    context = random_ids(gen, cfg["context"], vocab)
    queries = [random_ids(gen, cfg["query"], vocab) for _ in range(cfg["queries"])]
    answers = [random_ids(gen, cfg["answer"] - 1, vocab) + [EOS] for _ in range(cfg["queries"])]
    prompts = [context + q for q in queries]
    template = plain_template()
    request = Job("bench", words(context), [words(q) for q in queries], [words(a[:-1]) for a in answers])
    rows = []

    def add(method, mode, fn, reps=cfg["reps"], warmup=None):
        seconds, result = timed(fn, device, reps, warmup)
        rows.append({"method": method, "mode": mode, "seconds": seconds})
        print(f"  teacher {mode:7s} {method:34s} {seconds * 1e3:10.1f} ms", flush=True)
        return result

    naive = add("naive per query", "forced", lambda: naive_forced(loaded, prompts, answers))
    add("naive, batches of 8", "forced", lambda: naive_forced(loaded, prompts, answers, batch=8))
    add(
        "prefix cache repeated (foundation)", "forced", lambda: repeated_prefix_cache(loaded, context, queries, answers)
    )
    ours = add(
        "fastsoft shared context", "forced", lambda: teach_jobs(loaded, template, [request], cfg["answer"])["bench"][0]
    )
    assert [t.answer for t in ours] == answers and ours[0].after == queries[0]
    diff = max(float((t.hidden - h.float()).abs().max()) for t, h in zip(ours, naive))

    new = cfg["greedy_new"]
    greedy_request = Job("greedy", request.context, request.queries)
    naive_answers = add(
        "naive per query",
        "greedy",
        lambda: naive_greedy(loaded, prompts, new),
        reps=1,
        warmup=lambda: naive_greedy(loaded, prompts[:1], new),
    )  # one query warms every kernel of it
    greedy = add(
        "fastsoft shared context",
        "greedy",
        lambda: teach_jobs(loaded, template, [greedy_request], new)["greedy"][0],
        reps=1,
    )
    agree = sum(t.answer == a for t, a in zip(greedy, naive_answers)) / len(greedy)

    by = {(r["method"], r["mode"]): r["seconds"] for r in rows}
    for row in rows:
        row["speedup_vs_naive"] = by[("naive per query", row["mode"])] / row["seconds"]
    bound = (
        cfg["queries"]
        * (cfg["context"] + cfg["query"] + cfg["answer"])
        / (cfg["context"] + cfg["queries"] * (cfg["query"] + cfg["answer"]))
    )
    return {
        "context_tokens": cfg["context"],
        "queries": cfg["queries"],
        "query_tokens": cfg["query"],
        "answer_tokens": cfg["answer"],
        "greedy_new_tokens": new,
        "rows": rows,
        "speedup": by[("naive per query", "forced")] / by[("fastsoft shared context", "forced")],
        "speedup_greedy": by[("naive per query", "greedy")] / by[("fastsoft shared context", "greedy")],
        "token_ratio_bound": bound,
        "target": spec["targets"]["teacher"],
        "max_abs_diff": diff,
        "greedy_answers_agree": agree,
    }


# ------------------------------------------------------------------------------------------------------
# (b) training throughput
# ------------------------------------------------------------------------------------------------------


def training_data(loaded, spec: dict):
    """Sequences (query, answer) and their dense teacher log-probs from the full-context teacher."""
    from fastsoft.data.jobs import Job
    from fastsoft.teacher.batching import teach_jobs
    from fastsoft.teacher.targets import CacheSpec

    cfg, vocab = spec["training"], loaded.vocab_size
    gen = torch.Generator().manual_seed(2)
    lengths = torch.linspace(cfg["shortest"], cfg["longest"], cfg["sequences"]).round().long().tolist()
    queries = [random_ids(gen, n, vocab) for n in lengths]
    answers = [random_ids(gen, cfg["answer"] - 1, vocab) + [EOS] for _ in lengths]
    context = random_ids(gen, cfg["context"], vocab)
    request = Job("data", words(context), [words(q) for q in queries], [words(a[:-1]) for a in answers])
    taught = teach_jobs(loaded, plain_template(), [request], cfg["answer"])["data"][0]
    hidden = torch.cat([t.hidden for t in taught])
    logprobs = CacheSpec("dense", dtype=spec["cache_dtype"]).build(loaded.lm_weight, hidden).logprobs.to(loaded.device)
    offsets = [0]
    for a in answers:
        offsets.append(offsets[-1] + len(a))
    return queries, answers, logprobs, offsets


def batches(count: int, size: int, epochs: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(count, generator=gen).tolist()
        out += [order[i : i + size] for i in range(0, count, size)]
    return out


def initial_prompt(loaded, length: int, seed: int) -> torch.Tensor:
    ids = torch.randint(3, loaded.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    return loaded.embed.weight[ids.to(loaded.device)].detach().float().clone()  # [P, H]


def train_fastsoft(loaded, spec, data, jobs: int, attention: str | None):
    """``jobs`` prompts trained at once (one slot each), every step packing each job's minibatch of 8."""
    from fastsoft.frozen.packing import Segment
    from fastsoft.ops import DenseTarget
    from fastsoft.train.bank import PromptBank
    from fastsoft.train.objectives import job_loss_sums, tokens_per_job

    cfg, device = spec["training"], loaded.device
    queries, answers, logprobs, offsets = data
    bank = PromptBank(jobs, cfg["prompt"], loaded.hidden_size, device=device)
    for slot in range(jobs):
        bank.assign(slot, initial_prompt(loaded, cfg["prompt"], seed=slot))
    schedule = [batches(len(queries), cfg["batch"], cfg["epochs"], seed=3 + slot) for slot in range(jobs)]
    curves, times, scored, real = [[] for _ in range(jobs)], [], 0, 0
    for step in range(len(schedule[0])):
        sync(device)
        start = time.perf_counter()
        segments, rows, job_of_segment = [], [], []
        for slot in range(jobs):
            for i in schedule[slot][step]:
                segments.append(Segment(slot, [], queries[i], answers[i]))
                rows += range(offsets[i], offsets[i + 1])
                job_of_segment.append(slot)
        teacher = DenseTarget(logprobs[torch.tensor(rows, device=device)])
        sums = job_loss_sums(
            loaded, bank.prompts, segments, job_of_segment, jobs, teacher, {"kl": 1.0}, attention=attention
        )
        per_job = sums / tokens_per_job(segments, job_of_segment, jobs).to(device)
        per_job.sum().backward()
        bank.step({slot: cfg["lr"] for slot in range(jobs)})
        losses = per_job.detach().cpu().tolist()  # the host sync the engine also makes (per-job losses)
        sync(device)
        times.append(time.perf_counter() - start)
        if step > 0:  # the first step warms up (kernel autotuning, allocator)
            scored += len(rows)
            real += sum(seg.length(cfg["prompt"]) for seg in segments)
        for slot in range(jobs):
            curves[slot].append(losses[slot])
    seconds = sum(times[1:])
    return {
        "scored_tokens_per_s": scored / seconds,
        "real_tokens_per_s": real / seconds,
        "steps": len(times),
        "seconds": seconds,
    }, curves


def load_peft():
    """``(peft, None)``, or ``(None, why not)``; a pure-Python wheel in .whl/ or benchmarks/wheels/ is imported from its zip."""
    peft, why = common.optional_import("peft")
    if peft is not None:
        return peft, None
    wheels = sorted([*(ROOT / ".whl").glob("peft-*.whl"), *(ROOT / "benchmarks" / "wheels").glob("peft-*.whl")])
    if not wheels:
        return None, f"{why}; no peft wheel in .whl/ or benchmarks/wheels/"
    sys.path.insert(0, str(wheels[-1]))  # pure Python: importable from the zip
    peft, why_zip = common.optional_import("peft")
    return peft, None if peft is not None else f"{why}; {wheels[-1].name} did not import: {why_zip}"


def train_peft(loaded, spec, data, peft):
    """PEFT prompt tuning: padded batches, full logits, eager KL against the same teacher rows, torch Adam."""
    cfg, device = spec["training"], loaded.device
    queries, answers, logprobs, offsets = data
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg["prompt"], prompt_tuning_init="RANDOM"
    )
    model = peft.get_peft_model(loaded.model, config)
    embedding = model.prompt_encoder["default"].embedding
    with torch.no_grad():
        embedding.weight.copy_(initial_prompt(loaded, cfg["prompt"], seed=0).to(embedding.weight))
    optimizer = torch.optim.Adam([embedding.weight], lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    P, curve, times, scored, real = cfg["prompt"], [], [], 0, 0
    for step, batch in enumerate(batches(len(queries), cfg["batch"], cfg["epochs"], seed=3)):
        sync(device)
        start = time.perf_counter()
        seqs = [queries[i] + answers[i] for i in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, P + width, V], all of them
        where = [(b, P + len(queries[i]) - 1 + j) for b, i in enumerate(batch) for j in range(len(answers[i]))]
        picked = logits[
            torch.tensor([b for b, _ in where], device=device), torch.tensor([t for _, t in where], device=device)
        ]
        student = torch.log_softmax(picked.float(), -1)
        teacher = logprobs[
            torch.tensor([r for i in batch for r in range(offsets[i], offsets[i + 1])], device=device)
        ].float()
        loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        sync(device)
        times.append(time.perf_counter() - start)
        if step > 0:
            scored += len(where)
            real += sum(map(len, seqs)) + P * len(seqs)
        curve.append(value)
    seconds = sum(times[1:])
    return {
        "scored_tokens_per_s": scored / seconds,
        "real_tokens_per_s": real / seconds,
        "steps": len(times),
        "seconds": seconds,
    }, curve


def bench_training(loaded, spec: dict, skipped: list) -> dict:
    """Training throughput of fastsoft (1 job, then all jobs at once) and of PEFT; a PEFT that does not run goes to ``skipped``."""
    from fastsoft.frozen.attention import BUCKETS_ATTENTION, packed_attention

    cfg, device = spec["training"], loaded.device
    data = training_data(loaded, spec)
    rows, curves, notes = [], {}, []
    attention = packed_attention(loaded)

    def measure(method, fn):
        peak = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        stats, curve = fn()
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        rows.append({"method": method, **stats, "peak_extra_gib": peak})
        curves[method] = curve
        print(
            f"  training {method:28s} {stats['scored_tokens_per_s']:12.0f} scored tok/s {stats['real_tokens_per_s']:12.0f} tok/s",
            flush=True,
        )

    try:
        measure("fastsoft, 1 job", lambda: (lambda s, c: (s, c[0]))(*train_fastsoft(loaded, spec, data, 1, attention)))
    except Exception as error:  # noqa: BLE001 - a packed-attention backend this machine lacks: say so, fall back
        notes.append(
            f"packed attention {attention!r} failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"used {BUCKETS_ATTENTION} (sdpa per length bucket)"
        )
        attention = BUCKETS_ATTENTION
        measure("fastsoft, 1 job", lambda: (lambda s, c: (s, c[0]))(*train_fastsoft(loaded, spec, data, 1, attention)))
    jobs = cfg["jobs"]
    measure(
        f"fastsoft, {jobs} jobs in {jobs} slots",
        lambda: (lambda s, c: (s, c[0]))(*train_fastsoft(loaded, spec, data, jobs, attention)),
    )
    peft, why = load_peft()
    if peft is None:
        skip(skipped, "peft prompt tuning", why)
    else:
        try:
            measure("peft prompt tuning", lambda: train_peft(loaded, spec, data, peft))
        except Exception as error:  # noqa: BLE001 - the baseline's failure is reported, ours are not caught
            why = f"{ERRORED}: {common.error_text(error)}"
            skip(skipped, "peft prompt tuning", why)
            print(f"  training peft prompt tuning: {why}", flush=True)
    by = {r["method"]: r["scored_tokens_per_s"] for r in rows}
    base = by.get("peft prompt tuning")
    for row in rows:
        row["speedup_vs_peft"] = row["scored_tokens_per_s"] / base if base else None
    return {
        "sequences": cfg["sequences"],
        "query_tokens": [cfg["shortest"], cfg["longest"]],
        "answer_tokens": cfg["answer"],
        "prompt_length": cfg["prompt"],
        "batch": cfg["batch"],
        "epochs": cfg["epochs"],
        "lr": cfg["lr"],
        "attention": attention,
        "peft": getattr(peft, "__version__", None),
        "rows": rows,
        "curves": curves,
        "speedup": by[f"fastsoft, {jobs} jobs in {jobs} slots"] / base if base else None,
        "speedup_1_job": by["fastsoft, 1 job"] / base if base else None,
        "target": spec["targets"]["training"],
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    t, tr = result.get("teacher"), result.get("training")
    if t:
        print(
            f"\n(a) teacher on {result['device']}: |context| {t['context_tokens']}, {t['queries']} queries of {t['query_tokens']} + "
            f"{t['answer_tokens']} tokens (bound {t['token_ratio_bound']:.1f}x)"
        )
        print("| mode | method | seconds | vs naive |\n|---|---|---|---|")
        for row in t["rows"]:
            print(f"| {row['mode']} | {row['method']} | {row['seconds']:.4f} | {row['speedup_vs_naive']:.1f}x |")
        print(
            f"max |hidden diff| vs naive: {t['max_abs_diff']:.2e}; greedy answers agreeing with naive: {t['greedy_answers_agree']:.0%}"
        )
    if tr:
        print(
            f"\n(b) training, {tr['sequences']} sequences per job, queries {tr['query_tokens'][0]}-{tr['query_tokens'][1]} tokens, "
            f"answers {tr['answer_tokens']}, P = {tr['prompt_length']}, attention {tr['attention']}"
        )
        print("| method | scored tok/s | tok/s | vs PEFT | peak extra GiB |\n|---|---|---|---|---|")
        for row in tr["rows"]:
            vs = f"{row['speedup_vs_peft']:.2f}x" if row["speedup_vs_peft"] else "-"
            peak = f"{row['peak_extra_gib']:.2f}" if row["peak_extra_gib"] is not None else "-"
            print(
                f"| {row['method']} | {row['scored_tokens_per_s']:.0f} | {row['real_tokens_per_s']:.0f} | {vs} | {peak} |"
            )
        for note in tr["notes"]:
            print("note:", note)
    common.print_skipped(result["skipped"])
    speed = f"{t['speedup']:.1f}x (target {t['target']:.0f}x)" if t else "unmeasured"
    train = f"{tr['speedup']:.2f}x (target {tr['target']:.0f}x)" if tr and tr["speedup"] else "unmeasured"
    print(f"\nteacher speed-up {speed}; training speed-up vs PEFT {train}")


def rows_of(result: dict) -> list[dict]:
    """The teacher's seconds and speed-ups a method and mode, the training's scored tokens a second, speed-ups over
    PEFT and peak extra memory a method."""
    rows, t, tr = [], result.get("teacher"), result.get("training")
    if t:
        shape = (
            f"|c| {t['context_tokens']}, {t['queries']} queries of {t['query_tokens']} + {t['answer_tokens']} tokens"
        )
        for r in t["rows"]:
            case = f"teacher, {r['mode']}: {shape}"
            rows.append(common.row(case, r["method"], "time", r["seconds"], "s"))
            rows.append(common.row(case, r["method"], "speed-up over naive per query", r["speedup_vs_naive"], "x"))
    if tr:
        case = f"training: {tr['sequences']} sequences a job, P {tr['prompt_length']}, batches of {tr['batch']}"
        for r in tr["rows"]:
            rows.append(common.row(case, r["method"], "scored tokens a second", r["scored_tokens_per_s"], "tokens/s"))
            rows.append(common.row(case, r["method"], "speed-up over PEFT", r["speedup_vs_peft"], "x"))
            rows.append(common.row(case, r["method"], "peak extra memory", r["peak_extra_gib"], "GiB"))
    return rows


def run(quick: bool = False, device: str = "cpu", results: Path | None = None) -> common.Outcome:
    """The entry point's call (``benchmarks/run.py``): the GPU run, or on CPU its only variant, the smoke-size
    ``--cpu-small`` (with or without ``quick``)."""
    if device == "cuda" and quick:
        raise ValueError("e2e has no quick GPU variant (its smoke run is --device cpu)")
    return bench([*(["--cpu-small"] if device == "cpu" else []), *(["--results", str(results)] if results else [])])


def main(argv=None) -> int:
    return bench(argv).status


def bench(argv=None) -> common.Outcome:
    parser = common.parser(__doc__)
    parser.add_argument("--cpu-small", action="store_true", help="tiny random model on CPU (seconds)")
    args = parser.parse_args(argv)
    variant = "cpu-small" if args.cpu_small else "gpu"
    if variant == "gpu" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-small, or on a GPU machine", file=sys.stderr)
        return common.Outcome(2, [])
    spec = VARIANTS[variant]
    device = torch.device("cuda" if variant == "gpu" else "cpu")
    name = common.device_name(device.type)
    print(
        f"fastsoft end to end on {name} ({variant}): teacher against the naive per-query full-context forward, "
        f"training against PEFT prompt tuning"
    )
    import transformers

    skipped = []
    result = {
        **common.run_info(name, "bench_e2e.py", argv),
        "variant": variant,
        "transformers": transformers.__version__,
        "model": {**spec["model"], "dtype": str(spec["dtype"]).removeprefix("torch.")},
        "skipped": skipped,
    }
    stem = f"e2e-{common.file_tag(name, 'cpu-small' if args.cpu_small else '')}"
    dirs = common.out_dirs(args.out, only_out=args.cpu_small, results=args.results)

    def body():
        loaded = make_model(spec, device)
        result["teacher"] = bench_teacher(loaded, spec)
        common.save(result, stem, dirs)  # the teacher's numbers are kept whatever happens to the training part
        result["training"] = bench_training(loaded, spec, skipped)

    status = common.run_keeping_partial(result, body)
    print_table(result)
    print()
    return common.finish("e2e", result, stem, dirs, rows_of, args.cpu_small, status)


if __name__ == "__main__":
    sys.exit(main())
