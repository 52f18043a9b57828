"""The published aMUSEd models' diffusers configs (amused/amused-256; the 512 model differs in
`sample_size` only): the shapes the converter, its parity tests and the benchmark build, without
downloading anything. From diffusers' scripts/convert_amused.py."""

from __future__ import annotations

# The U-ViT (`UVit2DModel`) of amused-256: 16x16 tokens; amused-512 has sample_size=32.
TRANSFORMER_256 = dict(
    hidden_size=1024,
    use_bias=False,
    hidden_dropout=0.0,
    cond_embed_dim=768,
    micro_cond_encode_dim=256,
    micro_cond_embed_dim=1280,
    encoder_hidden_size=768,
    vocab_size=8256,
    codebook_size=8192,
    in_channels=768,
    block_out_channels=768,
    num_res_blocks=3,
    downsample=False,
    upsample=False,
    block_num_heads=12,
    num_hidden_layers=22,
    num_attention_heads=16,
    attention_dropout=0.0,
    intermediate_size=2816,
    layer_norm_eps=1e-06,
    ln_elementwise_affine=True,
    sample_size=16,
)

# The VQ-GAN (`VQModel`) of both: 8192 codes, 16x downsampling.
VQ = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 256, 512, 768],
    down_block_types=["DownEncoderBlock2D"] * 5,
    in_channels=3,
    latent_channels=64,
    layers_per_block=2,
    norm_num_groups=32,
    num_vq_embeddings=8192,
    out_channels=3,
    sample_size=32,
    up_block_types=["UpDecoderBlock2D"] * 5,
    mid_block_add_attention=False,
    lookup_from_codebook=True,
)
