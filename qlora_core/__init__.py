"""qlora-bench's library: what each weight quantization mode costs and loses when fine-tuning with LoRA.

Data flows one way: ``modes`` (the registry) -> ``models`` (load in a mode) -> ``trainer`` (LoRA steps) ->
``measure`` (memory, time, perplexity, quantization error) -> ``results`` (self-describing JSON) -> ``report``.
``cell`` runs one (model, mode) measurement; ``sweep`` runs many, each in a fresh process.
"""

from qlora_core.noise import drop_kernels_hint

# before anything imports bitsandbytes, which logs the hint at import
drop_kernels_hint()

__version__ = "0.1.0"
