"""One mesh axis name and one workdir-config reader for the whole package."""

import json

import jax
import pytest

from clasp_jax.common import mesh
from clasp_jax.common import workdir
from clasp_jax.common.config_args import ConfigError
from clasp_jax.data import pipeline
from clasp_jax.retrieval import scoring
from clasp_jax.trainer import steps


def test_every_collective_names_the_one_axis():
  assert steps.AXIS is mesh.DATA_AXIS and scoring.AXIS is mesh.DATA_AXIS
  assert pipeline.DATA_AXIS is mesh.DATA_AXIS


def test_data_mesh_spans_the_devices_given():
  full = mesh.data_mesh()
  assert full.axis_names == (mesh.DATA_AXIS,) and full.size == jax.device_count() == 8
  assert mesh.data_mesh(jax.devices()[:2]).devices.tolist() == jax.devices()[:2]
  with pytest.raises(ValueError, match="at least one device"):
    mesh.data_mesh([])


def test_read_config_round_trips_and_fails_in_one_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"batch_size": 8, "data": {"kind": "x"},
                                                     "model": {}}))
  config = workdir.read_config(tmp_path)
  assert config.batch_size == 8 and config.data.kind == "x"
  assert config.model.speech.kind == "features"  # Read in today's layout (upgrade_config).
  config.data.kind = "features"  # Evaluation retargets the data of a saved config.
  with pytest.raises(workdir.WorkdirError, match="config.json is missing"):
    workdir.read_config(tmp_path / "nowhere")
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(workdir.WorkdirError, match="expected a JSON object"):
    workdir.read_config(tmp_path)
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(ConfigError, match="not valid JSON"):
    workdir.read_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"batch_size": 8}))
  with pytest.raises(ConfigError, match="not a CLASP training config"):
    workdir.read_config(tmp_path)
