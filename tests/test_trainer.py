"""The LoRA trainer, in every registered mode: the loss falls, perplexity is finite, adapters round-trip."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from tiny import mode_params
from qlora_core.lora import LoraSettings, attach_lora, parameter_counts
from qlora_core.measure.perplexity import perplexity
from qlora_core.models import load_model, prepare_for_training
from qlora_core.modes import MODES, get_mode
from qlora_core.trainer import LoraTrainer, TrainSettings, save_adapter

CPU = torch.device("cpu")
SEQ_LEN, BATCH = 32, 2
STEPS = 8


def fixed_batch(seed: int = 0) -> torch.Tensor:
    """One [BATCH, SEQ_LEN] batch of byte tokens, repeated every step so the loss can only fall by learning it."""
    return torch.randint(0, 256, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def lora_model(source, mode, **lora):
    model = load_model(source, mode, CPU)
    model = prepare_for_training(model, mode, gradient_checkpointing=False)
    torch.manual_seed(0)
    return attach_lora(model, LoraSettings(**{"r": 8, "alpha": 16, "dropout": 0.0, **lora}))


def logits(model, batch, mode) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=mode.torch_compute_dtype):
        return model(input_ids=batch).logits.float()


@pytest.mark.parametrize("name", mode_params(MODES))
def test_mode_trains_evaluates_and_round_trips_its_adapter(tiny_source, name, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    mode = get_mode(name)

    batch = fixed_batch()
    model = lora_model(tiny_source, mode)
    settings = TrainSettings(learning_rate=1e-2, schedule="constant", max_steps=STEPS)
    trainer = LoraTrainer(model, itertools.repeat(batch), settings, mode.torch_compute_dtype)

    records = trainer.train()
    losses = [r.loss for r in records]
    assert [r.step for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in losses)
    assert all(r.tokens == BATCH * SEQ_LEN and r.seconds > 0 for r in records)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, losses  # ~0.7 nats in practice; a broken backward leaves it flat

    ppl = perplexity(model, batch[0], window=SEQ_LEN, stride=SEQ_LEN // 2, autocast_dtype=mode.torch_compute_dtype)
    assert math.isfinite(ppl["perplexity"]) and ppl["perplexity"] > 1
    assert model.training  # perplexity restored the mode it came in

    folder = trainer.save_adapter(tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file()
    assert not any(p.name.startswith("model") for p in folder.iterdir())  # adapters only, no base weights
    trained = logits(model, batch, mode)

    # A fresh base in the same mode, prepared as for training: quantized modes upcast norms and the head to
    # float32 there, and the trained model ran with them so.
    reloaded = PeftModel.from_pretrained(
        prepare_for_training(load_model(tiny_source, mode, CPU), mode, gradient_checkpointing=False), folder
    )
    saved, loaded = get_peft_model_state_dict(model), get_peft_model_state_dict(reloaded)
    assert saved.keys() == loaded.keys() and saved
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    torch.testing.assert_close(logits(reloaded, batch, mode), trained, rtol=1e-6, atol=1e-6)

    with reloaded.disable_adapter():  # the adapter really changes the outputs: the comparison above means something
        base = logits(reloaded, batch, mode)
    assert (base - trained).abs().max() > 1e-2


def test_lora_counts_only_adapters_as_trainable(tiny_source):
    model = lora_model(tiny_source, get_mode("bf16"), r=4)
    counts = parameter_counts(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable_params"] == trainable
    # r * (in + out) per adapted linear: q,o 64->64; k,v 64->32; gate,up 64->128; down 128->64; 2 layers
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert trainable == 2 * per_layer
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


def test_grad_accum_consumes_micro_batches(tiny_source):
    mode = get_mode("bf16")
    model = lora_model(tiny_source, mode)
    served = []

    def counting():
        while True:
            served.append(1)
            yield fixed_batch(len(served))

    trainer = LoraTrainer(model, counting(), TrainSettings(grad_accum=3, max_steps=2), mode.torch_compute_dtype)
    records = trainer.train()
    assert len(served) == 6
    assert all(r.tokens == 3 * BATCH * SEQ_LEN for r in records)
    assert trainer.steps_done == 2
    assert trainer.train() == []  # max_steps reached


def test_base_weights_stay_frozen(tiny_source):
    mode = get_mode("bf16")
    model = lora_model(tiny_source, mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    LoraTrainer(model, itertools.repeat(fixed_batch()), TrainSettings(learning_rate=1e-2, max_steps=2),
                mode.torch_compute_dtype).train()
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name


def test_trainer_needs_trainable_parameters(tiny_source):
    mode = get_mode("bf16")
    model = prepare_for_training(load_model(tiny_source, mode, CPU), mode, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        LoraTrainer(model, itertools.repeat(fixed_batch()), TrainSettings(), mode.torch_compute_dtype)


def test_8bit_optimizer_trains(tiny_source):
    mode = get_mode("nf4")
    model = lora_model(tiny_source, mode)
    settings = TrainSettings(learning_rate=1e-2, optimizer="adamw8bit", schedule="constant", max_steps=4)
    trainer = LoraTrainer(model, itertools.repeat(fixed_batch()), settings, mode.torch_compute_dtype)
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    losses = [r.loss for r in trainer.train()]
    assert losses[-1] < losses[0]


def test_the_fused_adamw_trains_as_adamw(tiny_source):
    """The update in fused kernels instead of one per operation and chunk of tensors, the same arithmetic: the
    same losses."""
    mode = get_mode("bf16")
    losses = {}
    for optimizer in ("adamw", "adamw_fused"):
        settings = TrainSettings(learning_rate=1e-2, optimizer=optimizer, schedule="constant", max_steps=4)
        trainer = LoraTrainer(lora_model(tiny_source, mode), itertools.repeat(fixed_batch()), settings,
                              mode.torch_compute_dtype)
        assert trainer.optimizer.defaults["fused"] is (optimizer == "adamw_fused" or None)
        losses[optimizer] = [r.loss for r in trainer.train()]
    assert losses["adamw_fused"] == pytest.approx(losses["adamw"], rel=1e-4)
    assert losses["adamw"][-1] < losses["adamw"][0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="sgd"), "unknown optimizer"),
        (dict(schedule="step"), "unknown schedule"),
        (dict(grad_accum=0), ">= 1"),
        (dict(max_steps=-1), ">= 0"),
    ],
)
def test_train_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainSettings(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(dropout=1.0), dict(dropout=-0.1)])
def test_lora_settings_validation(kwargs):
    with pytest.raises(ValueError):
        LoraSettings(**kwargs)


def test_lora_settings_describe_is_json():
    assert LoraSettings(target_modules=("q_proj", "v_proj")).describe()["target_modules"] == ["q_proj", "v_proj"]


def test_lora_alpha_left_out_is_twice_the_rank_everywhere():
    """One default for every command and the bench suites: the tutorial's r=16, alpha=32, and the same scale at
    any other rank; an alpha given is kept."""
    assert LoraSettings().alpha == 32
    assert LoraSettings(r=64).alpha == 128 and LoraSettings(r=64).describe()["alpha"] == 128
    assert LoraSettings(r=64, alpha=16).alpha == 16

def test_save_adapter_replaces_atomically(tiny_source, tmp_path):
    model = lora_model(tiny_source, get_mode("bf16"))
    target = tmp_path / "out" / "adapter"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an older run")
    assert save_adapter(model, target) == target
    assert (target / "adapter_config.json").is_file()
    assert not (target / "stale.txt").exists()
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]  # no staging folder left beside it


def test_save_adapter_failure_leaves_old_adapter(tiny_source, tmp_path, monkeypatch):
    model = lora_model(tiny_source, get_mode("bf16"))
    target = tmp_path / "adapter"
    save_adapter(model, target)
    before = sorted(p.name for p in target.iterdir())

    def broken(folder, **kwargs):
        (folder / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def reference_training(model, batches, settings: TrainSettings, compute_dtype: torch.dtype) -> list[float]:
    """The trainer's step written out by hand, as it was before it ran through accelerate: per optimizer step
    ``grad_accum`` micro-batches under autocast, each loss divided by ``grad_accum`` and backpropagated, then
    gradient clipping, the optimizer, the schedule, gradients set to None. Returns the step losses."""
    from transformers import get_scheduler

    from qlora_core.paths import causal_lm_loss
    from qlora_core.trainer import build_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, settings)
    scheduler = get_scheduler(settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=settings.max_steps)
    losses = []
    for _ in range(settings.max_steps):
        model.train()
        micro_losses = []
        for _ in range(settings.grad_accum):
            with torch.autocast("cpu", dtype=compute_dtype):
                loss = causal_lm_loss(model, next(batches))
            (loss / settings.grad_accum).backward()
            micro_losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(torch.stack(micro_losses).float().mean().item())
    return losses


@pytest.mark.parametrize("name", ["bf16", "nf4"])
def test_one_process_trainer_matches_the_hand_written_step_bit_for_bit(tiny_source, name):
    """With one process the trainer's step (through accelerate) is exactly the plain loop: the same losses and
    the same adapter weights, compared with ``torch.equal``, over steps with accumulation, warm-up, a linear
    schedule and clipping that bites (max_grad_norm small enough to scale every step's gradients)."""
    from peft.utils import get_peft_model_state_dict

    mode = get_mode(name)
    settings = TrainSettings(learning_rate=1e-2, grad_accum=2, warmup_steps=1, max_steps=4, max_grad_norm=0.1)
    batch_stream = lambda: (fixed_batch(i) for i in itertools.count())  # noqa: E731 - fresh identical streams

    expected_model = lora_model(tiny_source, mode)
    expected = reference_training(expected_model, batch_stream(), settings, mode.torch_compute_dtype)
    model = lora_model(tiny_source, mode)
    records = LoraTrainer(model, batch_stream(), settings, mode.torch_compute_dtype).train()

    assert [r.loss for r in records] == expected
    trained, reference = get_peft_model_state_dict(model), get_peft_model_state_dict(expected_model)
    assert trained.keys() == reference.keys() and trained
    for key in trained:
        assert torch.equal(trained[key], reference[key]), key


def test_restore_puts_the_trainer_back_as_the_snapshot_found_it(tiny_source):
    """Steps taken between ``snapshot`` and ``restore`` (a profile) leave no trace: the next step after the
    restore is the step that would have come without them, bit for bit."""
    mode = get_mode("nf4")

    def trainer():
        model = lora_model(tiny_source, mode, dropout=0.1)
        return LoraTrainer(model, itertools.repeat(fixed_batch()), TrainSettings(max_steps=4, warmup_steps=1),
                           mode.torch_compute_dtype)

    undisturbed, disturbed = trainer(), trainer()
    torch.manual_seed(1)
    undisturbed.train(2)
    expected = undisturbed.step()
    torch.manual_seed(1)  # the same dropout masks for the first two steps of both
    disturbed.train(2)
    saved = disturbed.snapshot()
    disturbed.train(2)
    assert not all(torch.equal(a, b) for a, b in zip(disturbed.trainable, undisturbed.trainable))
    disturbed.restore(saved)
    assert disturbed.steps_done == 2
    assert disturbed.step().loss == expected.loss  # dropout drew the same masks: the RNG came back too
    assert all(torch.equal(a, b) for a, b in zip(disturbed.trainable, undisturbed.trainable))


def state_layout(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Per parameter, each state entry's shape and dtype (a number's type for plain numbers): what it holds."""
    return [{key: (tuple(value.shape), value.dtype) if torch.is_tensor(value) else type(value)
             for key, value in optimizer.state[param].items()}
            for group in optimizer.param_groups for param in group["params"]]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit"])
def test_upfront_optimizer_state_is_a_steps_state_and_leaves_the_adapters_as_they_were(tiny_source, optimizer):
    """``optimizer_state_upfront`` makes, before any step, the state a first step would make (every entry, its
    shape and dtype), changes no parameter, leaves the learning rate as the schedule set it, and the first step
    then adds no state."""
    mode = get_mode("nf4")
    settings = TrainSettings(learning_rate=1e-2, weight_decay=0.1, optimizer=optimizer, max_steps=2)

    def trainer(**changes):
        torch.manual_seed(0)
        model = lora_model(tiny_source, mode)
        return LoraTrainer(model, itertools.repeat(fixed_batch()), dataclasses.replace(settings, **changes),
                           mode.torch_compute_dtype)

    stepped = trainer()
    stepped.step()
    upfront = trainer(optimizer_state_upfront=True)
    fresh = trainer()
    assert upfront.optimizer.state and not fresh.optimizer.state
    assert state_layout(upfront.optimizer) == state_layout(stepped.optimizer)
    assert all(torch.equal(a, b) for a, b in zip(upfront.trainable, fresh.trainable, strict=True))
    assert all(param.grad is None for param in upfront.trainable)
    assert [g["lr"] for g in upfront.optimizer.param_groups] == [g["lr"] for g in fresh.optimizer.param_groups]
    record = upfront.step()
    assert math.isfinite(record.loss)
    assert state_layout(upfront.optimizer) == state_layout(stepped.optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(upfront.trainable, fresh.trainable, strict=True))
