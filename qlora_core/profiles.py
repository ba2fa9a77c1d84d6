"""Default measurement settings per machine, read by both entry points (the CLI's sweep and bench/).

``gpu`` is the published profile. Its step is 32 blocks of 2,048 tokens (65,536 tokens) because on an H200 a
SmolLM2-135M step of 8 x 512 tokens is bound by kernel count, not compute: its CPU thread spent 0.11-0.25 s a
step while the step took 0.30-0.59 s, and the interquartile range of step times was 11-22 % of the median in
every variant tried (one thread, a pinned core, garbage collection frozen). At 32 x 2,048 the GPU is busy
throughout and the IQR was 0.7 % (bf16), 0.8 % (nf4-dq) and 3.0 % (int8) of the median (H200, torch 2.11,
bitsandbytes 0.50.2; 20 steps each). With that little noise, 2 warm-up and 6 timed steps rank the modes, and
a 7-mode run fits in three minutes. Evaluation keeps the full protocol (1,024-token windows, stride 512,
the whole text).

``cpu`` finishes in minutes on the embedded 135M model and evaluates a slice of each text: its figures show the
harness working, not publishable numbers.
"""

from __future__ import annotations

PROFILES = {
    "gpu": dict(seq_len=2048, batch_size=32, steps=8, timing_warmup=2, eval_window=1024, eval_stride=512,
                eval_max_tokens=None, eval_batch_size=32),
    "cpu": dict(seq_len=128, batch_size=2, steps=4, timing_warmup=1, eval_window=128, eval_stride=64,
                eval_max_tokens=1024, eval_batch_size=4),
}
