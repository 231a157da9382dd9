"""Seeded tiny-model runs whose per-step losses must not change when the code is restructured: float.hex, to the bit.

Run by tests/e2e/test_seeded_losses.py in a fresh single-threaded process. Rewrite the reference only when a
change is meant to alter the numbers: ``python tests/e2e/seeded_losses.py > tests/e2e/seeded_losses.json``.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny model of conftest.py

from conftest import CORPUS, build_model, build_tokenizer  # noqa: E402

import fastsoft  # noqa: E402

CASES = {
    "kl-dense": dict(objective="kl", teacher="dense"),
    "kl-topk": dict(objective="kl", teacher="topk", top_k=8),
    "kl-sampled": dict(objective="kl", teacher="sampled", samples=16),
    "kl-hidden": dict(objective="kl", teacher="hidden"),
    "kl+answer": dict(objective="kl:0.7,answer:0.3", teacher="dense"),
}


def run(out: Path) -> dict:
    """Three jobs in two slots (so steps pack several jobs), six steps, for each case: ``{case: {job: [loss.hex()]}}``."""
    torch.set_num_threads(1)
    folder = out / "model"
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = fastsoft.load_model(folder)
    words = (" ".join(CORPUS[:2]) * 2).split()
    queries = ["What colour are the doors?", "Who is the mayor?", "How many goats?", "When is the festival?"]
    jobs = [
        fastsoft.Job(f"job{i}", " ".join(words[i:] + words[:i]), queries, eval_queries=["Name the mayor."])
        for i in range(3)
    ]
    result = {}
    for name, settings in CASES.items():
        reports = fastsoft.compress(
            jobs, model, out / name, steps=6, prompt_length=4, max_new_tokens=4, batch_queries=2, slots=2, tol=0.0,
            progress=False, share_prefix=False, **settings,
        )  # fmt: skip
        result[name] = {r["job_id"]: [float(x).hex() for x in r["losses"]] for r in reports}
    return result


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp)), indent=1))
