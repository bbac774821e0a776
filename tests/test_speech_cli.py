"""`embed speech` and `transcribe` end to end, against transformers' PyTorch models per clip."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
soundfile = pytest.importorskip("soundfile")

from clasp_jax.data import audio_io  # pylint: disable=g-import-not-at-top
from clasp_jax import embed  # pylint: disable=g-import-not-at-top
from clasp_jax import transcribe  # pylint: disable=g-import-not-at-top

TOLERANCE = 1e-4


# XLA's optimisation passes cost more than they save on these tiny graphs (conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def encoder(ctc_encoder):
  return ctc_encoder


def _tone(seconds, sample_rate, frequency, channels=1, seed=0):
  time = np.arange(int(seconds * sample_rate)) / sample_rate
  rng = np.random.RandomState(seed)
  mono = 0.4 * np.sin(2 * np.pi * frequency * time) + 0.05 * rng.randn(time.size)
  return np.stack([mono, 0.5 * mono], axis=1) if channels == 2 else mono


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
  """Good clips in several formats, rates and channel counts, plus bad ones beside them."""
  good = tmp_path_factory.mktemp("good")
  soundfile.write(good / "a_tone.wav", _tone(0.7, 16_000, 440), 16_000)
  soundfile.write(good / "b_stereo.flac", _tone(1.3, 44_100, 220, channels=2, seed=1), 44_100)
  soundfile.write(good / "c_vorbis.ogg", _tone(0.9, 22_050, 880, seed=2), 22_050)
  soundfile.write(good / "d_silent.wav", np.zeros(8000), 16_000)
  if shutil.which("espeak-ng"):
    subprocess.run(["espeak-ng", "-w", str(good / "e_speech.wav"), "the north wind and the sun"],
                   check=True, capture_output=True)
  (good / "notes.txt").write_text("not audio, and not an audio extension: ignored")
  mixed = tmp_path_factory.mktemp("mixed")
  for path in sorted(good.iterdir()):
    shutil.copy(path, mixed / path.name)
  (mixed / "x_garbage.wav").write_bytes(b"RIFF but not really a wave file")
  (mixed / "y_empty.flac").write_bytes(b"")
  soundfile.write(mixed / "z_short.wav", np.ones(20) * 0.1, 16_000)  # < 40-sample receptive field
  return good, mixed


def good_paths(folder):
  return sorted(str(path) for path in folder.iterdir() if path.suffix != ".txt")


def torch_reference(model, feature_extractor, path, layer=None):
  """What the Hugging Face stack gives for one clip, with no batching or padding at all."""
  waveform = audio_io.peak_normalize(audio_io.load_audio(path, 16_000))
  inputs = feature_extractor(waveform, sampling_rate=16_000, return_tensors="pt")
  with torch.no_grad():
    outputs = model(inputs.input_values, output_hidden_states=True)
  base = model.wav2vec2(inputs.input_values, output_hidden_states=True)
  hidden = base.last_hidden_state if layer is None else base.hidden_states[layer]
  return hidden[0].mean(0).detach().numpy(), outputs.logits[0].argmax(-1).tolist()


def run_embed(*flags):
  return embed.main(["clasp_jax.embed", "speech", *flags])


def test_folder_embeddings_match_pytorch_per_clip(encoder, audio, tmp_path, capsys):
  model, feature_extractor, folder = encoder
  good, _ = audio
  output = tmp_path / "out" / "speech.npy"
  assert run_embed(f"--encoder={folder}", f"--input={good}", f"--output={output}",
                   "--batch_size=3") == 0
  paths = good_paths(good)
  assert (tmp_path / "out" / "speech.paths.txt").read_text().splitlines() == paths
  embeddings = np.load(output)
  assert embeddings.shape == (len(paths), 32) and embeddings.dtype == np.float32
  assert np.isfinite(embeddings).all()  # the silent clip included
  for row, path in enumerate(paths):
    expected, _ = torch_reference(model, feature_extractor, path)
    assert np.abs(embeddings[row] - expected).max() < TOLERANCE, path
  assert f"embedded {len(paths)}/{len(paths)} files" in capsys.readouterr().err


def test_list_file_order_relative_paths_and_layer(encoder, audio, tmp_path):
  model, feature_extractor, folder = encoder
  good, _ = audio
  paths = good_paths(good)[::-1]
  listing = good / "list.txt"  # relative entries are taken from the list file's folder
  names = "\n".join(os.path.basename(p) for p in paths)
  listing.write_text("# clips, newest first\n\n" + names + "\n")
  output = tmp_path / "layer1.npy"
  try:
    assert run_embed(f"--encoder={folder}", f"--input={listing}", f"--output={output}",
                     "--layer=1", "--batch_size=2") == 0
  finally:
    listing.unlink()
  embeddings = np.load(output)
  assert len(embeddings) == len(paths)
  for row, path in enumerate(paths):
    expected, _ = torch_reference(model, feature_extractor, path, layer=1)
    assert np.abs(embeddings[row] - expected).max() < TOLERANCE, path


def test_bad_files_fail_with_one_line_each(encoder, audio, tmp_path, capsys):
  _, _, folder = encoder
  _, mixed = audio
  output = tmp_path / "never.npy"
  assert run_embed(f"--encoder={folder}", f"--input={mixed}", f"--output={output}") == 1
  errors = capsys.readouterr().err
  assert f"error: {mixed / 'x_garbage.wav'}: undecodable audio file" in errors
  assert f"error: {mixed / 'y_empty.flac'}: empty audio file" in errors
  assert f"error: {mixed / 'z_short.wav'}: too short (20 samples" in errors
  assert "3 bad file(s), nothing written; rerun with --skip_bad" in errors
  assert "Traceback" not in errors and not output.exists()


def test_skip_bad_counts_and_keeps_good_rows(encoder, audio, tmp_path, capsys):
  _, _, folder = encoder
  good, mixed = audio
  output = tmp_path / "skipped.npy"
  assert run_embed(f"--encoder={folder}", f"--input={mixed}", f"--output={output}",
                   "--skip_bad") == 0
  assert "skipped 3 bad file(s)" in capsys.readouterr().err
  rows = (tmp_path / "skipped.paths.txt").read_text().splitlines()
  assert [os.path.basename(p) for p in rows] == [os.path.basename(p) for p in good_paths(good)]
  reference = tmp_path / "reference.npy"
  assert run_embed(f"--encoder={folder}", f"--input={good}", f"--output={reference}") == 0
  np.testing.assert_allclose(np.load(output), np.load(reference), atol=1e-5)


def test_flag_and_input_errors(encoder, audio, tmp_path, capsys):
  _, _, folder = encoder
  good, _ = audio
  assert run_embed("--help") == 0
  help_text = capsys.readouterr().out
  for flag in ("--encoder", "--input", "--output", "--layer", "--[no]skip_bad", "--batch_size"):
    assert flag in help_text
  assert run_embed(f"--encoder={folder}", f"--input={good}") == 2
  assert "missing required flag: --output" in capsys.readouterr().err
  assert run_embed(f"--encoder={folder}", f"--input={tmp_path / 'nothing'}", "--output=x.npy") == 1
  assert "no such file or folder" in capsys.readouterr().err
  assert run_embed(f"--encoder={tmp_path}", f"--input={good}", "--output=x.npy") == 1
  assert "config.json not found" in capsys.readouterr().err
  assert run_embed(f"--encoder={folder}", f"--input={good}", "--output=x.npy", "--layer=7") == 1
  assert "--layer must be in [-3, 2]" in capsys.readouterr().err
  assert run_embed("--encoder=a", "--input=b", "--output=c", "--batch_size=0") == 2


def test_transcripts_match_pytorch_greedy_decoding(encoder, audio, tmp_path, capsys):
  model, feature_extractor, folder = encoder
  good, _ = audio
  tokenizer = transformers.Wav2Vec2CTCTokenizer.from_pretrained(folder)
  assert transcribe.run(["transcribe", f"--encoder={folder}", f"--input={good}",
                         "--batch_size=2"]) == 0
  lines = capsys.readouterr().out.splitlines()
  paths = good_paths(good)
  assert [line.split("\t")[0] for line in lines] == paths
  for line, path in zip(lines, paths):
    _, best_ids = torch_reference(model, feature_extractor, path)
    assert line.split("\t")[1] == tokenizer.decode(best_ids), path
  output = tmp_path / "asr.tsv"
  assert transcribe.run(["transcribe", f"--encoder={folder}", f"--input={good}", "--batch_size=2",
                         f"--output={output}"]) == 0
  assert output.read_text().splitlines() == lines


def test_transcribe_needs_a_ctc_head(tmp_path, audio, capsys):
  good, _ = audio
  torch.manual_seed(0)
  transformers.HubertModel(transformers.HubertConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
      conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)).save_pretrained(tmp_path)
  assert transcribe.run(["transcribe", f"--encoder={tmp_path}", f"--input={good}"]) == 1
  assert "no CTC head" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["clasp_jax.transcribe", "clasp_jax.embed speech"])
def test_module_entry_points_print_help(module):
  result = subprocess.run([sys.executable, "-m", *module.split(), "--help"], capture_output=True,
                          text=True, check=False, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr
  assert "--[no]skip_bad" in result.stdout and "--encoder" in result.stdout


@pytest.mark.parametrize("do_normalize", [True, False])
def test_preprocessing_follows_the_feature_extractor_config(do_normalize):
  from clasp_jax.models import wav2vec2_checkpoint  # pylint: disable=g-import-not-at-top
  feature_extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize)
  preprocessing = wav2vec2_checkpoint.Preprocessing.from_hf_dict(feature_extractor.to_dict())
  assert preprocessing.do_normalize == do_normalize and preprocessing.sampling_rate == 16_000
  waveform = (0.3 * np.random.RandomState(0).randn(5000) + 0.1).astype(np.float32)
  expected = feature_extractor(waveform, sampling_rate=16_000).input_values[0]
  np.testing.assert_allclose(preprocessing.apply(waveform), expected, atol=1e-5)
  assert np.isfinite(preprocessing.apply(np.zeros(4000, np.float32))).all()
