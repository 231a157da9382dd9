"""Every setting is checked when the settings are built: a bad one is one sentence naming its flag, exit status 2,
before the model loads (CLI), and a FastsoftError at construction (API), before any work."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastsoft
import fastsoft.frozen.loading
from fastsoft.cli import main
from fastsoft.config import (
    BACKENDS,
    CACHE_DTYPES,
    DTYPES,
    INITS,
    PLACEMENTS,
    TEACHERS,
    CompressConfig,
    GenerateOptions,
    ModelOptions,
    RunOptions,
    settings_of,
)
from fastsoft.errors import FastsoftError


class ModelLoaded(Exception):
    """Raised instead of loading the model: a test that meets it validated too late."""


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded("the model was loaded before the settings were checked")

    monkeypatch.setattr(fastsoft.frozen.loading, "load_model", refuse)


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def files(tmp_path, tiny_job):
    (tmp_path / "ctx.txt").write_text(tiny_job.context)
    (tmp_path / "q.txt").write_text("\n".join(tiny_job.queries) + "\n")
    return tmp_path


def _compress_argv(files, model, extra):
    return [
        "compress",
        "--context",
        str(files / "ctx.txt"),
        "--queries",
        str(files / "q.txt"),
        "--out",
        str(files / "out"),
        "--model",
        str(model),
        "--steps",
        "2",
        "--no-progress",
        *extra,
    ]


def run(argv: list[str]) -> int:
    """``main``'s exit status, argparse's own refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "loading" not in err and "Traceback" not in err
    assert lines[0].startswith("fastsoft: error: ")
    return lines[0]


# (flags, what the sentence must contain); each sentence names its flag
CASES = [
    (["--backend", "bogus"], "--backend must be auto, triton, cpp or reference, got 'bogus'"),
    (["--backend", "triton", "--device", "cpu"], "--backend triton cannot run here"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:"], "--device"),
    (["--init", "bogus"], "--init must be context, pooled, vocab, text or random, got 'bogus'"),
    (["--init", "text"], "--init text needs --init-text"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--temperature", "-1"], "--temperature must be positive"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be positive"),
    (["--tol", "nan"], "--tol must be a finite number"),
    (["--tol", "-0.1"], "--tol must be at least 0"),
    (["--eval-fraction", "nan"], "--eval-fraction must be a finite number"),
    (["--eval-fraction", "1"], "--eval-fraction must be in [0, 1)"),
    (["--eval-fraction", "-0.2"], "--eval-fraction must be in [0, 1)"),
    (["--objective", "kl:0.7,answer:nan"], "--objective weight of 'answer' must be a finite number at least 0"),
    (["--objective", "kl:inf"], "--objective weight of 'kl' must be a finite number"),
    (["--objective", "kl:-1"], "--objective weight of 'kl' must be a finite number at least 0"),
    (["--objective", "kl:0,answer:0"], "--objective weights are all zero"),
    (["--objective", "kl:x"], "--objective weight 'x' of 'kl' is not a number"),
    (["--objective", "kld"], "--objective names an unknown objective 'kld'"),
    (["--objective", "kl,kl"], "--objective names 'kl' twice"),
    (["--objective", "answer,supervised"], "--objective cannot mix answer and supervised"),
    (["--dtype", "fp64"], "--dtype must be fp32, bf16 or fp16, got 'fp64'"),
    (["--template", "fancy"], "--template must be auto, chat or plain, got 'fancy'"),
    (["--placement", "middle"], "--placement must be template or first, got 'middle'"),
    (["--cache-dtype", "fp16"], "--cache-dtype must be bf16 or fp32, got 'fp16'"),
    (["--teacher", "fuzzy"], "--teacher must be dense, topk, sampled, hidden or compact, got 'fuzzy'"),
    (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    (["--topic-queries", "1"], "--topic-queries asks two questions a topic: give 0 or at least 2, got 1"),
    (
        ["--objective", "supervised", "--topic-queries", "4"],
        "and topic queries have none: use --topic-queries 0 (the default with supervised)",
    ),
    (
        ["--objective", "supervised", "--synthesize", "4"],
        "and synthetic queries have none: use --synthesize 0 (the default with supervised)",
    ),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),  # argparse's own refusal, on one line too
] + [
    ([f"--{name}", "0"], f"--{name} must be at least 1, got 0")
    for name in (
        "prompt-length",
        "steps",
        "batch-queries",
        "patience",
        "top-k",
        "samples",
        "max-new-tokens",
        "slots",
        "token-budget",
    )
]


@pytest.mark.parametrize("flags,message", CASES, ids=[" ".join(flags) for flags, _ in CASES])
def test_bad_setting_is_one_sentence_before_the_model_loads(files, tiny_model_dir, capsys, no_load, flags, message):
    assert run(_compress_argv(files, tiny_model_dir, flags)) == 2
    line = _one_error_line(capsys)
    assert message in line and flags[0] in line
    assert not (files / "out").exists()  # nothing written either


def test_triton_backend_refused_on_a_machine_without_cuda(files, tiny_model_dir, capsys, no_load, no_cuda, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run(_compress_argv(files, tiny_model_dir, ["--backend", "triton"])) == 2
    line = _one_error_line(capsys)
    assert "--backend triton cannot run here" in line and "TRITON_INTERPRET=1" in line


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_device_refused_without_cuda(files, tiny_model_dir, capsys, no_load, no_cuda, device):
    assert run(_compress_argv(files, tiny_model_dir, ["--device", device])) == 2
    assert f"--device {device} was asked for but no CUDA device is available" in _one_error_line(capsys)


def test_cpp_backend_refused_with_its_reason_when_unavailable(files, tiny_model_dir, capsys, no_load, monkeypatch):
    from fastsoft.ops import cpp

    monkeypatch.setattr(cpp, "is_available", lambda: (False, "the C++ backend failed to build just in time (test)"))
    assert run(_compress_argv(files, tiny_model_dir, ["--backend", "cpp", "--device", "cpu"])) == 2
    line = _one_error_line(capsys)
    assert "--backend cpp cannot run here: the C++ backend failed to build just in time (test)" in line


def test_generate_settings_checked_before_the_model_loads(tmp_path, capsys, no_load):
    base = ["generate", "--prompt", str(tmp_path / "no-prompt"), "--query", "Who?"]
    assert run([*base, "--device", "tpu"]) == 2
    assert "--device must be cpu, cuda or cuda:N" in _one_error_line(capsys)
    assert run([*base, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1, got 0" in _one_error_line(capsys)
    assert run([*base, "--dtype", "int8"]) == 2
    assert "--dtype must be fp32, bf16 or fp16" in _one_error_line(capsys)


def test_good_settings_go_on_to_load_the_model(files, tiny_model_dir, no_load):
    """The guard of the tests above: with valid settings the CLI does reach the model load."""
    with pytest.raises(ModelLoaded):
        main(_compress_argv(files, tiny_model_dir, ["--backend", "reference", "--device", "cpu", "--dtype", "fp32"]))


def test_module_entry_point_refuses_before_loading(tmp_path):
    """A fresh process, a model path that does not exist: the settings' sentence comes first, alone."""
    result = subprocess.run(
        [sys.executable, "-m", "fastsoft", "compress", "--context", "c.txt", "--queries", "q.txt", "--out", "o"]
        + ["--model", str(tmp_path / "no-model"), "--temperature", "inf"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == "fastsoft: error: --temperature must be a finite number, got inf\n"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_allowed_on_cpu_under_triton_interpret(tmp_path):
    """TRITON_INTERPRET=1 runs Triton on CPU tensors, so the check lets it through (to the model load)."""
    (tmp_path / "c.txt").write_text("Some context.")
    (tmp_path / "q.txt").write_text("A query?\n")
    result = subprocess.run(
        [sys.executable, "-m", "fastsoft", "compress", "--context", "c.txt", "--queries", "q.txt", "--out", "o"]
        + ["--model", str(tmp_path / "no-model"), "--device", "cpu", "--backend", "triton"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 2 and "--backend" not in result.stderr
    assert "loading" in result.stderr and "does not exist" in result.stderr


# -- the Python API -------------------------------------------------------------------------------------------------

_TYPES = {s.flag: s for cls in (CompressConfig, RunOptions, ModelOptions) for s in settings_of(cls)}


def _api_call(flags: list[str]):
    """The settings class and keyword arguments the CLI builds from ``flags``."""
    kwargs, owner = {}, CompressConfig
    for name, value in zip(flags[::2], flags[1::2]):
        s = _TYPES[name]
        kwargs[s.name] = s.kind(value)
        for cls in (RunOptions, ModelOptions):
            if any(t.name == s.name for t in settings_of(cls)):
                owner = cls
    return owner, kwargs


API_CASES = [(flags, message) for flags, message in CASES if "argument" not in message and "cannot run" not in message]


@pytest.mark.parametrize("flags,message", API_CASES, ids=[" ".join(flags) for flags, _ in API_CASES])
def test_api_refuses_at_construction_with_the_cli_sentence(files, tiny_model_dir, capsys, no_load, flags, message):
    owner, kwargs = _api_call(flags)
    with pytest.raises(FastsoftError) as refused:
        owner(**kwargs)
    assert run(_compress_argv(files, tiny_model_dir, flags)) == 2
    assert _one_error_line(capsys) == f"fastsoft: error: {refused.value}"


@pytest.mark.parametrize("name", [s.name for s in settings_of(CompressConfig) if s.kind is float])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_setting_refuses_inf_and_nan(name, value):
    with pytest.raises(FastsoftError, match=f"--{name.replace('_', '-')} must be a finite number"):
        CompressConfig(**{name: value})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps="3"), "--steps must be a whole number, got '3'"),
        (dict(steps=True), "--steps must be a whole number, got True"),
        (dict(lr="0.1"), "--lr must be a number, got '0.1'"),
        (dict(teacher=3), "--teacher must be dense, topk, sampled, hidden or compact, got 3"),
        (dict(objective=0.5), "--objective must be a string"),
        (dict(init_text=3), "--init-text must be a string, got 3"),
    ],
)
def test_api_refuses_wrong_types(kwargs, message):
    with pytest.raises(FastsoftError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        CompressConfig(**kwargs)


def test_backend_checked_on_the_device():
    CompressConfig(backend="reference").validate(device="cpu")
    CompressConfig(backend="auto").validate(device="cpu")
    with pytest.raises(FastsoftError, match="--backend triton cannot run here"):
        CompressConfig(backend="triton").validate(device="meta")


class _NoEngine:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the engine started although a setting was bad")


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(temperature=math.inf), "--temperature must be a finite number, got inf"),
        (dict(objective="kl:0.7,answer:nan"), "--objective weight of 'answer' must be a finite number"),
        (dict(init="bogus"), "--init must be context, pooled, vocab, text or random, got 'bogus'"),
        (dict(stepz=3), "unknown setting 'stepz'; did you mean 'steps'?"),
        (dict(wibble=3), "unknown setting 'wibble'; the settings are prompt_length, steps, "),
        (dict(checkpoint_every=0), "--checkpoint-every must be at least 1, got 0"),
        (dict(backend="triton"), "--backend triton cannot run here"),  # the tiny model is on the CPU
    ],
)
def test_compress_refuses_before_any_work(tiny, tiny_job, tmp_path, monkeypatch, settings, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fastsoft.api, "Engine", _NoEngine)
    with pytest.raises(FastsoftError) as refused:
        fastsoft.compress([tiny_job], tiny, tmp_path / "out", progress=False, **settings)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


# -- what did not change --------------------------------------------------------------------------------------------

DEFAULTS = {
    "prompt_length": 32,  # was 16 before bench_curves' prompt-length run (benchmarks/RESULTS.md, "Prompt length")
    "steps": 200,
    "lr": 0.1,
    "warmup": 10,
    "batch_queries": 4,
    "tol": 0.02,
    "patience": 5,
    "objective": "kl",
    "teacher": "compact",  # was "dense" before loss v2: the same forward KL, cached in H + 1 numbers a token
    "top_k": 64,
    "samples": 64,
    "cache_dtype": "fp32",
    "temperature": 1.0,
    "init": "context",
    "init_text": None,
    "placement": "template",
    "template": "auto",
    "max_new_tokens": 24,
    "eval_fraction": 0.2,
    "slots": 4,
    "token_budget": 4096,
    "seed": 0,
    "backend": "auto",
    # added with self-study and loss v2 (a checkpoint written before them is refused on --resume as other settings)
    "synthesize": None,  # None: 64 for a job without queries, 0 for one with queries
    "topic_queries": None,  # added with topic queries; None: likewise 64 or 0 (a checkpoint without it resumes)
    "synthesis_temperature": 0.6,
    "synthesis_top_p": 0.95,
    "grad_filter": 0.0,
    # added with the student step's issue
    "share_prefix": True,
    "min_improvement": 0.0,
}


def test_to_dict_is_the_same_plain_json_as_before():
    """Checkpoints compare it on --resume and exports store it: same keys, order, values and types."""
    plain = CompressConfig().to_dict()
    assert list(plain) == list(DEFAULTS) and plain == DEFAULTS
    assert [type(v) for v in plain.values()] == [type(v) for v in DEFAULTS.values()]
    custom = dict(objective="kl:0.7,answer:0.3", teacher="topk", top_k=8, lr=1, init="text", init_text="x", seed=-3)
    assert CompressConfig(**custom).to_dict() == {**DEFAULTS, **custom}
    assert type(CompressConfig(lr=1).to_dict()["lr"]) is int  # kept as given, as before
    assert json.loads(json.dumps(CompressConfig(**custom).to_dict())) == CompressConfig(**custom).to_dict()


def test_cli_defaults_are_the_config_defaults(files):
    from fastsoft.cli import _build, _parser

    args = _parser().parse_args(["compress", "--context", "c", "--queries", "q", "--out", "o"])
    assert _build(CompressConfig, args) == CompressConfig()
    assert _build(RunOptions, args) == RunOptions() and _build(ModelOptions, args) == ModelOptions()
    generate = _parser().parse_args(["generate", "--prompt", "p", "--query", "q"])
    assert _build(GenerateOptions, generate) == GenerateOptions()


def test_every_flag_has_its_fields_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping (argparse also breaks lines at hyphens)
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in (CompressConfig, RunOptions, ModelOptions):
        for s in settings_of(cls):
            assert s.help and s.flag in text and " ".join(s.help.split()) in text


def test_the_settings_take_their_choices_from_the_stages():
    """The vocabularies are the stages' own, defined once; config only collects them (and checks the settings)."""
    from fastsoft.data import templates
    from fastsoft.teacher import targets
    from fastsoft.train import objectives, prompt_init

    softmax_kl = importlib.import_module("fastsoft.ops.softmax_kl")  # fastsoft.ops.softmax_kl is also the function
    choices = {s.name: s.choices for s in settings_of(CompressConfig)}
    assert choices["teacher"] == TEACHERS == tuple(targets.KINDS)
    assert choices["cache_dtype"] == CACHE_DTYPES == tuple(targets.CACHE_DTYPES)
    assert choices["backend"] == BACKENDS == ("auto", *softmax_kl.BACKENDS)
    assert choices["init"] == INITS and INITS is prompt_init.INITS
    assert choices["placement"] == PLACEMENTS and PLACEMENTS is templates.PLACEMENTS
    assert choices["template"] == templates.TEMPLATE_KINDS
    assert fastsoft.config.parse_objective is objectives.parse_objective
    assert set(DTYPES) <= set(fastsoft.frozen.loading.DTYPES)


# -- the teacher kind follows the objective when it is not set ---------------------------------------------------

SERVED = {"kl": "forward", "rkl": "reverse", "jsd": "jsd", "jsd@0.3": "jsd"}


@pytest.mark.parametrize("objective", list(SERVED))
@pytest.mark.parametrize("kind", list(fastsoft.config.KINDS))
def test_an_explicit_kind_is_refused_exactly_where_its_target_type_does_not_serve(objective, kind):
    from fastsoft.teacher.targets import KINDS, kinds_serving

    divergence = SERVED[objective]
    if divergence in KINDS[kind].target_type.DIVERGENCES:
        assert CompressConfig(objective=objective, teacher=kind).teacher == kind
        return
    serving = kinds_serving([divergence])
    assert serving and kind not in serving
    with pytest.raises(FastsoftError) as refused:
        CompressConfig(objective=objective, teacher=kind)
    names = ", ".join(serving[:-1]) + " or " + serving[-1]
    assert str(refused.value) == (
        f"--objective {objective} needs --teacher {names} (it is not linear in the teacher); got --teacher {kind}"
    )


@pytest.mark.parametrize("kind", list(fastsoft.config.KINDS))
def test_grad_filter_is_refused_exactly_where_its_target_type_has_none(kind):
    from fastsoft.teacher.targets import KINDS

    if "forward" in KINDS[kind].target_type.GRAD_FILTER:
        CompressConfig(teacher=kind, grad_filter=1e-3)
    else:
        with pytest.raises(FastsoftError, match="^--grad-filter applies to the kl objective with --teacher compact"):
            CompressConfig(teacher=kind, grad_filter=1e-3)


@pytest.mark.parametrize(
    "objective,kind",
    [("kl", "compact"), ("answer", "compact"), ("supervised", "compact"), ("kl:0.7,answer:0.3", "compact")]
    + [("rkl", "hidden"), ("jsd", "hidden"), ("kl:0.5,jsd@0.3:0.5", "hidden"), ("kl:0,rkl:1", "hidden")],
)
def test_the_automatic_kind_serves_the_objective_and_says_so_once(objective, kind, capsys):
    config = CompressConfig(objective=objective)
    assert config.teacher == kind and config.to_dict()["teacher"] == kind  # stored resolved: checkpoints, exports
    assert config == CompressConfig(objective=objective, teacher=kind) == CompressConfig.from_dict(config.to_dict())
    err = capsys.readouterr().err
    if kind == "compact":
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("fastsoft: --objective ")
        assert f"needs a teacher that serves it, and the default compact does not: using --teacher {kind}" in err
    CompressConfig(objective=objective, teacher=kind)
    assert capsys.readouterr().err == ""  # a kind the user set is not announced


def test_the_default_run_is_unchanged():
    from fastsoft.teacher.targets import CacheSpec

    config = CompressConfig()
    assert config.teacher == "compact" and config.to_dict() == DEFAULTS
    for c in (config, CompressConfig(teacher="topk", top_k=8, temperature=2.0, cache_dtype="bf16")):
        assert CacheSpec.of(c) == CacheSpec(c.teacher, c.top_k, c.samples, c.temperature, c.cache_dtype)
    assert CacheSpec.of(config).params() == {"temperature": 1.0}  # the cache fingerprint's part, as before


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--objective", "rkl", "--teacher", "compact"], "--objective rkl needs --teacher dense or hidden"),
        (["--objective", "jsd", "--teacher", "topk"], "--objective jsd needs --teacher dense or hidden"),
        (["--objective", "rkl", "--grad-filter", "0.001"], "--grad-filter applies to the kl objective"),
    ],
)
def test_an_unserved_request_is_one_sentence(files, tiny_model_dir, capsys, no_load, flags, message):
    assert run(_compress_argv(files, tiny_model_dir, flags)) == 2
    assert message in _one_error_line(capsys)  # the automatic kind's note is not printed for a refused request


def test_rkl_with_the_default_teacher_trains(files, tiny_model_dir, capsys):
    flags = ["--objective", "rkl", "--prompt-length", "4", "--max-new-tokens", "4", "--device", "cpu"]
    assert run(_compress_argv(files, tiny_model_dir, flags)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "needs a teacher that serves it" in line]
    assert notes == ["fastsoft: --objective rkl needs a teacher that serves it, and the default compact does not: "
                     "using --teacher hidden"]  # fmt: skip
    (report,) = [json.loads(p.read_text()) for p in (files / "out").glob("*/report.json")]
    assert report["teacher"] == "hidden" and len(report["losses"]) == 2
