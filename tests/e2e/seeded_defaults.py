"""Seeded tiny-model run at the default settings (compact teacher, shared prefix, fused layers, self-study): 15 steps.

Its per-step losses are the reference of the structure work (issue #28): recorded at main 728089b before any file moved,
and they must not change by a bit. Run by tests/e2e/test_seeded_losses.py in a fresh single-threaded process; rewrite
the reference only when a change is meant to alter the numbers:
``python tests/e2e/seeded_defaults.py > tests/e2e/seeded_defaults.json``.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny model of conftest.py

from conftest import CORPUS, build_model, build_tokenizer  # noqa: E402

import fastsoft  # noqa: E402


def run(out: Path) -> dict:
    """Two jobs (one with its own queries, one that studies itself) in two slots, 15 steps: ``{job: [loss.hex()]}``."""
    torch.set_num_threads(1)
    folder = out / "model"
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = fastsoft.load_model(folder)
    words = (" ".join(CORPUS[:2]) * 3).split()
    queries = ["What colour are the doors?", "Who is the mayor?", "How many goats?", "When is the festival?"]
    jobs = [
        fastsoft.Job("given", " ".join(words), queries, eval_queries=["Name the mayor."]),
        fastsoft.Job("studied", " ".join(words[5:] + words[:5]), eval_queries=["How many goats are there?"]),
    ]
    reports = fastsoft.compress(
        jobs, model, out / "run", steps=15, prompt_length=8, max_new_tokens=6, synthesize=6, topic_queries=6,
        slots=2, tol=0.0, progress=False,
    )  # fmt: skip
    return {r["job_id"]: [float(x).hex() for x in r.get("losses", [])] or r.get("error") for r in reports}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp)), indent=1))
