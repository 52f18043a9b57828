r"""Paper-scale Muse (Chang et al., 2023, arXiv 2301.00704): 256x256 base stage on T5-XXL.

Composes on `configs/shapes_tiny.get_config()` and overrides only what the paper fixes; the
argument picks a model-size preset (`PRESETS`). Nothing here fits a CPU: size it first with

  python -m muse_jax.sizing --config=configs/muse_paper.py:3b --batch_size=512 \
      --mesh=data=1,fsdp=32,tensor=1

and launch on a pod slice (precomputed T5-XXL embeddings, the paper's setting):

  python -m muse_jax.embed --config=configs/muse_paper.py:3b --workdir=gs://B/muse3b \
      --output_dir=gs://B/muse3b/text_emb --config.data.dataset=... \
      --config.text_encoder.checkpoint=/ckpt/t5_1_1_xxl --config.data.vocabulary=/ckpt/spiece.model
  python -m muse_jax.train --config=configs/muse_paper.py:3b --workdir=gs://B/muse3b \
      --config.stage=tokenizer --config.data.dataset=...
  python -m muse_jax.train --config=configs/muse_paper.py:3b --workdir=gs://B/muse3b \
      --config.stage=base --config.text_embeddings=gs://B/muse3b/text_emb \
      --config.mesh.shape.data=1 --config.mesh.shape.fsdp=32

Sources (the paper's LaTeX source, appendix tables "Configuration and training hyperparameters
for base model / VQGAN / Super-Resolution Model", sections 3-4, abstract):
- 3B base: 48 layers, hidden 2048, MLP 8192 (Table "base model"); heads are not given: 32
  (head dim 64, as in T5/MaskGIT) is our choice and does not change the parameter count.
- 632M base (CC3M model): only the total is given. We take the paper's other transformer width
  (super-res table: hidden 1024, MLP 4096) at the depth that lands on 632M: 36 layers.
- Super-res (table "Super-Resolution Model"): a 16-layer low-res encoder over the 16x16 base
  tokens, 32 layers (self-attention over 64x64 tokens, cross-attention to [text; low-res]),
  hidden 1024, MLP 4096. It goes with the 3B system; the CC3M system's super-res is only given
  as 268M (632M + 268M = "900M"), so the `632m` preset's super-res (the table's layout scaled
  down, keeping its 2:1 depth ratio: 10 layers + a 5-layer low-res encoder at 1024) is our
  approximation of that number.
- VQGANs: codebook 8192; base channels 128, 2 residual blocks per resolution, no non-local
  blocks (appendix "VQGAN Architecture"); f=16 on 256x256 (16x16 tokens) and f=8 on 512x512
  (64x64 tokens) (section 3.2). Channel multipliers are MaskGIT's / taming's (not in the paper).
- T5-XXL frozen encoder, prompts up to 64 tokens (figure "text understanding"); batch 512, lr
  1e-4, weight decay 0.045, b1 0.9, b2 0.96, 5000 warmup steps, cosine decay, 1.5M steps.
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

# Model-size presets: base transformer and super-res transformer (width/depth/heads/mlp), and
# the paper's parameter count for each (None: the paper gives no number for that part).
PRESETS: dict[str, dict] = {
    "632m": dict(
        base=dict(width=1024, depth=36, num_heads=16, mlp_dim=4096),
        base_paper_params=632e6,  # "632M" (CC3M base model, Table CC3M / section 1).
        superres=dict(width=1024, depth=10, lowres_depth=5, num_heads=16, mlp_dim=4096),
        superres_paper_params=268e6,  # "632M + 268M" (Table CC3M); dims not given: approximate.
    ),
    "3b": dict(
        base=dict(width=2048, depth=48, num_heads=32, mlp_dim=8192),
        base_paper_params=3e9,  # "3B" (abstract, section 4); the table's dims give ~3.26e9.
        superres=dict(width=1024, depth=32, lowres_depth=16, num_heads=16, mlp_dim=4096),
        superres_paper_params=None,  # Appendix table gives dims only.
    ),
}

T5_XXL_PAPER_PARAMS = 4.6e9  # "T5-XXL ... consists of 4.6B parameters" (section 4).


def _vqgan(channel_mult: tuple[int, ...]) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            channels=128,
            channel_mult=channel_mult,
            patch_size=1,  # All-convolutional at full resolution, as in the paper.
            num_res_blocks=2,
            embedding_dim=256,  # MaskGIT's; not stated in the Muse paper.
            codebook_size=8192,
            norm_groups=32,
            # ViT-VQGAN-style cosine lookup (keeps more codes alive); the paper's taming-style
            # VQGAN uses raw Euclidean lookup: set False to match it exactly.
            l2_normalize_codes=True,
            commitment_cost=0.25,
            dtype="bfloat16",
        )
    )


def get_config(arg: str = "3b") -> ml_collections.ConfigDict:
    """`arg` picks the preset: `configs/muse_paper.py:632m` or `configs/muse_paper.py:3b`."""
    preset_name = arg or "3b"
    if preset_name not in PRESETS:
        raise ValueError(
            f"Unknown muse_paper preset {arg!r}; valid: {sorted(PRESETS)} "
            "(e.g. --config=configs/muse_paper.py:3b)."
        )
    preset = PRESETS[preset_name]
    config = shapes_tiny.get_config()
    config.preset = preset_name

    config.data.dataset = "shapes"  # Point at a real image-text dataset to train for real.
    config.data.image_size = 256
    config.data.text_length = 64

    # f = 2 ** (len(channel_mult) - 1) = 16: 256x256 -> 16x16 tokens (MaskGIT's multipliers).
    config.tokenizer.model = _vqgan((1, 1, 2, 2, 4))
    config.tokenizer.loss.adversarial_weight = 0.1  # Appendix VQGAN table.
    config.tokenizer.restart_dead_codes_every = 0
    config.tokenizer.train = shapes_tiny._train(batch_size=256, num_steps=1_000_000, lr=1e-4)
    config.tokenizer.train.optimizer.warmup_steps = 10_000
    config.tokenizer.train.optimizer.b2 = 0.99

    config.base.model.update(preset["base"])
    config.base.model.dtype = "bfloat16"
    # What makes batch 512 fit a TPU slice (python -m muse_jax.aot; BENCHMARKS.md, section
    # "Compiled for TPU: what fits where"): each block recomputes its activations in the
    # backward pass, and one compiled layer body serves the whole stack.
    config.base.model.update(dict(remat="full", scan_layers=True))
    config.text_encoder.update(dict(name="t5", preset="xxl", trainable=False, dtype="bfloat16"))
    config.base.train = shapes_tiny._train(batch_size=512, num_steps=1_500_000, lr=1e-4)
    # The paper trains with Adafactor; AdamW with its momentum/decay settings is what
    # muse_jax.sizing counts (2 float32 moments per parameter). Override name=adafactor to save them.
    config.base.train.optimizer.update(dict(warmup_steps=5000, b1=0.9, b2=0.96, weight_decay=0.045))
    for stage in (config.tokenizer, config.base):
        stage.train.time_budget_s = 0.0
    # The base decoder (shapes_tiny's addition, not the paper's) is left out here.
    del config.base_decoder
    for stage in (
        config.tokenizer,
        config.base,
        config.superres_tokenizer,
        config.superres,
        config.decoder,
    ):
        stage.train.log_every = 100
        stage.train.summary_every = 5000
        stage.train.checkpoint_every = 5000
        # One step per call: on TPU/GPU there is no per-call page zeroing to amortise, and K
        # stacked host batches would take K times the input memory.
        stage.train.steps_per_call = 1

    # Super-res: 512x512 -> 64x64 tokens of a separate f8 VQGAN (taming's f8 multipliers),
    # trained from scratch as in the paper (not warm-started from the f16 tokenizer).
    config.data.hr_image_size = 512
    config.superres_tokenizer.model = _vqgan((1, 2, 2, 4))
    config.superres_tokenizer.loss.update(config.tokenizer.loss)
    config.superres_tokenizer.restart_dead_codes_every = 0
    config.superres_tokenizer.init_from = ""
    config.superres_tokenizer.train = config.tokenizer.train.copy_and_resolve_references()
    config.superres.model.update(
        dict(
            **preset["superres"],
            dtype="bfloat16",
            aligned_lowres="none",
            lowres_input="tokens",
            remat="full",
            scan_layers=True,
        )
    )
    config.superres.train = config.base.train.copy_and_resolve_references()
    # 8 images per super-res pass: 32 at once would not fit one v4 chip, most of their
    # temporaries being the logits over 8192 codes at 4096 positions for both guidance
    # branches (BENCHMARKS.md, section "Compiled for TPU: what fits where").
    config.superres.sampling.update(dict(num_steps=8, choice_temperature=4.5, micro_batch=8))
    # Decoder fine-tuning: the paper adds residual layers and channels but gives no numbers.
    config.decoder.model.update(dict(channels=0, extra_res_blocks=2))
    config.decoder.train = config.tokenizer.train.copy_and_resolve_references()
    config.decoder.train.num_steps = 100_000
    for stage in (config.superres_tokenizer, config.superres, config.decoder):
        stage.train.time_budget_s = 0.0
        stage.train.optimizer.warmup_steps = 5000
    config.paper = ml_collections.ConfigDict(
        dict(
            base_params=preset["base_paper_params"],
            superres_params=preset["superres_paper_params"],
            text_encoder_params=T5_XXL_PAPER_PARAMS,
        )
    )

    config.base.sampling.num_steps = 24  # "256 tokens using only 24 decoding steps" (section 3.5).
    config.mesh.shape.update(dict(data=1, fsdp=-1, tensor=1))
    return config
