"""Tensor names from a weights folder's header or index, without reading the tensors."""

import json

import numpy as np
import pytest

from clasp_jax.models import hf_checkpoint

safetensors_numpy = pytest.importorskip("safetensors.numpy")

TENSORS = {"encoder.weight": np.ones((3, 2), np.float32), "pooler.dense.bias": np.zeros(4)}


def test_safetensors_header(tmp_path):
  safetensors_numpy.save_file(TENSORS, str(tmp_path / "model.safetensors"),
                              metadata={"format": "pt"})
  assert hf_checkpoint.tensor_names(tmp_path) == set(TENSORS)


def test_shard_index(tmp_path):
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {"a.weight": "model-1.safetensors",
                                      "b.bias": "model-2.safetensors"}}))
  assert hf_checkpoint.tensor_names(tmp_path) == {"a.weight", "b.bias"}


def test_pytorch_bin(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({name: torch.tensor(value) for name, value in TENSORS.items()},
             tmp_path / "pytorch_model.bin")
  assert hf_checkpoint.tensor_names(tmp_path) == set(TENSORS)


def test_missing_or_broken_weights_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
    hf_checkpoint.tensor_names(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
  with pytest.raises(ValueError, match="not a safetensors file"):
    hf_checkpoint.tensor_names(tmp_path)
