"""The ``qlora-bench`` command line: help, refusals before any work, a real sweep and its report."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from qlora_core.cli import SUBCOMMANDS, main
from qlora_core.modes import MODES
from qlora_core.shapes import shape_config


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


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_help_renders_its_own_words(command, capsys):
    """argparse formats help with %: a bare '5 % above' once printed an argparse action's repr in --help."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qlora-bench {command}")
    assert "option_strings" not in out


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


def test_sweep_trains_a_cell_on_two_processes(tiny_model_dir, tmp_path):
    """--num-processes 2: the cell's process starts two ranks through torchrun (gloo on a CPU); its result is
    rank 0's, with both ranks' memory and steps."""
    out = tmp_path / "out"
    assert main(["sweep", "--model", str(tiny_model_dir), "--modes", "nf4", "--profile", "cpu", "--seq-len", "32",
                 "--batch-size", "2", "--steps", "2", "--eval-window", "32", "--eval-stride", "16",
                 "--eval-max-tokens", "64", "--num-processes", "2", "--out", str(out)]) == 0
    result = json.loads((out / "nf4.json").read_text())
    assert result["settings"]["num_processes"] == 2 and [r["rank"] for r in result["ranks"]] == [0, 1]
    assert set(result["perplexity"]) == {"before", "after", "merged"}


def test_several_processes_need_as_many_gpus(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["sweep", "--device", "cuda", "--profile", "cpu", "--modes", "bf16", "--num-processes", "2",
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.endswith("num_processes 2 needs as many GPUs; this machine has 1\n")


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
    # the cells carry a memory floor: the memory picture is drawn beside the report's plot
    assert sorted(p.name for p in report_dir.iterdir()) == ["memory.png", "report.csv", "report.md", "report.png"]
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
    from qlora_core.modes import installed_modes

    cpu = default_modes("cpu")
    assert default_modes("gpu") == installed_modes()  # test_modes.py: without hqq, all but the HQQ modes
    assert cpu and all(m.compute_dtype != "float16" for m in cpu)
    assert {m.name for m in installed_modes()} - {m.name for m in cpu} == {
        m.name for m in installed_modes() if m.compute_dtype == "float16"
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


def tiny_sweep_args(model_dir, out, *extra) -> list[str]:
    """A sweep of the tiny model that takes seconds a cell."""
    return ["sweep", "--model", str(model_dir), "--profile", "cpu", "--seq-len", "32", "--batch-size", "2",
            "--steps", "2", "--eval-window", "32", "--eval-stride", "16", "--eval-max-tokens", "64",
            "--out", str(out), *extra]


def refused(capsys, code: int, *named: str) -> str:
    """Assert a user error: exit 2, one line on stderr naming each of ``named``, no traceback."""
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    for text in named:
        assert text in error, (text, error)
    return error


def test_every_failed_cell_gives_its_full_reason_after_the_table(tiny_model_dir, tmp_path, capsys):
    """A folder with a config but no weights passes the checks before the cells and fails in each of them."""
    folder = tmp_path / "a-model-folder-whose-long-name-pushes-the-reason-past-eighty-columns"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    out = tmp_path / "out"
    assert main(tiny_sweep_args(folder, out, "--modes", "nf4")) == 1  # one cell: each costs a process
    printed = capsys.readouterr().out
    error = json.loads((out / "nf4.json").read_text())["error"]
    line = f"nf4: error: {' '.join(error.split())}"
    assert line in printed.splitlines() and len(line) > 80  # whole, not cut at the terminal's width
    assert str(folder) in line and "nf4.log" in line
    assert printed.index(line) > printed.index("figure")  # after the table


@pytest.mark.parametrize("extra, named", [
    (["--steps", "1"], "steps (1) must exceed the timing warm-up (1"),  # the cpu profile's warm-up is 1
    (["--steps", "3", "--timing-warmup", "3"], "steps (3) must exceed the timing warm-up (3"),
    (["--modes", "bf16,bf16"], "mode given twice: bf16"),
    (["--modes", ","], "no modes given"),
    (["--modes", " "], "no modes given"),
    (["--modes", ""], "no modes given"),
    (["--device", "cpu", "--profile", "gpu"], "--profile gpu needs a CUDA device, not cpu"),
])
def test_settings_that_cannot_work_are_refused_before_any_model_work(extra, named, tmp_path, capsys):
    out = tmp_path / "never"
    # a model that does not exist: the refusal must come before anything looks at it
    refused(capsys, main(tiny_sweep_args(tmp_path / "no-model", out, *extra)), named)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--timing-warmup", "-1"), ("--lr", "nan"), ("--lr", "inf"),
                                           ("--lr", "0")])
def test_impossible_numbers_are_usage_errors(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", option, value])
    assert exit_.value.code == 2
    assert option in capsys.readouterr().err


def test_gpu_profile_message_says_how_much_longer_it_would_take(tmp_path, capsys):
    error = refused(capsys, main(["sweep", "--device", "cpu", "--profile", "gpu", "--out", str(tmp_path / "o")]))
    from qlora_core.profiles import PROFILES

    gpu, cpu = PROFILES["gpu"], PROFILES["cpu"]
    ratio = (gpu["steps"] * gpu["batch_size"] * gpu["seq_len"]) / (cpu["steps"] * cpu["batch_size"] * cpu["seq_len"])
    assert f"{ratio:.0f}x the tokens of the cpu profile" in error


def test_out_under_a_file_is_refused_before_any_model_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(capsys, main(tiny_sweep_args(tmp_path / "no-model", blocker / "run", "--modes", "bf16")),
            str(blocker / "run"), "is a file")


@pytest.mark.parametrize("command", [
    ["report", "results"], ["compare", "results", "results"],
    ["finetune", "--mode", "bf16"], ["merge", "--mode", "bf16", "--adapter", "adapter"],
])
def test_every_out_under_a_file_is_one_line(command, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(capsys, main([*command, "--out", str(blocker / "out")]), str(blocker / "out"), "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permission bits")
def test_a_read_only_out_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused(capsys, main(tiny_sweep_args(tmp_path / "no-model", locked / "run", "--modes", "bf16")),
            str(locked / "run"))


def test_an_unreachable_hub_is_one_line(tiny_model_dir, tmp_path, capsys):
    """conftest sets HF_HUB_OFFLINE=1."""
    out = tmp_path / "never"
    code = main(tiny_sweep_args(tiny_model_dir, out, "--modes", "bf16", "--eval-text", "wikitext"))
    refused(capsys, code, "Hugging Face Hub is unreachable", "pass a local file")
    code = main(tiny_sweep_args(tiny_model_dir, out, "--modes", "bf16", "--data", "hub:someone/rows"))
    refused(capsys, code, "Hugging Face Hub is unreachable")
    assert not out.exists()


def test_a_binary_eval_text_is_named(tiny_model_dir, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code = main(tiny_sweep_args(tiny_model_dir, tmp_path / "never", "--modes", "bf16", "--eval-text", str(binary)))
    refused(capsys, code, str(binary), "not UTF-8")


def test_resume_with_other_settings_is_refused_naming_them(sweep_dir, tiny_model_dir, capsys):
    _, out = sweep_dir
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(["sweep", "--model", str(tiny_model_dir), "--modes", "bf16,nf4", "--profile", "cpu",
                 "--seq-len", "32", "--batch-size", "2", "--steps", "4", "--eval-window", "32",
                 "--eval-stride", "16", "--eval-max-tokens", "128", "--out", str(out), "--resume"])
    refused(capsys, code, "bf16.json was measured with other settings", "train.max_steps: 3 -> 4")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` and that run multiprocessing's spawned workers (Linux /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
            cmdline = open(stat.replace("stat", "cmdline"), "rb").read()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.split("/")[2]))
    return found


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


#: Steps of each cell of the Ctrl-C test: enough that nf4's cell is still training when the signal comes, even
#: where this test's own process gets no CPU for seconds (with 50, on CI's two cores under load, nf4's cell once
#: finished between the test's seeing bf16's result and its signal: the sweep exited 0).
CTRL_C_STEPS = 400


def test_ctrl_c_ends_the_worker_and_says_how_to_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_sweep_args(tiny_model_dir, out, "--modes", "bf16,nf4", "--steps", str(CTRL_C_STEPS))
    sweep = subprocess.Popen([sys.executable, "-m", "qlora_core.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (out / "bf16.json").exists(), 120)
        assert _wait_for(lambda: _children(sweep.pid), 30)  # nf4's worker
        workers = _children(sweep.pid)
        sweep.send_signal(signal.SIGINT)
        _, error = sweep.communicate(timeout=60)
    finally:
        sweep.kill()
    assert sweep.returncode == 130
    assert "Traceback" not in error
    assert error.strip().splitlines()[-1] == f"interrupted: 1 of 2 cells finished in {out}; rerun with --resume"
    assert _wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 10)  # no orphan


def test_a_cpu_that_emulates_a_modes_compute_dtype_is_warned_about():
    """On a CPU without bf16 instructions the cpu profile's minutes become the better part of an hour: say so
    before the sweep starts, naming the dtype and the factor; not on CUDA, nor for a fast dtype."""
    from qlora_core.cli import slow_compute_warning
    from qlora_core.modes import get_mode

    modes = [get_mode("bf16"), get_mode("nf4")]
    slow = slow_compute_warning(torch.device("cpu"), modes, lambda dtype: 60.0)
    assert "bfloat16 matmuls 60x slower than float32" in slow
    assert slow_compute_warning(torch.device("cpu"), modes, lambda dtype: 1.5) is None
    assert slow_compute_warning(torch.device("cuda"), modes, lambda dtype: 60.0) is None


def test_a_warning_repeated_every_step_is_shown_once(monkeypatch, recwarn):
    """bitsandbytes' int8 matmul warns on every call, and a library entering ``catch_warnings`` each step resets
    Python's once-per-place default, so an H200 int8 finetune's log held one warning 40,320 times. A command
    shows each distinct warning once."""
    import warnings

    from qlora_core import cli

    def noisy_command(args) -> int:
        for _ in range(3):
            with warnings.catch_warnings():  # as a library does around a step
                pass
            warnings.warn("inputs will be cast", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "report", noisy_command)
    assert main(["report", "anything"]) == 0
    assert sum(str(w.message) == "inputs will be cast" for w in recwarn) == 1


def test_frontier_records_random_weights_outliers_for_int8_alone(tmp_path):
    """A shape's random weights make LLM.int8 outlier columns; only the int8 mode's frontier counts and records
    them (the other modes have no such columns)."""
    assert main(["frontier", "--shapes", "tiny-llama", "--modes", "bf16,int8", "--paths", "lean",
                 "--capacity-gib", "1", "--out", str(tmp_path)]) == 0
    frontiers = json.loads((tmp_path / "frontier.json").read_text())["frontiers"]
    outliers = {frontier["mode"]: frontier["int8_outlier_columns"] for frontier in frontiers}
    assert outliers["bf16"] is None
    assert outliers["int8"] == {"down_proj": float(shape_config("tiny-llama").intermediate_size)}


def test_frontier_with_the_dequantized_int8_matmul_predicts_int8_alone_and_records_it(tmp_path, capsys):
    """The dequantized int8 matmul is the int8 mode's: asked for with other modes the frontier says which to
    leave out, before predicting anything; with int8 alone its frontier records the lever and is no shorter."""
    asked = ["frontier", "--shapes", "Llama-3.1-8B", "--paths", "lean", "--capacity-gib", "24"]
    assert main([*asked, "--modes", "bf16,int8", "--int8-matmul", "dequantized"]) == 2
    assert "how the int8 mode's linears compute; mode 'bf16' has none" in capsys.readouterr().err
    assert main([*asked, "--modes", "int8", "--out", str(tmp_path / "plain")]) == 0
    assert main([*asked, "--modes", "int8", "--int8-matmul", "dequantized", "--out", str(tmp_path / "lever")]) == 0
    plain, lever = (json.loads((tmp_path / name / "frontier.json").read_text())["frontiers"][0]
                    for name in ("plain", "lever"))
    assert lever["levers"]["int8_matmul"] == "dequantized" and plain["levers"]["int8_matmul"] == "llm-int8"
    assert lever["tokens"] >= plain["tokens"]
