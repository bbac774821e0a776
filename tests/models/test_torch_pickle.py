"""The authors' whole-module checkpoints: imported without running them, equal outputs."""

import os
import zipfile

import jax
import numpy as np
import pytest

from clasp_jax.models import torch_pickle
from clasp_jax.models.fusion import FusionEncoder

torch = pytest.importorskip("torch")
from tests.helpers import torch_fusion  # noqa: E402  (needs torch)

SPEECH_DIM, SPECTROGRAM_DIM = 48, 40


@pytest.mark.parametrize("cls", [torch_fusion.HubertLabseConcat, torch_fusion.HubertLabseGating])
def test_a_released_module_imports_and_computes_what_pytorch_computes(cls, tmp_path):
  path = tmp_path / "clasp.pt"
  with torch_fusion.as_notebook_class(cls) as notebook_class:
    module = torch_fusion.trained_like(notebook_class(SPEECH_DIM, SPECTROGRAM_DIM)).eval()
    torch.save(module, path)
  data_pickle = zipfile.ZipFile(path).read("clasp/data.pkl")
  assert f"__main__\n{cls.__name__}".encode() in data_pickle  # Pickled as theirs were.

  record = torch_pickle.load_module(path)
  assert record.torch_class == f"__main__.{cls.__name__}"
  tensors = torch_pickle.state_dict(record)
  expected_tensors = module.state_dict()
  assert list(tensors) == list(expected_tensors)  # The authors' names, in their order.
  for name, value in expected_tensors.items():
    np.testing.assert_array_equal(tensors[name], value.numpy())

  imported = torch_pickle.import_fusion_encoder(path)
  assert imported.class_name == cls.__name__
  assert imported.dims == {"speech": SPEECH_DIM, "spectrogram": SPECTROGRAM_DIM}
  model = FusionEncoder(**imported.settings)
  rng = np.random.default_rng(1)
  speech = rng.standard_normal((5, SPEECH_DIM)).astype(np.float32)
  spectrogram = rng.standard_normal((5, SPECTROGRAM_DIM)).astype(np.float32)
  out = model.apply({"params": imported.params, "batch_stats": imported.batch_stats}, speech,
                    spectrogram, train=False)
  with torch.no_grad():
    expected = module(torch.from_numpy(speech), torch.from_numpy(spectrogram)).numpy()
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_the_authors_single_branch_mode_is_kept(tmp_path):
  path = tmp_path / "audio_only.pt"
  with torch_fusion.as_notebook_class(torch_fusion.HubertLabseConcat) as notebook_class:
    module = torch_fusion.trained_like(
        notebook_class(SPEECH_DIM, SPECTROGRAM_DIM, mode="audio")).eval()
    torch.save(module, path)
  imported = torch_pickle.import_fusion_encoder(path)
  assert imported.settings["mode"] == "speech" and set(imported.params) == {"speech_branch"}
  speech = np.random.default_rng(2).standard_normal((3, SPEECH_DIM)).astype(np.float32)
  out = FusionEncoder(**imported.settings).apply(
      {"params": imported.params, "batch_stats": imported.batch_stats}, speech, None,
      train=False)
  with torch.no_grad():
    expected = module.audio_seq(torch.from_numpy(speech)).numpy()
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


class RunsACommand:
  """What a malicious checkpoint hides: unpickling it calls os.system."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "malicious.pt"
  with torch_fusion.as_notebook_class(torch_fusion.HubertLabseConcat) as notebook_class:
    module = notebook_class(SPEECH_DIM, SPECTROGRAM_DIM)
    module.payload = RunsACommand(marker)  # Hidden among the module's attributes.
    torch.save(module, path)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"refused: .*system.*nothing was "
                                                               r"run"):
    torch_pickle.load_module(path)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="refused"):
    torch_pickle.import_fusion_encoder(path)
  assert not marker.exists()
  # The payload is live: an ordinary unpickler runs it.
  with torch_fusion.as_notebook_class(torch_fusion.HubertLabseConcat):
    torch.load(path, weights_only=False)
  assert marker.exists()


def test_other_classes_and_files_are_refused(tmp_path):
  conv = tmp_path / "conv.pt"
  torch.save(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3)), conv)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="Conv1d"):
    torch_pickle.load_module(conv)
  weights = tmp_path / "weights.pt"
  torch.save(torch_fusion.ConcatFusion(SPEECH_DIM, SPECTROGRAM_DIM).state_dict(), weights)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="not a whole pickled module"):
    torch_pickle.load_module(weights)
  plain = tmp_path / "plain.pkl"
  plain.write_bytes(b"\x80\x02cposix\nsystem\nq\x00.")
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="not a zip-format"):
    torch_pickle.load_module(plain)
  stranger = tmp_path / "stranger.pt"
  torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), stranger)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="not one of the authors'"):
    torch_pickle.import_fusion_encoder(stranger)
  with pytest.raises(FileNotFoundError):
    torch_pickle.load_module(tmp_path / "missing.pt")


def test_a_state_dict_that_is_not_theirs_is_a_clear_error():
  tensors = {name: value.numpy() for name, value in
             torch_fusion.ConcatFusion(SPEECH_DIM, SPECTROGRAM_DIM).state_dict().items()}
  torch_pickle.fusion_variables(tensors)  # Whole: fine.
  extra = {**tensors, "mix_seq.9.weight": np.zeros((2, 2), np.float32)}
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="no known layer"):
    torch_pickle.fusion_variables(extra)
  missing = {k: v for k, v in tensors.items() if k != "mix_seq.3.bias"}
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="lacks mix_seq.3.bias"):
    torch_pickle.fusion_variables(missing)
  reshaped = {**tensors, "mix_seq.3.weight": np.zeros((800, 7), np.float32)}
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="do not chain"):
    torch_pickle.fusion_variables(reshaped)
  assert jax.tree.leaves(torch_pickle.fusion_variables(tensors).params)


@pytest.mark.parametrize("cls", [torch_fusion.HubertLabseConcat, torch_fusion.HubertLabseGating])
def test_our_names_are_the_inverse_of_the_import(cls):
  import chex
  module = torch_fusion.trained_like(cls(SPEECH_DIM, SPECTROGRAM_DIM))
  tensors = {name: value.numpy() for name, value in module.state_dict().items()}
  imported = torch_pickle.fusion_variables(tensors)
  exported = torch_pickle.fusion_state_dict(imported.params, imported.batch_stats,
                                            imported.settings["fusion"])
  assert list(exported) == list(tensors)  # Every name, in the authors' own order.
  for name, value in tensors.items():
    if name.endswith("num_batches_tracked"):
      assert exported[name].dtype == np.int64 and exported[name].shape == ()
    else:
      np.testing.assert_array_equal(exported[name], value)
  params, batch_stats = torch_pickle.fusion_from_state_dict(exported, imported.settings["fusion"])
  chex.assert_trees_all_equal((params, batch_stats), (imported.params, imported.batch_stats))
  # One branch alone (a single-branch model) maps back too; foreign tensors do not.
  speech_only = {k: v for k, v in exported.items() if k.startswith(("audio_seq", "text_seq"))}
  params, _ = torch_pickle.fusion_from_state_dict(speech_only, imported.settings["fusion"])
  assert set(params) == {"speech_branch"}
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="no concat fusion layer"):
    torch_pickle.fusion_from_state_dict({**exported, "extra.weight": np.zeros(2)}, "concat")
