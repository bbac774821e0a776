"""The tensor names of a Hugging Face weights folder, read without reading the tensors.

Building a model from its config alone (shapes for `jax.eval_shape`, a Flax module whose
parameters `load()` fills later) needs to know which optional tensors a checkpoint holds (a
BERT pooler, HuBERT's SpecAugment embedding, a CTC head). The names sit in the safetensors
header or the shard index, so a 1.2 GB HuBERT-large costs a few kilobytes of reading here.
"""

from __future__ import annotations

import json
import os
import struct

# The files `read_folder_tensors` / `read_state_dict` look for, in their order of preference.
WEIGHT_FILES = ("{stem}.safetensors", "{stem}.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _safetensors_names(path: str) -> set[str]:
  with open(path, "rb") as stream:
    size_bytes = stream.read(8)
    if len(size_bytes) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its header size)")
    (header_size,) = struct.unpack("<Q", size_bytes)
    try:
      header = json.loads(stream.read(header_size))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise ValueError(f"{path}: not a safetensors file ({error})") from None
  return set(header) - {"__metadata__"}


def _torch_bin_names(path: str) -> set[str]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path} is a PyTorch file; install the 'torch' extra to read it, or "
                     "convert it to model.safetensors") from None
  try:
    # mmap: the storages are mapped, not read; weights_only: no pickled code runs.
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as error:  # torch raises several unrelated types for unsafe or bad files.
    raise ValueError(f"{path}: cannot read as a weights-only PyTorch state dict ({error})") from None
  return set(state_dict)


def tensor_names(folder: str | os.PathLike, stem: str = "model") -> set[str]:
  """Names of the tensors in the weights file the loaders would read from `folder`.

  Raises ValueError (naming the folder) when there is no weights file or it is unreadable.
  """
  folder = os.fspath(folder)
  for pattern in WEIGHT_FILES:
    path = os.path.join(folder, pattern.format(stem=stem))
    if not os.path.isfile(path):
      continue
    if path.endswith(".index.json"):
      try:
        with open(path) as stream:
          return set(json.load(stream)["weight_map"])
      except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a weight index ({error!r})") from None
    if path.endswith(".safetensors"):
      return _safetensors_names(path)
    return _torch_bin_names(path)
  raise ValueError(f"{folder}: no weights found (looked for "
                   f"{', '.join(pattern.format(stem=stem) for pattern in WEIGHT_FILES)})")
