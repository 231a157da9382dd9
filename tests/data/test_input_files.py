"""Input files on the command line: an empty --eval-queries or --answers file is refused, not quietly ignored."""

from __future__ import annotations

import pytest

from fastsoft.cli import main


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--eval-queries", "eval queries file {} has no queries; give one query per line"),
        ("--answers", "answers file {} has no answers; give one answer per line, in the queries' order"),
    ],
)
def test_an_empty_file_is_refused_in_one_sentence(tmp_path, tiny_model_dir, capsys, flag, message):
    (tmp_path / "ctx.txt").write_text("The doors are teal.\n")
    (tmp_path / "q.txt").write_text("What colour are the doors?\nWho paints them?\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\ufeff\n\n")  # a byte-order mark and blank lines: still nothing
    argv = ["compress", "--context", str(tmp_path / "ctx.txt"), "--queries", str(tmp_path / "q.txt"), flag, str(empty)]
    code = main([*argv, "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == f"fastsoft: error: {message.format(empty)}"
    assert not (tmp_path / "out").exists()  # refused before anything ran
