r"""Embedded default: the whole Muse pipeline on procedurally drawn shapes, on CPU.

Sized so that `python -m muse_jax.pipeline --config=configs/shapes_tiny.py` (dataset build,
the six stages, cascade sampling, alignment score) finishes within 15 minutes on 2 CPU cores.
Every field can be overridden, e.g. `--config.base.train.num_steps=200`. One stage at a time,
in this order (each reads the earlier ones' checkpoints from the same workdir):

  for s in tokenizer base base_decoder superres_tokenizer superres decoder; do
    python -m muse_jax.train --config=configs/shapes_tiny.py --config.stage=$s --workdir=runs/shapes
  done

`get_config("smoke")` shrinks every stage to a few steps for tests.
"""

import ml_collections

# Colour–shape combinations never shown in training: compositional generalisation is measured
# on them. Each colour and each shape still appears in training with other partners.
HELD_OUT = ("red triangle", "blue circle", "green square", "yellow circle")

# The evaluation's three prompt groups (muse_jax/prompt_groups.py). Seen single-object
# prompts: both sizes at every position, every seen colour and shape.
SEEN_PROMPTS = (
    "a large red circle in the center",
    "a large blue square on the left",
    "a large green triangle at the top",
    "a large yellow square on the right",
    "a large magenta circle at the bottom",
    "a large cyan triangle in the center",
    "a small white square on the left",
    "a small red square at the top",
    "a large white circle on the left",
    "a large red square at the top",
    "a large blue triangle on the right",
    "a large magenta triangle at the bottom",
    "a small cyan circle on the right",
    "a small green circle at the bottom",
    "a small yellow triangle in the center",
    "a small magenta square on the left",
    "a small blue triangle at the top",
    "a small white triangle on the right",
    "a small cyan square at the bottom",
    "a small green triangle in the center",
)
# The held-out colour-shape combinations, each at both sizes and three positions.
HELD_OUT_PROMPTS = (
    "a large red triangle in the center",
    "a large blue circle on the left",
    "a large green square at the top",
    "a large yellow circle on the right",
    "a small red triangle at the bottom",
    "a small blue circle at the top",
    "a small green square on the right",
    "a small yellow circle on the left",
    "a large red triangle on the left",
    "a small blue circle in the center",
    "a large green square at the bottom",
    "a small yellow circle at the top",
)
# Two objects in a relation (training shows both relations with seen combinations only).
TWO_OBJECT_PROMPTS = (
    "a red circle left of a blue square",
    "a green triangle left of a yellow square",
    "a white square left of a magenta circle",
    "a cyan triangle left of a red square",
    "a blue triangle left of a green circle",
    "a yellow triangle above a cyan circle",
    "a magenta square above a white triangle",
    "a green circle above a red square",
    "a blue square above a yellow triangle",
    "a white circle above a cyan square",
)


def _train(batch_size: int, num_steps: int, lr: float, **kw) -> ml_collections.ConfigDict:
    train = ml_collections.ConfigDict(
        dict(
            batch_size=batch_size,
            num_steps=num_steps,
            time_budget_s=0.0,  # > 0 stops the stage (with a checkpoint) after this many seconds.
            log_every=50,
            # Train steps per jitted call (a scan over that many batches): on XLA:CPU one call
            # maps and faults in its temporary buffer afresh, so K steps per call pay that once.
            # A call never straddles a log/summary/checkpoint step or the end: where K steps
            # would, single steps run up to it (a second program, compiled then: e.g. after a
            # resume from a step that is not a multiple of K). K dividing every interval and
            # num_steps keeps it to one program. Preemption and the time budget are checked
            # between calls.
            steps_per_call=10,
            summary_every=500,
            checkpoint_every=500,
            keep_checkpoints=2,
            optimizer=ml_collections.ConfigDict(
                dict(
                    name="adamw",
                    learning_rate=lr,
                    warmup_steps=100,
                    schedule="cosine",
                    b1=0.9,
                    b2=0.99,
                    weight_decay=1e-4,
                    grad_clip=1.0,
                )
            ),
        )
    )
    train.update(kw)
    return train


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Which stage `muse_jax.train` runs, in pipeline order: "tokenizer" | "base" |
    # "superres_tokenizer" | "superres" | "decoder".
    config.stage = "base"
    config.seed = 0
    config.tokenizer_workdir = ""  # Empty: `<workdir>/tokenizer` of the same experiment.
    # Multi-host: call jax.distributed.initialize() first (launch/tpu_train.sh sets
    # MUSE_DISTRIBUTED=1, which does the same).
    config.distributed = False
    # Persistent compilation cache (muse_jax/compilation_cache.py): a restarted stage loads its
    # compiled programs instead of compiling again. "auto": `<workdir>/compilation_cache`;
    # "": none; or a directory (local or gs://), e.g. one shared by several runs.
    config.compilation_cache = "auto"
    # The models' hand-written CPU paths (muse_jax/models/kernels.py): "auto" takes them on CPU
    # and plain XLA elsewhere; "xla" turns every one of them off.
    config.kernels = "auto"

    config.data = ml_collections.ConfigDict(
        dict(
            dataset="shapes",
            data_dir="",  # Empty: `<workdir>/data`.
            image_size=32,
            # The same scenes at the super-res stage's resolution (0: base stage only).
            hr_image_size=64,
            num_train=20000,
            num_test=1000,
            # 0.6 of the scenes hold two small objects: at 0.3 the base stage drew their shapes
            # right far less often, and at 0.7 it lost held-out colour-shape pairs, which are
            # single-object scenes (BENCHMARKS.md, "Quality ablations").
            two_object_prob=0.6,
            held_out=list(HELD_OUT),
            text_length=16,
            # "shapes" (a word-level SentencePiece model trained here), "byte", or the path of a
            # SentencePiece .model file (e.g. T5's).
            vocabulary="shapes",
        )
    )

    config.tokenizer = ml_collections.ConfigDict(
        dict(
            model=ml_collections.ConfigDict(
                dict(
                    channels=128,
                    channel_mult=(1,),  # f = patch_size * 2 ** (len(channel_mult) - 1) = 4.
                    patch_size=4,
                    num_res_blocks=2,
                    embedding_dim=32,
                    # 128 codes, not 512: every code is used either way, and with fewer
                    # near-synonyms the transformers learn their targets much sooner
                    # (BENCHMARKS.md, "Quality ablations").
                    codebook_size=128,
                    norm_groups=0,  # 0: no GroupNorm (it dominates the step time on CPU).
                    l2_normalize_codes=True,
                    commitment_cost=0.25,
                    dtype="float32",
                )
            ),
            loss=ml_collections.ConfigDict(
                dict(
                    l1_weight=1.0,
                    l2_weight=1.0,
                    edge_weight=0.5,
                    codebook_weight=1.0,
                    adversarial_weight=0.0,
                    adversarial_start=0,
                    disc_channels=32,
                )
            ),
            restart_dead_codes_every=50,  # 0 disables re-seeding of unused codebook entries.
            # 1000 steps: the base stage can draw only what this tokenizer reconstructs, and
            # shapes keep sharpening well past 400 (BENCHMARKS.md, "Quality ablations").
            train=_train(batch_size=32, num_steps=1000, lr=2e-3),
        )
    )

    # The text encoder every transformer stage shares (the base and super-res stages; a
    # trainable one gets its own weights in each).
    config.text_encoder = ml_collections.ConfigDict(
        dict(
            name="tiny",  # "tiny" (trained with the base model) or "t5".
            width=128,
            depth=2,
            num_heads=4,
            mlp_dim=256,
            trainable=True,
            # For name="t5": a preset of muse_jax.models.t5 and a T5X or safetensors
            # checkpoint (frozen: trainable=False); data.vocabulary = its .model file.
            preset="small",
            checkpoint="",
            dtype="float32",
            attention="auto",  # The tiny encoder's (T5 has its own attention).
        )
    )
    # A directory written by `python -m muse_jax.embed`: train on precomputed text embeddings
    # instead of running the text encoder (the paper's T5-XXL setting).
    config.text_embeddings = ""

    config.base = ml_collections.ConfigDict(
        dict(
            model=ml_collections.ConfigDict(
                dict(
                    width=128,
                    depth=4,
                    num_heads=4,
                    mlp_dim=512,
                    dropout=0.0,
                    dtype="float32",
                    # "auto" | "heads_major" | "xla" | "cudnn" (muse_jax/models/attention.py):
                    # auto = heads_major on CPU, jax.nn.dot_product_attention elsewhere.
                    attention="auto",
                    # Memory and compile-time levers (`python -m muse_jax.aot` shows their
                    # effect on a TPU): remat "none" | "full" | "save_dots" recomputes each
                    # block's activations in the backward pass; scan_layers compiles one
                    # layer body for the whole stack (its checkpoints stack the layers, so a
                    # run keeps the value it started with).
                    remat="none",
                    scan_layers=False,
                )
            ),
            mask_schedule="cosine",
            cond_dropout=0.1,
            label_smoothing=0.1,
            # Batch 32 at twice the steps and lr 2e-3 learns held-out colour-shape pairs and
            # two-object scenes sooner than batch 64 at 1e-3 in the same minutes
            # (BENCHMARKS.md, "Quality ablations").
            train=_train(batch_size=32, num_steps=1800, lr=2e-3),
        )
    )

    # Stage 3: the base decoder (muse_jax/train/base_decoder_stage.py): the low-res tokenizer's
    # decoder fine-tuned on grids with a uniform share in [0, redraw_max] of their tokens
    # re-drawn by the trained base transformer, so that it decodes the base stage's samples to
    # whole shapes instead of blobs between shapes (BENCHMARKS.md, "Quality ablations").
    # Sampling uses it when its checkpoint exists; a config without this block skips it.
    config.base_decoder = ml_collections.ConfigDict(
        dict(
            redraw_max=0.5,
            temperature=1.0,  # Of the re-drawing step's tokens.
            # The tokenizer's pixel terms and its hinge patch discriminator (on below: the
            # decoder then commits small objects to one shape, and the base stage draws held-out
            # pairs better; BENCHMARKS.md, "Quality ablations").
            loss=ml_collections.ConfigDict(
                {
                    k: config.tokenizer.loss[k]
                    for k in (
                        "l1_weight",
                        "l2_weight",
                        "edge_weight",
                        "adversarial_weight",
                        "disc_channels",
                    )
                }
            ),
            # 300 steps with the discriminator take less time than 600 without it.
            train=_train(batch_size=32, num_steps=300, lr=1e-3),
        )
    )
    config.base_decoder.loss.adversarial_weight = 0.1
    config.base_decoder.train.optimizer.warmup_steps = 20

    # Stage 4: the high-res tokenizer (64x64 images -> 16x16 tokens). Fully convolutional with
    # the low-res tokenizer's architecture, so it starts from that tokenizer's weights
    # (`init_from`; "" trains from scratch as the paper's separate f8 VQGAN does).
    config.superres_tokenizer = ml_collections.ConfigDict(
        dict(
            model=ml_collections.ConfigDict(config.tokenizer.model.to_dict()),
            loss=ml_collections.ConfigDict(config.tokenizer.loss.to_dict()),
            restart_dead_codes_every=50,
            init_from="tokenizer",
            train=_train(batch_size=16, num_steps=30, lr=1e-3),
        )
    )
    config.superres_tokenizer.train.optimizer.warmup_steps = 5

    # Stage 5: the super-res transformer: 16x16 high-res tokens given the 8x8 low-res tokens
    # (through their own `lowres_depth` self-attention layers) and the text.
    config.superres = ml_collections.ConfigDict(
        dict(
            model=ml_collections.ConfigDict(
                dict(
                    width=128,
                    depth=3,
                    lowres_depth=1,
                    num_heads=4,
                    mlp_dim=512,
                    dropout=0.0,
                    dtype="float32",
                    attention="auto",
                    remat="none",  # As config.base.model's (both stacks).
                    scan_layers=False,  # The high-res stack.
                    # Add to each high-res token's input a projection of its parent's 3x3
                    # low-res neighbourhood, one per child position (beside the paper's
                    # cross-attention, which alone does not learn to follow the low-res layout
                    # in minutes of CPU training; "parent" shares one projection of the parent
                    # among its children and draws far worse edges: BENCHMARKS.md, "Quality
                    # ablations"). "none" is the paper's model.
                    aligned_lowres="subpixel",
                    # What the low-res stack reads: "pixels", the low-res image (the base
                    # stage's tokens decoded by the base decoder), one patch per low-res token;
                    # or "tokens", the ids (the paper's). With ids it drew held-out colour-shape
                    # pairs and two-object scenes worse than the base stage itself; with pixels
                    # better (BENCHMARKS.md, "Quality ablations").
                    lowres_input="pixels",
                )
            ),
            mask_schedule="cosine",
            cond_dropout=0.1,  # Drops the text only: the low-res tokens are always given.
            label_smoothing=0.1,
            # Batch 8 at lr 2e-3 as for the base stage: more, smaller steps in the same minutes.
            # 800 steps: reading pixels it learns sooner (masked accuracy about 0.80 by step
            # 750), and decoding its low-res input costs time the main job's 15 minutes lack.
            train=_train(batch_size=8, num_steps=800, lr=2e-3),
            # Its own decoding settings (the paper: ~24 base steps, ~8 super-res steps).
            sampling=ml_collections.ConfigDict(
                dict(
                    num_steps=8,
                    mask_schedule="cosine",
                    temperature=1.0,
                    # 0.2 rather than the base stage's 0.5: it keeps closer to the low-res
                    # image, and draws held-out pairs better at no cost elsewhere
                    # (BENCHMARKS.md, "Quality ablations").
                    temperature_final=0.2,
                    choice_temperature=2.0,
                    guidance_scale=1.0,
                    guidance_schedule="linear",
                    negative_prompt="",
                    refine_rounds=0,  # Self-critic refinement, as config.base.sampling's.
                    refine_fraction=0.2,
                    refine_steps=4,
                    # Images per super-res pass inside the cascade (0: the whole batch). A
                    # smaller pass bounds the memory of large high-res grids (the paper's
                    # 512x512: configs/muse_paper.py); the samples of a seed depend on it.
                    micro_batch=0,
                )
            ),
        )
    )

    # Stage 6: decoder fine-tuning of the high-res tokenizer: encoder and codebook frozen, a
    # deeper decoder (zero-initialised extra residual blocks: it starts as the trained decoder)
    # trained with the tokenizer's losses. Sampling uses it when its checkpoint exists.
    config.decoder = ml_collections.ConfigDict(
        dict(
            model=ml_collections.ConfigDict(
                # channels: 0 keeps the tokenizer's width (loaded); wider starts those fresh.
                dict(channels=0, extra_res_blocks=2)
            ),
            loss=ml_collections.ConfigDict(config.tokenizer.loss.to_dict()),
            train=_train(batch_size=8, num_steps=60, lr=5e-4),
        )
    )
    config.decoder.train.optimizer.warmup_steps = 10
    config.superres.train.optimizer.warmup_steps = 30

    # The base stage's sampler (the super-res stage's is config.superres.sampling).
    config.base.sampling = ml_collections.ConfigDict(
        dict(
            num_steps=12,
            mask_schedule="cosine",
            temperature=1.0,
            temperature_final=0.5,  # Token temperature anneals linearly to this.
            choice_temperature=4.5,  # Gumbel noise on confidences, annealed to 0.
            # 2 rather than 3 since the base decoder and refinement: two-object and held-out
            # prompts draw better, seen ones as well (BENCHMARKS.md, "Quality ablations").
            guidance_scale=2.0,
            guidance_schedule="linear",  # "linear" ramps 0 -> scale over the steps; or "constant".
            negative_prompt="",
            # Self-critic refinement (muse_jax/sampling/self_critic.py): after decoding, this
            # many rounds re-mask the generated tokens the model finds least likely given
            # the rest (refine_fraction of them) and decode them again in refine_steps steps.
            # It mends objects drawn between two shapes (BENCHMARKS.md, "Quality
            # ablations"); 0 turns it off.
            refine_rounds=4,
            refine_fraction=0.2,
            refine_steps=4,
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            # The prompt groups (muse_jax/prompt_groups.py): <group>_prompts for "seen",
            # "held_out" and "two_object"; a group left empty is skipped.
            seen_prompts=list(SEEN_PROMPTS),
            held_out_prompts=list(HELD_OUT_PROMPTS),
            two_object_prompts=list(TWO_OBJECT_PROMPTS),
            # 8, not 4: at 4 one sample moves a two-object cell by 0.025, and a cell's spread
            # between draws hid which stage was ahead (the cost: BENCHMARKS.md, "Embedded
            # default, end to end").
            samples_per_prompt=8,
            # `python -m muse_jax.evaluate`: the metric plug-ins of muse_jax/eval/metrics.py to
            # run: "alignment" (shapes captions only), "clip" and "fid" (these two need the
            # weight files below, which the user supplies). A tuple, so that it can be overridden:
            # --config.eval.metrics=alignment,clip,fid
            metrics=("alignment",),
            # "prompts": seen_prompts + held_out_prompts, samples_per_prompt images each;
            # "dataset": the first caption of each of the first num_images records of `split`.
            captions="prompts",
            split="test",  # captions="dataset": the split the captions come from.
            num_images=1000,  # captions="dataset": how many captions (one image each).
            # Images per sampler call (`muse_jax.evaluate` and the main job's table): 168 makes
            # two calls of the main job's 336 images, faster and smaller at peak than one call
            # of 336 (BENCHMARKS.md, "Embedded default, end to end").
            batch_size=168,
            # Sampling seed of the first call of each prompt group (call k: seed + k). Training
            # derives every random number from config.seed, and its sample summaries use seed 0.
            seed=1,
            grid_size=16,  # Samples (one per distinct caption) in the TensorBoard grid.
            clip=ml_collections.ConfigDict(
                dict(
                    # A transformers CLIPModel directory (config.json, model.safetensors,
                    # vocab.json + merges.txt), e.g. openai/clip-vit-large-patch14.
                    checkpoint="",
                    batch_size=32,
                )
            ),
            fid=ml_collections.ConfigDict(
                dict(
                    # FID InceptionV3 weights (.safetensors / .npz): pytorch-fid's
                    # pt_inception-2015-12-05-6726825d.pth converted with
                    # `python -m muse_jax.eval.convert_inception`.
                    inception_weights="",
                    reference_split="test",  # Real images: this split of config.data ...
                    num_reference=1000,  # ... its first this many (centre crops).
                    # Reference statistics are cached here, keyed by dataset, split, count,
                    # resolution and weights. Empty: `<workdir>/eval/fid_stats`.
                    cache_dir="",
                    batch_size=50,  # Images per Inception call.
                )
            ),
        )
    )

    config.mesh = ml_collections.ConfigDict(
        dict(
            shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
            # Logical axis -> mesh axes. Model code only ever names the logical axes.
            rules=[
                ("batch", ("data", "fsdp")),
                ("length", None),
                ("embed", "fsdp"),
                ("mlp", "tensor"),
                ("heads", "tensor"),
                ("joined_kv", "tensor"),  # T5X-layout attention kernels: heads * head_dim.
                ("relpos_buckets", None),
                ("layers", None),  # The stacked layer axis of scan_layers.
                ("context_embed", None),
                ("kv", None),
                ("vocab", "tensor"),
                ("conv_in", None),
                ("conv_out", "tensor"),
                ("codebook", None),
                ("height", None),
                ("width", None),
            ],
        )
    )

    # Wall-clock caps that bound the main job on slower machines than the reference one: a
    # stage that reaches its budget stops there with a checkpoint (fewer steps,
    # a learning rate not yet decayed; rerunning resumes it). They sum to 15.2 min; on the
    # 2-core machine of 2026-12-05 every stage ends before its cap and the job takes 13.0 min
    # (BENCHMARKS.md, section "Embedded default, end to end (CPU)").
    config.tokenizer.train.time_budget_s = 200.0
    config.base.train.time_budget_s = 330.0
    config.base_decoder.train.time_budget_s = 120.0
    config.superres_tokenizer.train.time_budget_s = 30.0
    config.superres.train.time_budget_s = 200.0
    config.decoder.train.time_budget_s = 30.0

    if arg == "smoke":
        _shrink(config)
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; valid: '' or 'smoke'.")
    return config


def _shrink(config: ml_collections.ConfigDict) -> None:
    """Tiny everything: for tests that run a whole stage in seconds."""
    config.data.num_train = 256
    config.data.num_test = 64
    config.tokenizer.model.channels = 16
    config.tokenizer.model.num_res_blocks = 1
    config.tokenizer.model.codebook_size = 64
    config.tokenizer.model.embedding_dim = 8
    config.base.model.width = 32
    config.base.model.depth = 1
    config.base.model.num_heads = 2
    config.base.model.mlp_dim = 64
    config.text_encoder.width = 32
    config.text_encoder.depth = 1
    config.text_encoder.num_heads = 2
    config.text_encoder.mlp_dim = 64
    config.data.hr_image_size = 64
    config.superres_tokenizer.model.update(config.tokenizer.model)
    config.superres.model.update(dict(width=32, depth=1, lowres_depth=1, num_heads=2, mlp_dim=64))
    config.superres.sampling.num_steps = 3
    config.decoder.model.extra_res_blocks = 1
    for stage in (
        config.tokenizer,
        config.base,
        config.base_decoder,
        config.superres_tokenizer,
        config.superres,
        config.decoder,
    ):
        stage.train.time_budget_s = 0.0
        stage.train.batch_size = 8
        stage.train.num_steps = 6
        stage.train.log_every = 2
        stage.train.summary_every = 3
        stage.train.checkpoint_every = 3
        stage.train.optimizer.warmup_steps = 2
    config.base.sampling.num_steps = 4
    config.base.sampling.refine_rounds = 1  # Exercised, at a quarter of the compile time.
    config.eval.samples_per_prompt = 2
    config.eval.seen_prompts = list(SEEN_PROMPTS[:2])
    config.eval.held_out_prompts = list(HELD_OUT_PROMPTS[:1])
    config.eval.two_object_prompts = list(TWO_OBJECT_PROMPTS[:1])
