r"""Retrieval evaluation of paired speech/text embeddings with the paper's protocols.

  python -m clasp_jax.evaluate --embeddings=test.npz --output=metrics.json \
      [--protocol=hard|soft] [--num_candidates=100] [--seed=0] [--candidates=FILE] \
      [--ties=expected|paper|optimistic|pessimistic] [--skip_ties] [--threshold=0.45] \
      [--duplicates_as_hits] [--breakdowns=category,language,source] [--cross_lingual=fr:en]
  python -m clasp_jax.evaluate --workdir=TRAIN_DIR --split=test --output=metrics.json [...]

  python -m clasp_jax.evaluate --baseline=asr --data=DATASET_DIR --split=test \
      --speech_encoder=HF_CTC_DIR --text_encoder=SENTENCE_DIR --output=metrics.json [...]

The paper's numbers, exactly as the authors' code computes them (HITS@1 = argmax == gold, a
tie going to the lower index; their tie skipping):

  python -m clasp_jax.evaluate --embeddings=test.npz --output=metrics.json --ties=paper \
      --skip_ties

With --workdir, a checkpoint of a training run (--checkpoint: best by default) embeds the
split of its own data config (or of --features, a feature folder) and those embeddings are
evaluated. With
--baseline=asr, the paper's ASR cascade is evaluated on a built speech-text dataset
(python -m clasp_jax.data.build): each clip is transcribed by greedy CTC decoding and the
transcript, like the reference text, is embedded by the sentence encoder.

The .npz file holds `speech` and `text` (N x d floats, row i of each is a pair) and optionally
`category`, `language`, `source` (N strings), `text_id` (N ids; equal ids mark duplicate
texts), and text-only queries `query_text` (M x d), `query_language`, `query_text_id` for the
cross-lingual evaluation. Both directions are scored; the JSON maps names like
`speech_to_text/hits@1`, `text_to_speech/mrr`, `by_category/news/speech_to_text/mean_rank` to
values, plus `settings/...` entries that record the protocol. See docs/evaluation.md.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import json
import os
import sys
import time
import zipfile

from absl import logging
import jax
import numpy as np

from clasp_jax.common import cli
from clasp_jax.common.config_args import ConfigError
from clasp_jax.data import text_prep
from clasp_jax.retrieval import evaluation as protocols
from clasp_jax.retrieval import scoring

FLAGS = cli.FlagValues()

_EMBEDDINGS = FLAGS.DEFINE_string(
    "embeddings", None, ".npz file with `speech` and `text` (N x d, row i of each a pair) and "
    "optional `category`, `language`, `source`, `text_id`, `query_text`, `query_language`, "
    "`query_text_id`.")
_WORKDIR = FLAGS.DEFINE_string(
    "workdir", None, "A training workdir: embed --split with its --checkpoint instead of "
    "reading --embeddings.")
_SPLIT = FLAGS.DEFINE_string("split", "test", "With --workdir or --baseline: the split.")
_CHECKPOINT = FLAGS.DEFINE_string(
    "checkpoint", "best", "With --workdir: 'best' (the step that scored best on the "
    "early-stopping metric; the newest when no evaluation ran), 'latest', or a step number.")
_FEATURES = FLAGS.DEFINE_string(
    "features", "", "With --workdir: a feature folder to read --split from instead of the "
    "workdir config's data.")
_BASELINE = FLAGS.DEFINE_enum(
    "baseline", None, ["asr"], "asr: evaluate the ASR cascade (CTC transcript -> sentence "
    "encoder) on --data instead of reading --embeddings.")
_DATA = FLAGS.DEFINE_list(
    "data", None, "With --baseline: built speech-text dataset folder(s), concatenated.")
_SPEECH_ENCODER = FLAGS.DEFINE_string(
    "speech_encoder", None, "With --baseline=asr: a HuBERT/wav2vec2 *ForCTC folder.")
_TEXT_ENCODER = FLAGS.DEFINE_string(
    "text_encoder", None, "With --baseline=asr: a sentence-transformers folder (LaBSE).")
_TEXT_PREPARATION = FLAGS.DEFINE_enum(
    "text_preparation", "paper", list(text_prep.PREPARATIONS),
    "With --baseline=asr: paper lowercases the CTC transcripts (the sentence encoder is cased, "
    "CTC vocabularies are upper case) and prepares each reference by its source (Common Voice "
    "lower case without punctuation), as the authors did; as_is embeds both unchanged.")
_TRANSCRIPTS = FLAGS.DEFINE_string(
    "transcripts", None, "With --baseline=asr: also write ID<TAB>TRANSCRIPT<TAB>TEXT lines here.")
_OUTPUT = FLAGS.DEFINE_string("output", None, "JSON file to write every metric to.")
_SAVE_EMBEDDINGS = FLAGS.DEFINE_string(
    "save_embeddings", None, "Also write the scored embeddings and labels to this .npz "
    "(--embeddings reads it back).")
protocols.define_protocol_flags(FLAGS)
_NORMALIZE = FLAGS.DEFINE_bool(
    "normalize", True, "L2-normalise the embeddings first, so scores are cosine similarities.")
_BLOCK_ROWS = FLAGS.DEFINE_integer(
    "block_rows", 0, "At most this many speech rows per tile; 0: backend default.")
_BLOCK_COLS = FLAGS.DEFINE_integer(
    "block_cols", 0, "At most this many texts per tile; 0: backend default.")
_CHUNK_ROWS = FLAGS.DEFINE_integer(
    "chunk_rows", 0, "Speech rows resident per device (rounded up to whole tiles); 0: default.")
_CHUNK_COLS = FLAGS.DEFINE_integer(
    "chunk_cols", 0, "Texts resident at a time (rounded up to whole tiles); 0: default.")


def load_embeddings(path: str) -> dict[str, np.ndarray]:
  """Every array of an .npz file, read one by one; fails with a one-line reason."""
  if not os.path.isfile(path):
    raise protocols.InputError(f"--embeddings: no such file {path}")
  with open(path, "rb") as f:
    magic = f.read(6)
  if magic == b"\x93NUMPY":
    raise protocols.InputError(f"--embeddings: {path} is a single .npy array, not an .npz file")
  if not magic.startswith(b"PK"):
    raise protocols.InputError(f"--embeddings: {path} is not an .npz (zip) file")
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except (zipfile.BadZipFile, EOFError, OSError) as error:
    raise protocols.InputError(f"--embeddings: cannot read {path} as .npz: {error}") from error
  except ValueError as error:
    # np.load refuses object arrays without pickle; strings must be stored as np.str_.
    raise protocols.InputError(f"--embeddings: {path}: {error} (store labels as fixed-width "
                               "strings, e.g. np.asarray(labels, dtype=str))") from error


# Facts learnt while embedding that the settings report (the checkpoint step chosen).
_RUN_INFO: dict[str, object] = {}


def _embed_from_workdir() -> dict[str, np.ndarray]:
  from clasp_jax.inference import workdir as inference  # Model code is only needed in this mode.
  from clasp_jax.trainer.checkpointing import parse_checkpoint_choice
  logging.info("embedding the %s split with the %s checkpoint of %s", _SPLIT.value,
               _CHECKPOINT.value, _WORKDIR.value)
  try:
    arrays, step = inference.embed_workdir_split(
        _WORKDIR.value, _SPLIT.value, features_dir=_FEATURES.value,
        checkpoint=parse_checkpoint_choice(_CHECKPOINT.value))
  except ValueError as error:  # e.g. a split the data config does not have.
    raise protocols.InputError(str(error)) from error
  logging.info("embedded %d pairs with the checkpoint of step %d", len(arrays["speech"]), step)
  _RUN_INFO["settings/checkpoint_step"] = step
  return arrays


def _workdir_cascade(reference: dict[str, np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], float] | None:
  """The ASR cascade of the workdir's own model when it has a CTC head: its greedy transcript
  of each clip, embedded by the same text tower as the references (the paper's baseline, side
  by side with the model itself), and the character error rate. None without a CTC head."""
  from clasp_jax.inference import workdir as inference
  from clasp_jax.models import clasp
  from clasp_jax.trainer.checkpointing import parse_checkpoint_choice
  trained = inference.load_trained(_WORKDIR.value, features_dir=_FEATURES.value,
                                   checkpoint=parse_checkpoint_choice(_CHECKPOINT.value))
  if not trained.ctc_vocabulary or trained.built.text_tower is None:
    return None
  logging.info("ASR cascade: transcribing the %s split with the CTC head", _SPLIT.value)
  transcripts, references = trained.transcribe_split(_SPLIT.value)
  cer = inference.character_error_rate(transcripts, [clasp.ctc_text(r) for r in references])
  cascade = dict(reference)
  # Both sides through the text tower alone (the model's own text side may add its learned
  # projection, config.model.text_projection, which the cascade has no part in); the
  # references from the model's table of sentence vectors when it keeps one.
  sentences = trained.built.text_encoder
  if not isinstance(sentences, clasp.PrecomputedText):
    sentences = clasp.PrecomputedText(trained.built.text_tower)
  cascade["speech"] = trained.built.text_tower.embed(transcripts)
  cascade["text"] = sentences(references)["text"]
  return cascade, cer


def _embed_asr_cascade() -> dict[str, np.ndarray]:
  from clasp_jax.inference import asr_baseline  # Speech and text towers are only needed here.
  from clasp_jax.data import reader
  from clasp_jax.models import wav2vec2_checkpoint
  try:
    split = reader.open_split(_DATA.value, _SPLIT.value)
    arrays, transcripts = asr_baseline.cascade_embeddings(
        split, speech_encoder=_SPEECH_ENCODER.value, text_encoder=_TEXT_ENCODER.value,
        progress=lambda line: logging.info("%s", line),
        text_preparation=_TEXT_PREPARATION.value)
  except (ValueError, OSError, wav2vec2_checkpoint.CheckpointError) as error:
    raise protocols.InputError(str(error)) from error
  if _TRANSCRIPTS.value:
    with open(_TRANSCRIPTS.value, "w", encoding="utf-8") as f:
      for index, transcript in enumerate(transcripts):
        record = split[index]
        f.write(f"{record['id']}\t{transcript}\t{record['text']}\n")
  return arrays


def _blocking() -> scoring.Blocking:
  try:
    return scoring.make_blocking(_BLOCK_ROWS.value, _BLOCK_COLS.value, _CHUNK_ROWS.value,
                                 _CHUNK_COLS.value)
  except ValueError as error:
    raise protocols.InputError(str(error)) from error


def _protocol() -> protocols.Protocol:
  return protocols.protocol_from_settings(lambda name: FLAGS[name].value)


def _settings(protocol: protocols.Protocol, corpus: protocols.Corpus) -> dict[str, object]:
  settings = {
      "settings/protocol": protocol.kind,
      "settings/ties": protocol.ties,
      "settings/skip_ties": protocol.skip_ties,
      "settings/duplicates_as_hits": protocol.duplicates_as_hits,
      "settings/num_pairs": corpus.size,
      "settings/dim": int(corpus.zspeech.shape[1]),
  }
  if _EMBEDDINGS.value:
    settings["settings/embeddings"] = os.path.abspath(_EMBEDDINGS.value)
  elif _WORKDIR.value:
    settings["settings/workdir"] = os.path.abspath(_WORKDIR.value)
    settings["settings/split"] = _SPLIT.value
    settings["settings/checkpoint"] = _CHECKPOINT.value
  else:
    settings["settings/baseline"] = _BASELINE.value
    settings["settings/data"] = ",".join(os.path.abspath(d) for d in _DATA.value)
    settings["settings/split"] = _SPLIT.value
    settings["settings/speech_encoder"] = os.path.abspath(_SPEECH_ENCODER.value)
    settings["settings/text_encoder"] = os.path.abspath(_TEXT_ENCODER.value)
    settings["settings/text_preparation"] = _TEXT_PREPARATION.value
  if protocol.threshold is not None:
    settings["settings/threshold"] = protocol.threshold
  if FLAGS.candidates:
    settings["settings/candidates"] = os.path.abspath(FLAGS.candidates)
  elif protocol.kind == "soft":
    settings["settings/num_candidates"] = protocol.num_candidates
    settings["settings/seed"] = protocol.seed
  settings.update(_RUN_INFO)
  return settings


def main() -> None:
  sources = [bool(_EMBEDDINGS.value), bool(_WORKDIR.value), bool(_BASELINE.value)]
  if sum(sources) != 1:
    raise cli.FlagError("exactly one of --embeddings, --workdir and --baseline is required")
  if _BASELINE.value and not (_DATA.value and _SPEECH_ENCODER.value and _TEXT_ENCODER.value):
    raise cli.FlagError("--baseline=asr needs --data, --speech_encoder and --text_encoder")
  if FLAGS.candidates and FLAGS.protocol != "soft":
    raise cli.FlagError("--candidates needs --protocol=soft")
  started = time.perf_counter()
  cascade = None
  _RUN_INFO.clear()  # A second run in one process reports its own checkpoint.
  protocol = _protocol()
  blocking = _blocking()
  if _EMBEDDINGS.value:
    logging.info("reading %s", _EMBEDDINGS.value)
    arrays = load_embeddings(_EMBEDDINGS.value)
  elif _WORKDIR.value:
    arrays = _embed_from_workdir()
    cascade = _workdir_cascade(arrays)
  else:
    arrays = _embed_asr_cascade()
  if _SAVE_EMBEDDINGS.value:
    try:
      np.savez(_SAVE_EMBEDDINGS.value, **arrays)
    except OSError as error:
      raise cli.UsageError(f"--save_embeddings: cannot write {_SAVE_EMBEDDINGS.value}: "
                           f"{error}") from None
  # The arrays were just made for this run, so they are normalised where they lie.
  corpus = protocols.Corpus.from_mapping(arrays, normalize=_NORMALIZE.value, in_place=True,
                                         strict=True)
  logging.info("%d pairs of dimension %d, %s protocol on %d %s device(s)", corpus.size,
               corpus.zspeech.shape[1], protocol.kind, jax.device_count(),
               jax.default_backend())
  candidates = (protocols.read_candidates(FLAGS.candidates, corpus.size)
                if FLAGS.candidates else None)
  metrics = protocols.evaluate(corpus, protocol, blocking=blocking, candidates=candidates,
                               progress=lambda line: logging.info("%s", line))
  output = dict(metrics)
  if cascade is not None:
    cascade_arrays, cer = cascade
    cascade_corpus = protocols.Corpus.from_mapping(cascade_arrays, normalize=_NORMALIZE.value,
                                                   in_place=True, strict=True)
    cascade_metrics = protocols.evaluate(cascade_corpus, protocol, blocking=blocking,
                                         candidates=candidates)
    output.update({f"asr_cascade/{name}": value for name, value in cascade_metrics.items()})
    output["asr_cascade/character_error_rate"] = cer
  output.update(_settings(protocol, corpus))
  try:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(output, f, indent=2, sort_keys=True)
  except OSError as error:
    raise cli.UsageError(f"--output: cannot write {_OUTPUT.value}: {error}") from None
  first_k = min(protocol.ks)
  for direction in protocols.DIRECTIONS:
    if f"{direction}/mrr" in metrics:
      print(f"{direction}: hits@{first_k} {metrics[f'{direction}/hits@{first_k}']:.4f}  "
            f"mrr {metrics[f'{direction}/mrr']:.4f}  "
            f"mean rank {metrics[f'{direction}/mean_rank']:.2f}  "
            f"({int(metrics[f'{direction}/num_queries'])} queries)")
  if cascade is not None:
    print(f"asr_cascade speech_to_text: hits@{first_k} "
          f"{output[f'asr_cascade/speech_to_text/hits@{first_k}']:.4f}  "
          f"mrr {output['asr_cascade/speech_to_text/mrr']:.4f}  "
          f"character error rate {output['asr_cascade/character_error_rate']:.4f}")
  print(f"wrote {len(output)} metrics to {_OUTPUT.value} in "
        f"{time.perf_counter() - started:.1f} s")


def run(argv: list[str] | None = None) -> int:
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__, required=("output",),
                 errors=(protocols.InputError, scoring.TooManyPairsError, FileNotFoundError,
                         ConfigError))


if __name__ == "__main__":
  sys.exit(run())
