"""Settings, checked when they are built: a bad one never reaches the model.

One dataclass per group of flags:

- :class:`CompressConfig`: the settings of a compression run, what ``fastsoft.compress(**config)`` takes; checkpoints
  and exports store them (:meth:`CompressConfig.to_dict`) and ``--resume`` compares them;
- :class:`RunOptions`: how a run is driven (checkpoints, resuming, overwriting); its results do not depend on them;
- :class:`ModelOptions`: which model to load, on which device, in which dtype (flags of both commands);
- :class:`GenerateOptions`: the other settings of ``fastsoft generate``.

Each field carries its help text and its bounds (:func:`setting`); a field with a fixed set of values has a
``Literal`` type. The command line builds its flags from these fields (``fastsoft/cli.py``), and building any of the
classes checks every field, raising :class:`FastsoftError` with one sentence that names the flag.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

from fastsoft.data.templates import PLACEMENTS, TEMPLATE_KINDS
from fastsoft.errors import FastsoftError
from fastsoft.ops.softmax_kl import BACKENDS as _BACKENDS
from fastsoft.ops.targets import one_of
from fastsoft.teacher import targets as _targets
from fastsoft.teacher.targets import DEFAULT_KIND, KINDS, automatic_kind, kinds_filtering, kinds_serving
from fastsoft.train.objectives import DIVERGENCE_OF, OBJECTIVES, divergence_of, parse_objective  # noqa: F401
from fastsoft.train.prompt_init import INITS

# The vocabularies are the stages' own (the teacher kinds: fastsoft/teacher/targets.py; the objectives:
# fastsoft/train/objectives.py; the initial prompts: train/prompt_init.py; placements and templates:
# data/templates.py; the backends: ops/softmax_kl.py); here they become the settings' Literal types.
Teacher = Literal[tuple(KINDS)]
CacheDtype = Literal[tuple(_targets.CACHE_DTYPES)]
Init = Literal[INITS]
Placement = Literal[PLACEMENTS]
TemplateKind = Literal[TEMPLATE_KINDS]
Backend = Literal[("auto", *_BACKENDS)]
Dtype = Literal["fp32", "bf16", "fp16"]

# Synthetic queries a job gets by default, without and with queries of its own (self-study;
# bench_selfstudy.py, a retired study in benchmarks/RESULTS.md, measured the choice)
SYNTHESIZE_DEFAULT = 64
SYNTHESIZE_DEFAULT_WITH_QUERIES = 0
# Template questions about the context's names, numbers and identifiers (fastsoft/teacher/topics.py), likewise
TOPIC_QUERIES_DEFAULT = 64
TOPIC_QUERIES_DEFAULT_WITH_QUERIES = 0

TEACHERS: tuple[str, ...] = get_args(Teacher)
CACHE_DTYPES: tuple[str, ...] = get_args(CacheDtype)
TEMPLATES: tuple[str, ...] = get_args(TemplateKind)
BACKENDS: tuple[str, ...] = get_args(Backend)
DTYPES: tuple[str, ...] = get_args(Dtype)


def setting(
    default: Any, help: str, *, at_least: float | None = None, above: float | None = None, below: float | None = None
) -> Any:
    """A dataclass field with its help text and bounds (``at_least <= value``, ``above < value``, ``value < below``)."""
    return field(default=default, metadata={"help": help, "at_least": at_least, "above": above, "below": below})


def flag(name: str) -> str:
    """The command-line flag of a field: ``prompt_length`` -> ``--prompt-length``."""
    return "--" + name.replace("_", "-")


class Setting(NamedTuple):
    """One field of a settings class, as the command line and the checks see it."""

    name: str
    flag: str
    kind: type  # bool, int, float or str (a Literal's values are strings)
    choices: tuple[str, ...] | None  # the values of a Literal field
    optional: bool  # None is allowed
    default: Any
    help: str
    at_least: float | None
    above: float | None
    below: float | None


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The fields of a settings dataclass, with their types resolved."""
    hints = get_type_hints(cls)
    result = []
    for f in fields(cls):
        kind, optional = hints[f.name], False
        if get_origin(kind) in (Union, types.UnionType):
            args = [a for a in get_args(kind) if a is not type(None)]
            optional, kind = len(args) < len(get_args(kind)), args[0]
        choices = get_args(kind) if get_origin(kind) is Literal else None
        meta = f.metadata
        result.append(
            Setting(
                f.name,
                flag(f.name),
                str if choices else kind,
                choices,
                optional,
                None if f.default is MISSING else f.default,
                meta.get("help", ""),
                meta.get("at_least"),
                meta.get("above"),
                meta.get("below"),
            )
        )
    return tuple(result)


def _bounds(s: Setting) -> str:
    if s.at_least is not None and s.below is not None:
        return f"in [{s.at_least}, {s.below})"
    if s.above == 0 and s.at_least is None and s.below is None:
        return "positive"
    bounds = (
        f"at least {s.at_least}" if s.at_least is not None else "",
        f"above {s.above}" if s.above is not None else "",
        f"below {s.below}" if s.below is not None else "",
    )
    return " and ".join(b for b in bounds if b)


def check_settings(obj) -> None:
    """Check every field of a settings dataclass against its type, choices and bounds."""
    for s in settings_of(type(obj)):
        value = getattr(obj, s.name)
        if value is None and s.optional:
            continue
        if s.choices is not None:
            if not isinstance(value, str) or value not in s.choices:
                raise FastsoftError(f"{s.flag} must be {one_of(s.choices)}, got {value!r}")
            continue
        if s.kind is bool:
            if not isinstance(value, bool):
                raise FastsoftError(f"{s.flag} must be True or False, got {value!r}")
            continue
        if s.kind is str:
            if not isinstance(value, str):
                raise FastsoftError(f"{s.flag} must be a string, got {value!r}")
            continue
        if s.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise FastsoftError(f"{s.flag} must be a whole number, got {value!r}")
        if s.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FastsoftError(f"{s.flag} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise FastsoftError(f"{s.flag} must be a finite number, got {value}")
        if (
            (s.at_least is not None and value < s.at_least)
            or (s.above is not None and not value > s.above)
            or (s.below is not None and not value < s.below)
        ):
            raise FastsoftError(f"{s.flag} must be {_bounds(s)}, got {value}")


def check_backend(backend: str, device) -> None:
    """Refuse an explicitly named softmax_kl ``backend`` that cannot run on ``device`` (may build the C++ one)."""
    if backend in ("auto", "reference"):
        return
    import torch

    from fastsoft.ops.softmax_kl import BackendUnavailable, resolve_backend

    try:
        resolve_backend(backend, torch.device(device))
    except BackendUnavailable as error:
        raise FastsoftError(f"--backend {backend} cannot run here: {error}") from None


def _divergences(objective: dict[str, float]) -> dict[str, str]:
    """``softmax_kl``'s divergence of each teacher term of a parsed objective, by its name."""
    return {name: divergence_of(name)[0] for name in objective if divergence_of(name) is not None}


def _kinds_help() -> tuple[str, str]:
    """The help of --teacher and the objective's sentence on teachers, both from the kind table."""
    order = [DEFAULT_KIND, *(name for name in KINDS if name != DEFAULT_KIND)]
    kinds = one_of([f"{name} ({KINDS[name].about})" for name in order])
    groups: dict[tuple[str, str], list[str]] = {}  # (kinds that serve it, automatic kind) -> objectives
    for name, divergence in DIVERGENCE_OF.items():
        if not KINDS[DEFAULT_KIND].serves([divergence]):
            key = (one_of(kinds_serving([divergence])), automatic_kind([divergence]))
            groups.setdefault(key, []).append(name)
    teacher = (
        f"teacher cache kind: {kinds}. Default: {DEFAULT_KIND}, or a kind that serves the objective: "
        + "; ".join(f"{kind} for {one_of(names)}" for (_, kind), names in groups.items())
    )
    needs = "; ".join(
        f"{one_of(names).replace(' or ', ' and ')} need{'s' if len(names) == 1 else ''} --teacher {serving} "
        f"({kind} when --teacher is not given)"
        for (serving, kind), names in groups.items()
    )
    return teacher, needs


_TEACHER_HELP, _OBJECTIVE_TEACHERS = _kinds_help()


@dataclass
class CompressConfig:
    """The settings of a compression run; :meth:`to_dict` is what exports and checkpoints store (plain JSON)."""

    # 32 over 16: +0.09 held-out gap closed on both contexts of the retired bench_curves study for 7-8 % more training
    # time (σ runs once a step); 64 adds 0.04-0.05 more for 13-17 % more but compresses a few hundred tokens only 6x
    # (benchmarks/RESULTS.md, "Prompt length")
    prompt_length: int = setting(32, "soft prompt length P (virtual tokens)", at_least=1)
    steps: int = setting(200, "step budget per job", at_least=1)
    lr: float = setting(0.1, "Adam learning rate", above=0)
    warmup: int = setting(10, "warmup steps", at_least=0)
    batch_queries: int = setting(4, "training queries of a job per step", at_least=1)
    tol: float = setting(
        0.02, "a job converges when its mean loss over the last --patience steps is below this", at_least=0
    )
    patience: int = setting(5, "steps averaged for the convergence test", at_least=1)
    objective: str = setting(
        "kl",
        "kl | rkl | jsd | answer | supervised, or a mixture like kl:0.7,answer:0.3. kl: forward KL(teacher || "
        "student); rkl: reverse KL(student || teacher); jsd: Jensen-Shannon, teacher weight 0.5, or jsd@BETA with "
        "weight BETA in (0, 1) (e.g. jsd@0.3:1.0). " + _OBJECTIVE_TEACHERS,
    )
    teacher: Teacher | None = setting(None, _TEACHER_HELP)
    top_k: int = setting(64, "ids kept by the topk teacher", at_least=1)
    samples: int = setting(64, "draws of the sampled teacher", at_least=1)
    cache_dtype: CacheDtype = setting("fp32", "storage of dense and hidden teacher caches")
    temperature: float = setting(1.0, "loss temperature", above=0)
    init: Init = setting(
        "context",
        (
            "initial prompt: context (evenly spaced context tokens), pooled (mean-pooled context chunks), "
            "vocab (sampled vocabulary rows), text (the tokens of --init-text) or random"
        ),
    )
    init_text: str | None = setting(None, "text for --init text")
    placement: Placement = setting(
        "template", "template (σ where the context was) | first (σ at position 0, identical under PEFT)"
    )
    template: TemplateKind = setting(
        "auto", "chat (the model's chat template), plain, or auto (chat when the tokenizer has one)"
    )
    # the facts come first; long greedy tails are mostly drift
    max_new_tokens: int = setting(24, "longest teacher/student answer", at_least=1)
    eval_fraction: float = setting(0.2, "share of queries held out when no eval queries are given", at_least=0, below=1)
    slots: int = setting(4, "prompt slots trained at once", at_least=1)
    token_budget: int = setting(4096, "packed tokens per step", at_least=1)
    seed: int = setting(0, "random seed")
    backend: Backend = setting("auto", "softmax_kl backend (auto: the fastest one that runs on the device)")
    synthesize: int | None = setting(
        None,
        "synthetic training queries per job, written by the model itself from chunks of the context (self-study), "
        f"used alongside the job's own queries; 0: the job's own queries only. Default: {SYNTHESIZE_DEFAULT} for a job "
        f"without queries, {SYNTHESIZE_DEFAULT_WITH_QUERIES} for one with queries, 0 with --objective supervised",
        at_least=0,
    )
    topic_queries: int | None = setting(
        None,
        "template questions per job about the names, numbers and identifiers of the context (two a topic, topics "
        "spread over the context; no model needed), used alongside the other queries; 0: none, else at least 2. "
        "Default: "
        f"{TOPIC_QUERIES_DEFAULT} for a job without queries, {TOPIC_QUERIES_DEFAULT_WITH_QUERIES} for one with "
        "queries, 0 with --objective supervised",
        at_least=0,
    )
    synthesis_temperature: float = setting(0.6, "sampling temperature of the synthetic queries", above=0)
    synthesis_top_p: float = setting(0.95, "nucleus (top-p) of the synthetic queries, in (0, 1]", above=0)
    grad_filter: float = setting(
        0.0,
        "gradient filter of the compact teacher's backward: skip vocabulary tiles whose share of the gradient is "
        "provably below this relative bound per token (0: exact; e.g. 1e-3)",
        at_least=0,
        below=1,
    )

    share_prefix: bool = setting(
        True,
        "compute the template head before σ once per model, and each job's σ once per step, and let every segment "
        "attend to their keys and values instead of running them in every segment of every step (exact up to "
        "rounding; --no-share-prefix turns both off)",
    )
    min_improvement: float = setting(
        0.0,
        "stop a job when its mean training loss over whole passes of its training queries (at least 8 steps) fell by "
        "less than this share of the window before (0, the default: train for the whole step budget; 0.01 saved "
        "12-28 % of the steps with hand-written queries but stopped self-study jobs too early)",
        at_least=0,
        below=1,
    )

    def __post_init__(self):
        automatic = self.teacher is None
        self.validate()  # resolves an automatic teacher: to_dict() (checkpoints, exports, reports) holds the kind
        if automatic and self.teacher != DEFAULT_KIND:
            from fastsoft.train.progress import RunProgress

            divergences = _divergences(parse_objective(self.objective))
            unserved = [name for name, d in divergences.items() if not KINDS[DEFAULT_KIND].serves([d])]
            RunProgress.note(
                f"--objective {unserved[0]} needs a teacher that serves it, and the default {DEFAULT_KIND} does not: "
                f"using --teacher {self.teacher}"
            )

    @classmethod
    def from_dict(cls, settings: dict) -> CompressConfig:
        """A config from keyword settings; an unknown key is refused with one sentence."""
        names = [f.name for f in fields(cls)]
        for key in settings:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the settings are {', '.join(names)}"
                raise FastsoftError(f"unknown setting {key!r}; {hint}")
        return cls(**settings)

    def validate(self, device=None) -> None:
        """Check every setting (it is done at construction); with ``device``, also that the backend runs there."""
        check_settings(self)
        objective = parse_objective(self.objective)
        divergences = _divergences(objective)
        if self.teacher is None:  # automatic: the default kind, or one that serves the objective
            self.teacher = automatic_kind(divergences.values())
        kind = KINDS[self.teacher]
        if self.grad_filter > 0 and not kind.target_type.GRAD_FILTER & set(divergences.values()):
            filtered = {d for k in KINDS.values() for d in k.target_type.GRAD_FILTER}
            names = one_of([name for name, d in DIVERGENCE_OF.items() if d in filtered])
            raise FastsoftError(
                f"--grad-filter applies to the {names} objective with --teacher {one_of(kinds_filtering(filtered))} "
                f"only (got --objective {self.objective} --teacher {self.teacher}); leave it at 0"
            )
        unserved = [name for name, divergence in divergences.items() if not kind.serves([divergence])]
        if unserved:
            raise FastsoftError(
                f"--objective {unserved[0]} needs --teacher {one_of(kinds_serving([divergences[unserved[0]]]))} (it is "
                f"not linear in the teacher); got --teacher {self.teacher}"
            )
        if self.synthesis_top_p > 1:
            raise FastsoftError(f"--synthesis-top-p must be in (0, 1], got {self.synthesis_top_p}")
        if self.topic_queries == 1:
            raise FastsoftError("--topic-queries asks two questions a topic: give 0 or at least 2, got 1")
        for flag, made, count in (
            ("--synthesize", "synthetic", self.synthesize),
            ("--topic-queries", "topic", self.topic_queries),
        ):
            if count and "supervised" in objective:
                raise FastsoftError(
                    f"--objective supervised trains on the given answers, and {made} queries have none: "
                    f"use {flag} 0 (the default with supervised)"
                )
        if self.init == "text" and not self.init_text:
            raise FastsoftError("--init text needs --init-text, the text whose tokens start the prompt")
        if device is not None:
            check_backend(self.backend, device)

    def to_dict(self) -> dict:
        return asdict(self)

    def _per_job(self, count: int | None, without: int, with_queries: int, has_queries: bool) -> int:
        """A count of made queries resolved for a job with or without queries of its own: as given; else none with
        the supervised objective (made queries have no answers); else the default for that kind of job."""
        if count is not None:
            return count
        if "supervised" in parse_objective(self.objective):
            return 0
        return with_queries if has_queries else without

    def synthetic_queries(self, has_queries: bool) -> int:
        """``synthesize`` resolved for a job with or without queries of its own (see the setting's help)."""
        return self._per_job(self.synthesize, SYNTHESIZE_DEFAULT, SYNTHESIZE_DEFAULT_WITH_QUERIES, has_queries)

    def topic_query_count(self, has_queries: bool) -> int:
        """``topic_queries`` resolved for a job with or without queries of its own (see the setting's help)."""
        return self._per_job(self.topic_queries, TOPIC_QUERIES_DEFAULT, TOPIC_QUERIES_DEFAULT_WITH_QUERIES, has_queries)

    def makes_queries(self, has_queries: bool) -> bool:
        """Whether a job gets queries beyond its own (written by the model, or about its topics)."""
        return bool(self.synthetic_queries(has_queries) or self.topic_query_count(has_queries))


@dataclass(frozen=True)
class RunOptions:
    """How a run is driven; the keyword options of :func:`fastsoft.compress` of the same names."""

    checkpoint_every: int = setting(10, "steps between checkpoints", at_least=1)
    overwrite: bool = setting(False, "replace finished jobs' exports in OUT")
    resume: bool = setting(False, "continue the run checkpointed in OUT (same jobs and settings)")
    rebuild_cache: bool = setting(False, "rebuild a mismatched or corrupted teacher cache instead of refusing it")

    def __post_init__(self):
        check_settings(self)


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load, where, and in which dtype."""

    model: str | None = setting(
        None, "Hugging Face model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    device: str | None = setting(None, "cpu, cuda or cuda:N (default: cuda when available)")
    dtype: Dtype | None = setting(None, "dtype of the model's weights (default: bf16 on cuda, fp32 on cpu)")

    def __post_init__(self):
        check_settings(self)
        if self.device is None:
            return
        if not _DEVICE.fullmatch(self.device):
            raise FastsoftError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise FastsoftError(f"--device {self.device} was asked for but no CUDA device is available")
            index, count = int(self.device.partition(":")[2] or 0), torch.cuda.device_count()
            if index >= count:
                raise FastsoftError(f"--device {self.device} names a GPU this machine does not have ({count} found)")

    def resolve(self, local_rank: int = 0) -> tuple[str, str]:
        """``(device, dtype)`` to load on: ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; bf16 on CUDA."""
        import torch

        device = self.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        return device, self.dtype or ("bf16" if device.startswith("cuda") else "fp32")


@dataclass(frozen=True)
class GenerateOptions:
    """Settings of ``fastsoft generate`` beyond the model's."""

    max_new_tokens: int = setting(64, "longest answer", at_least=1)

    def __post_init__(self):
        check_settings(self)
