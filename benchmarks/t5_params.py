r"""Prints the parameter count of every T5 v1.1 encoder preset, without allocating any weights.

Counts come from `jax.eval_shape` of the Flax module, so even XXL (~4.76e9) costs no memory.
The embedding is counted once (T5X's single `token_embedder`; HF ties `encoder.embed_tokens`).

  python benchmarks/t5_params.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from muse_jax.models import t5  # noqa: E402


def main() -> None:
    print(f"{'preset':<8}{'d_model':>8}{'d_ff':>7}{'layers':>7}{'heads':>6}{'params':>16}")
    for name, config in t5.PRESETS.items():
        count = t5.param_count(config)
        print(
            f"{name:<8}{config.d_model:>8}{config.d_ff:>7}{config.num_layers:>7}"
            f"{config.num_heads:>6}{count:>16,} ({count / 1e9:.3f}B)"
        )


if __name__ == "__main__":
    main()
