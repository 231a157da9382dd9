"""Training objectives, all run through ``fastsoft.ops.softmax_kl``.

- ``kl``: forward KL(teacher || student) against the cached teacher distributions;
- ``rkl``: reverse KL(student || teacher), and ``jsd`` / ``jsd@BETA``: Jensen-Shannon with the teacher's weight 0.5 /
  ``BETA``; not linear in the teacher, so only against dense or hidden caches (the settings check refuses others);
- ``answer``: log-likelihood of the teacher's own greedy answer (one-hot targets);
- ``supervised``: log-likelihood of the given answers (plain prompt tuning).

A mixture is written ``kl:0.7,answer:0.3``. ``answer`` and ``supervised`` score different token
sequences, so they cannot be mixed with each other.
"""

from __future__ import annotations

import torch

from fastsoft.attention import packed_attention
from fastsoft.config import OBJECTIVES, parse_objective  # noqa: F401  (the objective's parser lives with the settings)
from fastsoft.errors import FastsoftError
from fastsoft.ops import CompactTarget, SparseTarget, Target, softmax_kl
from fastsoft.train.packing import Segment, pack_shared, scored_hidden


def divergence_of(name: str) -> tuple[str, float] | None:
    """``softmax_kl``'s ``(divergence, beta)`` for a teacher objective's key (``kl``, ``rkl``, ``jsd``, ``jsd@BETA``),
    or None for the one-hot ones (``answer``, ``supervised``)."""
    if name == "kl":
        return "forward", 0.5
    if name == "rkl":
        return "reverse", 0.5
    base, _, beta = name.partition("@")
    if base == "jsd":
        return "jsd", float(beta) if beta else 0.5
    return None


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
        loaded: the frozen model (:class:`fastsoft.models.LoadedModel`).
        prompts: ``[S, P, H]`` fp32 soft-prompt slots (normally requiring grad); segment ``i`` uses slot ``segments[i].slot``.
        segments: the step's sequences, packed into one padding-free row.
        job_of_segment: for each segment, its job's index in ``0 .. jobs - 1``.
        jobs: the number of jobs in the step.
        teacher: the KL targets of every scored token, in segment order (``len(teacher) = sum(len(s.answer))``); only
            read when the mixture has ``kl``, ``rkl`` or ``jsd`` (the last two need a dense or hidden one). The
            ``answer`` and ``supervised`` terms score each segment's own answer tokens (the teacher's greedy answer,
            or the given one).
        objective: weights by name, as :func:`parse_objective` returns them.
        attention: overrides the packed attention implementation (``fastsoft.attention.packed_attention``'s choice).
        grad_filter: ``softmax_kl``'s gradient filter for a compact teacher's KL term (0: exact).
        share_prefix: compute the segments' common template head once per model and each job's σ once per step
            instead of in every segment (:mod:`fastsoft.prefix`, :func:`fastsoft.train.packing.pack`; exact up to
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
        elif divergence[0] != "forward" and isinstance(teacher, (SparseTarget, CompactTarget)):
            raise FastsoftError(
                f"the {name} objective needs a dense or hidden teacher (it is not linear in the teacher); "
                f"got a {type(teacher).__name__}"
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
            grad_filter=grad_filter if isinstance(target, CompactTarget) else 0.0,
        )
        row_loss = row_loss + weight * loss
    return torch.zeros(jobs, device=device).index_add(0, torch.tensor(row_job, device=device), row_loss)


def tokens_per_job(segments: list[Segment], job_of_segment: list[int], jobs: int) -> torch.Tensor:
    """``[jobs]`` fp32 scored-token counts of a packed step (the denominators of the per-job mean losses)."""
    row_job = [job for seg, job in zip(segments, job_of_segment) for _ in seg.answer]
    return torch.bincount(torch.tensor(row_job, dtype=torch.long), minlength=jobs).to(torch.float32)
