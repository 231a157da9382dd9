"""The Python API in a few lines::

import fastsoft
model = fastsoft.load_model()                      # SmolLM2-135M-Instruct, offline
job = fastsoft.Job("doc", context, queries=[...])
reports = fastsoft.compress([job], model, out="runs/doc", steps=150)    # any setting: prompt_length=64, ...
prompt, template, meta = fastsoft.load_prompt("runs/doc/doc")
print(fastsoft.generate(model, template, prompt, "Who founded it?"))
"""

from __future__ import annotations

from pathlib import Path

from fastsoft.config import CompressConfig, RunOptions
from fastsoft.data.jobs import Job
from fastsoft.pipeline.conductor import Engine


def compress(
    jobs: list[Job],
    model,
    out: str | Path,
    *,
    cache: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: int = 10,
    rebuild_cache: bool = False,
    dist=None,
    on_step=None,
    **config,
) -> list[dict]:
    """Learn one soft prompt per job; each is exported to ``out/<job id>/`` with its ``report.json``.

    ``config`` takes the fields of :class:`fastsoft.config.CompressConfig`. ``resume`` continues the run
    checkpointed in ``out`` (written every ``checkpoint_every`` steps and on Ctrl-C). ``dist`` is this
    process's :class:`fastsoft.distributed.Dist` under torchrun (``jobs`` are then this rank's). ``on_step(runs)`` is
    called at every training step with the jobs it trains (see :class:`fastsoft.pipeline.conductor.Engine`). Returns one
    dict per job: the report of a finished job, or ``{"job_id", "error"}`` for a failed one.

    Every setting is checked first, the backend on ``model``'s device included: a bad one (or an unknown key in
    ``config``) raises :class:`fastsoft.FastsoftError` before any work.
    """
    settings = CompressConfig.from_dict(config)
    settings.validate(device=model.device)
    options = RunOptions(
        checkpoint_every=checkpoint_every, overwrite=overwrite, resume=resume, rebuild_cache=rebuild_cache
    )
    engine = Engine(
        model,
        settings,
        out,
        cache_dir=cache,
        overwrite=options.overwrite,
        progress=progress,
        resume=options.resume,
        checkpoint_every=options.checkpoint_every,
        rebuild_cache=options.rebuild_cache,
        dist=dist,
        on_step=on_step,
    )
    return [
        run.report if run.report is not None else {"job_id": run.job.id, "error": run.error} for run in engine.run(jobs)
    ]
