"""CLASP in PyTorch: a folder written by `python -m clasp_jax.convert --to=torch`, run in torch.

  import clasp_jax.torch as clasp_torch
  model = clasp_torch.load(DIR)
  zspeech = model.embed_speech([waveform_16khz, ...])   # (n, embed_dim), unit rows
  ztext = model.embed_text(["a sentence", ...])           # with a text tower

Needs the `torch` extra (`pip install clasp_jax[torch]`: torch, transformers,
sentence-transformers). See `model.py` for what each part is.
"""

try:
  import torch as _torch  # noqa: F401
except ImportError as error:
  raise ImportError("clasp_jax.torch needs PyTorch: install the torch extra "
                    "(pip install 'clasp_jax[torch]')") from error

from clasp_jax.torch.model import ClaspTorch, FusionEncoder, FrontEnd, SpectrogramEncoder, load

__all__ = ["ClaspTorch", "FusionEncoder", "FrontEnd", "SpectrogramEncoder", "load"]
