r"""Example sweep on the embedded default (`configs/shapes_tiny.py`): base learning rate x
guidance scale, 3 x 2 = 6 runs of the base stage that share one tokenizer.

The guidance scale changes the sample grids that the base stage writes to TensorBoard (and the
samples of `muse_jax.sample` / `muse_jax.pipeline` run on the same workdir), not the training.

  launch/local_train.sh --config=configs/shapes_tiny.py --workdir=runs/sweep --stage=tokenizer
  launch/local_train.sh --config=configs/shapes_tiny.py --workdir=runs/sweep --stage=base \
      --sweep=configs/sweeps/shapes_lr.py   # -> runs/sweep/lr0.0005_gs1/base, ...

  python -m muse_jax.sweep configs/sweeps/shapes_lr.py   # lists the 6 points
"""

from muse_jax.sweep import axis, product


def get_sweep():
    return product(
        axis("base.train.optimizer.learning_rate", [5e-4, 1e-3, 2e-3]),
        axis("base.sampling.guidance_scale", [1.0, 3.0]),
    )
