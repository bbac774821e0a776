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

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import json
import os
import sys

from clasp_jax.common import cli
from clasp_jax.data import fortunes
from clasp_jax.data import speech_corpus

FLAGS = cli.FlagValues()
_OUTPUT = FLAGS.DEFINE_string("output", None, "Corpus folder (audio/, manifest.jsonl, tfds/).")
_LANGUAGES = FLAGS.DEFINE_list("languages", ["en", "de", "es"],
                               f"Languages among {', '.join(fortunes.LANGUAGE_FOLDERS)}.")
_NUM_SENTENCES = FLAGS.DEFINE_integer(
    "num_sentences", 2400, "Sentences (= utterances) in total, split evenly over languages.")
_SEED = FLAGS.DEFINE_integer("seed", 0, "Seed of sentence choice, speakers and splits.")
_SPEAKERS = FLAGS.DEFINE_integer("speakers_per_language", 8, "Distinct speakers per language.")
_NUM_WORKERS = FLAGS.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Parallel espeak-ng processes.")
_FORTUNES_DIR = FLAGS.DEFINE_string("fortunes_dir", fortunes.DEFAULT_FORTUNES_DIR,
                                    "Root of the installed fortune files.")
_ESPEAK = FLAGS.DEFINE_string("espeak", "espeak-ng", "espeak-ng executable.")
_BUILD = FLAGS.DEFINE_bool("build", True, "Also build the manifest into OUTPUT/tfds.")
_OVERWRITE = FLAGS.DEFINE_bool("overwrite", False, "Replace an existing corpus in --output.")


def main() -> None:
  summary = speech_corpus.synthesize_corpus(
      os.path.expanduser(_OUTPUT.value), _LANGUAGES.value, _NUM_SENTENCES.value,
      _SEED.value, _SPEAKERS.value, _NUM_WORKERS.value, _FORTUNES_DIR.value, _ESPEAK.value,
      _BUILD.value, _OVERWRITE.value)
  print(f"{summary['utterances']} utterances, {summary['hours']} h of audio, "
        f"{summary['total_seconds']} s; per language and split: "
        f"{json.dumps(summary['per_language_split'])}")
  if "dataset_dir" in summary:
    print(summary["dataset_dir"])


def run(argv: list[str] | None = None) -> int:
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__, required=("output",),
                 errors=(speech_corpus.SynthesisError, FileExistsError, FileNotFoundError,
                         ValueError))


if __name__ == "__main__":
  sys.exit(run())
