"""Default measurement settings per machine, read by both entry points (the CLI's sweep and bench/).

``gpu`` is the published profile. Its step is 32 blocks of 2,048 tokens (65,536 tokens) because on an H200 a
SmolLM2-135M step of 8 x 512 tokens is bound by kernel count, not compute: its CPU thread spent 0.11-0.25 s a
step while the step took 0.30-0.59 s, and the interquartile range of step times was 11-22 % of the median in
every variant tried (one thread, a pinned core, garbage collection frozen). At 32 x 2,048 the GPU is busy
throughout and the IQR was 0.7 % (bf16), 0.8 % (nf4-dq) and 3.0 % (int8) of the median (H200, torch 2.11,
bitsandbytes 0.50.2; 20 steps each). With that little noise, 1 warm-up and 6 timed steps rank the modes: in
all 14 cells of the 2026-12-02 pair (2 warm-up steps each) the second step was within 3.1 % of the median
(within 1.1 % in 12), the first 1.2-4x it (cuDNN and kernel selection). Evaluation keeps the full protocol
(1,024-token windows, stride 512, the whole text), 64 windows a forward pass: at 32 an evaluation spent as
much time launching kernels on the CPU as the GPU spent running them (H200 profile, nf4-dq: 1.75 s wall,
1.12 s of kernels).

``cpu`` finishes in minutes on the embedded 135M model and evaluates a slice of each text: its figures show the
harness working, not publishable numbers.
"""

from __future__ import annotations

PROFILES = {
    "gpu": dict(seq_len=2048, batch_size=32, steps=7, timing_warmup=1, eval_window=1024, eval_stride=512,
                eval_max_tokens=None, eval_batch_size=64),
    "cpu": dict(seq_len=128, batch_size=2, steps=4, timing_warmup=1, eval_window=128, eval_stride=64,
                eval_max_tokens=1024, eval_batch_size=4),
}
