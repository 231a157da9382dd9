"""The README's promises: its Python blocks run as written, CI runs its test command."""

from __future__ import annotations

from pathlib import Path

import torch

import fastsoft


def test_ci_runs_exactly_the_readme_test_command():
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    command = readme.split("# 2. Run the test suite")[1].splitlines()[1].strip()
    assert command.endswith("python -m pytest -q tests")
    lines = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert command in lines
    before = lines[: lines.index(command)]
    assert not [line for line in before if "pip install" in line], "CI must install nothing the README command does not"
    # --no-build-isolation needs setuptools (absent from Python >= 3.12 venvs); ninja builds the C++ backend
    for install in ("setuptools", "ninja"):
        assert install in command.split("--no-build-isolation")[0]


def test_the_readme_python_examples_run_as_written(tiny, tiny_job, tmp_path, monkeypatch, capsys):
    """Both README code blocks, verbatim; the default model is swapped for the tiny one (no real weights in this test)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    api, loss = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[:2]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text(tiny_job.context)
    monkeypatch.setattr(fastsoft, "load_model", lambda *args, **kwargs: tiny)
    scope = {}
    exec(api, scope)
    assert "error" not in scope["reports"][0] and scope["reports"][0]["steps"] >= 1
    answer = fastsoft.generate(tiny, scope["template"], scope["prompt"], "Who founded it?")
    assert isinstance(answer, str) and capsys.readouterr().out == answer + "\n"

    gen = torch.Generator().manual_seed(0)
    n, k = 5, 4
    scope = {
        "hidden": torch.randn(n, 64, generator=gen, requires_grad=True),
        "lm_head": torch.nn.Linear(64, tiny.vocab_size, bias=False),
        "teacher_logprobs": torch.log_softmax(torch.randn(n, tiny.vocab_size, generator=gen), -1),
        "ids": torch.randint(0, tiny.vocab_size, (n, k), generator=gen),
        "probs": torch.full((n, k), 0.2),
        "tail": torch.full((n,), 0.2),
        "labels": torch.randint(0, tiny.vocab_size, (n,), generator=gen),
        "teacher_hidden": torch.randn(n, 64, generator=gen),
    }
    exec(loss, scope)
    assert scope["loss"].ndim == 0 and torch.isfinite(scope["loss"]) and "LigerFusedLinearKLDivLoss" in scope
