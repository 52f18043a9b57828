"""optax optimisers and learning-rate schedules from config."""

from __future__ import annotations

import optax

from muse_jax.errors import UsageError


def learning_rate(opt_cfg, num_steps: int) -> optax.Schedule:
    warmup = min(int(opt_cfg.warmup_steps), max(num_steps - 1, 0))
    if opt_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, opt_cfg.learning_rate, warmup, max(num_steps, warmup + 1), end_value=0.0
        )
    if opt_cfg.schedule == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, opt_cfg.learning_rate, max(warmup, 1)),
                optax.constant_schedule(opt_cfg.learning_rate),
            ],
            [max(warmup, 1)],
        )
    raise UsageError(f"Unknown optimizer schedule {opt_cfg.schedule!r}; valid: cosine, constant.")


def make(opt_cfg, num_steps: int) -> optax.GradientTransformation:
    """Gradient clipping + the named optimiser with a warmup schedule."""
    lr = learning_rate(opt_cfg, num_steps)
    if opt_cfg.name == "adamw":
        opt = optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay)
    elif opt_cfg.name == "adam":
        opt = optax.adam(lr, b1=opt_cfg.b1, b2=opt_cfg.b2)
    elif opt_cfg.name == "adafactor":
        opt = optax.adafactor(lr)
    else:
        raise UsageError(f"Unknown optimizer {opt_cfg.name!r}; valid: adamw, adam, adafactor.")
    if opt_cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), opt)
    return opt
