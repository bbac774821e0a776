"""The one Hugging Face checkpoint reader: files, folders, and the strict rule-table mapping."""

import json
import struct
import sys

import ml_dtypes
import numpy as np
import pytest

from clasp_jax.models import bert_checkpoint
from clasp_jax.models import hf_checkpoint
from clasp_jax.models import wav2vec2_checkpoint


def write_safetensors(path, tensors):
  """The format as its specification gives it: u64 header size, JSON header, raw bytes."""
  header, chunks, offset = {"__metadata__": {"format": "np"}}, [], 0
  tags = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64",
          np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
  for name, array in tensors.items():
    data = np.ascontiguousarray(array).tobytes()
    header[name] = {"dtype": tags[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  encoded = json.dumps(header).encode()
  with open(path, "wb") as stream:
    stream.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


def _tensors():
  rng = np.random.default_rng(0)
  return {"a.weight": rng.normal(size=(3, 4)).astype(np.float32),
          "a.bias": rng.normal(size=(3,)).astype(np.float32),
          "steps": np.arange(5, dtype=np.int64),
          "half": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16)}


def test_one_error_type_for_every_tower():
  assert bert_checkpoint.CheckpointError is hf_checkpoint.CheckpointError
  assert wav2vec2_checkpoint.CheckpointError is hf_checkpoint.CheckpointError
  assert issubclass(hf_checkpoint.CheckpointError, ValueError)


def test_safetensors_keep_every_dtype(tmp_path):
  tensors = _tensors()
  write_safetensors(tmp_path / "model.safetensors", tensors)
  read = hf_checkpoint.read_safetensors(tmp_path / "model.safetensors")
  assert sorted(read) == sorted(tensors)
  for name, array in tensors.items():
    assert read[name].dtype == array.dtype and read[name].shape == array.shape
    np.testing.assert_array_equal(read[name].astype(np.float64), array.astype(np.float64))
    assert read[name].flags.writeable  # copies, not views of a closed mapping


def test_safetensors_written_by_the_reference_library_read_back(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  tensors = {name: array for name, array in _tensors().items() if name != "half"}
  safetensors_numpy.save_file(tensors, str(tmp_path / "w.safetensors"))
  read = hf_checkpoint.read_safetensors(tmp_path / "w.safetensors")
  for name, array in tensors.items():
    np.testing.assert_array_equal(read[name], array)


def test_damaged_safetensors_are_refused(tmp_path):
  write_safetensors(tmp_path / "model.safetensors", _tensors())
  data = (tmp_path / "model.safetensors").read_bytes()
  (tmp_path / "model.safetensors").write_bytes(data[:-10])
  with pytest.raises(hf_checkpoint.CheckpointError, match="truncated"):
    hf_checkpoint.read_safetensors(tmp_path / "model.safetensors")
  (tmp_path / "model.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{no")
  with pytest.raises(hf_checkpoint.CheckpointError, match="not a safetensors file"):
    hf_checkpoint.read_safetensors(tmp_path / "model.safetensors")


def test_folder_prefers_safetensors_and_reads_shards(tmp_path):
  tensors = _tensors()
  names = sorted(tensors)
  weight_map = {}
  shards = (("model-1.safetensors", names[:2]), ("model-2.safetensors", names[2:]))
  for shard, shard_names in shards:
    write_safetensors(tmp_path / shard, {name: tensors[name] for name in shard_names})
    weight_map.update({name: shard for name in shard_names})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"never read: safetensors come first")
  read = hf_checkpoint.read_weights(tmp_path)
  assert sorted(read) == names
  np.testing.assert_array_equal(read["a.weight"], tensors["a.weight"])
  (tmp_path / "model-2.safetensors").unlink()
  with pytest.raises(hf_checkpoint.CheckpointError, match="shard model-2.safetensors not found"):
    hf_checkpoint.read_weights(tmp_path)


def test_folder_without_weights_or_config(tmp_path):
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match="no model.safetensors or pytorch_model.bin .or their index. found"):
    hf_checkpoint.read_weights(tmp_path)
  with pytest.raises(hf_checkpoint.CheckpointError, match="config.json not found"):
    hf_checkpoint.read_config(tmp_path)
  assert hf_checkpoint.read_config(tmp_path, "preprocessor_config.json", required=False) is None
  (tmp_path / "config.json").write_text("{broken")
  with pytest.raises(hf_checkpoint.CheckpointError, match="not valid JSON"):
    hf_checkpoint.read_config(tmp_path)
  with pytest.raises(hf_checkpoint.CheckpointError, match="not a checkpoint folder"):
    hf_checkpoint.read_config(tmp_path / "nowhere")


def test_torch_bin_is_read_weights_only_with_bfloat16_intact(tmp_path):
  torch = pytest.importorskip("torch")
  state = {"w": torch.randn(3, 4), "h": torch.randn(2, 5).to(torch.bfloat16)}
  torch.save(state, tmp_path / "pytorch_model.bin")
  read = hf_checkpoint.read_weights(tmp_path)
  np.testing.assert_array_equal(read["w"], state["w"].numpy())
  assert read["h"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(read["h"].astype(np.float32), state["h"].float().numpy())
  torch.save({"w": torch.zeros(1), "code": print}, tmp_path / "pytorch_model.bin")
  with pytest.raises(hf_checkpoint.CheckpointError, match="weights-only"):
    hf_checkpoint.read_weights(tmp_path)


def test_torch_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  (tmp_path / "pytorch_model.bin").write_bytes(b"PK")
  monkeypatch.setitem(sys.modules, "torch", None)  # What an environment without torch sees.
  with pytest.raises(hf_checkpoint.CheckpointError, match="install the 'torch' extra"):
    hf_checkpoint.read_weights(tmp_path)


def _table():
  table = hf_checkpoint.RuleTable("model.")
  table.linear("dense", "dense", 4, 3)
  table.layer_norm("norm", "norm", 3, legacy_names=True)
  return table.rules


def _checkpoint():
  rng = np.random.default_rng(1)
  return {"model.dense.weight": rng.normal(size=(3, 4)).astype(np.float32),
          "model.dense.bias": rng.normal(size=(3,)).astype(ml_dtypes.bfloat16),
          "model.norm.gamma": np.ones(3, np.float32),  # TF's name for the LayerNorm weight
          "model.norm.bias": np.zeros(3, np.float32)}


def test_rules_map_names_layouts_and_dtypes():
  tensors = _checkpoint()
  params = hf_checkpoint.params_from_tensors(tensors, _table(), source="ckpt", model="a toy")
  np.testing.assert_array_equal(params["dense"]["kernel"], tensors["model.dense.weight"].T)
  assert params["dense"]["kernel"].flags.c_contiguous
  assert params["dense"]["bias"].dtype == np.float32
  np.testing.assert_array_equal(params["norm"]["scale"], np.ones(3))
  assert sorted(params) == ["dense", "norm"] and sorted(params["norm"]) == ["bias", "scale"]


def test_every_problem_is_counted_and_named_in_one_message():
  tensors = _checkpoint()
  del tensors["model.norm.bias"]
  tensors["model.dense.weight"] = np.zeros((4, 4), np.float32)
  tensors.update({f"model.extra.{index}": np.zeros(1, np.float32) for index in range(10)})
  with pytest.raises(hf_checkpoint.CheckpointError) as raised:
    hf_checkpoint.params_from_tensors(tensors, _table(), source="ckpt", model="a toy")
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith("ckpt does not match a toy: 1 missing tensor(s): model.norm.bias or "
                            "model.norm.beta; "
                            "10 unused tensor(s): model.extra.0, model.extra.1, ")
  assert "model.extra.7, ... (10 in all); 1 shape mismatch(es): model.dense.weight: " in message
  assert message.endswith("checkpoint (4, 4) gives (4, 4), expected (4, 3) for dense/kernel")
  tensors = _checkpoint()
  tensors["lm_head.bias"] = np.zeros(2, np.float32)
  params = hf_checkpoint.params_from_tensors(tensors, _table(), source="ckpt", model="a toy",
                                             ignore_unused=[r"^lm_head\."])
  assert "lm_head" not in params


def test_shapes_from_the_model_tree_must_cover_the_table():
  table = hf_checkpoint.RuleTable()
  table.linear("dense", "dense")
  shape_tree = {"dense": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}
  rules = hf_checkpoint.with_shapes(table.rules, shape_tree)
  assert [rule.shape for rule in rules] == [(4, 3), (3,)]
  with pytest.raises(AssertionError, match="no rule for extra/scale"):
    hf_checkpoint.with_shapes(table.rules, {**shape_tree, "extra": {"scale": np.zeros(3)}})
  with pytest.raises(AssertionError, match="no expected shape"):
    hf_checkpoint.params_from_tensors({}, table.rules, source="s", model="m")
