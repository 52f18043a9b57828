"""The tokenizer stage's train step really learns: it overfits a small batch."""

import jax
import numpy as np

from muse_jax import parallel
from muse_jax.train.tokenizer_stage import TokenizerStage
from tests.helpers import shapes_images


def test_tokenizer_overfits_a_small_batch(smoke_config, tmp_path):
    smoke_config.tokenizer.train.num_steps = 150
    smoke_config.tokenizer.train.optimizer.learning_rate = 3e-3
    stage = TokenizerStage(smoke_config, str(tmp_path))
    images = shapes_images()
    mesh = parallel.create_mesh(smoke_config)
    rules = parallel.rules(smoke_config)
    state, _, _ = parallel.jit_init(stage.init, jax.random.PRNGKey(0), mesh, rules)
    step = jax.jit(lambda s, b: stage.train_step(s, b, None))
    batch = {"image": images}
    errors = []
    for _ in range(150):
        state, metrics = step(state, batch)
        errors.append(float(metrics["l2"]))
    assert np.all(np.isfinite(errors))
    first, last = np.mean(errors[:5]), np.mean(errors[-5:])
    assert last < 0.3 * first, (first, last)
    assert int(state.step) == 150
