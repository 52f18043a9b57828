"""Shared fixtures: tiny configs and one trained smoke experiment reused by slow tests."""

from __future__ import annotations

import os
import sys

import pytest
from helpers import ROOT  # pytest puts tests/ (this file's folder) on sys.path for it.

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests run on CPU. With the [tpu] extra installed (libtpu, for tests/test_aot.py), JAX would
# otherwise probe this host for a TPU in every process; the aot tests describe theirs without one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, ROOT)  # `configs`, `tests.*` and this checkout's `muse_jax`.


@pytest.fixture
def smoke_config():
    from configs import shapes_tiny

    return shapes_tiny.get_config("smoke")


@pytest.fixture(scope="session")
def trained_smoke(tmp_path_factory):
    """A workdir with both stages trained for a few steps on the smoke config."""
    from configs import shapes_tiny
    from muse_jax.train import trainer

    workdir = str(tmp_path_factory.mktemp("smoke"))
    config = shapes_tiny.get_config("smoke")
    trainer.train(config, workdir, "tokenizer")
    trainer.train(config, workdir, "base")
    return config, workdir


@pytest.fixture(scope="session")
def trained_cascade(trained_smoke, tmp_path_factory):
    """A copy of `trained_smoke` with the base decoder and the super-res stages trained too (the
    original keeps only the base stages, so tests of the one-stage path see exactly that). The
    super-res stage reads the low-res image the base decoder makes."""
    import shutil

    from muse_jax import stages
    from muse_jax.train import trainer

    config, source = trained_smoke
    workdir = str(tmp_path_factory.mktemp("cascade") / "run")
    shutil.copytree(source, workdir)
    for stage in ("base_decoder", *stages.SUPERRES_STAGES):
        trainer.train(config, workdir, stage)
    return config, workdir
