"""Where a run's folders may be: a cache never shares --out or another run's output, a folder that is not a cache
is refused before anything is written or deleted, and every refusal names the real conflict in one sentence."""

from __future__ import annotations

import shutil

import pytest

from fastsoft.errors import FastsoftError
from fastsoft.io.lock import FolderLock
from fastsoft.io.outputs import RUN_MARKER, check_run_folders, make_folder
from fastsoft.teacher.cache import cache_folder


def test_a_cache_that_is_the_out_folder_is_refused_naming_that(tmp_path):
    out = tmp_path / "out"
    make_folder(out, "--out")
    (tmp_path / "alias").symlink_to(out)
    for cache in (out, out / ".", tmp_path / "alias"):
        with pytest.raises(FastsoftError, match=r"^--cache .* is the --out folder itself") as refused:
            cache_folder(out, cache, None)
        assert "another fastsoft run" not in str(refused.value)
    with pytest.raises(FastsoftError, match=r"^--out .* lies inside --cache"):
        cache_folder(out, tmp_path, None)


def test_a_cache_inside_another_runs_out_is_refused_and_one_inside_the_own_out_is_fine(tmp_path):
    other, mine = tmp_path / "other", tmp_path / "mine"
    make_folder(other, "--out")  # what every run does to its --out: mark it
    assert (other / RUN_MARKER).is_file()
    for cache in (other, other / "cache", other / "deep" / "cache"):
        with pytest.raises(FastsoftError, match="output folder of another fastsoft run.*--cache") as refused:
            cache_folder(mine, cache, None)
        assert str(other) in str(refused.value)
    legacy = tmp_path / "legacy"  # the output of a fastsoft older than the marker: its lock beside a checkpoint
    legacy.mkdir()
    (legacy / ".fastsoft.lock").write_text("{}")
    (legacy / "checkpoint.safetensors").write_bytes(b"checkpoint")
    with pytest.raises(FastsoftError, match="another fastsoft run"):
        cache_folder(mine, legacy / "cache", None)
    make_folder(mine, "--out")
    assert cache_folder(mine, None, None) == mine / "cache"  # the default, inside the run's own out
    assert cache_folder(mine, None, 1) == mine / "cache" / "rank1"
    assert cache_folder(mine, mine / "teacher", None) == mine / "teacher"
    check_run_folders(mine, cache_folder(mine, None, None), 0)


def test_a_model_folder_as_cache_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(FastsoftError, match=r"^--cache .* is not a fastsoft teacher cache"):
        cache_folder(tmp_path / "out", model, None)
    assert sorted(p.name for p in model.iterdir()) == before  # not even a lock file


def test_a_folder_held_by_this_process_does_not_blame_another_run(tmp_path):
    with FolderLock(tmp_path, "output folder"):
        with pytest.raises(FastsoftError) as refused:
            FolderLock(tmp_path, "teacher cache folder").acquire()
    message = str(refused.value)
    assert "this same process" in message and "as its output folder" in message
    assert "another fastsoft run" not in message


@pytest.mark.parametrize("flag", ["--out", "--cache"])
def test_a_dangling_symbolic_link_is_named(tmp_path, flag):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(FastsoftError, match=rf"^{flag} .*link is a symbolic link to .*gone, which does not exist"):
        make_folder(link, flag)
    with pytest.raises(FastsoftError, match=rf"^{flag} .*link/run lies under .*link, which is a symbolic link"):
        make_folder(link / "run", flag)
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("conflict", ["model folder", "cache is out"])
def test_the_cli_refuses_a_misplaced_cache_with_one_sentence(tmp_path, tiny_model_dir, tiny_job, capsys, conflict):
    from fastsoft.cli import main

    (tmp_path / "context.txt").write_text(tiny_job.context)
    (tmp_path / "queries.txt").write_text("\n".join(tiny_job.queries))
    out = tmp_path / "out"
    if conflict == "model folder":
        cache = tmp_path / "model"
        shutil.copytree(tiny_model_dir, cache)
        (cache / "index.json").write_text("{}")  # a foreign index: the old --rebuild-cache emptied the folder
        expected = "is not a fastsoft teacher cache"
    else:
        cache, expected = out, "is the --out folder itself"
    before = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    argv = ["compress", "--context", str(tmp_path / "context.txt"), "--queries", str(tmp_path / "queries.txt"),
            "--out", str(out), "--cache", str(cache), "--rebuild-cache", "--model", str(tiny_model_dir),
            "--steps", "1", "--prompt-length", "4", "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastsoft: error: --cache") and expected in error and error.count("\n") == 1, error
    if conflict == "model folder":
        assert sorted(p.name for p in cache.iterdir()) == before
