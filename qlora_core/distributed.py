"""Several training processes of one host: the accelerator every trainer steps through, and two launchers.

One concern: starting ranks and joining them. ``torchrun`` runs a module's ``main`` in N processes through
torch's own launcher (``torch.distributed.run``, what users run multi-GPU training with); ``launch`` runs a
function in N fresh processes and returns their values (for tests and library callers). Both give each rank
the environment torch.distributed and accelerate read (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK);
the process group itself is created by accelerate when a rank builds its first ``Accelerator``
(``make_accelerator``): gloo for CPU processes, nccl for CUDA ones. What a rank trains, and how its batches are
shared (``data.rank_rows``), is the trainer's business.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Every rank runs on this host: torch.distributed rendezvous over the loopback interface.
LOCALHOST = "127.0.0.1"


def make_accelerator(device: torch.device):
    """An ``accelerate.Accelerator`` for a trainer whose model is on ``device``.

    - Mixed precision ``"no"``: the trainer autocasts itself. accelerate's own mixed precision patches
      ``model.forward`` only (``Accelerator.prepare_model``), and the lean path computes its loss through the
      decoder body and the head directly, bypassing ``forward``; it also converts the outputs to fp32, a copy of
      the full-vocabulary logits the reference path does not make today.
    - No device placement: the model stays where the mode loaded it (bitsandbytes places 4-bit weights at load).
    - ``cpu``: for a CPU model; accelerate then joins several launched processes with gloo. Without it, on a
      machine without CUDA, accelerate sees no distributed set-up at all (``PartialState._prepare_backend``).

    accelerate keeps its state per process, and refuses a second ``Accelerator`` with other settings (a
    ``ValueError``): transformers' Trainer, run earlier in the same process by the classic workflow, leaves it
    at its own mixed precision. So the state is cleared first, as transformers itself does before each
    Trainer; the process-level part (``PartialState``) is kept where a process group already exists, since it
    describes that group.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    group_exists = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not group_exists)
    return Accelerator(cpu=device.type == "cpu", mixed_precision="no", device_placement=False)


def free_port() -> int:
    """A TCP port free on the loopback interface now, for rank 0's rendezvous store (the operating system picks
    it; another program could take it before rank 0 binds it, a race torchrun's standalone mode accepts too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def torchrun(module: str, args: list[str], num_processes: int) -> int:
    """Run ``python -m module *args`` as ``num_processes`` ranks of this host under ``torch.distributed.run``
    (standalone: it picks the rendezvous port itself) and return its exit code: 0 when every rank exited 0.
    When a rank fails, torchrun stops the others (they would otherwise wait in a collective until its timeout).
    The ranks' output goes to this process's stderr (a cell's log in a worker)."""
    import subprocess
    import sys

    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={num_processes}", "-m", module, *args]
    return subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False).returncode


def launch(fn: Callable[..., Any], args: tuple = (), num_processes: int = 2) -> list[Any]:
    """Run ``fn(*args)`` in ``num_processes`` fresh processes of this host and return what each returned, by rank.

    Ranks start by spawn (a fresh interpreter each: no state copied from this process, which may hold a model
    or CUDA context), with MASTER_ADDR, MASTER_PORT and WORLD_SIZE shared and RANK = LOCAL_RANK = the rank.
    ``fn`` must be importable by name (a module-level function) and return something picklable; the values come
    back through files in a temporary folder, so a large one cannot block a rank in a pipe. A rank that raises
    makes this raise ``torch.multiprocessing.ProcessRaisedException`` with its traceback; torch ends the
    other ranks then.
    """
    from accelerate.utils import patch_environment

    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    with tempfile.TemporaryDirectory(prefix="qlora-bench-ranks-") as folder, patch_environment(
        master_addr=LOCALHOST, master_port=str(free_port()), world_size=str(num_processes),
        local_world_size=str(num_processes),
    ):
        torch.multiprocessing.start_processes(
            _run_rank, args=(fn, args, Path(folder)), nprocs=num_processes, join=True, start_method="spawn"
        )
        return [pickle.loads(_result_file(Path(folder), rank).read_bytes()) for rank in range(num_processes)]


def _result_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.pickle"


def _run_rank(rank: int, fn: Callable[..., Any], args: tuple, folder: Path) -> None:
    """One rank: its environment, ``fn``, its return value written for ``launch``; the process group (if
    ``fn`` made one) destroyed at the end, as torch asks of every process that created one."""
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    try:
        result = fn(*args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _result_file(folder, rank).write_bytes(pickle.dumps(result))
