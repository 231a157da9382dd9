"""Training objectives, all run through ``fastsoft.ops.softmax_kl``.

- ``kl``: forward KL(teacher || student) against the cached teacher distributions;
- ``rkl``: reverse KL(student || teacher), and ``jsd`` / ``jsd@BETA``: Jensen-Shannon with the teacher's weight 0.5 /
  ``BETA``; not linear in the teacher, so only against a teacher kind whose target type serves them (its
  ``DIVERGENCES``: dense, hidden; the settings check refuses the others);
- ``answer``: log-likelihood of the teacher's own greedy answer (one-hot targets);
- ``supervised``: log-likelihood of the given answers (plain prompt tuning).

A mixture is written ``kl:0.7,answer:0.3``. ``answer`` and ``supervised`` score different token
sequences, so they cannot be mixed with each other.

The objective names and their parser live here, with what they mean; the settings (``fastsoft/config.py``) take them.
"""

from __future__ import annotations

import math

import torch

from fastsoft.errors import FastsoftError
from fastsoft.frozen.attention import packed_attention
from fastsoft.frozen.packing import Segment, pack_shared, scored_hidden
from fastsoft.ops import SparseTarget, Target, softmax_kl
from fastsoft.ops.targets import as_target, one_of
from fastsoft.teacher.targets import kinds_serving

OBJECTIVES = ("kl", "rkl", "jsd", "answer", "supervised")
# the objectives against the teacher's distribution, and softmax_kl's divergence of each (the others are one-hot)
DIVERGENCE_OF = {"kl": "forward", "rkl": "reverse", "jsd": "jsd"}


def divergence_of(name: str) -> tuple[str, float] | None:
    """``softmax_kl``'s ``(divergence, beta)`` for a teacher objective's key (``kl``, ``rkl``, ``jsd``, ``jsd@BETA``),
    or None for the one-hot ones (``answer``, ``supervised``)."""
    base, _, beta = name.partition("@")
    if base not in DIVERGENCE_OF:
        return None
    return DIVERGENCE_OF[base], float(beta) if beta else 0.5


def parse_objective(text: str) -> dict[str, float]:
    """``"kl"`` -> ``{"kl": 1.0}``; ``"kl:0.7,answer:0.3"`` -> ``{"kl": 0.7, "answer": 0.3}``.

    Names: ``kl`` (forward KL(teacher || student)), ``rkl`` (reverse KL(student || teacher)), ``jsd`` (Jensen-Shannon
    with the teacher's weight 0.5) or ``jsd@BETA`` (teacher weight ``BETA`` strictly between 0 and 1, e.g.
    ``jsd@0.3:1.0``), ``answer``, ``supervised``. A JSD's key is ``"jsd"`` at 0.5 and ``"jsd@BETA"`` otherwise.
    Weights must be finite and at least 0, and not all 0. ``answer`` and ``supervised`` score different token
    sequences, so they cannot be mixed with each other.
    """
    if not isinstance(text, str):
        raise FastsoftError(f"--objective must be a string like kl or kl:0.7,answer:0.3, got {text!r}")
    weights = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        base, at, beta_text = name.partition("@")
        if base == "jsd" and at:
            try:
                beta = float(beta_text)
            except ValueError:
                raise FastsoftError(
                    f"--objective {name!r}: the JSD's teacher weight {beta_text!r} is not a number"
                ) from None
            if not 0 < beta < 1:
                raise FastsoftError(f"--objective {name!r}: the JSD's teacher weight must be strictly between 0 and 1")
            name = "jsd" if beta == 0.5 else f"jsd@{beta!r}"
        elif name not in OBJECTIVES:
            raise FastsoftError(
                f"--objective names an unknown objective {name!r}; choose kl, rkl, jsd (jsd@BETA: teacher weight BETA), "
                "answer or supervised, or a mixture like kl:0.7,answer:0.3"
            )
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise FastsoftError(f"--objective weight {weight!r} of {name!r} is not a number") from None
        if not (math.isfinite(value) and value >= 0):
            raise FastsoftError(f"--objective weight of {name!r} must be a finite number at least 0, got {weight}")
        if name in weights:
            raise FastsoftError(f"--objective names {name!r} twice")
        weights[name] = value
    if "answer" in weights and "supervised" in weights:
        raise FastsoftError("--objective cannot mix answer and supervised, which score different answers")
    if not any(weights.values()):
        raise FastsoftError(f"--objective weights are all zero in {text!r}")
    return weights


def job_loss_sums(
    loaded,
    prompts: torch.Tensor,
    segments: list[Segment],
    job_of_segment: list[int],
    jobs: int,
    teacher: Target | None,
    objective: dict[str, float],
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    attention: str | None = None,
    grad_filter: float = 0.0,
    share_prefix: bool = True,
) -> torch.Tensor:
    """One packed student step's summed token losses per job, for any objective mixture.

    Args:
        loaded: the frozen model (:class:`fastsoft.frozen.loading.LoadedModel`).
        prompts: ``[S, P, H]`` fp32 soft-prompt slots (normally requiring grad); segment ``i`` uses slot ``segments[i].slot``.
        segments: the step's sequences, packed into one padding-free row.
        job_of_segment: for each segment, its job's index in ``0 .. jobs - 1``.
        jobs: the number of jobs in the step.
        teacher: the KL targets of every scored token, in segment order (``len(teacher) = sum(len(s.answer))``); only
            read when the mixture has ``kl``, ``rkl`` or ``jsd`` (the last two need a target type that serves them). The
            ``answer`` and ``supervised`` terms score each segment's own answer tokens (the teacher's greedy answer,
            or the given one).
        objective: weights by name, as :func:`parse_objective` returns them.
        attention: overrides the packed attention implementation (``fastsoft.frozen.attention.packed_attention``'s choice).
        grad_filter: ``softmax_kl``'s gradient filter, for the terms whose target type and divergence it applies to
            (its ``GRAD_FILTER``: a compact teacher's KL; 0: exact).
        share_prefix: compute the segments' common template head once per model and each job's σ once per step
            instead of in every segment (:mod:`fastsoft.frozen.prefix`, :func:`fastsoft.frozen.packing.pack`; exact up to
            rounding); False runs every segment whole.

    Returns:
        ``[jobs]`` fp32 sums of the weighted token losses (differentiable w.r.t. ``prompts``); divide by each job's
        scored token count (:func:`tokens_per_job`) for its mean. Logits ``[N, V]`` are never materialised.
    """
    device = loaded.device
    row_job = [job for seg, job in zip(segments, job_of_segment) for _ in seg.answer]
    attention = attention or packed_attention(loaded)
    packed = pack_shared(loaded, segments, prompts.shape[1], attention, share_prefix)
    hidden = scored_hidden(loaded, prompts, packed, attention)  # [N, H]
    row_loss = torch.zeros(hidden.shape[0], device=device)
    for name, weight in objective.items():
        if weight == 0:
            continue
        divergence = divergence_of(name)
        if divergence is None:
            target = SparseTarget.one_hot(torch.tensor([t for s in segments for t in s.answer], device=device))
        elif teacher is None:
            raise FastsoftError(f"the {name} objective needs the teacher's targets, and none were given")
        elif divergence[0] not in type(as_target(teacher)).DIVERGENCES:
            raise FastsoftError(
                f"the {name} objective needs a {one_of(kinds_serving([divergence[0]]))} teacher (it is not linear in "
                f"the teacher); got a {type(as_target(teacher)).__name__}"
            )
        else:
            target = teacher.to(device)
        kind, beta = divergence or ("forward", 0.5)
        loss = softmax_kl(
            hidden,
            loaded.lm_weight,
            target,
            temperature=temperature,
            reduction="none",
            backend=backend,
            divergence=kind,
            beta=beta,
            grad_filter=grad_filter if kind in type(target).GRAD_FILTER else 0.0,
        )
        row_loss = row_loss + weight * loss
    return torch.zeros(jobs, device=device).index_add(0, torch.tensor(row_job, device=device), row_loss)


def tokens_per_job(segments: list[Segment], job_of_segment: list[int], jobs: int) -> torch.Tensor:
    """``[jobs]`` fp32 scored-token counts of a packed step (the denominators of the per-job mean losses)."""
    row_job = [job for seg, job in zip(segments, job_of_segment) for _ in seg.answer]
    return torch.bincount(torch.tensor(row_job, dtype=torch.long), minlength=jobs).to(torch.float32)
