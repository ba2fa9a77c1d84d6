"""Several processes of one host (``qlora_core.distributed``): 2 CPU ranks joined with gloo train the tiny model
as one process does with the same global batch, and end with the same adapters on every rank, whether they share
it by DDP or by FSDP (``qlora_core.strategies``)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from qlora_core.distributed import launch
from qlora_core.strategies import STRATEGIES

CPU = torch.device("cpu")
RANKS = 2
SEQ_LEN, GLOBAL_BATCH = 32, 4
MODES = ("bf16", "nf4")
#: Runs of ``train_modes``: each mode on the reference path, and nf4 on the lean path (its chunked loss reaches
#: the decoder and head around the model's forward: the DDP wrapper must still see it, ``trainer.LossModule``).
RUNS = (*MODES, "nf4-lean")
#: Largest |loss difference| (nats) allowed between 2 ranks and 1 process over the 4 steps of ``train_modes``.
#: Measured on this 2-core AVX512-BF16 CPU (torch 2.13, one run a mode): 4.2e-5 (bf16), 4.6e-5 (nf4); a rank
#: training alone on its half of each batch differs by 0.017-0.019. About 10x the measured difference.
LOSS_TOLERANCE = 5e-4
#: Largest ||adapters(2 ranks) - adapters(1 process)|| / ||adapters(1 process) - initial adapters||: how far the
#: 2-rank training ended from the 1-process one, relative to how far training moved the adapters. Measured as
#: for LOSS_TOLERANCE: 0.025 (bf16), 0.022 (nf4); a rank training alone on its half: 0.95.
ADAPTER_TOLERANCE = 0.1


def global_batch(step: int) -> torch.Tensor:
    """Step ``step``'s global batch [GLOBAL_BATCH, SEQ_LEN] of byte tokens: every rank draws the same one."""
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(step))


def train_modes(model_dir: str, strategy: str = "ddp", device: str = "cpu") -> dict[str, dict]:
    """Train the tiny model's adapters in each of MODES in this process (a launched rank, or the test's own
    process as the one-process reference), the ranks sharing the training as ``strategy`` says; per mode: step
    losses and tokens, step seconds (the step's, every rank's), the adapter weights before and after (whole:
    FSDP's shards gathered), and what the process holds after (``memory_snapshot``). ``device``: where it trains
    (a rank on CUDA takes its local rank's GPU)."""
    from peft.utils import get_peft_model_state_dict

    from qlora_core.lora import LoraSettings, attach_lora
    from qlora_core.measure.memory import memory_snapshot
    from qlora_core.models import load_model, prepare_for_training, resolve_model
    from qlora_core.modes import get_mode
    from qlora_core.paths import loss_function
    from qlora_core.strategies import mode_for
    from qlora_core.trainer import LoraTrainer, TrainSettings

    def whole(adapters: dict) -> dict[str, torch.Tensor]:
        return {key: (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
                for key, value in adapters.items()}

    source = resolve_model(model_dir)
    where = torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else CPU
    settings = TrainSettings(learning_rate=1e-2, grad_accum=2, warmup_steps=1, max_steps=4, max_grad_norm=0.1)
    runs = {}
    for name in RUNS:
        path = "lean" if name.endswith("-lean") else "reference"
        mode = mode_for(get_mode(name.removesuffix("-lean")), strategy)
        model = prepare_for_training(load_model(source, mode, where), mode, gradient_checkpointing=False, path=path)
        torch.manual_seed(0)  # the same initial adapters on every rank and in the reference
        model = attach_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))
        initial = whole(get_peft_model_state_dict(model))
        batches = (global_batch(step) for step in itertools.count())
        trainer = LoraTrainer(model, batches, settings, mode.torch_compute_dtype, loss_fn=loss_function(path),
                              strategy=strategy)
        records = trainer.train()
        held = [(p.to_local() if hasattr(p, "to_local") else p) for p in trainer.training_model.parameters()]
        runs[name] = {
            "losses": [r.loss for r in records],
            "tokens": [r.tokens for r in records],
            "seconds": [r.seconds for r in records],
            "rank_seconds": [r.rank_seconds for r in records],
            "initial_adapters": initial,
            "adapters": whole(get_peft_model_state_dict(model)),
            "memory": memory_snapshot(where),
            # the parameters' elements this rank holds, of all the model's (FSDP's shards hold part of each)
            "strategy": strategy,
            "held_share": sum(t.numel() for t in held) / sum(p.numel() for p in trainer.training_model.parameters()),
        }
    return runs


def rank_environment() -> dict[str, str]:
    """What a launched rank finds in its environment for torch.distributed."""
    import os

    return {name: os.environ[name] for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def fail_on_rank_one() -> None:
    import os

    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 failed on purpose")


@pytest.fixture(scope="module")
def one_process(tiny_model_dir) -> dict[str, dict]:
    return train_modes(str(tiny_model_dir))


@pytest.fixture(scope="module", params=STRATEGIES)
def two_ranks(request, tiny_model_dir) -> list[dict[str, dict]]:
    """``train_modes`` in 2 launched CPU processes (gloo), by rank, under each strategy: DDP, and FSDP (every
    parameter sharded, the 4-bit weights stored in bf16 for it: FSDP-QLoRA)."""
    return launch(train_modes, (str(tiny_model_dir), request.param), num_processes=RANKS)


def test_launch_returns_each_ranks_value_with_its_own_rank():
    import os

    before = dict(os.environ)
    environments = launch(rank_environment, num_processes=RANKS)
    assert dict(os.environ) == before  # the ranks' variables were set for them only
    assert [env["RANK"] for env in environments] == [env["LOCAL_RANK"] for env in environments] == ["0", "1"]
    assert {env["WORLD_SIZE"] for env in environments} == {str(RANKS)}
    assert len({env["MASTER_PORT"] for env in environments}) == 1  # one rendezvous


def test_a_failing_rank_fails_the_launch_with_its_error():
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank 1 failed on purpose"):
        launch(fail_on_rank_one, num_processes=RANKS)


@pytest.mark.parametrize("name", RUNS)
def test_two_ranks_follow_the_one_process_loss_trajectory(one_process, two_ranks, name):
    """2 ranks x 2 rows train as 1 process x 4 rows: the same losses within LOSS_TOLERANCE (nats), and the
    adapters end within ADAPTER_TOLERANCE of the 1-process ones relative to how far training moved them.

    Not bit for bit: each rank's forward runs bf16 matmuls on 2 rows instead of 4 (CPU kernels block and sum
    differently by shape), and the gradient is the mean of two half-batch gradients, summed in another order;
    Adam, whose first steps move each weight by about the learning rate whatever its gradient's size, turns
    such rounding differences into small weight differences that grow over the steps.
    """
    expected = one_process[name]
    for rank in two_ranks:
        assert rank[name]["tokens"] == expected["tokens"]  # the global batch's tokens, counted once
        torch.testing.assert_close(rank[name]["losses"], expected["losses"], rtol=0, atol=LOSS_TOLERANCE)
    initial, trained = flat(expected["initial_adapters"]), flat(expected["adapters"])
    distance = (flat(two_ranks[0][name]["adapters"]) - trained).norm() / (trained - initial).norm()
    assert distance < ADAPTER_TOLERANCE


def flat(adapters: dict[str, torch.Tensor]) -> torch.Tensor:
    """All adapter weights as one float32 vector, in the state dict's order."""
    return torch.cat([weight.flatten().float() for weight in adapters.values()])


@pytest.mark.parametrize("name", RUNS)
def test_adapters_are_identical_on_every_rank_after_training(two_ranks, name):
    """The all-reduce gave every rank the same gradients, so the same steps: equal bit for bit across ranks."""
    first, second = (rank[name]["adapters"] for rank in two_ranks)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_step_time_is_the_slowest_ranks_and_every_rank_reports_it(two_ranks):
    runs = [rank["bf16"] for rank in two_ranks]
    assert runs[0]["rank_seconds"] == runs[1]["rank_seconds"]  # gathered: every rank holds all ranks' times
    for seconds, rank_seconds in zip(runs[0]["seconds"], runs[0]["rank_seconds"]):
        assert len(rank_seconds) == RANKS and seconds == max(rank_seconds) > 0
    assert all(rank["bf16"]["memory"]["peak_rss_bytes"] > 0 for rank in two_ranks)  # per rank: its own process


@pytest.mark.parametrize("name", RUNS)
def test_fsdp_ranks_hold_half_the_parameters_and_ddp_ranks_all(two_ranks, name):
    """Under FSDP each of 2 ranks holds about half of every parameter, the 4-bit weights included (a shard is
    padded to a whole share of dim 0); under DDP each holds the whole model."""
    shares = [rank[name]["held_share"] for rank in two_ranks]
    if two_ranks[0][name]["strategy"] == "ddp":
        assert shares == [1.0, 1.0]
    else:
        assert sum(shares) == pytest.approx(1.0, abs=0.02) and all(0.4 < share < 0.6 for share in shares)


@pytest.mark.gpu
def test_one_fsdp_rank_on_cuda_trains_as_one_process_does(tiny_model_dir):
    """FSDP with a single rank on one GPU (a process group of one: NCCL) against the same training unwrapped: the
    same loss trajectory within LOSS_TOLERANCE, in every run of ``train_modes``."""
    (sharded,) = launch(train_modes, (str(tiny_model_dir), "fsdp", "cuda"), num_processes=1)
    (plain,) = launch(train_modes, (str(tiny_model_dir), "ddp", "cuda"), num_processes=1)
    for name in RUNS:
        torch.testing.assert_close(sharded[name]["losses"], plain[name]["losses"], rtol=0, atol=LOSS_TOLERANCE)
        assert sharded[name]["held_share"] == pytest.approx(1.0, abs=0.02)  # one rank holds every shard
