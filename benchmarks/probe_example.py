"""Held-out KL along short trainings of the shipped example, for choosing defaults (init, learning rate).

One model load and one teacher cache serve every setting; every ``--every`` steps the held-out token
KL with σ is measured against the no-context KL (``gap_closed``). This is how the defaults of command 1
were chosen (the curves are in ``benchmarks/results/compress-example-amd-epyc-x2.json``, ``probes``)::

    python benchmarks/probe_example.py '[{"init": "context", "lr": 0.03, "steps": 100}, {"init": "context", "lr": 0.1, "steps": 100}]'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402  (puts the checkout on sys.path)

import fastsoft  # noqa: E402
from fastsoft.config import CompressConfig  # noqa: E402
from fastsoft.data.jobs import job_from_files  # noqa: E402
from fastsoft.eval.evaluate import token_kl  # noqa: E402
from fastsoft.train.engine import Engine  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", help='JSON list of CompressConfig overrides, e.g. \'[{"lr": 0.1, "steps": 100}]\'')
    parser.add_argument("--every", type=int, default=25, help="steps between held-out measurements (default: 25)")
    args = parser.parse_args(argv)
    example = ROOT / "examples" / "marrowick_island"
    job = job_from_files(f"{example}.txt", f"{example}.queries.txt", f"{example}.eval.txt")
    loaded = fastsoft.load_model()
    work = Path(tempfile.mkdtemp(prefix="fastsoft-probe-"))
    for overrides in json.loads(args.settings):
        config = CompressConfig(**overrides)
        started, curve, kl_none = time.perf_counter(), [], {}

        def measure(run, kl: float) -> None:
            recent = run.losses[-5:]
            curve.append({"step": run.step, "train_loss_last5": round(sum(recent) / len(recent), 3), "heldout_kl": round(kl, 3),
                          "gap_closed": round(1 - kl / kl_none["value"], 3), "seconds": round(time.perf_counter() - started)})  # fmt: skip
            print(json.dumps({"settings": overrides, **curve[-1]}), flush=True)

        def at_step(runs):  # called before each step: the prompt in the bank has trained run.step steps
            (run,) = runs
            if "value" not in kl_none:
                kl_none["value"] = float(token_kl(loaded, None, run.teacher.eval)[0].mean())
            if run.step == 1 or (run.step and run.step % args.every == 0):
                measure(run, float(token_kl(loaded, engine.bank.get(run.slot), run.teacher.eval)[0].mean()))

        # the engine's own teacher pass and cache (taught once, then reused by every setting)
        engine = Engine(
            loaded, config, work / "out", cache_dir=work / "cache", progress=False, overwrite=True, on_step=at_step
        )
        (run,) = engine.run([job])
        if not curve or curve[-1]["step"] != run.step:  # the last point: what the run's own evaluation measured
            measure(run, run.report["kl_soft"])
        print(json.dumps({"settings": overrides, "kl_none": round(kl_none["value"], 3), "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
