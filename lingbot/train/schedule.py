"""The learning-rate schedule of every trainer (world model, VAE, plain BC): a linear warmup and a cosine
decay to zero at the last step, as a factor of the base rate (`torch.optim.lr_scheduler.LambdaLR` or set
by hand)."""

from __future__ import annotations

import math


def lr_factor(step: int, steps: int, warmup: int = 0, schedule: str = "cosine",
              decay_from_start: bool = False) -> float:
    """The factor at `step` (0-based) of `steps`: `(step + 1) / warmup` during the first `warmup` steps,
    then cosine decay over the remaining steps (`schedule` "constant": 1.0 after warmup).

    `decay_from_start`: the cosine runs over all `steps` from step 0 and the warmup ramp multiplies it
    (the VAE's and plain BC's), instead of starting when the warmup ends."""
    if decay_from_start:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
