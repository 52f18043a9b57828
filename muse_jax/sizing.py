r"""Parameter counts, train-step FLOPs and per-device memory of a config, without allocating.

Everything comes from `jax.eval_shape` (shapes only) and from XLA's cost analysis of the
lowered, never-run step, so the paper-scale configs can be sized on a laptop before renting a
pod slice:

  python -m muse_jax.sizing --config=configs/muse_paper.py:3b --batch_size=512 \
      --mesh=data=1,fsdp=32,tensor=1

Memory per device = parameters + gradients + optimiser state (each leaf's shard size from its
logical axes, `config.mesh.rules` and the mesh shape: exactly what `muse_jax.parallel` would
place there), + the frozen text encoder when it runs in the graph (bfloat16, sharded by the same
rules), + an analytic activation estimate (see `activation_bytes`).

Where libtpu is installed (the `[tpu]` extra), the report ends with the XLA:TPU compiler's own
per-device memory for the base train step on `--topology` (default: the v4 slice with the
mesh's device count), which replaces the estimate: `muse_jax.aot` compiles it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models import factory, t5
from muse_jax.models.layers import get_dtype
from muse_jax.models.transformer import MaskedTransformer, SuperResTransformer
from muse_jax.models.vqgan import VQGAN
from muse_jax.parallel import MESH_AXES
from muse_jax.train import optim

GiB = 1024**3


def _boxed_leaves(tree: Any) -> list[tuple[jax.ShapeDtypeStruct, tuple | None]]:
    """(abstract leaf, logical axis names or None) for every leaf of a boxed abstract tree."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    out = []
    for leaf in jax.tree.leaves(tree, is_leaf=is_box):
        if is_box(leaf):
            out.append((leaf.value, tuple(leaf.names)))
        else:
            out.append((leaf, None))
    return out


def count(tree: Any) -> int:
    """Number of elements of a (possibly boxed) abstract tree."""
    return sum(math.prod(x.shape) for x, _ in _boxed_leaves(tree))


def shard_bytes(tree: Any, mesh_shape: Mapping[str, int], rules, dtype: Any | None = None) -> int:
    """Bytes one device holds of a boxed tree sharded by its logical axes and `rules`.

    Each dimension is split over the product of the mesh axes its logical name maps to (rounded
    up, as XLA pads uneven shards); unnamed leaves are replicated. `dtype` overrides the leaves'.
    """
    total = 0
    for leaf, names in _boxed_leaves(tree):
        itemsize = jnp.dtype(dtype or leaf.dtype).itemsize
        if names is None:
            total += math.prod(leaf.shape) * itemsize
            continue
        spec = nn.logical_to_mesh_axes(names, list(rules))
        elems = 1
        for dim, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            elems *= -(-dim // math.prod(mesh_shape[a] for a in axes))
        total += elems * itemsize
    return total


# ---------------------------------------------------------------------------------------------
# Modules of each component, built from the config the way the stages build them.


def text_encoder_module(config) -> nn.Module:
    t = config.text_encoder
    vocab = t5.get_config(t.preset).vocab_size if t.name == "t5" else 32128
    return factory.text_encoder(config, vocab)


def superres_modules(config) -> tuple[SuperResTransformer, VQGAN] | None:
    """(super-res transformer incl. its low-res encoder, high-res VQGAN), if configured."""
    from muse_jax.stages import has_cascade

    if not has_cascade(config):
        return None
    return factory.superres_transformer(config), factory.superres_tokenizer(config)


def _transformer_init(model: MaskedTransformer, context_len: int, context_dim: int) -> Callable:
    def init(rng):
        tokens = jnp.zeros((1, model.seq_len), jnp.int32)
        ctx = jnp.zeros((1, context_len, context_dim))
        return model.init(rng, tokens, ctx, jnp.ones((1, context_len), jnp.int32))["params"]

    return init


COMPONENTS = ("tokenizer", "base", "superres", "text_encoder")


def abstract_params(config, components: tuple[str, ...] = COMPONENTS) -> dict[str, Any]:
    """Boxed abstract parameter trees of the components (`jax.eval_shape`: nothing allocated).

    "superres" adds the keys "superres" (transformer incl. its low-res encoder) and
    "superres_tokenizer" when the config has the super-res stages.
    """
    rng = jax.random.key(0)
    out = {}
    size = config.data.image_size
    if "tokenizer" in components:
        vq = factory.tokenizer(config)
        out["tokenizer"] = jax.eval_shape(
            lambda r: vq.init(r, jnp.zeros((1, size, size, 3)))["params"], rng
        )
    if "base" in components:
        transformer = factory.base_transformer(config)
        out["base"] = jax.eval_shape(
            _transformer_init(transformer, config.data.text_length, factory.text_width(config)), rng
        )
    sr = superres_modules(config) if "superres" in components else None
    if sr is not None:
        high, vq8 = sr
        hi_size = config.data.hr_image_size
        out["superres_tokenizer"] = jax.eval_shape(
            lambda r: vq8.init(r, jnp.zeros((1, hi_size, hi_size, 3)))["params"], rng
        )
        t = config.data.text_length

        def init_superres(r):
            return high.init(
                r,
                jnp.zeros((1, high.seq_len), jnp.int32),
                jnp.zeros((1, t, factory.text_width(config))),
                jnp.ones((1, t), jnp.int32),
                high.lowres_example(),
            )["params"]

        out["superres"] = jax.eval_shape(init_superres, rng)
    if "text_encoder" in components:
        text = text_encoder_module(config)
        ids = jnp.zeros((1, config.data.text_length), jnp.int32)
        out["text_encoder"] = jax.eval_shape(
            lambda r: text.init(r, ids, jnp.ones_like(ids))["params"], rng
        )
    return out


# ---------------------------------------------------------------------------------------------
# FLOPs.


def base_step_flops(config, batch_size: int) -> dict[str, float]:
    """FLOPs of one base-stage step on precomputed text embeddings (the paper's setting).

    `xla_forward` / `xla_train` are XLA's cost analysis of the lowered forward+loss and
    value-and-grad programs over abstract inputs (nothing runs or is allocated); `analytic` is
    3 x (2 FLOPs per weight per token + attention score/value products).
    """
    from muse_jax.train import losses

    model = factory.base_transformer(config)
    params = nn.unbox(
        jax.eval_shape(
            _transformer_init(model, config.data.text_length, factory.text_width(config)),
            jax.random.key(0),
        )
    )
    s, t = model.seq_len, config.data.text_length
    tokens = jax.ShapeDtypeStruct((batch_size, s), jnp.int32)
    ctx = jax.ShapeDtypeStruct((batch_size, t, factory.text_width(config)), jnp.float32)
    ctx_mask = jax.ShapeDtypeStruct((batch_size, t), jnp.int32)
    masked = jax.ShapeDtypeStruct((batch_size, s), jnp.bool_)

    smoothing = float(config.base.get("label_smoothing", 0.0))

    def loss(p, tok, c, cm, m):  # The base stage's loss (`BaseStage.loss`), without dropout.
        logits = model.apply({"params": p}, tok, c, cm)
        return losses.masked_cross_entropy(logits, tok, m, smoothing)[0]

    def xla_flops(fn) -> float:
        cost = jax.jit(fn).lower(params, tokens, ctx, ctx_mask, masked).cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", float("nan"))) if cost else float("nan")

    fwd = xla_flops(loss)
    train = xla_flops(jax.value_and_grad(loss))
    # Analytic: embeddings are lookups (no FLOPs); the text projection and the cross-attention
    # key/value projections run on the t text tokens, every other weight on the s image tokens.
    w = model.width
    n_all = count(params)
    n_embed = (model.vocab_size + 1) * w + s * w
    n_text = factory.text_width(config) * w + w + model.depth * 2 * (w * w + w)
    dense = 2 * (n_all - n_embed - n_text) * s + 2 * n_text * t
    attn = model.depth * 4 * model.width * (s * s + s * t)  # QK^T and AV, self + cross.
    analytic_fwd = batch_size * (dense + attn)
    return {
        "xla_forward": fwd,
        "xla_train": train,
        "analytic_forward": float(analytic_fwd),
        "analytic_train": 3.0 * analytic_fwd,
    }


# ---------------------------------------------------------------------------------------------
# Memory.


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=32,tensor=1' -> {'data': 1, 'fsdp': 32, 'tensor': 1} (missing axes: 1)."""
    out = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in out:
            raise UsageError(f"Unknown mesh axis {key!r} in {text!r}; valid: {MESH_AXES}.")
        out[key.strip()] = int(value)
    return out


def activation_bytes(config, batch_per_device: int, tensor: int = 1) -> float:
    """Rough activation memory of one base-stage train step on one device (no rematerialisation).

    Per layer, per example, in 16-bit units (Korthikanti et al. 2022, "Reducing activation
    recomputation", extended to cross-attention and a general MLP width): self-attention
    11sh + 5as^2, cross-attention 9sh + 4th + 5ast, MLP 3sh + 4sm, three LayerNorms 6sh (s image
    tokens, t text tokens, h width, m MLP width, a heads); plus the float32 logits and their
    softmax (8 s V bytes). Scaled by 2 for a float32 model, divided by the tensor-parallel size.
    """
    m = config.base.model
    model = factory.base_transformer(config)
    s, t, h, mlp, a = model.seq_len, config.data.text_length, m.width, m.mlp_dim, m.num_heads
    per_layer = 11 * s * h + 5 * a * s * s + 9 * s * h + 4 * t * h + 5 * a * s * t
    per_layer += 3 * s * h + 4 * s * mlp + 6 * s * h
    scale = jnp.dtype(get_dtype(m.dtype)).itemsize / 2
    body = model.depth * per_layer * scale
    logits = 8 * s * model.vocab_size
    return batch_per_device * (body + logits) / tensor


@dataclasses.dataclass
class MemoryReport:
    params: int
    grads: int
    opt_state: int
    text_encoder: int
    activations: float
    unsharded_params: int

    @property
    def total(self) -> float:
        return self.params + self.grads + self.opt_state + self.text_encoder + self.activations


def base_memory(
    config,
    mesh_shape: Mapping[str, int],
    batch_size: int,
    text_in_graph: bool | None = None,
    abstract: Mapping[str, Any] | None = None,
) -> MemoryReport:
    """Per-device bytes of the base stage's train state on `mesh_shape` (see module docstring).

    `text_in_graph` None: True unless `config.text_embeddings` is set (precomputed) or the
    text encoder is trainable (then it is counted in the parameters instead).
    """
    from muse_jax import parallel

    rules = parallel.rules(config)
    abstract = abstract or abstract_params(config, ("base", "text_encoder"))
    params = {"transformer": abstract["base"]}
    tcfg = config.text_encoder
    if tcfg.trainable:
        params["text_encoder"] = abstract["text_encoder"]
    tx = optim.make(config.base.train.optimizer, config.base.train.num_steps)
    opt_state = jax.eval_shape(tx.init, params)
    if text_in_graph is None:
        text_in_graph = not config.get("text_embeddings") and not tcfg.trainable
    text = (
        shard_bytes(abstract["text_encoder"], mesh_shape, rules, jnp.bfloat16)
        if text_in_graph
        else 0
    )
    batch_axes = math.prod(mesh_shape[a] for a in ("data", "fsdp"))
    p = shard_bytes(params, mesh_shape, rules)
    return MemoryReport(
        params=p,
        grads=p,
        opt_state=shard_bytes(opt_state, mesh_shape, rules),
        text_encoder=text,
        activations=activation_bytes(
            config, -(-batch_size // batch_axes), mesh_shape.get("tensor", 1)
        ),
        unsharded_params=shard_bytes(params, dict.fromkeys(MESH_AXES, 1), rules),
    )


# ---------------------------------------------------------------------------------------------
# Report.


def param_table(config, abstract: Mapping[str, Any] | None = None) -> list[tuple]:
    """Rows (component, params, paper's number or None)."""
    abstract = abstract or abstract_params(config)
    paper = config.get("paper", {})
    rows = [
        (
            f"tokenizer (f{factory.tokenizer(config).downsample_factor} VQGAN)",
            count(abstract["tokenizer"]),
            None,
        )
    ]
    rows.append(
        ("base transformer (+ text proj)", count(abstract["base"]), paper.get("base_params"))
    )
    if "superres" in abstract:
        sr = count(abstract["superres"])
        rows.append(("super-res tokenizer (f8 VQGAN)", count(abstract["superres_tokenizer"]), None))
        rows.append(("super-res (+ low-res encoder)", sr, paper.get("superres_params")))
    t = config.text_encoder
    rows.append(
        (
            f"text encoder ({t.name} {t.preset if t.name == 't5' else ''})".replace(" )", ")"),
            count(abstract["text_encoder"]),
            paper.get("text_encoder_params"),
        )
    )
    return rows


def report(config, batch_size: int, mesh_shape: Mapping[str, int], flops: bool = True) -> str:
    abstract = abstract_params(config)
    lines = [f"{'component':<36}{'params':>16}{'paper':>10}{'ratio':>8}"]
    for name, n, ref in param_table(config, abstract):
        ref_s, ratio = ("-", "-") if not ref else (f"{ref / 1e9:.3g}B", f"{n / ref:.3f}")
        lines.append(f"{name:<36}{n:>16,}{ref_s:>10}{ratio:>8}")
    if flops:
        f = base_step_flops(config, batch_size)
        lines.append("")
        lines.append(f"base step FLOPs, global batch {batch_size} (text precomputed):")
        lines.append(
            f"  XLA forward {f['xla_forward']:.3e}   XLA fwd+bwd {f['xla_train']:.3e} "
            f"({f['xla_train'] / f['xla_forward']:.2f}x fwd)"
        )
        lines.append(
            f"  analytic forward {f['analytic_forward']:.3e}   3x = {f['analytic_train']:.3e}"
        )
    mem = base_memory(config, mesh_shape, batch_size, abstract=abstract)
    n_dev = math.prod(mesh_shape.values())
    lines.append("")
    lines.append(
        f"base stage memory per device, mesh {dict(mesh_shape)} ({n_dev} devices), "
        f"global batch {batch_size}:"
    )
    for name, b in [
        ("params (float32)", mem.params),
        ("grads (float32)", mem.grads),
        ("optimizer state", mem.opt_state),
        ("frozen text encoder (bfloat16)", mem.text_encoder),
        ("activations (estimate, no remat)", mem.activations),
        ("total", mem.total),
    ]:
        lines.append(f"  {name:<34}{b / GiB:>9.2f} GiB")
    lines.append(f"  (unsharded params: {mem.unsharded_params / GiB:.2f} GiB)")
    return "\n".join(lines)


def compiler_report(config, batch_size: int, mesh_shape: Mapping[str, int], topology: str) -> str:
    """The XLA:TPU compiler's per-device memory of the base train step (precomputed text) on
    `topology` (empty: the v4 slice of the mesh's chip count), or why it is not available."""
    from muse_jax import aot, tpu

    missing = tpu.libtpu_missing()
    if missing:
        return f"compiler's figure: not available ({missing}); the estimate above stands."
    n = math.prod(mesh_shape.values())
    topo = tpu.parse(topology or f"v4-{2 * n}")
    config = config.copy_and_resolve_references()
    config.mesh.shape.update(dict(mesh_shape))
    (r,) = aot.run(config, topo, ["base"], ["precomputed"], batch_size, log=lambda _: None)
    if r.error:
        return (
            f"XLA:TPU compiler on {topo.name}: the base step does NOT fit, it asks for "
            f"{r.total_bytes / GiB:.2f} GiB per device of {r.hbm_bytes / GiB:.2f} ({r.error})"
        )
    m = r.memory
    return (
        f"XLA:TPU compiler on {topo.name} (replaces the estimate): {m.total / GiB:.2f} GiB per "
        f"device of {r.hbm_bytes / GiB:.2f} GiB HBM, {'fits' if r.fits else 'DOES NOT FIT'} "
        f"(arguments {m.arguments / GiB:.2f}, temporaries {m.temporaries / GiB:.2f}; "
        f"remat={config.base.model.get('remat', 'none')}, "
        f"scan_layers={config.base.model.get('scan_layers', False)})"
    )


def main(argv: list[str]) -> None:
    from muse_jax import cli, parallel

    cli.check_no_extra_args(argv)
    config = _CONFIG.value
    batch = _BATCH.value or config.base.train.batch_size
    if _MESH.value:
        mesh_shape = parse_mesh(_MESH.value)
    else:
        sizes = parallel.mesh_shape(config.mesh.shape, _NUM_DEVICES.value)
        mesh_shape = dict(zip(MESH_AXES, sizes))
    print(report(config, batch, mesh_shape, flops=not _NO_FLOPS.value))
    if not _NO_COMPILE.value:
        print()
        print(compiler_report(config, batch, mesh_shape, _TOPOLOGY.value))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from muse_jax import cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    _BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: config.base.train).")
    _MESH = flags.DEFINE_string("mesh", "", "e.g. data=1,fsdp=32,tensor=1 (empty: config.mesh).")
    _NUM_DEVICES = flags.DEFINE_integer(
        "num_devices", 32, "Devices that resolve a -1 in config.mesh.shape (v4-64: 32 chips)."
    )
    _NO_FLOPS = flags.DEFINE_bool("no_flops", False, "Skip XLA's cost analysis (faster).")
    _TOPOLOGY = flags.DEFINE_string(
        "topology", "", "TPU slice the compiler's figure is for (empty: v4 with the mesh's chips)."
    )
    _NO_COMPILE = flags.DEFINE_bool(
        "no_compile", False, "Skip the XLA:TPU compile (minutes for the paper configs)."
    )
    flags.mark_flag_as_required("config")
    from muse_jax import tpu

    if tpu.libtpu_missing() is None:
        tpu.quiet_libtpu_environment()  # Before JAX picks a backend: sizing runs nothing.
    cli.run(main)
