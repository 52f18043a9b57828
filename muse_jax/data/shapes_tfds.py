"""TFDS builder for the procedural shapes world (nothing is downloaded).

Every generation parameter lives in a `ShapesConfig` whose name is a hash of
those parameters, so changing any of them builds a separate dataset directory
instead of silently reusing an old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from muse_jax.data import shapes


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Generation parameters; see `make_builder` for their meaning."""

    image_size: int = 32
    num_train: int = 20000
    num_test: int = 1000
    seed: int = 0
    held_out: tuple[str, ...] = ()
    two_object_prob: float = 0.3
    hr_image_size: int = 0


def _params(
    image_size: int,
    num_train: int,
    num_test: int,
    seed: int,
    held_out: Sequence[str],
    two_object_prob: float,
    hr_image_size: int = 0,
) -> dict:
    params = dict(
        image_size=int(image_size),
        num_train=int(num_train),
        num_test=int(num_test),
        seed=int(seed),
        # Sorted and normalised so equivalent held-out lists share a config.
        held_out=tuple(sorted(shapes.normalize_held_out(held_out))),
        two_object_prob=float(two_object_prob),
    )
    if hr_image_size:  # Only when set, so single-resolution datasets keep their names.
        params["hr_image_size"] = int(hr_image_size)
    return params


def config_name(params: dict) -> str:
    """Readable prefix plus a short hash of every parameter."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"s{params['image_size']}_n{params['num_train']}_{digest}"


def make_config(**kwargs) -> ShapesConfig:
    """Builds a `ShapesConfig` named after its parameters (same args as `make_builder`)."""
    params = _params(**kwargs)
    return ShapesConfig(
        name=config_name(params),
        description=f"Procedural shapes: {json.dumps(params, sort_keys=True)}",
        **params,
    )


class ShapesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Coloured-shape scenes with captions; 'train' excludes held-out combos, 'test' does not.

    Not registered with TFDS (use `make_builder`) so importing this module twice
    or defining other builders cannot collide with a global name.
    """

    name = "muse_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # A default config is required by TFDS bookkeeping; real use passes a
    # custom, parameter-hashed config through `make_builder`.
    BUILDER_CONFIGS = [
        make_config(
            image_size=32, num_train=20000, num_test=1000, seed=0, held_out=(), two_object_prob=0.3
        )
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file; TFDS 4.9's default needs `importlib_resources`, absent on py>=3.9 installs."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: ShapesConfig = self.builder_config
        s, hr = cfg.image_size, cfg.hr_image_size
        features = {"image": tfds.features.Image(shape=(s, s, 3)), "caption": tfds.features.Text()}
        if hr:  # The same scene at the super-res stage's resolution.
            features["image_hr"] = tfds.features.Image(shape=(hr, hr, 3))
        return self.dataset_info_from_configs(
            description="Procedurally rendered coloured shapes with plain-English captions.",
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("caption", "image"),
            # Keep records in index order so record i == generate_example(..., i);
            # training pipelines shuffle with tf.data anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Procedural: nothing to download.
        cfg: ShapesConfig = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        cfg: ShapesConfig = self.builder_config
        for i in range(num):
            scene = shapes.example_scene(
                cfg.seed, split, i, held_out=cfg.held_out, two_object_prob=cfg.two_object_prob
            )
            record = {
                "image": shapes.render(scene, cfg.image_size),
                "caption": shapes.caption(scene),
            }
            if cfg.hr_image_size:
                record["image_hr"] = shapes.render(scene, cfg.hr_image_size)
            yield i, record


def make_builder(
    data_dir: str,
    *,
    image_size: int = 32,
    num_train: int = 20000,
    num_test: int = 1000,
    seed: int = 0,
    held_out: Sequence[str] = (),
    two_object_prob: float = 0.3,
    hr_image_size: int = 0,
) -> tfds.core.DatasetBuilder:
    """Returns a shapes builder whose config name encodes all parameters.

    Call `download_and_prepare()` (offline, generates the data) then
    `as_dataset(split='train' | 'test')`. Example i of a split equals
    `shapes.generate_example(seed, split, i, ...)`, and records are stored in
    index order (`disable_shuffling`), so shuffle in the input pipeline.
    """
    cfg = make_config(
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
        held_out=held_out,
        two_object_prob=two_object_prob,
        hr_image_size=hr_image_size,
    )
    # TFDS refuses a custom config that merely shares a registered config's
    # name, so reuse the registered object when the parameters are the defaults.
    registered = ShapesBuilder.builder_configs.get(cfg.name)
    return ShapesBuilder(data_dir=data_dir, config=registered or cfg)
