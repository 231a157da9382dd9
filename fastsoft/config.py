"""Settings of a compression run (one dataclass; the CLI flags map onto it one to one)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fastsoft.errors import FastsoftError


@dataclass
class CompressConfig:
    prompt_length: int = 16
    steps: int = 200  # step budget per job
    lr: float = 0.1
    warmup: int = 10
    batch_queries: int = 4  # training queries of a job per step
    tol: float = 0.02  # a job converges when its mean loss over the last `patience` steps is below this
    patience: int = 5
    objective: str = "kl"
    teacher: str = "dense"  # cache kind: dense | topk | sampled | hidden
    top_k: int = 64
    samples: int = 64
    cache_dtype: str = "fp32"
    temperature: float = 1.0
    init: str = "context"
    init_text: str | None = None
    placement: str = "template"
    template: str = "auto"
    max_new_tokens: int = 24  # the facts come first; long greedy tails are mostly drift
    eval_fraction: float = 0.2
    slots: int = 4
    token_budget: int = 4096
    seed: int = 0
    backend: str = "auto"  # softmax_kl backend

    def validate(self) -> None:
        positive = (
            "prompt_length",
            "steps",
            "batch_queries",
            "max_new_tokens",
            "slots",
            "token_budget",
            "top_k",
            "samples",
            "patience",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise FastsoftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise FastsoftError(f"--lr must be positive, got {self.lr}")
        if not self.temperature > 0:
            raise FastsoftError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.eval_fraction < 1:
            raise FastsoftError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.warmup < 0 or self.tol < 0:
            raise FastsoftError("--warmup and --tol must not be negative")

    def to_dict(self) -> dict:
        return asdict(self)
