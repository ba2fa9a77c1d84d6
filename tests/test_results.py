"""Self-describing results: the environment, atomic JSON files, reading results back."""

from __future__ import annotations

import json
import os
import re

import pytest

from qlora_core.results import SCHEMA, environment, git_commit, read_results, write_json_atomic


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic({"a": 1}, path)
    write_json_atomic({"b": [1.5, None]}, path)
    assert json.loads(path.read_text()) == {"b": [1.5, None]}
    assert os.listdir(path.parent) == ["r.json"]  # no temporary file left


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic({"a": 1}, path)
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_read_results_skips_other_files(tmp_path):
    write_json_atomic({"schema": SCHEMA, "status": "ok", "n": 1}, tmp_path / "a.json")
    write_json_atomic({"schema": SCHEMA, "status": "error", "n": 2}, tmp_path / "b.json")
    write_json_atomic({"schema": "other"}, tmp_path / "c.json")
    write_json_atomic([1, 2], tmp_path / "d.json")
    (tmp_path / "a.log").write_text("not json")
    assert [r["n"] for r in read_results([tmp_path])] == [1, 2]
    assert [r["n"] for r in read_results([tmp_path / "b.json"])] == [2]


def test_environment_is_plain_json():
    env = environment()
    assert json.loads(json.dumps(env)) == env
    assert set(env["libraries"]) >= {"torch", "transformers", "peft", "bitsandbytes", "qlora-bench"}


def test_git_commit_names_this_checkout():
    """The suite runs from a git checkout (CI clones the repository): the result names its commit."""
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?", git_commit() or "")
