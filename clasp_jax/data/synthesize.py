r"""Offline multilingual speech corpus: real sentences spoken by espeak-ng.

  python -m clasp_jax.data.synthesize --output=DIR --languages=en,de,es \
      --num_sentences=2400 --seed=0

Sentences come from Debian's fortunes packages (3 to 40 words; the category is the
fortune file's topic). Each is spoken once by espeak-ng in its own language by one of
several speakers per language (voice, variant, speed and pitch drawn from the seed),
resampled to 16 kHz and written as DIR/audio/LANG/ID.wav with DIR/manifest.jsonl. The
train/validation/test split (80/10/10 per language) shares no sentence. The manifest is
then built into DIR/tfds (array_record) like any other manifest dataset. Everything is a
function of the seed: the same flags give the same manifest and audio files, byte for byte.

Needs espeak-ng and the fortunes packages: scripts/install_system_packages.sh.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags

from clasp_jax.common import cli
from clasp_jax.data import fortunes
from clasp_jax.data import speech_corpus

_OUTPUT = flags.DEFINE_string("output", None, "Corpus folder (audio/, manifest.jsonl, tfds/).")
_LANGUAGES = flags.DEFINE_list("languages", ["en", "de", "es"],
                               f"Languages among {', '.join(fortunes.LANGUAGE_FOLDERS)}.")
_NUM_SENTENCES = flags.DEFINE_integer(
    "num_sentences", 2400, "Sentences (= utterances) in total, split evenly over languages.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of sentence choice, speakers and splits.")
_SPEAKERS = flags.DEFINE_integer("speakers_per_language", 8, "Distinct speakers per language.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Parallel espeak-ng processes.")
_FORTUNES_DIR = flags.DEFINE_string("fortunes_dir", fortunes.DEFAULT_FORTUNES_DIR,
                                    "Root of the installed fortune files.")
_ESPEAK = flags.DEFINE_string("espeak", "espeak-ng", "espeak-ng executable.")
_BUILD = flags.DEFINE_bool("build", True, "Also build the manifest into OUTPUT/tfds.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing corpus in --output.")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUTPUT.value:
    print("error: --output is required (see --help)", file=sys.stderr)
    return 2
  try:
    summary = speech_corpus.synthesize_corpus(
        os.path.expanduser(_OUTPUT.value), _LANGUAGES.value, _NUM_SENTENCES.value,
        _SEED.value, _SPEAKERS.value, _NUM_WORKERS.value, _FORTUNES_DIR.value, _ESPEAK.value,
        _BUILD.value, _OVERWRITE.value)
  except (speech_corpus.SynthesisError, FileExistsError, FileNotFoundError,
          ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"{summary['utterances']} utterances, {summary['hours']} h of audio, "
        f"{summary['total_seconds']} s; per language and split: "
        f"{json.dumps(summary['per_language_split'])}")
  if "dataset_dir" in summary:
    print(summary["dataset_dir"])
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
