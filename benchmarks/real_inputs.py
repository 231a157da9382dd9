"""Real-model rows for ``bench_softmax_kl.py --distributions real``: SmolLM2-135M-Instruct's own hidden states.

The embedded default model (``fastsoft.frozen.loading.load_model()``: the local GGUF, nothing downloaded), fp32, on the
CPU, reads ``examples/marrowick_island.txt`` and the ``context`` of every job in ``examples/jobs.jsonl``, each
text tokenised on its own (no special tokens). For every token with at least ``w`` tokens before it in its text:

- teacher hidden state: the model over its whole text up to and including the token (one causal pass a text);
- student hidden state: the model over only the ``w`` tokens before it and the token (a ``[B, w + 1]`` batch of
  windows, last position): a compressed-context student, as after partial training.

``w = 8`` gives the rows; when a benchmark wants more rows than the texts give, rows with a second window of
``w = 32`` follow; when still short, the rows repeat (cycled), which ``info["note"]`` and the caller say. With more
rows than wanted, ``N`` evenly spaced ones (deterministic). ``W`` is the model's lm_head ``[49152, 576]``.

Cached under ``~/.cache/fastsoft/bench/``: the rows by the texts' sha256, the model file and ``N``
(``real-<texts>-<model>-n<N>.pt``, 2 x N x 576 fp32), every token's rows of a window by the texts and the model file
(``pool-<texts>-<model>-w<8|32>.pt``: another N needs no model), ``W`` by the model file (``lm_weight-<model>.pt``,
113 MiB), so benchmark workers (one process a provider) load them in a fraction of a second instead of loading the
model (one to three minutes on 2 shared cores). Delete the folder to rebuild; bump ``VERSION`` when the
construction changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from common import ROOT

MODEL = "SmolLM2-135M-Instruct"
H, V = 576, 49152  # the model's hidden size and vocabulary: a real-distribution shape must have these
WINDOWS = (8, 32)  # the student's context: tokens before the row's token (first window, then the second one)
TEXTS = (ROOT / "examples" / "marrowick_island.txt", ROOT / "examples" / "jobs.jsonl")
CACHE_DIR = Path("~/.cache/fastsoft/bench").expanduser()
VERSION = 1
BATCH = 128  # student windows a forward pass


def texts() -> list[str]:
    """The island text, then each job's ``context``, in file order."""
    island, jobs = TEXTS
    out = [island.read_text()]
    out += [json.loads(line)["context"] for line in jobs.read_text().splitlines() if line.strip()]
    return out


def _model_key() -> tuple[str, str]:
    """The default model file's name and a short key of (name, size, construction version)."""
    from fastsoft.frozen.loading import default_model_path

    path = default_model_path()
    key = hashlib.sha256(f"{path.name}|{path.stat().st_size}|v{VERSION}".encode()).hexdigest()[:12]
    return path.name, key


def _save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file in the same folder, then rename: no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rows(n: int, log=print) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``(student [n, H], teacher [n, H], W [V, H], info)``, fp32 on the CPU, from the cache or built (and cached).

    ``log`` gets one line when the model has to be loaded. ``info``: the texts, token counts, rows per window,
    whether rows repeat (``note``), and the teacher's and student's mean entropy and top-1 probability, and the
    mean forward KL(teacher || student) over the ``n`` rows.
    """
    text_list = texts()
    text_sha = hashlib.sha256(json.dumps(text_list).encode()).hexdigest()[:12]
    model_file, model_key = _model_key()
    rows_path = CACHE_DIR / f"real-{text_sha}-{model_key}-n{n}.pt"
    w_path = CACHE_DIR / f"lm_weight-{model_key}.pt"
    if rows_path.is_file() and w_path.is_file():
        cached = torch.load(rows_path)
        return cached["student"], cached["teacher"], torch.load(w_path), cached["info"]

    model = _Lazy(text_list, n, log)
    if not w_path.is_file():
        W = model.get().lm_weight.detach().float().contiguous()
        if tuple(W.shape) != (V, H):
            raise RuntimeError(
                f"the default model's lm_head is {tuple(W.shape)}, not [{V}, {H}] as this benchmark assumes"
            )
        _save(W, w_path)
    W = torch.load(w_path)
    # every token's rows for a window, cached by (texts, model, window): another N needs no model
    pools = [_pool(model, CACHE_DIR / f"pool-{text_sha}-{model_key}-w{WINDOWS[0]}.pt", WINDOWS[0])]
    if n > len(pools[0]["student"]):
        pools.append(_pool(model, CACHE_DIR / f"pool-{text_sha}-{model_key}-w{WINDOWS[1]}.pt", WINDOWS[1]))
    first = len(pools[0]["student"])
    student = torch.cat([pool["student"] for pool in pools])
    teacher = torch.cat([pool["teacher"] for pool in pools])
    total, note = len(student), None
    if n <= first:  # evenly spaced over the first window's rows
        pick = _spread(first, n)
    elif n <= total:  # all of the first window's rows, then evenly spaced over the second's
        pick = torch.cat([torch.arange(first), first + _spread(total - first, n - first)])
    else:
        pick = torch.arange(n) % total
        note = (
            f"the texts give {total} rows ({first} with a {WINDOWS[0]}-token student window, "
            f"{total - first} with {WINDOWS[1]}); the {n} rows cycle through them: rows repeat"
        )
    student, teacher = student[pick].contiguous(), teacher[pick].contiguous()
    info = {
        "model": f"{MODEL} ({model_file}), fp32, CPU",
        "texts": [str(p.relative_to(ROOT)) for p in TEXTS],
        "texts_sha256": text_sha,
        "tokens_per_text": pools[0]["tokens_per_text"],
        "student_windows": list(WINDOWS[: len(pools)]),
        **{f"rows_window_{w}": len(pool["student"]) for w, pool in zip(WINDOWS, pools)},
        "rows": n,
        "rows_distinct": min(n, total),
        "note": note,
        **_stats(student, teacher, W),
    }
    _save({"student": student, "teacher": teacher, "info": info}, rows_path)
    return student, teacher, W, info


class _Lazy:
    """The model, its tokens of every text and every text's teacher hidden states, loaded on first use only."""

    def __init__(self, text_list: list[str], n: int, log):
        self.text_list, self.n, self.log, self.lm = text_list, n, log, None

    def get(self):
        if self.lm is None:
            from fastsoft.frozen.loading import load_model

            self.log(f"real distributions: loading {MODEL} on the CPU to build {self.n} rows (cached in {CACHE_DIR})")
            self.lm = load_model(device="cpu", dtype="fp32")
            self.ids = [self.lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.text_list]
            with torch.inference_mode():  # the teacher: one causal pass over each whole text, [L, H] a text
                self.full = [self.lm.hidden_states(input_ids=torch.tensor([t]))[0].float() for t in self.ids]
        return self.lm


def _pool(model: _Lazy, path: Path, w: int) -> dict:
    """``{"student" [R, H], "teacher" [R, H], "tokens_per_text"}`` of every token with ``w`` tokens before it in its
    text, in text and position order: cached at ``path``, else built with the model."""
    if path.is_file():
        return torch.load(path)
    lm = model.get()
    spans = [(k, i) for k, t in enumerate(model.ids) for i in range(w, len(t))]
    student = []
    with torch.inference_mode():
        for b in range(0, len(spans), BATCH):  # [B, w + 1] windows: the w tokens before, then the token; last position
            batch = torch.tensor([model.ids[k][i - w : i + 1] for k, i in spans[b : b + BATCH]])
            student.append(lm.hidden_states(input_ids=batch)[:, -1].float())
    pool = {
        "student": torch.cat(student).contiguous(),
        "teacher": torch.stack([model.full[k][i] for k, i in spans]).contiguous(),
        "tokens_per_text": [len(t) for t in model.ids],
    }
    _save(pool, path)
    return pool


def _spread(count: int, k: int) -> torch.Tensor:
    """``k <= count`` evenly spaced indices in ``[0, count)``, first and last included."""
    return torch.linspace(0, count - 1, k).round().long() if k > 1 else torch.zeros(k, dtype=torch.long)


def _stats(student: torch.Tensor, teacher: torch.Tensor, W: torch.Tensor, chunk: int = 256) -> dict:
    """Mean entropy and top-1 probability of teacher and student, and the mean KL(teacher || student), at T = 1."""
    sums = torch.zeros(5, dtype=torch.float64)
    for i in range(0, len(student), chunk):
        lp = torch.log_softmax(student[i : i + chunk] @ W.T, -1)
        lq = torch.log_softmax(teacher[i : i + chunk] @ W.T, -1)
        q, p = lq.exp(), lp.exp()
        sums += torch.stack(
            [
                -(q * lq).sum(-1).sum(),
                q.amax(-1).sum(),
                -(p * lp).sum(-1).sum(),
                p.amax(-1).sum(),
                (q * (lq - lp)).sum(-1).sum(),
            ]
        ).double()
    mean = (sums / max(1, len(student))).tolist()
    names = ("teacher_entropy_mean", "teacher_top1_mean", "student_entropy_mean", "student_top1_mean", "kl_mean")
    return {name: round(value, 4) for name, value in zip(names, mean)}
