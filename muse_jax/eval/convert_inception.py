r"""Binary: converts pytorch-fid's FID Inception weights (.pth) into a safe format, once.

  python -m muse_jax.eval.convert_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.safetensors

The .pth is a pickle; it is opened with `torch.load(weights_only=True)` (tensors only, no code)
and checked against the network before anything is written, so a wrong file fails here with
the offending key. The output keeps the PyTorch key names and drops what FID never reads (the
1008-class head, BatchNorm step counters). `--output` ending in `.npz` writes numpy's format.
Either path may be local or gs:// (through `muse_jax.storage`; the output is written atomically).
torch is needed only here; `muse_jax.eval.fid` reads the output without it.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
from absl import flags

from muse_jax import cli, storage
from muse_jax.eval import inception

_INPUT = flags.DEFINE_string("input", None, "pytorch-fid's pt_inception-2015-12-05-*.pth.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .safetensors (or .npz) file.")

# torch.hub names downloads `<name>-<first hex digits of the sha256>.pth`.
_HUB_HASH = re.compile(r"-([0-9a-f]{8,64})\.pth$")


def read_pth(path: str) -> dict[str, np.ndarray]:
    """The state dict of a `.pth` as float32 numpy, read without running pickled code."""
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such file (download pytorch-fid's FID weights first).")
    try:
        import torch
    except ImportError:
        raise ImportError(
            "Converting a .pth needs PyTorch (CPU build is enough): pip install torch. "
            "Only the conversion needs it; FID itself reads the converted file."
        ) from None
    # torch.load opens local paths only: a gs:// file is read into memory (~100 MB) first.
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise inception.WeightsError(f"{path}: expected a state dict of tensors.")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def convert(input_path: str, output_path: str) -> str:
    """Checks and converts; returns the input's sha256.

    Raises:
      FileNotFoundError: the input does not exist.
      WeightsError: a missing, unexpected or misshapen key (named), a hash that does not match
        the torch.hub file name (a truncated download), or an unknown output extension.
    """
    if not output_path.endswith((".safetensors", ".npz")):
        raise inception.WeightsError(f"{output_path}: output must end in .safetensors or .npz.")
    state = read_pth(input_path)
    digest = inception.sha256(input_path)
    name_hash = _HUB_HASH.search(os.path.basename(input_path))
    if name_hash and not digest.startswith(name_hash.group(1)):
        raise inception.WeightsError(
            f"{input_path}: sha256 {digest[:12]}... does not match the {name_hash.group(1)} "
            "in its name; the download is corrupt or truncated."
        )
    inception.check_state_dict(state, input_path)
    kept = {k: np.ascontiguousarray(state[k]) for k in inception.key_table()}
    if output_path.endswith(".npz"):
        buffer = io.BytesIO()
        np.savez(buffer, **kept)
        data = buffer.getvalue()
    else:
        from safetensors.numpy import save

        data = save(kept, metadata={"source": os.path.basename(input_path), "sha256": digest})
    storage.write_bytes(output_path, data)  # Creates the folder; atomic, local or gs://.
    return digest


def main(argv: list[str]) -> None:
    cli.check_no_extra_args(argv)
    try:
        digest = convert(_INPUT.value, _OUTPUT.value)
    except ImportError as e:
        raise cli.UsageError(str(e)) from None
    print(
        f"wrote {_OUTPUT.value} ({len(inception.key_table())} tensors) from {_INPUT.value} (sha256 {digest[:12]})"
    )


def run() -> None:
    flags.mark_flags_as_required(["input", "output"])
    cli.run(main)


if __name__ == "__main__":
    run()
