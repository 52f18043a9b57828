"""The masked image-token transformers of Muse: the base stage and the super-res stage.

Bidirectional self-attention over image tokens, cross-attention to projected text embeddings,
and a softmax over the codebook at every position. The [MASK] token is id `vocab_size`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models import layers
from muse_jax.models.layers import Dtype, constrain, partitioned

# Every layer's cross-attention (keys, values): a list of per-layer pairs, or, with
# `scan_layers`, one pair of arrays stacked on a leading layer axis. Only `logits` reads it.
ContextKV = Sequence[tuple[jax.Array, jax.Array]] | tuple[jax.Array, jax.Array]

# Rematerialisation of each transformer block's activations in the backward pass.
#   none: keep every activation (fastest, most memory);
#   full: keep only each block's input and recompute the rest;
#   save_dots: keep the outputs of the weight matmuls, recompute the rest (attention scores
#     and softmax, norms, activations): most of the saving of `full` for a fraction of its
#     recompute, the usual choice for long sequences.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str) -> str:
    if name not in REMAT_POLICIES:
        raise UsageError(f"Unknown remat policy {name!r}; valid: {sorted(REMAT_POLICIES)}.")
    return name


def _layer_step(
    block: Block,
    x: jax.Array,
    kv: tuple[jax.Array, jax.Array] | None,
    *,
    self_mask: jax.Array | None,
    context_mask: jax.Array | None,
    deterministic: bool,
) -> tuple[jax.Array, None]:
    """One block as a scan body: (carry, per-layer input) -> (carry, nothing)."""
    out = block(
        x,
        self_mask=self_mask,
        context_kv=kv,
        context_mask=context_mask,
        deterministic=deterministic,
    )
    return out, None


def run_blocks(
    blocks: Any,
    x: jax.Array,
    kv: Any,
    *,
    remat: str,
    scan: bool,
    depth: int,
    self_mask: jax.Array | None = None,
    context_mask: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Applies `depth` blocks to `x`, unrolled (`blocks` a list, `kv` per layer or None) or as
    one `nn.scan` (`blocks` one Block whose parameters carry a leading "layers" axis, `kv`
    stacked). Either way each block is rematerialised by the `remat` policy. The two layouts
    compute the same function: `scan` trades a parameter tree with stacked layers for one
    compiled layer body (compile time and program size no longer grow with depth)."""
    step = functools.partial(
        _layer_step, self_mask=self_mask, context_mask=context_mask, deterministic=deterministic
    )
    policy = REMAT_POLICIES[check_remat(remat)]
    if policy is not None:
        # prevent_cse only matters outside a scan (XLA could merge the recompute into the
        # forward pass); inside one it blocks optimisations for nothing.
        step = nn.remat(step, policy=policy, prevent_cse=not scan)
    if scan:
        x, _ = nn.scan(step, length=depth, **_SCAN_KW)(blocks, x, kv)
        return x
    for i, block in enumerate(blocks):
        x, _ = step(block, x, None if kv is None else kv[i])
    return x


# Scanned blocks: parameters stacked on a leading axis named "layers" (replicated by the rules:
# each device holds its shard of every layer), a fresh parameter and dropout key per layer.
_SCAN_KW = dict(
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},
    metadata_params={nn.PARTITION_NAME: "layers"},
)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP."""

    width: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    cross_attention: bool = True
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # See `muse_jax.models.attention`.

    def setup(self) -> None:
        self.self_norm = layers.LayerNorm(self.dtype)
        self.self_attn = layers.Attention(self.num_heads, self.width, self.dtype, self.attention)
        if self.cross_attention:
            self.cross_norm = layers.LayerNorm(self.dtype)
            self.cross_attn = layers.Attention(
                self.num_heads, self.width, self.dtype, self.attention
            )
        self.mlp_norm = layers.LayerNorm(self.dtype)
        self.mlp = layers.MlpBlock(self.mlp_dim, self.dropout, self.dtype)
        self.drop = nn.Dropout(self.dropout)

    def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cross_attn.project_kv(context)

    def __call__(
        self,
        x: jax.Array,
        *,
        self_mask: jax.Array | None = None,
        context_kv: tuple[jax.Array, jax.Array] | None = None,
        context_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        x = x + self.drop(
            self.self_attn(self.self_norm(x), mask=self_mask), deterministic=deterministic
        )
        if self.cross_attention:
            mask = None if context_mask is None else context_mask[:, None, None, :].astype(bool)
            h = self.cross_attn(self.cross_norm(x), kv=context_kv, mask=mask)
            x = x + self.drop(h, deterministic=deterministic)
        x = x + self.drop(
            self.mlp(self.mlp_norm(x), deterministic=deterministic), deterministic=deterministic
        )
        return constrain(x, "batch", "length", "embed")


class MaskedTransformer(nn.Module):
    """Predicts the codebook entry of every image token given partially masked tokens and text.

    Attributes:
      vocab_size: codebook size; the [MASK] id is `vocab_size`.
      seq_len: number of image tokens (e.g. 16 * 16).
    """

    vocab_size: int
    seq_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: str = "none"  # See `REMAT_POLICIES`.
    scan_layers: bool = False  # One `nn.scan` over the blocks (see `run_blocks`).

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def setup(self) -> None:
        self.token_embed = nn.Embed(
            self.vocab_size + 1,
            self.width,
            dtype=self.dtype,
            embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"),
        )
        self.pos_embed = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(0.02), "length", "embed"),
            (self.seq_len, self.width),
        )
        self.context_proj = layers.dense(self.width, "context_embed", "embed", self.dtype)
        self.context_norm = layers.LayerNorm(self.dtype)
        block = functools.partial(
            Block, self.width, self.num_heads, self.mlp_dim, self.dropout, True, self.dtype,
            self.attention,
        )  # fmt: skip
        if self.scan_layers:
            self.blocks = block()
        else:
            self.blocks = [block() for _ in range(self.depth)]
        self.final_norm = layers.LayerNorm(self.dtype)
        self.head = layers.dense(self.vocab_size, "embed", "vocab", self.dtype)

    def encode_context(self, context: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Projects text embeddings [B, S, C] to every layer's cross-attention (keys, values)."""
        c = self.context_norm(self.context_proj(context))
        c = constrain(c, "batch", "length", "embed")
        if self.scan_layers:
            kv_step = lambda block, carry, _: (carry, block.context_kv(carry))
            return nn.scan(kv_step, length=self.depth, **_SCAN_KW)(self.blocks, c, None)[1]
        return [block.context_kv(c) for block in self.blocks]

    def logits(
        self,
        tokens: jax.Array,
        context_kv: ContextKV,
        context_mask: jax.Array,
        deterministic: bool = True,
        input_embed: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, vocab_size] for tokens [B, L] given precomputed text keys/values;
        `input_embed` [B, L, width] is added to the token embeddings (super-res)."""
        chex.assert_rank(tokens, 2)
        chex.assert_axis_dimension(tokens, 1, self.seq_len)
        x = self.token_embed(tokens) + self.pos_embed.astype(self.dtype)[None]
        if input_embed is not None:
            x = x + input_embed.astype(x.dtype)
        x = constrain(x, "batch", "length", "embed")
        x = run_blocks(
            self.blocks,
            x,
            context_kv,
            remat=self.remat,
            scan=self.scan_layers,
            depth=self.depth,
            context_mask=context_mask,
            deterministic=deterministic,
        )
        logits = self.head(self.final_norm(x))
        return constrain(logits, "batch", "length", "vocab").astype(jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits [B, L, vocab] for tokens [B, L] and text [B, S, C] with mask [B, S]."""
        chex.assert_equal_shape_prefix((context, context_mask), 2)
        return self.logits(tokens, self.encode_context(context), context_mask, deterministic)


class TinyTextEncoder(nn.Module):
    """A small trainable text transformer for the embedded default (T5 plugs in instead).

    Returns [B, S, width]; padded positions are zeroed so that downstream code may ignore them.
    """

    vocab_size: int
    max_length: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: str = "none"  # See `REMAT_POLICIES` (the super-res stage's low-res encoder).

    @nn.compact
    def __call__(
        self, ids: jax.Array | None, mask: jax.Array, embeds: jax.Array | None = None
    ) -> jax.Array:
        """`ids` [B, S] with `mask` [B, S]; or, `ids` None, input `embeds` [B, S, width] in
        their place (the super-res stage's low-res image patches): no embedding table then."""
        if embeds is None:
            chex.assert_equal_shape((ids, mask))
            x = nn.Embed(
                self.vocab_size,
                self.width,
                dtype=self.dtype,
                embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"),
            )(ids)
        else:
            chex.assert_shape(embeds, (*mask.shape, self.width))
            x = embeds.astype(self.dtype)
        pos = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(0.02), "length", "embed"),
            (self.max_length, self.width),
        )
        x = x + pos[None, : x.shape[1]].astype(self.dtype)
        attn_mask = mask[:, None, None, :].astype(bool)
        blocks = [
            Block(
                self.width,
                self.num_heads,
                self.mlp_dim,
                0.0,
                False,
                self.dtype,
                self.attention,
                name=f"block_{i}",
            )
            for i in range(self.depth)
        ]
        x = run_blocks(
            blocks, x, None, remat=self.remat, scan=False, depth=self.depth, self_mask=attn_mask
        )
        x = layers.LayerNorm(self.dtype)(x)
        return (x * mask[..., None]).astype(jnp.float32)


ALIGNED_LOWRES = ("none", "parent", "subpixel")
LOWRES_INPUTS = ("tokens", "pixels")


class SuperResTransformer(nn.Module):
    """Muse's super-resolution transformer: high-res tokens given low-res tokens and text.

    The (unmasked) low-res tokens pass through their own self-attention stack; their outputs are
    concatenated with the projected text embeddings and the result is the context every
    high-res layer cross-attends to. Only the text part is ever dropped or replaced (guidance):
    the low-res tokens are the stage's input, present in both branches.

    `lowres_input="pixels"` (not the paper's) feeds that stack the low-res *image* instead: the
    pixels of each low-res token's patch (`lowres_patch` square), projected, in place of the
    token's embedding. The image is the low-res tokens decoded (`SuperResSampler` decodes them).
    Token ids carry no colour or shape apart: a model that learned each id's meaning from the
    training pairs draws colour-shape pairs it never saw wrongly, where the same pixels carry
    the shape in each colour channel (BENCHMARKS.md, "Quality ablations").
    """

    vocab_size: int  # High-res codebook; [MASK] is `vocab_size`.
    seq_len: int  # High-res tokens, e.g. 64 * 64.
    lowres_vocab_size: int
    lowres_len: int
    width: int
    depth: int
    lowres_depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    # A spatially aligned path beside the paper's cross-attention (which it does not have):
    # each high-res position's input embedding gets a projection of low-res features.
    # "parent": one projection of its parent's, the same for the f*f children of a parent;
    # "subpixel": a sub-pixel convolution, one projection per child position of the parent's
    # 3x3 neighbourhood, so that every child learns its own part of an edge that runs through
    # or past its parent; "none": the paper's model. Small, briefly trained models learn to
    # follow this path far sooner than cross-attention.
    aligned_lowres: str = "none"
    lowres_input: str = "tokens"  # Or "pixels": see the class docstring.
    lowres_patch: int = 0  # Pixels per low-res token along each side ("pixels" only).
    attention: str = "auto"
    remat: str = "none"  # Both stacks; see `REMAT_POLICIES`.
    scan_layers: bool = False  # The high-res stack (the low-res encoder stays unrolled).

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def setup(self) -> None:
        if self.aligned_lowres not in ALIGNED_LOWRES:
            raise ValueError(
                f"aligned_lowres={self.aligned_lowres!r}; valid: {', '.join(ALIGNED_LOWRES)}"
            )
        if self.lowres_input not in LOWRES_INPUTS:
            raise ValueError(
                f"lowres_input={self.lowres_input!r}; valid: {', '.join(LOWRES_INPUTS)}"
            )
        if self.lowres_input == "pixels":
            if self.lowres_patch < 1:
                raise ValueError(
                    f"lowres_input='pixels' needs lowres_patch >= 1, got {self.lowres_patch}"
                )
            self.lowres_pixels_proj = layers.dense(self.width, "context_embed", "embed", self.dtype)
        if self.aligned_lowres != "none":
            children = self._factor() ** 2 if self.aligned_lowres == "subpixel" else 1
            self.aligned_proj = layers.dense(
                children * self.width, "context_embed", "embed", self.dtype
            )
        self.lowres = TinyTextEncoder(
            vocab_size=self.lowres_vocab_size,
            max_length=self.lowres_len,
            width=self.width,
            depth=self.lowres_depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            attention=self.attention,
            remat=self.remat,
        )
        self.text_proj = layers.dense(self.width, "context_embed", "embed", self.dtype)
        self.high = MaskedTransformer(
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            dtype=self.dtype,
            attention=self.attention,
            remat=self.remat,
            scan_layers=self.scan_layers,
        )

    def lowres_example(self, batch: int = 1) -> jax.Array:
        """Zeros shaped like this model's low-res input (for `init`): token ids
        [batch, lowres_len], or with `lowres_input="pixels"` an image [batch, H, W, 3]."""
        if self.lowres_input == "pixels":
            size = round(self.lowres_len**0.5) * self.lowres_patch
            return jnp.zeros((batch, size, size, 3), jnp.float32)
        return jnp.zeros((batch, self.lowres_len), jnp.int32)

    def _patches(self, image: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, lowres_len, p*p*C]: each low-res token's patch, row-major."""
        chex.assert_rank(image, 4)
        b, h, w, c = image.shape
        p, side = self.lowres_patch, round(self.lowres_len**0.5)
        if h != side * p or w != side * p:
            raise ValueError(f"low-res image {h}x{w}; expected {side * p}x{side * p}")
        x = image.reshape(b, side, p, side, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, self.lowres_len, p * p * c)

    def encode_context(
        self, context: jax.Array, context_mask: jax.Array, lowres: jax.Array
    ) -> tuple[tuple[ContextKV, jax.Array | None], jax.Array]:
        """((every layer's cross-attention keys/values, aligned low-res input embeddings or
        None), the keys' mask [B, S + lowres_len]).

        `lowres`: low-res token ids [B, lowres_len], or the low-res image [B, H, W, 3] in
        [-1, 1] (`lowres_input="pixels"`). Computed once per prompt and low-res image; the
        decoding loop only calls `logits`.
        """
        ones = jnp.ones((lowres.shape[0], self.lowres_len), jnp.int32)
        if self.lowres_input == "pixels":
            patches = self._patches(jnp.clip(lowres.astype(jnp.float32), -1.0, 1.0))
            low = self.lowres(None, ones, embeds=self.lowres_pixels_proj(patches))
        else:
            chex.assert_shape(lowres, (None, self.lowres_len))
            low = self.lowres(lowres, ones)
        ctx = jnp.concatenate([self.text_proj(context).astype(low.dtype), low], axis=1)
        mask = jnp.concatenate([context_mask, ones.astype(context_mask.dtype)], axis=1)
        aligned = None
        if self.aligned_lowres == "parent":
            aligned = self._upsample(self.aligned_proj(low))
        elif self.aligned_lowres == "subpixel":
            aligned = self._upsample(self.aligned_proj(self._neighbourhoods(low)))
        return (self.high.encode_context(ctx), aligned), mask

    def _factor(self) -> int:
        """High-res tokens per low-res token along each side."""
        side, high_side = round(self.lowres_len**0.5), round(self.seq_len**0.5)
        if side * side != self.lowres_len or high_side % side:
            raise ValueError(
                f"{self.seq_len} high-res tokens do not tile {self.lowres_len} low-res"
            )
        return high_side // side

    @staticmethod
    def _neighbourhoods(low: jax.Array) -> jax.Array:
        """[B, l*l, W] -> [B, l*l, 9*W]: each low-res token's 3x3 neighbourhood (zeros past the
        border), rows then columns; a 3x3 convolution as one matmul, fast on every backend."""
        b, n, w = low.shape
        side = round(n**0.5)
        grid = jnp.pad(low.reshape(b, side, side, w), ((0, 0), (1, 1), (1, 1), (0, 0)))
        shifted = [grid[:, i : i + side, j : j + side] for i in range(3) for j in range(3)]
        return jnp.concatenate(shifted, axis=-1).reshape(b, n, 9 * w)

    def _upsample(self, low: jax.Array) -> jax.Array:
        """[B, l*l, C] low-res features -> [B, L, width]. C == width: each high-res token gets its
        parent's features; C == f*f*width: child (i, j) of a parent gets its slice i*f + j."""
        b, n, c = low.shape
        f, side, w = self._factor(), round(n**0.5), self.width
        grid = low.reshape(b, side, 1, side, 1, w) if c == w else None
        if grid is None:
            chex.assert_equal(c, f * f * w)
            grid = low.reshape(b, side, side, f, f, w).transpose(0, 1, 3, 2, 4, 5)
        grid = jnp.broadcast_to(grid, (b, side, f, side, f, w))
        return constrain(grid.reshape(b, self.seq_len, w), "batch", "length", "embed")

    def logits(
        self,
        tokens: jax.Array,
        context: tuple[ContextKV, jax.Array | None],
        context_mask: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits [B, L, vocab] given `encode_context`'s output."""
        kv, aligned = context
        return self.high.logits(tokens, kv, context_mask, deterministic, input_embed=aligned)

    def __call__(
        self,
        tokens: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        lowres: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits [B, L, vocab] for high-res tokens [B, L] (masked with `mask_id`), text [B, S, C]
        with mask [B, S], and the low-res input (`encode_context`)."""
        chex.assert_equal_shape_prefix((context, context_mask), 2)
        kv, mask = self.encode_context(context, context_mask, lowres)
        return self.logits(tokens, kv, mask, deterministic)


def stack_layers(params: dict[str, Any], depth: int) -> dict[str, Any]:
    """A MaskedTransformer's parameters from the unrolled layout ('blocks_0' ... one subtree
    per layer) to the `scan_layers` one ('blocks', each leaf with a leading layer axis).

    Nested transformers (the super-res stage's 'high') are converted too; other keys stay.
    """
    out = {}
    for key, value in params.items():
        if key.startswith("blocks_"):
            continue
        out[key] = stack_layers(value, depth) if isinstance(value, dict) else value
    if "blocks_0" in params:
        layers = [params[f"blocks_{i}"] for i in range(depth)]
        out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: dict[str, Any], depth: int) -> dict[str, Any]:
    """The inverse of `stack_layers`."""
    out = {}
    for key, value in params.items():
        if key == "blocks" and not isinstance(value, list):
            out.update(
                {f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], value) for i in range(depth)}
            )
        else:
            out[key] = unstack_layers(value, depth) if isinstance(value, dict) else value
    return out
