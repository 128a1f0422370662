"""Atomic writes: a destination is either its old or its new content, never a part."""
import glob
import json
import os

import pytest

from tasks.files import atomic_path, write_json_atomic, write_text_atomic


def test_write_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["results.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.md"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["table.md"]


def test_the_temporary_path_keeps_the_suffix(tmp_path):
    with atomic_path(tmp_path / "chart.png") as tmp:
        assert tmp.endswith(".png") and tmp != str(tmp_path / "chart.png")
        open(tmp, "wb").close()
        assert glob.glob(str(tmp_path / "*.png")) == []  # a left-over temporary file is not a result
    assert (tmp_path / "chart.png").is_file()
