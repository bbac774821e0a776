"""The authors' released fusion encoders: whole pickled PyTorch modules, read without running them.

The authors saved their trained models with `torch.save(model)`: a zip file whose `data.pkl`
pickles the module object itself (class `__main__.HubertLabseConcat` and the torch.nn layers
inside it), its tensors kept as raw storages next to it. Loading that with `torch.load`
unpickles arbitrary classes, and a pickle can call any function it names. This module reads
the zip itself with an allow-listed unpickler instead:

* torch's tensor rebuild functions and storage types become NumPy arrays built here,
* `collections.OrderedDict` and `set` (the containers an nn.Module's state holds),
* the torch.nn layer classes of the authors' modules and the authors' own class names
  (`AUTHORS_CLASSES`) become inert stand-ins (`ModuleRecord`) that only record the state
  pickle hands them; no torch code is imported and no method of theirs runs.

Any other global (`os.system`, `builtins.eval`, a class of another library) is refused with
`UnsafeCheckpointError` before anything is called. PyTorch is not needed.

`load_module` returns the stand-in tree, `state_dict` its tensors under PyTorch's names
(`audio_seq.0.weight`, `mix_seq.1.running_mean`, gated `text_seq.*`, `input_gate_text.0.*`,
`weight.0.*`, ...), and `fusion_variables` maps those onto `FusionEncoder`'s parameters and
BatchNorm statistics, with the settings (fusion kind, mode, widths) that rebuild the same
network.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
from typing import Any, Optional

import numpy as np

# The authors' fusion modules (their notebooks define them in __main__).
AUTHORS_CLASSES = ("HubertLabseConcat", "HubertLabseGating", "Wav2vecConcat", "Wav2vecGating")
# torch.nn layers their modules are built from, as pickle names them.
TORCH_MODULE_CLASSES = {
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.batchnorm", "BatchNorm1d"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.activation", "LeakyReLU"),
    ("torch.nn.modules.activation", "Sigmoid"),
    ("torch.nn.modules.activation", "Tanh"),
    ("torch.nn.modules.activation", "Softmax"),
    ("torch.nn.modules.dropout", "Dropout"),
}
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class UnsafeCheckpointError(ValueError):
  """The file is not a checkpoint this reader accepts; nothing in it was run."""


class ModuleRecord:
  """Stand-in for one pickled nn.Module: keeps the state pickle gives it, runs nothing."""

  torch_class = ""  # 'module.Class' as the pickle names it; set on each subclass.

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise UnsafeCheckpointError(f"{self.torch_class}: module state is not a dict")
    self.__dict__["state"] = state

  @property
  def class_name(self) -> str:
    return self.torch_class.rpartition(".")[2]

  def _part(self, name: str) -> dict:
    return dict(self.__dict__.get("state", {}).get(name) or {})

  @property
  def modules(self) -> dict[str, "ModuleRecord"]:
    return self._part("_modules")

  @property
  def parameters(self) -> dict[str, np.ndarray]:
    return {k: v for k, v in self._part("_parameters").items() if v is not None}

  @property
  def buffers(self) -> dict[str, np.ndarray]:
    skipped = self.__dict__.get("state", {}).get("_non_persistent_buffers_set") or set()
    return {k: v for k, v in self._part("_buffers").items() if v is not None and k not in skipped}

  def attribute(self, name: str, default: Any = None) -> Any:
    return self.__dict__.get("state", {}).get(name, default)


_stand_ins: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
  qualified = f"{module}.{name}"
  if qualified not in _stand_ins:
    _stand_ins[qualified] = type(name, (ModuleRecord,), {"torch_class": qualified})
  return _stand_ins[qualified]


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _Storage:
  values: np.ndarray  # 1-D, the storage's elements.


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2, as a NumPy copy of the strided view."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise UnsafeCheckpointError("a tensor is rebuilt from something that is not a storage")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(storage_offset)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise UnsafeCheckpointError(f"bad tensor layout: size {size}, stride {stride}")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if last >= len(storage.values):
    raise UnsafeCheckpointError(f"a tensor of size {size} reaches past its storage "
                                f"({len(storage.values)} elements)")
  values = storage.values
  itemsize = values.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(values[offset:] if all(size) else values[:0],
                                         shape=size, strides=[s * itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """torch._utils._rebuild_parameter(_with_state): a parameter is its tensor here."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise UnsafeCheckpointError("a parameter is rebuilt from something that is not a tensor")
  return data


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # Protocol 2 pickles write Python 2 names.
}


class _AllowListUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; tensors come from the zip's storages."""

  def __init__(self, stream, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(stream)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _FUNCTIONS:
      return _FUNCTIONS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    if (module, name) in TORCH_MODULE_CLASSES or name in AUTHORS_CLASSES:
      return _stand_in(module, name)
    raise UnsafeCheckpointError(
        f"refused: the checkpoint's pickle names {module}.{name}, which is neither a tensor, a "
        f"storage nor a module class of the authors' fusion encoders; nothing was run")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and
            isinstance(pid[1], _StorageType)):
      raise UnsafeCheckpointError(f"refused: unknown persistent id {str(pid)[:80]}")
    _, storage_type, key, _, numel = pid
    key = str(key)
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise UnsafeCheckpointError(f"the checkpoint lacks its storage {name}") from None
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      if len(raw) % dtype.itemsize:
        raise UnsafeCheckpointError(f"storage {name} is not a whole number of {dtype} values")
      values = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype.newbyteorder("="))
      if len(values) < int(numel):
        raise UnsafeCheckpointError(f"storage {name} holds {len(values)} values, {numel} "
                                    "expected")
      self._storages[key] = _Storage(values)
    return self._storages[key]


def load_module(path: str | os.PathLike) -> ModuleRecord:
  """The pickled module of a zip-format `torch.save` file, as a tree of ModuleRecords.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: not a zip-format torch file, a pickle naming anything outside the
      allow-list (refused before it is called), or a malformed tensor.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint {path}")
  if not zipfile.is_zipfile(path):
    raise UnsafeCheckpointError(f"{path} is not a zip-format torch checkpoint (torch.save "
                                "writes one since PyTorch 1.6; load and re-save older files)")
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist()
               if name.endswith("data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
      raise UnsafeCheckpointError(f"{path}: expected one <name>/data.pkl in the zip, found "
                                  f"{pickles or 'none'}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise UnsafeCheckpointError(f"{path}: unknown byte order {byteorder!r}")
    with archive.open(pickles[0]) as stream:
      try:
        loaded = _AllowListUnpickler(stream, archive, prefix, byteorder).load()
      except UnsafeCheckpointError:
        raise
      except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
              IndexError, KeyError) as error:
        raise UnsafeCheckpointError(f"{path}: cannot unpickle its module: {error}") from None
  if not isinstance(loaded, ModuleRecord):
    raise UnsafeCheckpointError(f"{path} holds a {type(loaded).__name__}, not a whole pickled "
                                "module (torch.save(model))")
  return loaded


def state_dict(module: ModuleRecord, prefix: str = "") -> dict[str, np.ndarray]:
  """Every parameter and persistent buffer under PyTorch's state_dict names, in order."""
  tensors = {}
  for name, value in {**module.parameters, **module.buffers}.items():
    tensors[prefix + name] = value
  for name, child in module.modules.items():
    if child is not None:
      tensors.update(state_dict(child, f"{prefix}{name}."))
  return tensors


# ------------------------------------------------------------------ Mapping onto FusionEncoder.

# Index of each Flax layer inside the authors' nn.Sequential blocks.
_BRANCH_LAYERS = {"linear_0": 0, "norm_0": 1, "linear_1": 4, "norm_1": 5, "linear_2": 8}
_CONCAT_MIX_LAYERS = {"linear_0": 0, "norm_0": 1, "linear_1": 3, "linear_2": 5}
_GATES = {"input_gate": "input_gate", "forget_gate": "forget_gate", "candidate": "tanh"}
# The authors' `mode` attribute (HubertLabseConcat(..., mode=...)) -> FusionEncoder's.
_MODES = {"joint": "joint", "audio": "speech", "image": "spectrogram"}


@dataclasses.dataclass(frozen=True)
class FusionImport:
  """An imported fusion encoder: FusionEncoder settings and its variables.

  Attributes:
    settings: FusionEncoder keyword arguments (fusion, mode, embed_dim, widths) that rebuild
      the authors' network; dims: input widths {'speech': ..., 'spectrogram': ...}.
    params, batch_stats: the FusionEncoder variables (float32 NumPy arrays).
    class_name: the authors' class, e.g. 'HubertLabseConcat'.
  """

  settings: dict[str, Any]
  dims: dict[str, int]
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  class_name: str


def fusion_variables(tensors: dict[str, np.ndarray], mode: Optional[str] = None,
                     class_name: str = "") -> FusionImport:
  """Maps the authors' state_dict onto FusionEncoder variables; every tensor must be used.

  Args:
    tensors: state_dict names -> arrays (`state_dict(load_module(path))`).
    mode: the authors' mode attribute ('joint', 'audio', 'image') or None for joint.
  Raises:
    UnsafeCheckpointError: names or shapes that are not one of the authors' fusion encoders.
  """
  if "weight.0.weight" in tensors or "text_seq.0.weight" in tensors:
    fusion, speech_prefix = "gated", "text_seq"
  elif "audio_seq.0.weight" in tensors:
    fusion, speech_prefix = "concat", "audio_seq"
  else:
    raise UnsafeCheckpointError("no fusion encoder in the checkpoint: it has neither "
                                "audio_seq.* (concat) nor text_seq.* / weight.* (gated) tensors "
                                f"(found {sorted(tensors)[:6]} ...)")
  if mode is not None and mode not in _MODES:
    raise UnsafeCheckpointError(f"unknown mode {mode!r} in the checkpoint; expected one of "
                                f"{sorted(_MODES)}")
  used: set[str] = set()

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise UnsafeCheckpointError(f"the checkpoint lacks {name}")
    used.add(name)
    return np.asarray(tensors[name], dtype=np.float32)

  def linear(prefix: str) -> dict[str, np.ndarray]:
    # PyTorch keeps (out, in); Flax's kernel is (in, out).
    return {"kernel": take(f"{prefix}.weight").T.copy(), "bias": take(f"{prefix}.bias")}

  def norm(prefix: str) -> tuple[dict, dict]:
    used.add(f"{prefix}.num_batches_tracked")  # Only momentum=None would read it.
    return ({"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")},
            {"mean": take(f"{prefix}.running_mean"), "var": take(f"{prefix}.running_var")})

  def sequential(prefix: str, layers: dict[str, int]) -> tuple[dict, dict]:
    params, stats = {}, {}
    for flax_name, index in layers.items():
      if flax_name.startswith("norm"):
        params[flax_name], stats[flax_name] = norm(f"{prefix}.{index}")
      else:
        params[flax_name] = linear(f"{prefix}.{index}")
    return params, stats

  params, batch_stats = {}, {}
  for flax_name, prefix in (("speech_branch", speech_prefix), ("spectrogram_branch", "image_seq")):
    params[flax_name], batch_stats[flax_name] = sequential(prefix, _BRANCH_LAYERS)
  if fusion == "concat":
    params["mix"], batch_stats["mix"] = sequential("mix_seq", _CONCAT_MIX_LAYERS)
  else:
    params["mix"] = {"mix_weights": linear("weight.0")}
    for side, suffix in (("speech_gate", "text"), ("spectrogram_gate", "image")):
      params["mix"][side] = {flax_name: linear(f"{torch_name}_{suffix}.0")
                             for flax_name, torch_name in _GATES.items()}

  unused = sorted(set(tensors) - used)
  if unused:
    raise UnsafeCheckpointError(f"tensors of no known layer: {unused[:6]}"
                                f"{' ...' if len(unused) > 6 else ''}")
  speech, spectrogram = params["speech_branch"], params["spectrogram_branch"]
  embed_dim = speech["linear_2"]["kernel"].shape[1]
  settings = {
      "fusion": fusion,
      "mode": _MODES[mode or "joint"],
      "embed_dim": int(embed_dim),
      "branch_hidden": (int(speech["linear_0"]["kernel"].shape[1]),
                        int(speech["linear_1"]["kernel"].shape[1])),
      "spectrogram_branch_hidden": (int(spectrogram["linear_0"]["kernel"].shape[1]),
                                    int(spectrogram["linear_1"]["kernel"].shape[1])),
  }
  if fusion == "concat":
    mix = params["mix"]
    settings["fusion_hidden"] = (int(mix["linear_0"]["kernel"].shape[1]),
                                 int(mix["linear_1"]["kernel"].shape[1]))
  dims = {"speech": int(speech["linear_0"]["kernel"].shape[0]),
          "spectrogram": int(spectrogram["linear_0"]["kernel"].shape[0])}
  # Shapes must chain as FusionEncoder builds them, or the network is not theirs.
  _check_shapes(params, batch_stats, {**settings, "mode": "joint"}, dims)
  if settings["mode"] != "joint":
    # The authors' single-branch modes keep every layer but use one branch.
    keep = f"{settings['mode']}_branch"
    params = {keep: params[keep]}
    batch_stats = {keep: batch_stats[keep]}
  return FusionImport(settings=settings, dims=dims, params=params, batch_stats=batch_stats,
                      class_name=class_name)


def _check_shapes(params, batch_stats, settings, dims) -> None:
  """Compares every array with a FusionEncoder of `settings` built by shape."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clasp_jax.models.fusion import FusionEncoder  # pylint: disable=g-import-not-at-top

  model = FusionEncoder(**settings)
  expected = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((2, dims["speech"])),
                         jnp.zeros((2, dims["spectrogram"])), train=False))
  got = {"params": params, "batch_stats": batch_stats}
  expected_shapes = jax.tree.map(lambda x: tuple(x.shape), expected)
  got_shapes = jax.tree.map(lambda x: tuple(x.shape), got)
  if expected_shapes != got_shapes:
    raise UnsafeCheckpointError("the checkpoint's layer shapes do not chain into the authors' "
                                f"fusion encoder ({settings})")


def import_fusion_encoder(path: str | os.PathLike) -> FusionImport:
  """`fusion_variables` of a released whole-module checkpoint file."""
  module = load_module(path)
  if module.class_name not in AUTHORS_CLASSES:
    raise UnsafeCheckpointError(f"{os.fspath(path)} holds a {module.torch_class}, not one of "
                                f"the authors' fusion encoders {AUTHORS_CLASSES}")
  mode = module.attribute("mode")
  return fusion_variables(state_dict(module), mode=mode if isinstance(mode, str) else None,
                          class_name=module.class_name)


# ------------------------------------------------------------------ FusionEncoder <-> their names.


@dataclasses.dataclass(frozen=True)
class NameRule:
  """One tensor of the authors' state_dict and the FusionEncoder variable it is.

  `collection` is 'params' or 'batch_stats'; `path` the variable's path inside the speech
  encoder; `transpose` for Linear weights (PyTorch (out, in), Flax kernel (in, out)).
  """

  torch_name: str
  collection: str
  path: tuple[str, ...]
  transpose: bool = False


def fusion_name_table(fusion: str) -> list[NameRule]:
  """Every tensor of the authors' joint fusion encoder of kind `fusion`, in their order; the
  same layer tables `fusion_variables` reads by."""
  if fusion not in ("concat", "gated"):
    raise ValueError(f"fusion must be 'concat' or 'gated', got {fusion!r}")
  rules: list[NameRule] = []

  def linear(prefix: str, path: tuple[str, ...]) -> None:
    rules.append(NameRule(f"{prefix}.weight", "params", path + ("kernel",), transpose=True))
    rules.append(NameRule(f"{prefix}.bias", "params", path + ("bias",)))

  def sequential(prefix: str, layers: dict[str, int], scope: str) -> None:
    for flax_name, index in layers.items():
      name, path = f"{prefix}.{index}", (scope, flax_name)
      if flax_name.startswith("norm"):
        rules.extend([NameRule(f"{name}.weight", "params", path + ("scale",)),
                      NameRule(f"{name}.bias", "params", path + ("bias",)),
                      NameRule(f"{name}.running_mean", "batch_stats", path + ("mean",)),
                      NameRule(f"{name}.running_var", "batch_stats", path + ("var",))])
      else:
        linear(name, path)

  sequential("audio_seq" if fusion == "concat" else "text_seq", _BRANCH_LAYERS, "speech_branch")
  sequential("image_seq", _BRANCH_LAYERS, "spectrogram_branch")
  if fusion == "concat":
    sequential("mix_seq", _CONCAT_MIX_LAYERS, "mix")
  else:
    for flax_name, torch_name in _GATES.items():  # The authors' module order.
      for side, suffix in (("speech_gate", "text"), ("spectrogram_gate", "image")):
        linear(f"{torch_name}_{suffix}.0", ("mix", side, flax_name))
    linear("weight.0", ("mix", "mix_weights"))
  return rules


def _lookup(tree: dict, path: tuple[str, ...]):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def fusion_state_dict(params: dict[str, Any], batch_stats: dict[str, Any],
                      fusion: str) -> dict[str, np.ndarray]:
  """FusionEncoder variables under the authors' state_dict names (the inverse of
  `fusion_variables`).

  BatchNorm layers get `num_batches_tracked` (0: our BatchNorm does not count batches, and
  PyTorch reads it only when momentum is None), so the authors' classes load the result with
  `strict=True`. A single-branch model holds its one branch only; the authors' classes kept
  every layer in every mode, so only joint models load strictly into them.
  """
  variables = {"params": params, "batch_stats": batch_stats}
  tensors: dict[str, np.ndarray] = {}
  for rule in fusion_name_table(fusion):
    value = _lookup(variables[rule.collection], rule.path)
    if value is None:
      continue  # A branch this mode does not build.
    value = np.asarray(value, np.float32)
    tensors[rule.torch_name] = np.ascontiguousarray(value.T if rule.transpose else value)
    if rule.torch_name.endswith(".running_var"):
      tensors[rule.torch_name[:-len("running_var")] + "num_batches_tracked"] = np.asarray(
          0, np.int64)
  return tensors


def fusion_from_state_dict(tensors: dict[str, np.ndarray], fusion: str
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, batch_stats) of a FusionEncoder from the authors' names, for any mode: the
  tensors present are taken, and every tensor must be used (shapes are the caller's check)."""
  params: dict[str, Any] = {}
  batch_stats: dict[str, Any] = {}
  used = set()
  for rule in fusion_name_table(fusion):
    if rule.torch_name not in tensors:
      continue
    used.add(rule.torch_name)
    value = np.asarray(tensors[rule.torch_name], np.float32)
    node = params if rule.collection == "params" else batch_stats
    for key in rule.path[:-1]:
      node = node.setdefault(key, {})
    node[rule.path[-1]] = np.ascontiguousarray(value.T if rule.transpose else value)
  unused = sorted(name for name in tensors
                  if name not in used and not name.endswith(".num_batches_tracked"))
  if unused:
    raise UnsafeCheckpointError(f"tensors of no {fusion} fusion layer: {unused[:6]}"
                                f"{' ...' if len(unused) > 6 else ''}")
  return params, batch_stats
