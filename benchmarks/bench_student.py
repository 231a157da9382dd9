"""The student step on the real default model on CPU: fastsoft against PEFT prompt tuning on the same job, the same
minibatches, the same initial prompt and the same learning-rate schedule, in one run.

Job: the shipped example (``examples/marrowick_island.txt``, its 32 training queries and 8 held-out ones) on the
default model (SmolLM2-135M-Instruct, GGUF, fp32, CPU). The teacher is built once, before any timing, with fastsoft's
own machinery (``teach_jobs`` with the default chat template, greedy answers of at most 24 tokens, then the default
cache kind of ``CompressConfig()``, the compact target); both students learn against that same teacher.

- fastsoft: what the engine's ``_step`` does for one job: the 4 queries' segments ``before + σ + after + answer``
  packed into one padding-free row, ``job_loss_sums`` (fused softmax-KL against the cached targets, no ``[N, V]``
  logits), the mean over the scored tokens, backward, ``PromptBank.step``. σ sits where the context was (inside
  the user turn, after the chat template's head), as the engine places it by default.
- PEFT, the way a PEFT user would: ``PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)`` and
  ``get_peft_model``; input the whole chat-templated query without the context and with the answer
  (``before + after + answer``), right-padded to a batch of 4 with its attention mask; the full logits
  ``[B, P + L, V]``; the eager forward KL at the answer positions against the teacher's dense log-probs
  (``log_softmax(hidden @ W^T)``, the distribution the compact target encodes, computed before timing);
  ``torch.optim.Adam`` with the bank's betas and eps, its learning rate set from the same schedule every step.
  PEFT can only put σ first, before the chat template's head; it cannot put it where the context was. The two
  students therefore do not follow the same loss curve (``bench_e2e.py`` compares them with σ at the same place).
- fastsoft, no shared prefix: ``job_loss_sums(..., share_prefix=False)`` (by default the template head's keys and
  values are computed once per model, and the job's σ once per step for its 4 segments): every segment run whole.

The same seeded sequence of minibatches of 4 query indices (epochs of a permutation of the 32) feeds every
student; init: ``init_prompt`` (the default: evenly spaced context tokens), copied into each; lr: ``lr_at(step,
steps, 0.1, 10)`` (the config's defaults). The students' steps are interleaved (one step of each per round, the
order alternating), so load from other processes falls on all of them alike.

Measured, in one run: seconds per step (median over the steps after the first, and its 20-80 % quantiles), scored
(answer) tokens per second, peak memory, and the held-out ``gap_closed`` (``fastsoft.eval.evaluate``: ``1 - KL with
σ / KL with no context``, token KL over the 8 held-out queries' answers) at step 0 and every ``--eval-every`` steps,
against the cumulative training wall-clock seconds (evaluation excluded). PEFT's σ is evaluated with σ first (the
held-out segments rewritten as ``before = []``, ``after = before + after``); the script checks on one held-out query
that this equals PEFT's own logits-based KL for the same σ (to 1e-4).

Peak memory (CPU, before training, on throwaway copies of each student): ``peak_tensor_mib``, the torch profiler's
memory timeline over one step (every tensor torch allocates, as ``torch.cuda.max_memory_allocated`` counts them on a
GPU) minus the tensors alive when the step starts (the model's weights, the teacher's targets); ``peak_rss_mib``,
the process's resident memory sampled every 2 ms in a thread during one step minus the value before it (after
``malloc_trim``), which also counts the allocator's slack.

    OMP_NUM_THREADS=2 python benchmarks/bench_student.py               # 200 steps on the 2-core machine: ~20 min
    python benchmarks/bench_student.py --steps 20                     # a short look (~3 min)
    python benchmarks/bench_student.py --smoke --out DIR              # the tests' tiny model (or --model DIR), seconds

Writes ``benchmarks/results/student-<device>[-smoke][-<label>].json``, at the end its rows into ``all.csv`` and the
figure ``student-<device>[-quick].png`` (``plot.py``: seconds a step, memory, held-out gap_closed, and the held-out
gap against training seconds), and prints a table; ``--smoke`` (the quick run) writes only into ``--out`` when
given without ``--results``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)
from common import ROOT  # noqa: E402

EXAMPLE = ROOT / "examples" / "marrowick_island"
FASTSOFT, PEFT, UNSHARED = "fastsoft", "peft prompt tuning", "fastsoft, no shared prefix"
SANITY_TOL = 1e-4


# ------------------------------------------------------------------------------------------------------
# the job, its teacher, the minibatches
# ------------------------------------------------------------------------------------------------------


def prepare(loaded, config, max_train: int | None = None):
    """The example job taught once: ``(job, template, train, held_out, targets, offsets, dense, init)``."""
    from fastsoft.data.jobs import job_from_files
    from fastsoft.data.templates import encode, make_template
    from fastsoft.errors import FastsoftError
    from fastsoft.teacher.batching import teach_jobs
    from fastsoft.teacher.targets import CacheSpec
    from fastsoft.train.prompt_init import init_prompt

    job = job_from_files(f"{EXAMPLE}.txt", f"{EXAMPLE}.queries.txt", f"{EXAMPLE}.eval.txt")
    if max_train:
        job = dataclasses.replace(job, queries=job.queries[:max_train])
    template = make_template(loaded.tokenizer, config.placement, config.template)
    taught = teach_jobs(loaded, template, [job], config.max_new_tokens, use_answers=True)[job.id]
    if isinstance(taught, FastsoftError):
        raise taught
    train, held_out = taught
    hidden = torch.cat([t.hidden for t in train])
    spec = CacheSpec(config.teacher, config.top_k, config.samples, config.temperature, config.cache_dtype)
    targets = spec.build(loaded.lm_weight, hidden, torch.Generator().manual_seed(config.seed))
    offsets = [0]
    for t in train:
        offsets.append(offsets[-1] + len(t.answer))
    dense = torch.log_softmax(loaded.logits(hidden) / config.temperature, -1)  # [R, V] what PEFT's KL reads
    context_ids = encode(loaded.tokenizer, job.context)
    init = init_prompt(
        loaded, context_ids, config.prompt_length, config.init, torch.Generator().manual_seed(config.seed)
    )
    return {
        "job": job,
        "template": template,
        "train": train,
        "held_out": held_out,
        "targets": targets,
        "offsets": offsets,
        "dense": dense,
        "init": init,
        "context_tokens": len(context_ids),
        "teacher_kind": spec.kind,
    }


def batches(count: int, size: int, steps: int, seed: int = 3) -> list[list[int]]:
    """``steps`` minibatches of ``size`` query indices: epochs of a seeded permutation of ``range(count)``."""
    gen, out = torch.Generator().manual_seed(seed), []
    while len(out) < steps:
        order = torch.randperm(count, generator=gen).tolist()
        out += [order[i : i + size] for i in range(0, count, size)]
    return out[:steps]


# ------------------------------------------------------------------------------------------------------
# the students
# ------------------------------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes on the cores slow every step)."""
    load = common.load_average()
    return [round(x, 2) for x in load] if load else None


class FastsoftStudent:
    """One job in slot 0 of a ``PromptBank``, trained as the engine's ``_step`` trains it."""

    def __init__(self, loaded, data, config, share_prefix: bool = True):
        from fastsoft.train.bank import PromptBank

        self.loaded, self.data, self.config, self.share_prefix = loaded, data, config, share_prefix
        self.bank = PromptBank(1, config.prompt_length, loaded.hidden_size, device=loaded.device)
        self.reset()

    def reset(self) -> None:
        self.bank.assign(0, self.data["init"])

    def step(self, batch: list[int], lr: float) -> tuple[float, int]:
        """One optimizer step on the minibatch; ``(mean token loss, scored tokens)``."""
        from fastsoft.frozen.packing import Segment
        from fastsoft.train.objectives import job_loss_sums, tokens_per_job

        cfg, train, offsets, targets = self.config, self.data["train"], self.data["offsets"], self.data["targets"]
        segments = [Segment(0, train[q].before, train[q].after, train[q].answer) for q in batch]
        job_of_segment = [0] * len(segments)
        parts = [targets[offsets[q] : offsets[q + 1]] for q in batch]
        counts = tokens_per_job(segments, job_of_segment, 1).to(self.loaded.device)
        teacher = type(parts[0]).concat(parts)
        sums = job_loss_sums(
            self.loaded,
            self.bank.prompts,
            segments,
            job_of_segment,
            1,
            teacher,
            {"kl": 1.0},
            temperature=cfg.temperature,
            backend=cfg.backend,
            grad_filter=cfg.grad_filter,
            share_prefix=self.share_prefix,
        )
        (sums / counts.clamp_min(1)).sum().backward()
        self.bank.step({0: lr})
        (loss,) = (sums.detach() / counts.clamp_min(1)).cpu().tolist()
        return loss, int(counts.sum())

    def prompt(self) -> torch.Tensor:
        return self.bank.get(0)

    def held_out(self) -> list:
        return self.data["held_out"]


class PeftStudent:
    """PEFT prompt tuning as its users write it: padded batches, full logits, eager KL, ``torch.optim.Adam``."""

    def __init__(self, model, loaded, data, config):
        self.model, self.loaded, self.data, self.config = model, loaded, data, config
        self.embedding = model.prompt_encoder["default"].embedding
        tokenizer = loaded.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.inputs = [t.before + t.after + t.answer for t in data["train"]]
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(self.data["init"].to(self.embedding.weight))
        # the bank's Adam: same betas and eps, no weight decay
        self.optimizer = torch.optim.Adam([self.embedding.weight], lr=self.config.lr, betas=(0.9, 0.999), eps=1e-8)

    def step(self, batch: list[int], lr: float) -> tuple[float, int]:
        P, train, offsets, device = (
            self.config.prompt_length,
            self.data["train"],
            self.data["offsets"],
            self.loaded.device,
        )
        seqs = [self.inputs[q] for q in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # [B, P + width, V], all of them
        where = [
            (b, P + len(train[q].before) + len(train[q].after) - 1 + j)
            for b, q in enumerate(batch)
            for j in range(len(train[q].answer))
        ]
        picked = logits[torch.tensor([b for b, _ in where]), torch.tensor([t for _, t in where])]
        student = torch.log_softmax(picked.float() / self.config.temperature, -1)
        rows = torch.tensor([r for q in batch for r in range(offsets[q], offsets[q + 1])], device=device)
        teacher = self.data["dense"].index_select(0, rows)
        loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), len(where)

    def prompt(self) -> torch.Tensor:
        return self.embedding.weight.detach().float().clone()

    def held_out(self) -> list:
        """The held-out queries with σ first, where PEFT puts it."""
        from fastsoft.teacher.batching import Taught

        return [Taught([], t.before + t.after, t.answer, t.hidden) for t in self.data["held_out"]]

    @torch.no_grad()
    def own_kl(self, query) -> float:
        """PEFT's own token KL on one held-out query (no padding), through its forward and full logits."""
        P, device = self.config.prompt_length, self.loaded.device
        ids = torch.tensor([query.before + query.after + query.answer], device=device)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        start = P + len(query.before) + len(query.after) - 1
        T = self.config.temperature
        student = torch.log_softmax(logits[start : start + len(query.answer)].float() / T, -1)
        teacher = torch.log_softmax(self.loaded.logits(query.hidden.to(device)) / T, -1)
        return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def heldout_kl(loaded, prompt, queries, temperature: float) -> float:
    from fastsoft.eval.evaluate import token_kl

    return float(token_kl(loaded, prompt, queries, temperature)[0].mean())


# ------------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------------


def peak_tensor_mib(fn) -> float | None:
    """Peak of torch's allocated tensors during ``fn()`` minus those alive when it starts (the profiler's timeline)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            fn()
        _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
        totals = [sum(s) for s in sizes]
        return (max(totals) - totals[0]) / 2**20 if totals else None
    except Exception as error:  # noqa: BLE001 - a private profiler API: without it, only the RSS figure
        print(f"  peak tensor memory unavailable: {common.error_text(error)}", flush=True)
        return None


def peak_rss_mib(fn) -> float | None:
    """Peak resident memory sampled every 2 ms during ``fn()``, minus the value before it."""
    psutil, _ = common.optional_import("psutil")
    if psutil is None:
        return None
    process, done, peak = psutil.Process(), threading.Event(), [0]
    common.malloc_trim()
    base = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (max(peak[0], process.memory_info().rss) - base) / 2**20


def measure_memory(student, batch: list[int], lr: float) -> dict:
    """On the student about to be trained: one warm-up step, one profiled, one RSS-sampled; then reset to the init."""
    student.step(batch, lr)
    tensor = peak_tensor_mib(lambda: student.step(batch, lr))
    rss = peak_rss_mib(lambda: student.step(batch, lr))
    student.reset()
    return {"peak_tensor_mib": tensor, "peak_rss_mib": rss}


# ------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------


def run_students(loaded, data, config, args, result: dict) -> None:
    from fastsoft.frozen.attention import packed_attention
    from fastsoft.ops.softmax_kl import resolve_backend
    from fastsoft.train.lr_schedule import lr_at

    peft, why = common.optional_import("peft")
    if peft is None:
        raise RuntimeError(f"PEFT is the baseline of this benchmark and it is {why}")
    steps, every, T = args.steps, args.eval_every, config.temperature
    schedule = batches(len(data["train"]), config.batch_queries, steps, seed=config.seed + 3)
    students = {FASTSOFT: FastsoftStudent(loaded, data, config, share_prefix=not args.no_share_prefix)}
    if not args.no_share_prefix:
        students[UNSHARED] = FastsoftStudent(loaded, data, config, share_prefix=False)
    # fastsoft's first loss before and after PEFT wraps the model: the wrapper must leave fastsoft's forward alone
    probe = FastsoftStudent(loaded, data, config)
    before = probe.step(schedule[0], 0.0)[0]
    model = peft.get_peft_model(
        loaded.model,
        peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=config.prompt_length, prompt_tuning_init="RANDOM"
        ),
    )
    model.eval()  # as the frozen model is (no dropout either way)
    probe.reset()
    after = probe.step(schedule[0], 0.0)[0]
    assert before == after, f"PEFT's wrapper changed fastsoft's loss: {before} -> {after}"
    students[PEFT] = PeftStudent(model, loaded, data, config)
    names = list(students)

    kl_none = heldout_kl(loaded, None, data["held_out"], T)
    check = {}

    def sanity(label: str) -> None:  # fastsoft's evaluation of PEFT's σ (σ first) is PEFT's own KL
        peft_student, query = students[PEFT], students[PEFT].held_out()[0]
        ours = heldout_kl(loaded, peft_student.prompt(), [query], T)
        theirs = peft_student.own_kl(data["held_out"][0])
        check[label] = {"fastsoft_token_kl": ours, "peft_logits_kl": theirs, "abs_diff": abs(ours - theirs)}
        assert abs(ours - theirs) < SANITY_TOL, f"σ-first evaluation differs from PEFT's own KL: {ours} vs {theirs}"

    sanity("init")
    print(f"  σ-first evaluation = PEFT's own KL on a held-out query: |diff| {check['init']['abs_diff']:.1e}")

    memory = {}
    for name in names:
        memory[name] = measure_memory(students[name], schedule[0], lr_at(0, steps, config.lr, config.warmup))
        m = memory[name]
        print(
            f"  memory {name:28s} peak tensors {m['peak_tensor_mib'] or float('nan'):8.1f} MiB"
            f"   peak RSS {m['peak_rss_mib'] or float('nan'):8.1f} MiB",
            flush=True,
        )

    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    scored = {n: [] for n in names}
    curves = {n: [] for n in names}

    def evaluate(step: int) -> None:
        for name, student in students.items():
            kl = heldout_kl(loaded, student.prompt(), student.held_out(), T)
            curves[name].append(
                {"step": step, "seconds": sum(times[name]), "kl_soft": kl, "gap_closed": 1 - kl / kl_none}
            )
        line = "  ".join(f"{n} {curves[n][-1]['gap_closed']:+.3f} ({curves[n][-1]['seconds']:.0f} s)" for n in names)
        print(f"  step {step:4d}  gap_closed  {line}", flush=True)

    evaluate(0)
    started = time.perf_counter()
    for step, batch in enumerate(schedule):
        lr = lr_at(step, steps, config.lr, config.warmup)
        for name in names if step % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            loss, n = students[name].step(batch, lr)
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss)
            scored[name].append(n)
        if (step + 1) % every == 0 or step + 1 == steps:
            evaluate(step + 1)
    wall = time.perf_counter() - started
    sanity("final")

    rest_of = lambda t: t[1:] or t  # the first step warms up
    rows = []
    for name in names:
        rest = rest_of(times[name])
        tokens = scored[name][1:] if times[name][1:] else scored[name]
        rows.append(
            {
                "method": name,
                "seconds_per_step": statistics.median(rest),
                "seconds_per_step_q20": common.quantiles_ms(rest)["q20_ms"] / 1e3,
                "seconds_per_step_q80": common.quantiles_ms(rest)["q80_ms"] / 1e3,
                "first_step_seconds": times[name][0],
                "training_seconds": sum(times[name]),
                "scored_tokens_per_s": sum(tokens) / sum(rest),
                **memory[name],
                "final_gap_closed": curves[name][-1]["gap_closed"],
                "final_loss": losses[name][-1],
            }
        )
    base = next(r for r in rows if r["method"] == PEFT)["seconds_per_step"]
    for row in rows:
        row["speedup_vs_peft"] = base / row["seconds_per_step"]
        # paired: PEFT's step over this method's step in the same round, median over the rounds after the first
        # (robust to load from other processes, which slows a whole round rather than one method)
        pairs = [p / t for p, t in zip(times[PEFT][1:], times[row["method"]][1:])] or [base / row["seconds_per_step"]]
        row["paired_speedup_vs_peft"] = statistics.median(pairs)
        row["fastest_step_seconds"] = min(rest_of(times[row["method"]]))
    result.update(
        {
            "rows": rows,
            "speedup": base / rows[0]["seconds_per_step"],
            "paired_speedup": rows[0]["paired_speedup_vs_peft"],
            "target": 2.0,
            "kl_none": kl_none,
            "curves": curves,
            "losses": losses,
            "times": times,
            "batches": schedule,
            "sanity_sigma_first": check,
            "fastsoft_share_prefix": not args.no_share_prefix,
            "attention": packed_attention(loaded),
            "backend": resolve_backend(config.backend, loaded.device)[0],
            "peft": peft.__version__,
            "interleaved_wall_seconds": wall,
        }
    )


def print_table(result: dict) -> None:
    if "rows" not in result:
        return
    print(
        f"\nstudent step on {result['device']}: {result['job']['train_queries']} training queries, batches of "
        f"{result['settings']['batch_queries']}, P = {result['settings']['prompt_length']}, {result['steps']} steps"
        f" (teacher {result['teacher_kind']}, softmax_kl {result['backend']}, attention {result['attention']})"
    )
    print(
        "| method | s/step (median) | fastest | vs PEFT | paired vs PEFT | scored tok/s | peak tensors MiB "
        "| peak RSS MiB | gap_closed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: format(x, spec) if x is not None else "-"
    for r in result["rows"]:
        print(
            f"| {r['method']} | {r['seconds_per_step']:.3f} | {r['fastest_step_seconds']:.3f} | "
            f"{r['speedup_vs_peft']:.2f}x | {r['paired_speedup_vs_peft']:.2f}x | "
            f"{r['scored_tokens_per_s']:.0f} | {fmt(r['peak_tensor_mib'], '.0f')} | {fmt(r['peak_rss_mib'], '.0f')} | "
            f"{r['final_gap_closed']:.3f} |"
        )
    print(
        f"\nfastsoft speed-up over PEFT: {result['speedup']:.2f}x in median seconds per step, "
        f"{result['paired_speedup']:.2f}x paired by round (target {result['target']:.0f}x); load average "
        f"{result.get('load_average_before')} before, {result.get('load_average_after')} after"
    )


def rows_of(result: dict) -> list[dict]:
    """A row a method and number: seconds a step (median, 20 / 80 % quantiles), scored tokens a second, the speed-up
    over PEFT (median and paired), peak memory and the held-out gap closed at the end; one case a run's setting."""
    if "rows" not in result:
        return []
    job, settings = result["job"], result["settings"]
    case = (
        f"{result['model_name']}, P {settings['prompt_length']}, {result['steps']} steps, {job['train_queries']} queries"
        f" in batches of {settings['batch_queries']}"
    )
    rows = []
    for r in result["rows"]:
        m = r["method"]
        q = (r["seconds_per_step_q20"], r["seconds_per_step_q80"])
        rows.append(common.row(case, m, "seconds a step", r["seconds_per_step"], "s", *q))
        rows.append(common.row(case, m, "scored tokens a second", r["scored_tokens_per_s"], "tokens/s"))
        rows.append(common.row(case, m, "speed-up over PEFT", r["speedup_vs_peft"], "x"))
        rows.append(common.row(case, m, "speed-up over PEFT, paired by round", r["paired_speedup_vs_peft"], "x"))
        rows.append(common.row(case, m, "peak tensors in a step", r["peak_tensor_mib"], "MiB"))
        rows.append(common.row(case, m, "peak RSS in a step", r["peak_rss_mib"], "MiB"))
        rows.append(common.row(case, m, "held-out gap_closed at the end", r["final_gap_closed"], ""))
    return rows


def run(quick: bool = False, device: str = "cpu", results: Path | None = None) -> common.Outcome:
    """The entry point's call (``benchmarks/run.py``): CPU only; ``quick`` is ``--smoke``."""
    if device != "cpu":
        raise ValueError("the student benchmark runs on CPU (the GPU's is bench_e2e's training part)")
    return bench([*(["--smoke"] if quick else []), *(["--results", str(results)] if results else [])])


def main(argv=None) -> int:
    return bench(argv).status


def bench(argv=None) -> common.Outcome:
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200; --smoke: 6)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (10)")
    parser.add_argument("--batch-queries", type=int, default=4, help="training queries per step (4)")
    parser.add_argument(
        "--prompt-length", type=int, default=None, help="P (16, the issue's; the CLI's default is 32; --smoke: 4)"
    )
    parser.add_argument("--label", default="", help="appended to the results' file name")
    parser.add_argument(
        "--model",
        default=None,
        help="model path (default: the embedded SmolLM2-135M-Instruct; --smoke: the tests' tiny one)",
    )
    parser.add_argument("--smoke", action="store_true", help="the quick run: a tiny model, 6 steps, 8 training queries")
    parser.add_argument("--no-share-prefix", action="store_true", help="fastsoft with share_prefix=False only")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.smoke else 200)
    args.eval_every = args.eval_every or (2 if args.smoke else 10)
    prompt_length = args.prompt_length or (4 if args.smoke else 16)
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be positive")

    import peft  # noqa: F401  (fail before the model loads when the baseline is missing)
    import transformers

    from fastsoft.config import CompressConfig
    from fastsoft.frozen.loading import load_model

    config = CompressConfig(
        prompt_length=prompt_length,
        steps=args.steps,
        batch_queries=args.batch_queries,
        **({"max_new_tokens": 6} if args.smoke else {}),
    )
    name = common.device_name("cpu")
    print(
        f"fastsoft's student step against PEFT prompt tuning on {name}, {torch.get_num_threads()} threads", flush=True
    )
    result = {
        **common.run_info(name, "bench_student.py", argv),
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "eval_every": args.eval_every,
        "settings": {
            k: v for k, v in config.to_dict().items() if k not in ("synthesis_temperature", "synthesis_top_p")
        },
        "load_average_before": load_average(),
    }
    stem = "-".join(["student", common.file_tag(name, "smoke" if args.smoke else "", args.label)])
    dirs = common.out_dirs(args.out, only_out=args.smoke, results=args.results)

    def body():
        started = time.perf_counter()
        if args.smoke and args.model is None:
            with tempfile.TemporaryDirectory() as tiny:
                loaded = load_model(common.tiny_model(Path(tiny) / "tiny-llama"))
        else:
            loaded = load_model(args.model)
        result["model_name"] = Path(loaded.path).name
        result["model"] = {"path": loaded.path, "hidden": loaded.hidden_size, "vocab": loaded.vocab_size}
        result["load_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        data = prepare(loaded, config, max_train=8 if args.smoke else None)
        result["teacher_seconds"] = time.perf_counter() - started
        result["teacher_kind"] = data["teacher_kind"]
        lengths = [len(t.before) + len(t.after) + len(t.answer) for t in data["train"]]
        result["job"] = {
            "context_tokens": data["context_tokens"],
            "train_queries": len(data["train"]),
            "held_out_queries": len(data["held_out"]),
            "before_tokens": len(data["train"][0].before),
            "answer_tokens": [len(t.answer) for t in data["train"]],
            "sequence_tokens_without_sigma": [min(lengths), max(lengths)],
        }
        print(
            f"  model {result['load_seconds']:.0f} s, teacher {result['teacher_seconds']:.0f} s: "
            f"{len(data['train'])} + {len(data['held_out'])} queries, context {data['context_tokens']} tokens",
            flush=True,
        )
        run_students(loaded, data, config, args, result)

    status = common.run_keeping_partial(result, body)
    result["load_average_after"] = load_average()
    print_table(result)
    print()
    return common.finish("student", result, stem, dirs, rows_of, args.smoke, status)


if __name__ == "__main__":
    sys.exit(main())
