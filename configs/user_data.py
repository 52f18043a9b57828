r"""Training on your own image-caption data: img2dataset shards, COCO captions, image folders.

The models are those of configs/shapes_tiny.py (change them the same way); only `config.data`
differs. Nothing is downloaded: the first run builds TFDS shards from `source_dir` into
`<workdir>/data` (or `data.data_dir`), logging and counting the records it skips.

  python -m muse_jax.train --config=configs/user_data.py --config.stage=tokenizer \
      --config.data.dataset=coco --config.data.source_dir=/data/coco --workdir=runs/coco
  python -m muse_jax.train --config=configs/user_data.py --config.stage=base \
      --config.data.dataset=coco --config.data.source_dir=/data/coco --workdir=runs/coco

  # A folder of images plus captions.csv ("file,caption" rows, header optional):
  ... --config.data.dataset=image_folder --config.data.source_dir=/data/my_images
  # img2dataset output (tar shards, NNNNN/ folders, or parquet with image bytes):
  ... --config.data.dataset=img2dataset --config.data.source_dir=/data/cc3m
  # A mixture (arg "mixture"): sources and rates under config.data.mixture.
  python -m muse_jax.train --config=configs/user_data.py:mixture \
      --config.data.mixture.coco.source_dir=/data/coco \
      --config.data.mixture.web.source_dir=/data/cc3m --workdir=runs/mix

`get_config("smoke")` (or "smoke,mixture") takes shapes_tiny's smoke sizes for tests.
"maskgit" starts from MaskGIT's released tokenizer instead of training one:

  python -m muse_jax.train --config=configs/user_data.py:maskgit --config.stage=tokenizer \
      --config.tokenizer.init_from=maskgit:/weights/tokenizer_imagenet256_checkpoint ...
"""

from __future__ import annotations

import ml_collections

try:
    from configs import shapes_tiny
except ImportError:  # Loaded by path (config_flags) from outside the repository root.
    import importlib.util
    import os

    _spec = importlib.util.spec_from_file_location(
        "shapes_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_tiny.py")
    )
    shapes_tiny = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(shapes_tiny)


def data_config(dataset: str = "image_folder") -> ml_collections.ConfigDict:
    """The data block for user data; every key is read by muse_jax/data/tasks.py."""
    return ml_collections.ConfigDict(
        dict(
            # "img2dataset" | "coco" | "image_folder" | "mixture" (of those; see `mixture`).
            dataset=dataset,
            # The local folder the dataset is built from (required; missing/empty: one-line
            # error). img2dataset: the --output_folder; coco: holds annotations/, train2017/,
            # val2017/; image_folder: the images and their captions table.
            source_dir="",
            data_dir="",  # Where the built TFDS shards go. Empty: `<workdir>/data`.
            # image_folder: the captions table (path, or relative to source_dir). Empty:
            # captions.csv (comma, CSV quoting) or captions.tsv (tab) in source_dir.
            captions_file="",
            layout="auto",  # img2dataset: "auto" | "webdataset" | "files" | "parquet".
            coco_year="2017",  # coco: "2017" or "2014" (val2014 is COCO-30k's usual pool).
            # Build time: images whose shorter side exceeds this are downscaled and re-encoded
            # (keeps shards small; crops at up to this size lose nothing). 0: store as found.
            max_image_size=512,
            # img2dataset / image_folder: share of records held out as 'test', by key hash
            # (coco uses val<year>). 'test' feeds the tokenizer's reconstruction summaries.
            test_fraction=0.01,
            build_workers=2,  # Build time: threads checking and re-encoding images.
            # Read time (change freely, no rebuild): drop images whose stored shorter side is
            # below min_image_size, or whose longer/shorter side ratio exceeds max_aspect_ratio.
            min_image_size=0,
            max_aspect_ratio=0.0,
            # Training crops a square of the full shorter side at a random position (False:
            # centred); evaluation always centres. Then resized to image_size (and hr_image_size).
            random_crop=True,
            # Records (encoded, ~50 KB each at 512 px) in each epoch's shuffle buffer.
            shuffle_buffer=10_000,
            image_size=32,  # The base stage's resolution (tokenizer input).
            hr_image_size=64,  # The super-res stage's resolution, from the same crop. 0: none.
            text_length=64,  # Caption tokens incl. EOS; longer captions are cut.
            # "byte" (no model file needed) or a SentencePiece .model path, e.g. T5's
            # spiece.model for a T5 text encoder (config.text_encoder.name="t5").
            vocabulary="byte",
            # dataset="mixture": {name: {dataset, source_dir, rate, and any per-source key
            # above (captions_file, layout, coco_year, max_image_size, test_fraction,
            # min_image_size, max_aspect_ratio) overriding the shared value}}. Sources are
            # drawn with probability rate / sum(rates), from a seeded, resumable stream.
            mixture=ml_collections.ConfigDict(),
        )
    )


def _mixture() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            coco=dict(dataset="coco", source_dir="", rate=0.2),
            web=dict(dataset="img2dataset", source_dir="", rate=0.8),
        )
    )


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = {a for a in arg.split(",") if a}
    unknown = args - {"smoke", "mixture", "maskgit"}
    if unknown:
        raise ValueError(
            f"Unknown config arguments {sorted(unknown)}; valid: smoke, mixture, maskgit."
        )
    config = shapes_tiny.get_config("smoke" if "smoke" in args else "")
    config.data = data_config("mixture" if "mixture" in args else "image_folder")
    if "mixture" in args:
        config.data.mixture = _mixture()
    # Shapes prompts would mean nothing here: sample summaries use these captions instead.
    config.eval.seen_prompts = ["a photo of a dog on a beach", "a red car parked on a street"]
    config.eval.held_out_prompts = ["a bowl of fruit on a wooden table"]
    # `muse_jax.evaluate`: captions and reference images from the held-out split; the shapes
    # alignment checker cannot read real photos. Point eval.clip.checkpoint and
    # eval.fid.inception_weights at the weight files (README, "Evaluation").
    config.eval.metrics = ("clip", "fid")
    config.eval.captions = "dataset"
    if "maskgit" in args:
        _maskgit_tokenizer(config)
    return config


def _maskgit_tokenizer(config) -> None:
    """arg "maskgit": MaskGIT's released ImageNet VQGAN (f16, 1024 codes) as the tokenizer,
    read from `tokenizer.init_from='maskgit:PATH'` (set PATH) instead of trained: 256x256
    images, 16x16 tokens, base stage only."""
    from muse_jax.convert import maskgit

    config.tokenizer.model = ml_collections.ConfigDict(maskgit.model_block())
    config.tokenizer.init_from = "maskgit:"
    config.tokenizer.train.num_steps = 0
    config.data.image_size = 256
    config.data.hr_image_size = 0
