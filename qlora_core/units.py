"""Byte sizes every measurement shares, written once: binary units, and the bytes of the value types the
memory model counts where it has no tensor to ask (quantization constants, adapters and their gradients,
optimizer moments: float32; bookkeeping indices: int64)."""

MIB, GIB = 2**20, 2**30
FLOAT32 = 4
INT64 = 8
