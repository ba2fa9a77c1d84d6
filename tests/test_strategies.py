"""How ranks share a training (``qlora_core.strategies``): the names, the modes FSDP can shard and how they load,
the units it shards. Their training across 2 CPU ranks is tests/test_distributed.py's."""

from __future__ import annotations

import pytest
import torch

from qlora_core.modes import MODES, get_mode
from qlora_core.strategies import STRATEGIES, check_strategy, decoder_layers, mode_for
from qlora_core.trainer import LossModule


def test_an_unknown_strategy_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown strategy 'zero3'; choose from ddp, fsdp"):
        check_strategy("zero3")
    assert [check_strategy(name) for name in STRATEGIES] == list(STRATEGIES)


@pytest.mark.parametrize("name", MODES)
def test_fsdp_stores_4_bit_weights_in_the_compute_dtype_and_refuses_what_it_cannot_shard(name):
    mode = get_mode(name)
    assert mode_for(mode, "ddp") is mode
    if not mode.is_quantized:
        assert mode_for(mode, "fsdp") is mode
    elif mode.is_4bit:
        sharded = mode_for(mode, "fsdp")
        assert sharded.quant_storage == mode.compute_dtype and sharded.torch_quant_storage.is_floating_point
        assert sharded.describe() == {**mode.describe(), "quant_storage": mode.compute_dtype}
    else:  # LLM.int8's and HQQ's
        with pytest.raises(ValueError, match=f"mode '{name}' cannot be trained with fsdp.*use ddp"):
            mode_for(mode, "fsdp")


def test_the_decoder_layers_are_the_units_fsdp_shards_one_by_one(tiny_model_dir):
    from qlora_core.lora import LoraSettings, attach_lora
    from qlora_core.models import load_model, resolve_model

    model = attach_lora(load_model(resolve_model(str(tiny_model_dir)), get_mode("bf16"), torch.device("cpu")),
                        LoraSettings(r=4, alpha=8))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert {type(layer).__name__ for layer in layers} == {"LlamaDecoderLayer"}
    # inside the trainer's loss module, and each given a subclass of its own as FSDP2 gives the units it shards
    # (where ``compiled_if`` finds them to compile)
    for layer in layers:
        layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    assert decoder_layers(LossModule(model, loss_fn=None)) == layers


def test_fsdp_in_a_single_process_outside_any_group_trains_as_the_plain_trainer(tiny_model_dir):
    """One process not started as a rank: FSDP makes itself a process group of one and trains the tiny nf4
    model's adapters along the plain trainer's losses (run in a fresh interpreter: the group outlives the
    training)."""
    import json
    import subprocess
    import sys

    script = f"""
import itertools, json, torch
from qlora_core.lora import LoraSettings, attach_lora
from qlora_core.models import load_model, prepare_for_training, resolve_model
from qlora_core.modes import get_mode
from qlora_core.strategies import mode_for
from qlora_core.trainer import LoraTrainer, TrainSettings
losses = {{}}
for strategy in ("ddp", "fsdp"):
    mode = mode_for(get_mode("nf4"), strategy)
    model = prepare_for_training(load_model(resolve_model({str(tiny_model_dir)!r}), mode, torch.device("cpu")),
                                 mode, gradient_checkpointing=True, path="lean")
    torch.manual_seed(0)
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    batches = (torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(s)) for s in itertools.count())
    trainer = LoraTrainer(model, batches, TrainSettings(learning_rate=1e-2, max_steps=3), torch.bfloat16,
                          strategy=strategy)
    losses[strategy] = [record.loss for record in trainer.train()]
losses["group"] = torch.distributed.get_world_size()
print(json.dumps(losses))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    losses = json.loads(run.stdout.strip().splitlines()[-1])
    assert losses["group"] == 1
    torch.testing.assert_close(losses["fsdp"], losses["ddp"], rtol=0, atol=5e-4)


def test_fsdp_trains_a_model_whose_head_is_its_embeddings(tmp_path):
    """Tied input embeddings and head (SmolLM2, Qwen2): one parameter, which the root shards; 2 CPU ranks train
    along one process's losses as with an untied head (tests/test_distributed.py)."""
    from tiny import make_model_folder

    from qlora_core.distributed import launch
    from test_distributed import LOSS_TOLERANCE, train_modes

    folder = str(make_model_folder(tmp_path / "tied", tie_word_embeddings=True))
    alone = train_modes(folder)
    for rank in launch(train_modes, (folder, "fsdp"), num_processes=2):
        for name in alone:
            torch.testing.assert_close(rank[name]["losses"], alone[name]["losses"], rtol=0, atol=LOSS_TOLERANCE)
