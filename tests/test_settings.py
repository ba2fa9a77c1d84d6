"""The settings declaration (qlora_core/settings.py) and the surfaces generated from it: the sweep's, finetune's,
frontier's, generate's and merge's options (cli.py) and bench/'s pytest options (bench/conftest.py) agree with it
and with each other."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_core import cli, settings
from qlora_core.lora import LoraSettings
from qlora_core.trainer import FinetuneSettings

REPO = Path(__file__).resolve().parents[1]


def load_bench_conftest():
    spec = importlib.util.spec_from_file_location("bench_conftest", REPO / "bench" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = load_bench_conftest()


class OptionRecorder:
    """Stands in for pytest's option parser: records every ``addoption`` into an argparse parser."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(prog="pytest", exit_on_error=True)

    def getgroup(self, *_names):
        return self

    def addoption(self, *names, **kwargs):
        self.parser.add_argument(*names, **kwargs)


@pytest.fixture(autouse=True)
def no_environment_defaults(monkeypatch):
    for setting in settings.SETTINGS:
        for source in (setting.default, setting.bench_default):
            if isinstance(source, settings.FromEnv):
                monkeypatch.delenv(source.variable, raising=False)


def bench_parser() -> argparse.ArgumentParser:
    recorder = OptionRecorder()
    BENCH.pytest_addoption(recorder)
    return recorder.parser


def sub_parser(command: str) -> argparse.ArgumentParser:
    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[command]


PARSERS = {**{command: (lambda command=command: sub_parser(command))
              for command in ("sweep", "finetune", "frontier", "generate", "merge")}, "bench": bench_parser}
ON_SURFACE = [pytest.param(setting.for_surface(surface), surface, id=f"{surface}-{setting.name}")
              for setting in settings.SETTINGS for surface in setting.surfaces]


def action_for(parser: argparse.ArgumentParser, option: str) -> argparse.Action:
    return parser._option_string_actions[option]


@pytest.mark.parametrize("setting, surface", ON_SURFACE)
def test_every_declared_setting_is_an_option_of_its_surfaces_with_its_spellings_default_and_help(setting, surface):
    parser = PARSERS[surface]()
    spellings = setting.option_strings(surface)
    actions = {id(action_for(parser, spelling)) for spelling in spellings}
    assert len(actions) == 1, f"{spellings} are not one option"
    action = action_for(parser, spellings[0])
    assert action.dest == setting.dest(surface)
    assert action.default == setting.parser_default(surface)
    assert action.help.startswith(setting.help) and action.help.endswith(setting.note)


@pytest.mark.parametrize("surface", settings.SURFACES)
def test_every_surface_has_a_parser_and_takes_only_what_is_declared_for_it(surface):
    dests = {action.dest for action in PARSERS[surface]()._actions}
    for setting in settings.SETTINGS:
        assert (setting.dest(surface) in dests) == (surface in setting.surfaces), setting.name


def test_frontier_takes_the_declared_rank_levers_and_device_as_it_states_them():
    args = sub_parser("frontier").parse_args(["--shapes", "Llama-3.1-8B"])
    assert (args.lora_r, args.offload_activations, args.mlp_tile_tokens, args.device) == (
        LoraSettings().r, False, None, "cuda")
    parser = sub_parser("frontier")
    assert action_for(parser, "--lora-r").help == "LoRA rank (default 16); alpha = 2 r"
    assert action_for(parser, "--mlp-tile-tokens").help.endswith("Llama/Qwen2 families); lean path only")
    assert action_for(parser, "--device").choices == ["cuda", "cpu"]  # no 'auto': probes are meant for a GPU
    assert action_for(sub_parser("sweep"), "--device").choices == ["auto", "cuda", "cpu"]  # elsewhere as declared


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_generate_and_merge_take_the_workflows_model_options_but_no_training_path(command):
    parser = sub_parser(command)
    finetune = sub_parser("finetune")
    for option in ("--model", "--gguf", "--trust-remote-code", "--device"):
        assert action_for(parser, option).help == action_for(finetune, option).help
    assert "--path" not in parser._option_string_actions  # reloading an adapter trains nothing


def test_the_sweep_and_the_workflow_name_the_model_alike():
    assert cli.cell_settings(sub_parser("sweep").parse_args(["--model", "m"]), "cpu").model == "m"
    args = sub_parser("finetune").parse_args(["--mode", "nf4", "--out", "x", "--model", "m"])
    assert args.model == "m" and action_for(sub_parser("sweep"), "--model").help == action_for(
        sub_parser("finetune"), "--model").help


def test_finetune_passes_a_given_prompt_and_length_to_the_workflow():
    assert finetune_objects(["--prompt", "Hi", "--max-new-tokens", "4"])[2] == {
        "data": "quotes", "text_field": "quote", "prompt": "Hi", "max_new_tokens": 4}


@pytest.mark.parametrize("setting", settings.SETTINGS, ids=lambda s: s.name)
def test_a_setting_says_where_its_value_goes_on_each_surface(setting):
    assert set(setting.surfaces) <= set(settings.SURFACES)
    if "finetune" in setting.surfaces:
        assert setting.finetune is not None
    if {"sweep", "bench"} & set(setting.surfaces) and setting.name != "timed_steps":  # bench turns it into max_steps
        assert setting.cell is not None


def test_the_sweep_and_bench_give_the_same_cell_under_the_gpu_profile():
    """bench/'s defaults are the gpu profile's; the sweep's, under --profile gpu, are the same settings."""
    sweep = cli.cell_settings(sub_parser("sweep").parse_args([]), "gpu")
    key = BENCH.CellKey(model=None, shape=None, mode="bf16", path="reference")
    bench = BENCH.cell_settings(SimpleNamespace(option=bench_parser().parse_args([])), key)
    assert dataclasses.replace(bench, device="auto") == sweep  # bench/ defaults to cuda on purpose (help says so)


def test_a_bench_cell_takes_its_timed_steps_after_the_warmup():
    key = BENCH.CellKey(model=None, shape=None, mode="bf16", path="reference")
    option = bench_parser().parse_args(["--bench-steps", "8", "--bench-warmup", "2"])
    cell = BENCH.cell_settings(SimpleNamespace(option=option), key)
    assert (cell.train.max_steps, cell.timing_warmup) == (10, 2)


@pytest.mark.parametrize("alias, canonical", [
    (["--steps", "3", "--lr", "1e-3", "--optim", "paged_adamw8bit", "--warmup", "2"],
     ["--max-steps", "3", "--learning-rate", "1e-3", "--optimizer", "paged_adamw8bit", "--timing-warmup", "2"]),
])
def test_an_alias_gives_the_same_sweep_settings_as_its_canonical_spelling(alias, canonical):
    parser = sub_parser("sweep")
    assert cli.cell_settings(parser.parse_args(alias), "cpu") == cli.cell_settings(parser.parse_args(canonical), "cpu")


def test_an_alias_gives_the_same_bench_settings_as_its_canonical_spelling():
    key = BENCH.CellKey(model=None, shape=None, mode="bf16", path="reference")
    cells = [BENCH.cell_settings(SimpleNamespace(option=bench_parser().parse_args(options)), key) for options in (
        ["--bench-steps", "4", "--bench-warmup", "2", "--bench-lr", "1e-3", "--bench-optim", "adamw8bit"],
        ["--bench-timed-steps", "4", "--bench-timing-warmup", "2", "--bench-learning-rate", "1e-3",
         "--bench-optimizer", "adamw8bit"])]
    assert cells[0] == cells[1]
    assert (cells[0].train.learning_rate, cells[0].train.optimizer) == (1e-3, "adamw8bit")


def finetune_objects(options: list[str]):
    args = sub_parser("finetune").parse_args(["--mode", "nf4", "--out", "x", *options])
    return settings.finetune_arguments(settings.parsed_values(args, "finetune"))


def test_finetune_options_not_given_keep_the_tutorial_defaults():
    assert finetune_objects([]) == (FinetuneSettings(), LoraSettings(), {"data": "quotes", "text_field": "quote"})


def test_finetune_options_fill_the_workflow_settings_and_aliases_agree():
    canonical = finetune_objects(["--learning-rate", "1e-3", "--optimizer", "paged_adamw8bit", "--max-steps", "7",
                                  "--no-gradient-checkpointing", "--lora-r", "4", "--target-modules", "q_proj,v_proj"])
    alias = finetune_objects(["--lr", "1e-3", "--optim", "paged_adamw8bit", "--steps", "7",
                              "--no-gradient-checkpointing", "--lora-r", "4", "--target-modules", "q_proj,v_proj"])
    assert canonical == alias
    train, lora, _ = canonical
    assert (train.learning_rate, train.optim, train.max_steps, train.gradient_checkpointing) == (
        1e-3, "paged_adamw8bit", 7, False)
    assert (lora.r, lora.alpha, lora.target_modules) == (4, 8, ("q_proj", "v_proj"))


@pytest.mark.parametrize("surface, options, named", [
    ("sweep", ["--seq-len", "0"], "must be >= 1, got 0"),
    ("sweep", ["--lora-dropout", "1"], "must be a fraction in [0, 1)"),
    ("sweep", ["--optim", "sgd"], "invalid choice: 'sgd'"),
    ("finetune", ["--mode", "nf4", "--out", "x", "--lr", "nan"], "must be a finite number > 0, got nan"),
    ("finetune", ["--mode", "nf4", "--out", "x", "--target-modules", ","], "names no module"),
    ("bench", ["--bench-steps", "0"], "must be >= 1, got 0"),
    ("bench", ["--bench-eval-batch-size", "-2"], "must be >= 1, got -2"),
])
def test_a_bad_value_is_refused_with_one_line_naming_the_option(surface, options, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        PARSERS[surface]().parse_args(options)
    assert exit_.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and named in error_lines[0] and options[-2] in error_lines[0]


def test_profile_defaults_are_stated_per_profile_in_the_sweep_help():
    help_text = settings.BY_NAME["seq_len"].help_on("sweep")
    assert "gpu 2048" in help_text and "cpu 128" in help_text


def test_environment_defaults_are_read_when_the_options_are_built(monkeypatch):
    monkeypatch.setenv("QLORA_BENCH_EVAL_TEXT", "/data/wiki.test.raw")
    assert sub_parser("sweep").parse_args([]).eval_text == "/data/wiki.test.raw"
    assert bench_parser().parse_args([]).bench_eval_text == "/data/wiki.test.raw"
