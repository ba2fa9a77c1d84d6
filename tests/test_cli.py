"""The ``qlora-bench`` command line: help, refusals before any work, a real sweep and its report."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from qlora_core.cli import main
from qlora_core.modes import MODES


def mentions(text: str, name: str) -> bool:
    """``name`` as a whole mode name ("fp4" must not be found inside "fp4-dq")."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


@pytest.fixture(autouse=True)
def no_eval_text_from_environment(monkeypatch):
    monkeypatch.delenv("QLORA_BENCH_EVAL_TEXT", raising=False)


def test_help_mentions_every_mode():
    env = {**os.environ, "COLUMNS": "200"}  # wide enough that no mode name is wrapped at its hyphen
    out = subprocess.run([sys.executable, "-m", "qlora_core.cli", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert out.startswith("usage: qlora-bench")
    for name in MODES:
        assert mentions(out, name), name


def test_sweep_help_mentions_every_mode(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in MODES:
        assert mentions(out, name), name


def test_unknown_mode_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--modes", "bogus", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "bogus" in error
    for name in MODES:
        assert mentions(error, name), name
    assert not out.exists()


def test_missing_model_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", "--model", str(tmp_path / "no-model"), "--modes", "bf16", "--out", str(out)]) == 2
    assert "no-model" in capsys.readouterr().err
    assert not out.exists()


def test_too_long_sequence_exits_2_before_any_cell(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", "--model", str(tiny_model_dir), "--modes", "bf16", "--profile", "cpu", "--out", str(out)]
    assert main(args + ["--seq-len", "512"]) == 2
    assert "exceeds the model's limit of 256" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("option", ["--seq-len", "--steps", "--batch-size"])
def test_non_positive_sizes_are_usage_errors(option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", option, "0"])
    assert exit_.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sweep_dir(tiny_model_dir, tmp_path_factory):
    """``qlora-bench sweep`` over bf16 and nf4 on the tiny model, each mode in its own process."""
    out = tmp_path_factory.mktemp("cli") / "sweep"
    code = main(["sweep", "--model", str(tiny_model_dir), "--modes", "bf16,nf4", "--profile", "cpu",
                 "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--eval-window", "32",
                 "--eval-stride", "16", "--eval-max-tokens", "128", "--out", str(out)])
    return code, out


def test_sweep_writes_a_result_per_mode(sweep_dir, tiny_model_dir):
    code, out = sweep_dir
    assert code == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["bf16.json", "nf4.json", "run.json"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["command"][:4] == ["qlora-bench", "sweep", "--model", str(tiny_model_dir)]
    assert [(c["mode"], c["status"]) for c in manifest["cells"]] == [("bf16", "ok"), ("nf4", "ok")]
    for name in ("bf16", "nf4"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["status"] == "ok"
        assert result["mode"] == MODES[name].describe()
        settings = result["settings"]
        assert settings["model"] == str(tiny_model_dir)
        assert (settings["seq_len"], settings["batch_size"], settings["train"]["max_steps"]) == (32, 2, 3)
        assert (settings["eval_window"], settings["eval_stride"], settings["eval_max_tokens"]) == (32, 16, 128)
        assert settings["timing_warmup"] == 1 and settings["eval_batch_size"] == 4  # from the cpu profile
        assert len(result["training"]["losses"]) == 3


def test_report_writes_markdown_csv_and_png(sweep_dir, tmp_path, capsys):
    _, out = sweep_dir
    report_dir = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report_dir)]) == 0
    assert sorted(p.name for p in report_dir.iterdir()) == ["report.csv", "report.md", "report.png"]
    with open(report_dir / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["mode"] for row in rows] == ["bf16", "nf4"]
    assert float(rows[0]["weights_mib_ratio"]) == 1.0
    nf4_bytes = json.loads((out / "nf4.json").read_text())["weights"]["weights_bytes"]
    bf16_bytes = json.loads((out / "bf16.json").read_text())["weights"]["weights_bytes"]
    assert float(rows[1]["weights_mib_ratio"]) == pytest.approx(nf4_bytes / bf16_bytes)
    markdown = (report_dir / "report.md").read_text()
    assert "| bf16 |" in markdown and "| nf4 |" in markdown
    assert (report_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "nf4" in capsys.readouterr().out  # the terminal table


def test_report_without_results_exits_2(tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else"}))
    assert main(["report", str(tmp_path)]) == 2
    assert "no qlora-bench results" in capsys.readouterr().err


def test_cpu_profile_leaves_fp16_compute_modes_out_by_default():
    from qlora_core.cli import default_modes
    from qlora_core.modes import MODES

    cpu = default_modes("cpu")
    assert [m.name for m in default_modes("gpu")] == list(MODES)
    assert cpu and all(m.compute_dtype != "float16" for m in cpu)
    assert {m.name for m in MODES.values()} - {m.name for m in cpu} == {
        m.name for m in MODES.values() if m.compute_dtype == "float16"
    }


def test_sweep_of_a_shape_on_the_lean_path(tmp_path, capsys):
    """--shape builds the architecture with random weights (no --model, no download) and --path reaches the
    cells; the table says the weights are random and shows the floor against the measurements."""
    out = tmp_path / "shape-run"
    code = main(["sweep", "--shape", "tiny-llama", "--path", "lean", "--modes", "nf4", "--profile", "cpu",
                 "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--timing-warmup", "0", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "nf4.json").read_text())
    assert result["settings"]["shape"] == "tiny-llama" and result["settings"]["path"] == "lean"
    printed = capsys.readouterr().out
    assert "random weights" in printed and "analytic floor vs measured" in printed


def test_a_stride_equal_to_the_window_is_refused_before_any_cell_runs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["sweep", "--model", str(tiny_model_dir), "--modes", "bf16", "--eval-window", "32",
                 "--eval-stride", "32", "--out", str(out)])
    assert code == 2
    assert "stride" in capsys.readouterr().err
    assert not out.exists()
