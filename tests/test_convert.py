"""`python -m clasp_jax.convert`: a workdir to a PyTorch folder and back.

The fusion encoder loads into the authors' own classes (strict) and computes what the Flax one
computes; the Hugging Face folders load with from_pretrained / SentenceTransformer and match
our towers; JAX -> PyTorch -> JAX returns identical parameters; a checkpoint that would run
code is refused and runs nothing.
"""

import json
import os
import re
import subprocess
import sys

import chex
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

import clasp_jax  # noqa: E402
from clasp_jax import convert  # noqa: E402
from clasp_jax.models import speech_tower, wav2vec2  # noqa: E402
from configs import base  # noqa: E402
from tests.helpers import torch_fusion, workdirs  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compiles")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  return convert.run(["convert", *flags])


@pytest.fixture(scope="module", params=["concat", "gated"])
def paper_export(request, tmp_path_factory):
  """A paper-size feature-mode workdir of each fusion kind and its export."""
  root = tmp_path_factory.mktemp(f"paper_{request.param}")
  workdir = workdirs.write_workdir(workdirs.paper_features_config(request.param), root / "wd",
                                   seed=3)
  assert _run("--to=torch", f"--workdir={workdir}", f"--output={root / 'torch'}") == 0
  return request.param, workdir, root / "torch"


def test_fusion_encoder_loads_strictly_into_the_authors_class_and_matches(paper_export):
  fusion, workdir, folder = paper_export
  authors_class = {"concat": torch_fusion.HubertLabseConcat,
                   "gated": torch_fusion.HubertLabseGating}[fusion]
  module = authors_class(1024, 1000)
  state = torch.load(folder / "fusion.pt", weights_only=True)
  module.load_state_dict(state, strict=True)
  module.eval()
  assert int(state["image_seq.1.num_batches_tracked"]) == 0

  rng = np.random.default_rng(0)
  speech = rng.standard_normal((5, 1024)).astype(np.float32)
  spectrogram = rng.standard_normal((5, 1000)).astype(np.float32)
  model = clasp_jax.load(workdir)
  raw = model.embed_features(speech=speech, spectrogram=spectrogram, normalize=False)
  with torch.no_grad():  # Their inference notebook L2-normalises the inputs first.
    expected = module(torch.nn.functional.normalize(torch.from_numpy(speech), dim=-1),
                      torch.nn.functional.normalize(torch.from_numpy(spectrogram), dim=-1))
  np.testing.assert_allclose(raw, expected.numpy(), atol=1e-5, rtol=0)
  normalized = model.embed_features(speech=speech, spectrogram=spectrogram)
  np.testing.assert_allclose(normalized, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                             atol=1e-6)

  settings = json.loads((folder / "clasp.json").read_text())
  assert settings["fusion"]["kind"] == fusion and settings["fusion"]["normalize_inputs"]
  assert settings["logit_scale"] is None and settings["scale_init"] == pytest.approx(0.07)
  # The folder's README runs as written, through clasp_jax.torch, and gives the same rows.
  readme = (folder / "README.md").read_text()
  assert "strict=True" in readme
  namespace = {}
  exec(compile(re.search(r"```python\n(.*?)```", readme, re.S).group(1), "README.md", "exec"),
       namespace)
  ones = {"speech": np.ones((1, 1024), np.float32), "spectrogram": np.ones((1, 1000), np.float32)}
  np.testing.assert_allclose(namespace["speech"], model.embed_features(**ones), atol=1e-5)


def test_paper_round_trip_gives_identical_parameters(paper_export, tmp_path):
  _, workdir, folder = paper_export
  assert _run("--from=torch", f"--input={folder}", f"--workdir={tmp_path / 'back'}") == 0
  original, _ = workdirs.read_variables(workdir)
  back, record = workdirs.read_variables(tmp_path / "back")
  chex.assert_trees_all_equal(back, original)
  assert record["exported_from"]["step"] == 7


def test_audio_round_trip_gives_identical_parameters(tiny_audio_workdir, tiny_audio_export,
                                                      tmp_path):
  back_dir = tmp_path / "back"
  assert _run("--from=torch", f"--input={tiny_audio_export}", f"--workdir={back_dir}") == 0
  original, _ = workdirs.read_variables(tiny_audio_workdir)
  back, _ = workdirs.read_variables(back_dir)
  assert set(back["params"]) == {"speech_encoder", "ssl_encoder", "spectrogram_encoder",
                                 "text_encoder", "logit_scale"}
  chex.assert_trees_all_equal(back, original)
  config = json.loads((back_dir / "config.json").read_text())
  assert config["model"]["text"]["encoder"] == str(back_dir / "text_encoder")
  assert config["model"]["speech"]["checkpoint"] == str(back_dir / "ssl_encoder")
  # A second import into the same workdir is refused unless asked for.
  assert _run("--from=torch", f"--input={tiny_audio_export}", f"--workdir={back_dir}") == 1


def test_hugging_face_folders_load_as_they_are_and_match(tiny_audio_workdir, tiny_audio_export,
                                                         tiny_audio_model):
  ssl, info = transformers.AutoModel.from_pretrained(tiny_audio_export / "ssl_encoder",
                                                     output_loading_info=True)
  assert type(ssl).__name__ == "HubertModel"
  assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  variables, _ = workdirs.read_variables(tiny_audio_workdir)
  config = workdirs.tiny_audio_config("unused")
  settings = speech_tower.settings_from_config(config.model.speech)
  waveform = np.random.default_rng(1).standard_normal((1, 8000)).astype(np.float32)
  ours = wav2vec2.Model(settings.ssl).apply({"params": variables["params"]["ssl_encoder"]},
                                            waveform, np.array([8000]), deterministic=True)
  ssl.eval()
  with torch.no_grad():
    theirs = ssl(torch.from_numpy(waveform)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(ours["last_hidden_state"]), theirs, atol=1e-4)

  sentences = ["red cat runs", "the blue bird sings slowly"]
  encoder = sentence_transformers.SentenceTransformer(str(tiny_audio_export / "text_encoder"),
                                                      device="cpu")
  model = tiny_audio_model
  np.testing.assert_allclose(encoder.encode(sentences, normalize_embeddings=True),
                             model.embed_text(sentences), atol=1e-5)


class RunsACommand:
  """What a malicious checkpoint hides: unpickling it calls os.system."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_a_fusion_encoder_the_pytorch_module_lacks_is_refused_in_one_line(tmp_path, capsys):
  """Linear branches and standardised inputs (config.model.branch, input_norm) have no
  counterpart in the authors' module: refused before anything is written."""
  config = base.get_config("tiny")
  config.model.update(dict(branch="linear", input_norm=True))
  workdir = workdirs.write_workdir(config, tmp_path / "wd")
  assert _run("--to=torch", f"--workdir={workdir}", f"--output={tmp_path / 'torch'}") == 1
  error = capsys.readouterr().err.strip()
  assert "linear branches with standardised inputs" in error and "\n" not in error
  assert not os.path.exists(tmp_path / "torch")


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
  marker = tmp_path / "ran"
  path = tmp_path / "clasp.pt"
  with torch_fusion.as_notebook_class(torch_fusion.HubertLabseConcat) as notebook_class:
    module = notebook_class(1024, 1000)
    module.payload = RunsACommand(marker)
    torch.save(module, path)
  assert _run("--from=torch", f"--input={path}", f"--workdir={tmp_path / 'wd'}") == 1
  error = capsys.readouterr().err.strip()
  assert error.startswith("error: refused") and "system" in error and "\n" not in error
  assert not marker.exists() and not (tmp_path / "wd" / "config.json").exists()


def test_the_authors_released_module_imports_through_the_safe_reader(tmp_path):
  path = tmp_path / "clasp.pt"
  with torch_fusion.as_notebook_class(torch_fusion.HubertLabseConcat) as notebook_class:
    torch.save(torch_fusion.trained_like(notebook_class(1024, 1000)), path)
  assert _run("--from=torch", f"--input={path}", f"--workdir={tmp_path / 'wd'}") == 0
  config = json.loads((tmp_path / "wd" / "config.json").read_text())
  assert config["model"]["normalize_inputs"] and config["model"]["fusion"] == "concat"


@pytest.mark.parametrize("flags, code, message", [
    ([], 2, "missing required flag(s): --workdir"),
    (["--workdir=W"], 2, "exactly one of --to=torch and --from=torch"),
    (["--workdir=W", "--to=torch", "--from=torch"], 2, "exactly one"),
    (["--workdir=W", "--to=torch"], 2, "--to=torch needs --output"),
    (["--workdir=W", "--from=torch"], 2, "--from=torch needs --input"),
    (["--workdir=W", "--to=pytorch"], 2, "--to"),
    (["--workdir=W", "--from=torch", "--input=/no/such/file.pt"], 1, "no such file"),
])
def test_command_line_errors(flags, code, message, capsys):
  assert _run(*flags) == code
  error = capsys.readouterr().err.strip()
  assert error.startswith("error: ") and message in error and "\n" not in error
  assert error.endswith("(see --help)") == (code == 2)


def test_importing_a_folder_that_is_no_export_fails_in_one_line(tmp_path, capsys):
  assert _run("--from=torch", f"--input={tmp_path}", f"--workdir={tmp_path / 'wd'}") == 1
  assert "no clasp.json" in capsys.readouterr().err


def test_help_exits_0_and_describes_both_directions(capsys):
  assert _run("--help") == 0
  out = capsys.readouterr().out
  assert "--to=torch" in out and "--from=torch" in out and "overwrite" in out


def test_a_one_device_process_converts_a_workdir_saved_on_eight(tmp_path):
  from configs import base
  workdir = workdirs.write_workdir(base.get_config("tiny"), tmp_path / "wd")
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.convert", "--to=torch", f"--workdir={workdir}",
       f"--output={tmp_path / 'torch'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert process.returncode == 0, process.stderr[-2000:]
  assert "wrote" in process.stdout and (tmp_path / "torch" / "fusion.safetensors").is_file()
