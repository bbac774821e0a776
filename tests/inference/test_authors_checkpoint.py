"""The authors' released checkpoint as a workdir: imported, then embedded like any run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clasp_jax.data import features
from clasp_jax.inference import authors_checkpoint
from clasp_jax.inference import workdir as inference
from clasp_jax.models import torch_pickle
from configs import base

torch = pytest.importorskip("torch")
from tests.helpers import torch_fusion  # noqa: E402  (needs torch)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEECH_DIM, SPECTROGRAM_DIM, NUM = 48, 40, 16


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A HubertLabseConcat pickled whole, as the authors released theirs, and a feature split."""
  root = tmp_path_factory.mktemp("released")
  with torch_fusion.as_notebook_class(torch_fusion.HubertLabseConcat) as notebook_class:
    module = torch_fusion.trained_like(notebook_class(SPEECH_DIM, SPECTROGRAM_DIM)).eval()
    torch.save(module, root / "clasp.pt")
  rng = np.random.default_rng(0)
  arrays = {"speech": rng.standard_normal((NUM, SPEECH_DIM)).astype(np.float32) * 3,
            "spectrogram": rng.standard_normal((NUM, SPECTROGRAM_DIM)).astype(np.float32) * 20,
            "text": rng.standard_normal((NUM, 768)).astype(np.float32),
            "category": np.zeros(NUM, np.int32), "language": np.zeros(NUM, np.int32)}
  features.write_feature_split(str(root / "features" / "test"),
                               features.FeatureSplit(arrays, ["news"], ["en"], source="brown"))
  return module, root, arrays


def test_imported_workdir_embeds_as_the_authors_module_does(released, tmp_path):
  module, root, arrays = released
  config = base.get_config(f"paper,features={root / 'features'}")
  imported = authors_checkpoint.write_workdir(str(root / "clasp.pt"), str(tmp_path), config)
  assert imported.class_name == "HubertLabseConcat"
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model"]["normalize_inputs"] and written["data"]["dims"]["speech"] == SPEECH_DIM
  embeddings, step = inference.embed_workdir_split(str(tmp_path), "test")
  assert step == authors_checkpoint.IMPORTED_STEP
  with torch.no_grad():  # Their inference: F.normalize both inputs, then the module.
    expected = module(torch.nn.functional.normalize(torch.from_numpy(arrays["speech"])),
                      torch.nn.functional.normalize(torch.from_numpy(arrays["spectrogram"])))
    expected = torch.nn.functional.normalize(expected).numpy()
  np.testing.assert_allclose(embeddings["speech"], expected, atol=1e-5)
  with pytest.raises(authors_checkpoint.ConfigError, match="already holds a run"):
    authors_checkpoint.write_workdir(str(root / "clasp.pt"), str(tmp_path), config)


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "clasp_jax.import_checkpoint", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_imports_and_refuses_with_one_line(released, tmp_path):
  _, root, _ = released
  config = f"--config=configs/base.py:paper,features={root / 'features'}"
  done = run_cli(f"--checkpoint={root / 'clasp.pt'}", config, f"--workdir={tmp_path / 'ok'}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "imported HubertLabseConcat (concat fusion, joint mode" in done.stdout
  assert (tmp_path / "ok" / "best").is_dir()
  bad = tmp_path / "bad.pt"
  torch.save(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 1)), bad)
  refused = run_cli(f"--checkpoint={bad}", config, f"--workdir={tmp_path / 'bad'}")
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert refused.stderr.strip().splitlines()[-1].startswith("error: refused:")
  assert not (tmp_path / "bad").exists()
  usage = run_cli(f"--checkpoint={bad}")
  assert usage.returncode == 2 and "required" in usage.stderr
  assert run_cli("--help").returncode == 0
  with pytest.raises(torch_pickle.UnsafeCheckpointError):
    torch_pickle.import_fusion_encoder(bad)
