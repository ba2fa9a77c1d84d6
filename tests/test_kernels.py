"""The lean path's fused kernels (qlora_core/kernels.py): the seam swaps the named computations into one model
instance and the loss, refuses what it cannot fit, and trains as without them; Liger-Kernel's own (Triton, CUDA)
on a GPU."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from qlora_core.cell import CellSettings, run_cell
from qlora_core.kernels import (FUSED_LINEAR_CROSS_ENTROPY, KERNELS, RMS_NORM, SWIGLU, KernelFunctions,
                                apply_kernels, check_kernels, liger_functions, rms_norms)
from qlora_core.levers import tile_mlps
from qlora_core.paths import IGNORE_INDEX, chunked_causal_lm_loss
from qlora_core.report import footnotes
from qlora_core.settings import kernel_names
from test_levers import TILED_GRADIENT_REL_TOL, ids, loss_and_gradient
from test_paths import adapted
from tiny import tiny_cell_settings

LIGER = importlib.util.find_spec("liger_kernel") is not None
#: Liger's kernels against transformers' eager modules on the GPU, bf16 under autocast: they round in other
#: places (the RMSNorm's fp32 sum in one pass, the loss's logits never cast to bf16 before the fp32 softmax),
#: so the loss agrees to bf16's rounding and the adapters' gradient to a few of its units.
LIGER_LOSS_REL_TOL = 1e-2
LIGER_GRADIENT_REL_TOL = 5e-2


def _rms_norm(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _linear_cross_entropy(hidden, weight, labels, bias):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=IGNORE_INDEX)


class Counted:
    """The computations of transformers' own modules, written out, each call counted: the seam's wiring is
    tested against the model's own loss on a CPU, where Triton is not."""

    def __init__(self):
        self.calls = dict.fromkeys(KERNELS, 0)

    def counting(self, name, function):
        def counted(*args):
            self.calls[name] += 1
            return function(*args)
        return counted

    def functions(self) -> KernelFunctions:
        return KernelFunctions(rms_norm=self.counting(RMS_NORM, _rms_norm),
                               swiglu=self.counting(SWIGLU, lambda gate, up: F.silu(gate) * up),
                               linear_cross_entropy=self.counting(FUSED_LINEAR_CROSS_ENTROPY, _linear_cross_entropy))


@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_each_kernel_runs_in_place_of_its_computation_with_the_same_loss_and_gradients(mode):
    """tiny-llama (2 layers, 5 RMSNorms): every norm and MLP goes through the swapped-in function, in forward
    and in the checkpointed recompute, and the loss through the fused one once; loss and adapter gradients as
    the lean path's own."""
    batch = ids()
    plain = loss_and_gradient(adapted("tiny-llama", mode, "lean"), chunked_causal_lm_loss, batch)
    counted = Counted()
    model, loss_fn = apply_kernels(adapted("tiny-llama", mode, "lean"), KERNELS, chunked_causal_lm_loss,
                                   counted.functions())
    fused = loss_and_gradient(model, loss_fn, batch)
    assert counted.calls == {RMS_NORM: 2 * 2 * 2 + 1, SWIGLU: 2 * 2, FUSED_LINEAR_CROSS_ENTROPY: 1}
    assert fused[0] == pytest.approx(plain[0], rel=1e-3)
    assert (fused[1] - plain[1]).norm() <= TILED_GRADIENT_REL_TOL * plain[1].norm()


def test_a_tiled_mlp_runs_the_kernel_in_each_tile():
    """MLP tiling wraps the forward the MLP has (the kernel's), not its class's: 64 tokens in tiles of 24 are 3
    tiles, each run at least in forward and in a recompute, in 2 layers (how often the nested checkpoints
    recompute a tile is torch's to decide)."""
    counted = Counted()
    model, loss_fn = apply_kernels(adapted("tiny-llama", "bf16", "lean"), (SWIGLU,), chunked_causal_lm_loss,
                                   counted.functions())
    loss_and_gradient(tile_mlps(model, 24), loss_fn, ids(rows=1))
    assert counted.calls[SWIGLU] >= 3 * 2 * 2


def test_kernels_change_one_instance_and_keep_its_names():
    model = adapted("tiny-llama", "bf16", "lean")
    names = [name for name, _ in model.named_parameters()]
    apply_kernels(model, (RMS_NORM, SWIGLU), chunked_causal_lm_loss, Counted().functions())
    other = adapted("tiny-llama", "bf16", "lean")
    assert [name for name, _ in model.named_parameters()] == names
    assert all("forward" in vars(norm) for norm in rms_norms(model))
    assert not any("forward" in vars(norm) for norm in rms_norms(other))


@pytest.mark.parametrize("kernel, message", [(RMS_NORM, "needs RMSNorm layers"), (SWIGLU, "needs decoder MLPs")])
def test_a_model_a_kernel_does_not_fit_is_refused_unchanged(kernel, message):
    model = adapted("tiny-bloom", "bf16", "lean")
    with pytest.raises(ValueError, match=message):
        apply_kernels(model, (kernel,), chunked_causal_lm_loss, Counted().functions())
    assert not any("forward" in vars(module) for module in model.modules())


def test_no_kernel_is_the_model_and_loss_as_they_were():
    model = adapted("tiny-llama", "bf16", "lean")
    assert apply_kernels(model, (), chunked_causal_lm_loss) == (model, chunked_causal_lm_loss)


@pytest.mark.parametrize("kernels, path, strategy, message", [
    (("rms-norm", "flash"), "lean", "ddp", "unknown kernel.*'flash'"),
    ((SWIGLU, SWIGLU), "lean", "ddp", "named twice"),
    ((RMS_NORM,), "reference", "ddp", "options of the lean path"),
    ((FUSED_LINEAR_CROSS_ENTROPY,), "lean", "fsdp", "FSDP holds only its shard"),
])
def test_a_set_up_the_kernels_cannot_run_is_refused(kernels, path, strategy, message):
    with pytest.raises(ValueError, match=message):
        check_kernels(kernels, path, strategy)
    with pytest.raises(ValueError, match=message):
        CellSettings(mode="bf16", path=path, strategy=strategy, kernels=kernels)


def test_the_option_reads_names_and_none():
    assert kernel_names("rms-norm, swiglu") == (RMS_NORM, SWIGLU)
    assert kernel_names("none") == ()
    for text in ("rmsnorm", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown kernel"):
            kernel_names(text)


def test_a_cell_with_kernels_round_trips_and_predicts_no_floor():
    from qlora_core.cell import predicted_floor
    from qlora_core.shapes import shape_config

    settings = CellSettings(mode="nf4-dq", shape="Llama-3.1-8B", path="lean", kernels=(SWIGLU,))
    assert CellSettings.from_dict(settings.describe()) == settings
    assert predicted_floor(settings, shape_config("Llama-3.1-8B"), "cuda") is None
    assert predicted_floor(dataclasses.replace(settings, kernels=()), shape_config("Llama-3.1-8B"), "cuda")


@pytest.mark.skipif(LIGER, reason="Liger-Kernel is installed: its absence cannot be seen")
def test_without_liger_the_kernels_say_how_to_install_it():
    with pytest.raises(ImportError, match=r"qlora-bench\[liger\]"):
        liger_functions()


def _liger_on_cuda():
    if not LIGER:
        pytest.skip("needs Liger-Kernel (pip install 'qlora-bench[liger]')")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_liger_kernels_give_the_lean_path_s_loss_and_gradients_on_cuda(mode):
    """Each of Liger's kernels, alone, on tiny-llama on the GPU under bf16 autocast, against the lean path's own
    modules and chunked loss."""
    _liger_on_cuda()
    batch = ids().cuda()

    def on_cuda(kernels):
        model, loss_fn = apply_kernels(adapted("tiny-llama", mode, "lean").cuda(), kernels, chunked_causal_lm_loss)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    plain = on_cuda(())
    for kernel in KERNELS:
        loss, gradient = on_cuda((kernel,))
        assert loss == pytest.approx(plain[0], rel=LIGER_LOSS_REL_TOL), kernel
        assert (gradient - plain[1]).norm() <= LIGER_GRADIENT_REL_TOL * plain[1].norm(), kernel


@pytest.mark.gpu
def test_a_cell_with_every_kernel_trains_as_the_lean_path_on_cuda(tiny_model_dir):
    """A whole cell (embedded-tokenizer tiny model, nf4, 3 steps) with all three kernels: the same losses as
    without them within the compiled path's tolerance, its kernels in its settings, and no prediction."""
    _liger_on_cuda()
    from test_compiled import LOSS_TOLERANCE

    eager = tiny_cell_settings(tiny_model_dir, "nf4", path="lean", eval_merged=False, device="cuda")
    eager = dataclasses.replace(eager, lora=dataclasses.replace(eager.lora, dropout=0.0))
    plain, fused = run_cell(eager), run_cell(dataclasses.replace(eager, kernels=KERNELS))
    assert fused["status"] == "ok", fused.get("error")
    assert fused["training"]["losses"] == pytest.approx(plain["training"]["losses"], abs=LOSS_TOLERANCE)
    assert fused["settings"]["kernels"] == list(KERNELS) and fused["floor"] is None
    assert any("(Liger-Kernel): rms-norm, swiglu, fused-linear-cross-entropy;" in note
               for note in footnotes([plain, fused]))
    assert not any("Liger-Kernel" in note for note in footnotes([plain]))
