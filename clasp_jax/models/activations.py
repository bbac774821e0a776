"""Activation functions by their Hugging Face `hidden_act` names, shared by every tower.

`gelu` is the exact (erf) GELU, as in transformers and torch.nn.GELU(); it is written out as
x/2 (1 + erf(x/sqrt 2)) because XLA's CPU code for that form runs about twice as fast as
`jax.nn.gelu(approximate=False)` at the same float32 accuracy. The tanh approximation goes by
the other names.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_INV_SQRT2 = 0.7071067811865476


def gelu_exact(x: jax.Array) -> jax.Array:
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_INV_SQRT2, x.dtype)))


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


HF_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_python": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def hf_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The function for a `hidden_act` name; a clear error for names the towers do not implement."""
  if name not in HF_ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[name]
