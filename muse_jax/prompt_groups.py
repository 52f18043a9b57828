"""The evaluation prompt groups a config names: `config.eval.<group>_prompts`.

Every evaluation (the main job's report, `muse_jax.evaluate`, the trainer's summaries and the
text-embedding precompute) reads the groups from here, so that a new group is one config key.
The shapes world has three: seen single-object prompts, held-out colour-shape combinations,
and two-object relations; a group a config does not set, or sets empty, is skipped.
"""

from __future__ import annotations

from typing import Any

GROUPS: tuple[str, ...] = ("seen", "held_out", "two_object")


def prompt_groups(eval_config: Any) -> list[tuple[str, list[str]]]:
    """[(group, prompts)] in `GROUPS` order, for each group with at least one prompt."""
    out = []
    for group in GROUPS:
        prompts = [str(p) for p in (eval_config.get(f"{group}_prompts", None) or ())]
        if prompts:
            out.append((group, prompts))
    return out


def all_prompts(eval_config: Any) -> list[str]:
    """Every group's prompts, in group order."""
    return [p for _, prompts in prompt_groups(eval_config) for p in prompts]
