"""Reading Hugging Face checkpoint folders into Flax parameter trees, one explicit rule a tensor.

Every tower loads through here: `read_config` for `config.json` (and its siblings),
`read_weights` for `model.safetensors`, sharded safetensors (`*.index.json`) or a weights-only
`pytorch_model.bin`, and `params_from_tensors` for the strict mapping. A tower supplies only
its table of `TensorRule`s (checkpoint name -> Flax path, converter, expected shape); a
checkpoint that lacks a tensor, holds one that no rule consumes, or disagrees on a shape is
refused with one message naming the first few of each, so a wrong architecture or a silently
half-random model fails at load time.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from clasp_jax.common import mismatch

Array = np.ndarray
Converter = Callable[[Array], Array]

# safetensors dtype tags -> numpy dtypes (bfloat16 via ml_dtypes: numpy has none of its own).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}

# How many names of each kind of problem a message lists: a wrong architecture can miss
# hundreds of tensors, and the first few already tell what went wrong.


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be loaded faithfully; the message says why."""


def read_config(folder: str | os.PathLike, file_name: str = "config.json", *,
                required: bool = True) -> Any:
  """A JSON file of a checkpoint folder; None when it (or the folder) is absent and not
  `required`."""
  folder = os.fspath(folder)
  path = os.path.join(folder, file_name)
  if not os.path.isfile(path):
    if not required:
      return None
    if not os.path.isdir(folder):
      raise CheckpointError(f"{folder}: not a checkpoint folder")
    raise CheckpointError(f"{folder}: {file_name} not found (not a Hugging Face model folder)")
  try:
    with open(path, encoding="utf-8") as stream:
      return json.load(stream)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def _safetensors_header(stream, path: str) -> tuple[dict, int]:
  """(the JSON header, the offset where tensor data starts) of an open .safetensors file."""
  try:
    (header_size,) = struct.unpack("<Q", stream.read(8))
    return json.loads(stream.read(header_size)), 8 + header_size
  except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CheckpointError(f"{path}: not a safetensors file ({error})") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, Array]:
  """Every tensor of a .safetensors file as a host numpy array in its stored dtype (bf16 too).

  The file is memory-mapped and each tensor copied out once, so reading a 2 GB checkpoint
  does not hold the whole file in memory beside the arrays.
  """
  path = os.fspath(path)
  with open(path, "rb") as stream:
    header, data_start = _safetensors_header(stream, path)
    tensors = {}
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
      for name, entry in header.items():
        if name == "__metadata__":
          continue
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
          raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        if data_start + end > len(mapped):
          raise CheckpointError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        view = np.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize,
                             offset=data_start + begin)
        tensors[name] = view.reshape(entry["shape"]).copy()
        del view  # The mapping cannot close while a view of it is alive.
  return tensors


def read_torch_bin(path: str | os.PathLike) -> dict[str, Array]:
  """A PyTorch state dict read with `weights_only=True`, so no pickled code runs."""
  path = os.fspath(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only .bin files need it)
  except ImportError:
    raise CheckpointError(f"{path} is a PyTorch file; install the 'torch' extra to read it, "
                          "or convert it to model.safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises several unrelated types for unsafe or bad files.
    raise CheckpointError(
        f"{path}: cannot read as a weights-only PyTorch state dict ({error})") from None
  if not isinstance(state, Mapping) or not all(
      isinstance(value, torch.Tensor) for value in state.values()):
    raise CheckpointError(f"{path}: not a state dict of tensors")
  tensors = {}
  for name, tensor in state.items():
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # numpy cannot take torch's bf16; the bits can.
      tensors[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      tensors[name] = tensor.numpy()
  return tensors


def _weights_file(folder: str, stem: str) -> tuple[str, str]:
  """(path, kind) of the weights a folder holds: `<stem>.safetensors` first, then
  `pytorch_model.bin`, either possibly sharded behind an `.index.json` (kind 'index')."""
  for file_name, kind in ((f"{stem}.safetensors", "safetensors"),
                          (f"{stem}.safetensors.index.json", "index"),
                          ("pytorch_model.bin", "bin"),
                          ("pytorch_model.bin.index.json", "index")):
    path = os.path.join(folder, file_name)
    if os.path.isfile(path):
      return path, kind
  raise CheckpointError(f"{folder}: no {stem}.safetensors or pytorch_model.bin (or their "
                        "index) found")


def _weight_map(path: str) -> dict[str, str]:
  """Tensor name -> shard file of a shard index."""
  try:
    with open(path, encoding="utf-8") as stream:
      weight_map = json.load(stream)["weight_map"]
    return {str(name): str(shard) for name, shard in weight_map.items()}
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
    raise CheckpointError(f"{path}: not a shard index ({error!r})") from None


def tensor_names(folder: str | os.PathLike, stem: str = "model") -> set[str]:
  """Names of the tensors `read_weights` would read, without reading them: the safetensors
  header or the shard index (a 1.2 GB HuBERT-large costs a few kilobytes), or a `.bin`
  memory-mapped. Building a model from its config needs them to know which optional tensors
  (a BERT pooler, HuBERT's SpecAugment embedding, a CTC head) a checkpoint holds."""
  path, kind = _weights_file(os.fspath(folder), stem)
  if kind == "index":
    return set(_weight_map(path))
  if kind == "safetensors":
    with open(path, "rb") as stream:
      return set(_safetensors_header(stream, path)[0]) - {"__metadata__"}
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only .bin files need it)
  except ImportError:
    raise CheckpointError(f"{path} is a PyTorch file; install the 'torch' extra to read it, "
                          "or convert it to model.safetensors") from None
  try:  # mmap: the storages are mapped, not read; weights_only: no pickled code runs.
    return set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
  except Exception as error:  # torch raises several unrelated types for unsafe or bad files.
    raise CheckpointError(
        f"{path}: cannot read as a weights-only PyTorch state dict ({error})") from None


def read_weights(folder: str | os.PathLike, stem: str = "model") -> dict[str, Array]:
  """All weight tensors of a folder: `<stem>.safetensors` first, then `pytorch_model.bin`.

  Either may be sharded behind an `.index.json`. `stem` is "model" for Hugging Face models
  and sentence-transformers Dense folders alike.
  """
  folder = os.fspath(folder)
  path, kind = _weights_file(folder, stem)
  if kind == "safetensors":
    return read_safetensors(path)
  if kind == "bin":
    return read_torch_bin(path)
  reader = read_safetensors if path.endswith(".safetensors.index.json") else read_torch_bin
  tensors: dict[str, Array] = {}
  for shard_name in sorted(set(_weight_map(path).values())):
    shard = os.path.join(folder, shard_name)
    if not os.path.isfile(shard):
      raise CheckpointError(f"{path}: shard {shard_name} not found")
    tensors.update(reader(shard))
  return tensors


def identity(tensor: Array) -> Array:
  return tensor


def linear_kernel(weight: Array) -> Array:
  return weight.T  # torch.nn.Linear (out, in) -> flax Dense (in, out)


def conv1d_kernel(weight: Array) -> Array:
  return np.transpose(weight, (2, 1, 0))  # torch (out, in, kernel) -> flax (kernel, in, out)


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One Flax parameter and the checkpoint tensor it comes from.

  `names` are the accepted spellings of the checkpoint name, the first one present wins
  (PyTorch renamed weight-norm tensors, TF conversions call LayerNorm weights gamma/beta).
  `convert` turns the stored array into the Flax layout, whose shape must be `shape`.
  """

  names: tuple[str, ...]
  flax_path: tuple[str, ...]
  shape: tuple[int, ...] | None = None
  convert: Converter = identity


class RuleTable:
  """Builds a tower's rule list: checkpoint names under `prefix`, Flax paths '/'-joined."""

  def __init__(self, prefix: str = ""):
    self.prefix = prefix
    self.rules: list[TensorRule] = []

  def add(self, flax_path: str, names: str | Sequence[str], shape: Sequence[int] | None = None,
          convert: Converter = identity, *, prefixed: bool = True) -> None:
    names = (names,) if isinstance(names, str) else tuple(names)
    if prefixed:
      names = tuple(self.prefix + name for name in names)
    self.rules.append(TensorRule(names, tuple(flax_path.split("/")),
                                 None if shape is None else tuple(shape), convert))

  def linear(self, flax_path: str, name: str, in_features: int | None = None,
             out_features: int | None = None, *, bias: bool = True) -> None:
    known = in_features is not None and out_features is not None
    self.add(f"{flax_path}/kernel", f"{name}.weight",
             (in_features, out_features) if known else None, linear_kernel)
    if bias:
      self.add(f"{flax_path}/bias", f"{name}.bias", (out_features,) if known else None)

  def layer_norm(self, flax_path: str, name: str, features: int | None = None, *,
                 legacy_names: bool = False) -> None:
    """LayerNorm weight/bias -> scale/bias; `legacy_names` also accepts TF's gamma/beta."""
    shape = None if features is None else (features,)
    for leaf, suffix, legacy in (("scale", "weight", "gamma"), ("bias", "bias", "beta")):
      names = (f"{name}.{suffix}", f"{name}.{legacy}") if legacy_names else f"{name}.{suffix}"
      self.add(f"{flax_path}/{leaf}", names, shape)


def _flat_shapes(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple]:
  shapes = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      shapes.update(_flat_shapes(value, prefix + (key,)))
    else:
      shapes[prefix + (key,)] = tuple(np.shape(value))
  return shapes


def with_shapes(rules: Iterable[TensorRule], shape_tree: Mapping) -> list[TensorRule]:
  """Takes each rule's expected shape from a Flax parameter (shape) tree, e.g. `eval_shape`.

  The table and the model must cover each other exactly; a gap is a bug in the table, not in
  the checkpoint, and is reported as such.
  """
  shapes = _flat_shapes(shape_tree)
  rules = list(rules)
  paths = {rule.flax_path for rule in rules}
  unmapped = sorted("/".join(path) for path in shapes if path not in paths)
  unknown = sorted("/".join(path) for path in paths if path not in shapes)
  if unmapped or unknown:
    raise AssertionError(f"rule table and model disagree: no rule for {mismatch.listing(unmapped)}; "
                         f"rules for parameters the model lacks: {mismatch.listing(unknown)}")
  return [dataclasses.replace(rule, shape=shapes[rule.flax_path]) for rule in rules]


def params_from_tensors(tensors: Mapping[str, Array], rules: Iterable[TensorRule], *,
                        source: str, model: str, ignore_unused: Iterable[str] = (),
                        dtype: Any = np.float32) -> dict[str, Any]:
  """Maps checkpoint tensors onto a nested Flax parameter dict by `rules`, strictly.

  Args:
    tensors: checkpoint name -> array, e.g. from `read_weights`.
    rules: the table; every rule needs its `shape`.
    source: the checkpoint, for the message (a folder or file name).
    model: what it was loaded as, for the message ("a 12-layer BERT encoder").
    ignore_unused: regexes (re.search) of checkpoint tensors that may stay unused.
    dtype: the parameters' dtype (numpy arrays, contiguous).

  Raises:
    CheckpointError: one message with the count and the first few names of the missing
      tensors, the unused tensors and the shape mismatches.
  """
  ignore = [re.compile(pattern) for pattern in ignore_unused]
  params: dict[str, Any] = {}
  used, missing, mismatched = set(), [], []
  for rule in rules:
    if rule.shape is None:
      raise AssertionError(f"rule for {'/'.join(rule.flax_path)} has no expected shape")
    found = next((name for name in rule.names if name in tensors), None)
    if found is None:
      missing.append(" or ".join(rule.names))
      continue
    used.add(found)
    stored = np.asarray(tensors[found])
    value = np.asarray(rule.convert(stored))
    if value.shape != rule.shape:
      mismatched.append(f"{found}: checkpoint {stored.shape} gives {value.shape}, expected "
                        f"{rule.shape} for {'/'.join(rule.flax_path)}")
      continue
    node = params
    for key in rule.flax_path[:-1]:
      node = node.setdefault(key, {})
    node[rule.flax_path[-1]] = np.ascontiguousarray(value, dtype=dtype)
  unused = sorted(name for name in tensors
                  if name not in used and not any(pattern.search(name) for pattern in ignore))
  found = mismatch.problems(missing, unused, mismatched)
  if found:
    raise CheckpointError(f"{source} does not match {model}: " + "; ".join(found))
  return params
