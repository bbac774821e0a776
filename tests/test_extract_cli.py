"""`python -m clasp_jax.extract`: feature splits from a built dataset, against each clip alone.

A tiny tone corpus (two bad clips in its train split), a tiny random HuBERT saved by
transformers, the spectrogram encoder of the tiny audio workdir and a LaBSE-shaped sentence
encoder; the splits are extracted once per module and shared.
"""

import filecmp
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sentence_transformers = pytest.importorskip("sentence_transformers")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from clasp_jax import extract  # pylint: disable=g-import-not-at-top
from clasp_jax.common.config_args import ConfigError  # pylint: disable=g-import-not-at-top
from clasp_jax.common.mesh import data_mesh  # pylint: disable=g-import-not-at-top
from clasp_jax.data import audio_io, features, pipeline, reader  # pylint: disable=g-import-not-at-top
from clasp_jax.data.tfds_builder import INT16_SCALE  # pylint: disable=g-import-not-at-top
from clasp_jax.inference import feature_extraction  # pylint: disable=g-import-not-at-top
from clasp_jax.inference import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
from clasp_jax.models import clasp  # pylint: disable=g-import-not-at-top
from configs import base  # pylint: disable=g-import-not-at-top
from tests.helpers import checkpoints, corpora, workdirs  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.usefixtures("fast_compiles")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHORT, SILENT = 2, 5  # Train examples that are bad: too short for HuBERT's 40 samples, silent.
TRAIN, VALIDATION = 10, 8
CHUNK = 6  # Two chunks per split.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  short = np.random.default_rng(0).uniform(-0.5, 0.5, 30).astype(np.float32)
  return corpora.build_tone_corpus(
      str(tmp_path_factory.mktemp("extract_corpus")),
      sizes=(("train", TRAIN), ("validation", VALIDATION)),
      odd_clips=[("train", SHORT, short), ("train", SILENT, np.zeros(4000, np.float32))])


@pytest.fixture(scope="module")
def hubert(tmp_path_factory):
  """(PyTorch model, folder) of a tiny random HuBERT saved with save_pretrained."""
  model, _, folder = checkpoints.build_hubert(tmp_path_factory.mktemp("extract_hubert"))
  return model, folder


def run_extract(dataset, hubert, text_encoder, output, split="train", *more):
  return extract.run(["extract", f"--data={dataset}", f"--split={split}",
                      f"--speech_encoder={hubert[1]}", f"--text_encoder={text_encoder}",
                      f"--output={output}", "--batch_size=8", f"--chunk_size={CHUNK}", *more])


@pytest.fixture(scope="module")
def spectrogram_workdir(tmp_path_factory):
  """A tiny audio-mode workdir of fusion mode 'spectrogram' (no SSL encoder, no text tower: it
  writes in seconds) whose pipeline peak-normalises clips."""
  config = workdirs.tiny_audio_config("")
  config.model.mode = "spectrogram"
  config.model.text.kind = "precomputed"
  config.data.peak_normalize = True
  return str(workdirs.write_workdir(config, tmp_path_factory.mktemp("spectrogram_workdir")))


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory, dataset, hubert, labse_like_dir, spectrogram_workdir):
  """Train and validation extracted with the workdir's spectrogram encoder."""
  output = tmp_path_factory.mktemp("extracted")
  for split in ("train", "validation"):
    assert run_extract(dataset, hubert, labse_like_dir, output, split,
                       f"--spectrogram_encoder={spectrogram_workdir}") == 0
  return output


def bad_and_kept(dataset):
  """{stored index: kind} of the bad clips, and the kept indices (a build may reorder)."""
  ids = [record["id"] for record in reader.open_split(dataset, "train").read(range(TRAIN))]
  bad = {ids.index(f"train_{SHORT}"): "too_short", ids.index(f"train_{SILENT}"): "silent"}
  return dict(sorted(bad.items())), [index for index in range(TRAIN) if index not in bad]


def test_rows_equal_each_clip_alone(features_dir, dataset, hubert, labse_like_dir,
                                    spectrogram_workdir):
  extracted = features.read_feature_split(str(features_dir / "train"))
  bad, kept = bad_and_kept(dataset)
  records = reader.open_split(dataset, "train").read(kept)
  assert extracted.num_examples == len(kept)
  assert extracted.sentences == [record["text"] for record in records]
  assert list(extracted.label_names("language")) == [record["language"] for record in records]
  assert list(extracted.label_names("category")) == [record["category"] for record in records]
  with open(features_dir / "train" / "info.json") as f:
    record = json.load(f)["extraction"]
  assert record["skipped"] == {"too_short": 1, "silent": 1}
  assert record["skipped_examples"] == list(bad)
  clips = [np.asarray(r["audio"], np.float32) / INT16_SCALE for r in records]

  model, _ = hubert  # transformers on each clip alone: peak-normalised, then standardised.
  for row, (clip, r) in enumerate(zip(clips, records)):
    waveform = audio_io.peak_normalize(clip, source_peak=r.get("source_peak"))
    waveform = (waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)
    with torch.no_grad():
      expected = model(torch.from_numpy(waveform)[None]).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(extracted.arrays["speech"][row], expected, atol=1e-5)

  texts = sentence_transformers.SentenceTransformer(labse_like_dir, device="cpu").encode(
      extracted.sentences)
  np.testing.assert_allclose(extracted.arrays["text"], texts, atol=1e-5)

  # The workdir's own model on single clips, peak-normalised as its pipeline does.
  trained = workdir_lib.load_trained(spectrogram_workdir)
  spectrogram_of = jax.jit(lambda variables, audio: trained.built.model.apply(
      variables, {"audio": audio, "audio_mask": jnp.ones(audio.shape, bool)},
      method=lambda module, batch: module._speech_embedding(batch, False)[1][
          "spectrogram/features"]))
  # The shortest clip: the most padding in its batch.
  for row in np.argsort([len(clip) for clip in clips])[:1]:
    clip = audio_io.peak_normalize(clips[row], source_peak=records[row].get("source_peak"))
    expected = spectrogram_of(trained.variables, clip[None])[0]
    np.testing.assert_allclose(extracted.arrays["spectrogram"][row], expected, atol=1e-5)


def test_killed_run_resumes_to_the_uninterrupted_result(features_dir, dataset, hubert,
                                                        labse_like_dir, spectrogram_workdir,
                                                        tmp_path, monkeypatch, capsys):
  saved, computed = [], []
  save, compute = feature_extraction.ChunkedJob.save, feature_extraction.ChunkExtractor.__call__

  def save_then_fail(job, chunk, arrays):
    if saved:
      raise RuntimeError("injected failure")
    save(job, chunk, arrays)
    saved.append(chunk)

  extract_validation = lambda: run_extract(dataset, hubert, labse_like_dir, tmp_path,
                                           "validation",
                                           f"--spectrogram_encoder={spectrogram_workdir}")
  monkeypatch.setattr(feature_extraction.ChunkedJob, "save", save_then_fail)
  with pytest.raises(RuntimeError, match="injected"):
    extract_validation()
  partial = tmp_path / ".validation.partial"
  assert sorted(os.listdir(partial)) == ["chunk-000000.npz", "plan.json"]
  (partial / "chunk-000001.npz.99.tmp").write_bytes(b"half a chunk, as a kill leaves it")

  monkeypatch.setattr(feature_extraction.ChunkedJob, "save", save)
  monkeypatch.setattr(feature_extraction.ChunkExtractor, "__call__",
                      lambda self, indices, **kw: computed.append(indices) or compute(
                          self, indices, **kw))
  capsys.readouterr()
  assert extract_validation() == 0
  assert "resuming: 1 of the 2 chunks of this process are already extracted" in (
      capsys.readouterr().err)
  assert [list(indices) for indices in computed] == [list(range(CHUNK, VALIDATION))]
  assert not partial.exists()
  names = sorted(os.listdir(features_dir / "validation"))
  assert sorted(os.listdir(tmp_path / "validation")) == names
  _, differing, unreadable = filecmp.cmpfiles(features_dir / "validation",
                                              tmp_path / "validation", names, shallow=False)
  assert (differing, unreadable) == ([], [])


def test_a_sigkilled_command_resumes_to_the_uninterrupted_result(dataset, hubert,
                                                                labse_like_dir, tmp_path):
  """The command itself killed with SIGKILL after two of its chunks were saved: the rerun keeps
  those, computes the rest, and writes what an uninterrupted run writes, byte for byte."""
  flags = [f"--data={dataset}", "--split=validation", f"--speech_encoder={hubert[1]}",
           f"--text_encoder={labse_like_dir}", "--batch_size=8", "--chunk_size=1"]
  killed = tmp_path / "killed"
  command = [sys.executable, "-m", "clasp_jax.extract", *flags, f"--output={killed}"]
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  partial = killed / ".validation.partial"
  with open(tmp_path / "killed.log", "w") as log:
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    try:
      deadline = time.monotonic() + 300
      while not (partial / "chunk-000001.npz").exists():
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no second chunk within 300 s"
        time.sleep(0.01)
    finally:
      process.kill()
      process.wait()
  done = [name for name in os.listdir(partial) if re.fullmatch(r"chunk-\d+\.npz", name)]
  assert 2 <= len(done) < VALIDATION, done
  assert not (killed / "validation").exists()

  resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming: {len(done)} of the {VALIDATION} chunks" in resumed.stderr
  assert not partial.exists()

  # The uninterrupted run: the same command in the same environment (in this process the
  # text tower may run under other compilation settings, off by rounding).
  reference = tmp_path / "reference"
  uninterrupted = subprocess.run(command[:-1] + [f"--output={reference}"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=600)
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  names = sorted(os.listdir(reference / "validation"))
  assert sorted(os.listdir(killed / "validation")) == names
  _, differing, unreadable = filecmp.cmpfiles(reference / "validation", killed / "validation",
                                              names, shallow=False)
  assert (differing, unreadable) == ([], [])


def test_process_shards_and_assembly(tmp_path):
  """Process p of P computes chunks p, p + P, ...; the assembled split keeps stored order."""
  def fake_chunk(indices, progress=None):
    rows = indices.astype(np.float32)[:, None]
    return {"index": indices, "speech": rows, "spectrogram": np.zeros((len(indices), 0)),
            "text": -rows, "sentence": indices.astype(str), "category": np.full(len(indices), "c"),
            "language": np.where(indices % 2, "de", "en"), "source": np.full(len(indices), "s"),
            "skipped_index": np.zeros(0, np.int64), "skipped_kind": np.zeros(0, str)}

  job = feature_extraction.ChunkedJob(str(tmp_path), "train", num_examples=10, chunk_size=3,
                                      plan={"seed": 1})
  job.start()
  assert feature_extraction.run_chunks(job, fake_chunk, process_index=1, process_count=2) == 2
  assert [job.is_saved(chunk) for chunk in range(4)] == [False, True, False, True]
  assert feature_extraction.run_chunks(job, fake_chunk, process_index=0, process_count=2) == 2
  feature_extraction.assemble(job, {})
  split = features.read_feature_split(str(tmp_path / "train"))
  np.testing.assert_array_equal(split.arrays["speech"][:, 0], np.arange(10))
  assert split.languages == ["de", "en"] and split.sentences == [str(i) for i in range(10)]
  with pytest.raises(FileExistsError, match="already holds"):
    job.start()


def test_bad_clips_stop_a_strict_run(dataset, hubert, labse_like_dir, tmp_path, capsys):
  assert run_extract(dataset, hubert, labse_like_dir, tmp_path, "train", "--strict") == 1
  error = capsys.readouterr().err.strip().splitlines()[-1]
  (first, kind), _ = next(iter(bad_and_kept(dataset)[0].items())), None
  assert error.startswith(f"error: train example {first} (id train_")
  assert {"too_short": "too_short (30 samples; the speech encoder needs at least 40)",
          "silent": "silent (peak 0.00e+00 <= 1e-04)"}[kind] in error
  assert "--strict stops at the first bad clip" in error
  assert not (tmp_path / "train").exists()
  # The unfinished run's settings guard its folder.
  assert run_extract(dataset, hubert, labse_like_dir, tmp_path, "train", "--batch_size=4") == 1
  assert "batch_size: 8 there, 4 now" in capsys.readouterr().err


def test_extracted_splits_train_in_feature_mode(features_dir, tmp_path):
  workdir = tmp_path / "workdir"
  # The launch command of a feature-mode run, with the tiny config's dims set to the data's.
  command = [
      sys.executable, "-m", "clasp_jax.train",
      f"--config=configs/base.py:tiny,features={features_dir}", f"--workdir={workdir}",
      "--config.data.dims.speech=32", "--config.data.dims.spectrogram=20",
      "--config.batch_size=8", "--config.eval_batch_size=8", "--config.total_steps=3",
      "--config.schedule.warmup_steps=1", "--config.log_every_steps=1",
      "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3"]
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
  assert finished.returncode == 0, finished.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  assert any("val/loss" in m and np.isfinite(m["val/loss"]) for m in metrics)


def test_without_a_spectrogram_encoder_only_speech_mode_trains(features_dir, dataset, hubert,
                                                                labse_like_dir, tmp_path):
  assert run_extract(dataset, hubert, labse_like_dir, tmp_path, "validation") == 0
  extracted = features.read_feature_split(str(tmp_path / "validation"))
  assert extracted.arrays["spectrogram"].shape == (VALIDATION, 0)
  with_spectrogram = features.read_feature_split(str(features_dir / "validation"))
  np.testing.assert_allclose(extracted.arrays["speech"], with_spectrogram.arrays["speech"],
                             atol=1e-6)
  for mode in ("speech", "joint"):
    config = base.get_config(f"tiny,features={tmp_path},mode={mode}")
    config.eval_batch_size = 8
    source = pipeline.for_split(config, "validation", mesh=data_mesh(), train=False)
    batch = source.batch(0)
    assert batch.arrays["spectrogram"].shape == (8, 0)
    arrays, host = source.local_batch(0)
    if mode == "speech":
      clasp.build(config).check_batch(arrays, host)
    else:
      with pytest.raises(ConfigError, match="config.model.mode='speech'"):
        clasp.build(config).check_batch(arrays, host)


def test_command_line_errors(dataset, hubert, labse_like_dir, tmp_path, capsys):
  assert extract.run(["extract", "--help"]) == 0
  assert "FEATURE_DIR/SPLIT/" in capsys.readouterr().out
  assert extract.run(["extract", f"--data={dataset}", "--split=train"]) == 2
  assert "missing required flag(s): --speech_encoder" in capsys.readouterr().err
  assert run_extract(tmp_path / "nothing", hubert, labse_like_dir, tmp_path) == 1
  assert "error: --data: no built dataset" in capsys.readouterr().err
  assert run_extract(dataset, hubert, labse_like_dir, tmp_path, "validation", "--layer=9") == 1
  assert "--layer must be in [-3, 2]" in capsys.readouterr().err
