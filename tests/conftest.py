"""Test-wide settings: CPU only, 8 fake devices for the data-parallel tests."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One compilation cache for the whole session, shared with the CLI subprocesses the tests
# start, so each distinct program compiles once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="clasp_jax_jit_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="module")
def fast_compiles():
  """Turns off most XLA optimisations for a module whose tiny graphs compile longer than they
  run (opt in with `pytestmark = pytest.mark.usefixtures("fast_compiles")`); restored after."""
  import jax
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def ctc_encoder(tmp_path_factory):
  """A tiny wav2vec2 CTC folder (model, feature extractor, folder); see helpers/checkpoints."""
  pytest.importorskip("torch")
  from tests.helpers import checkpoints
  return checkpoints.build_wav2vec2_ctc(tmp_path_factory.mktemp("ctc_encoder"))


@pytest.fixture(scope="session")
def labse_like_dir(tmp_path_factory):
  """A tiny LaBSE-shaped sentence-transformers folder (BERT, CLS pooling, Dense, Normalize)."""
  pytest.importorskip("torch")
  from tests.helpers import checkpoints
  return checkpoints.build_labse_like(tmp_path_factory.mktemp("labse_like"))


@pytest.fixture(scope="session")
def tone_corpus(tmp_path_factory):
  """A built speech-text dataset (train 96 / validation 32 / test 32 clips) whose audio is a
  tone per word, so audio-mode models learn it in a few steps; see helpers/corpora.py."""
  from tests.helpers import corpora
  return corpora.build_tone_corpus(str(tmp_path_factory.mktemp("tone_corpus")))


@pytest.fixture(scope="session")
def tiny_audio_workdir(tmp_path_factory, labse_like_dir):
  """A tiny audio-mode workdir (SSL encoder, spectrogram CNN, concat fusion, LaBSE-like text
  tower) with perturbed weights as its best checkpoint; see helpers/workdirs.py."""
  from tests.helpers import workdirs
  return workdirs.write_workdir(workdirs.tiny_audio_config(labse_like_dir),
                                tmp_path_factory.mktemp("tiny_audio_workdir"))


@pytest.fixture(scope="session")
def tiny_audio_export(tmp_path_factory, tiny_audio_workdir):
  """`tiny_audio_workdir` converted by `clasp_jax.convert --to=torch` (run in-process)."""
  from clasp_jax import convert
  output = tmp_path_factory.mktemp("tiny_audio_export") / "torch"
  code = convert.run(["convert", "--to=torch", f"--workdir={tiny_audio_workdir}",
                      f"--output={output}"])
  assert code == 0
  return output


@pytest.fixture(scope="session")
def tiny_audio_model(tiny_audio_workdir):
  """`clasp_jax.load(tiny_audio_workdir)`, shared so its jitted functions compile once."""
  import clasp_jax
  return clasp_jax.load(tiny_audio_workdir)


@pytest.fixture
def browser(tmp_path):
  """Headless Chromium with one page, driven over DevTools (tests/helpers/devtools.py);
  skips the test when Chromium is not installed."""
  from tests.helpers import devtools
  binary = devtools.find_chromium()
  if binary is None:
    pytest.skip("needs Chromium for the browser test (Debian: apt-get install chromium)")
  browser = devtools.DevTools(binary, tmp_path / "profile", tmp_path / "chromium.log")
  yield browser
  browser.close()


@pytest.fixture(scope="session")
def trained_audio_workdir(tmp_path_factory, tone_corpus, labse_like_dir):
  """(workdir, config) of one tiny audio-mode run on the tone corpus (24 steps; evaluated and
  checkpointed at 12 and 24; helpers/audio_workdir.py), trained once and shared read-only."""
  from clasp_jax.trainer import trainer
  from tests.helpers import audio_workdir
  workdir = tmp_path_factory.mktemp("trained_audio")
  config = audio_workdir.audio_config(tone_corpus, labse_like_dir, total_steps=24)
  trainer.train_and_evaluate(config, str(workdir))
  return workdir, config
