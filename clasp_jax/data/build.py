r"""Builds a speech-text dataset (array_record, 16 kHz mono) from a local layout.

  python -m clasp_jax.data.build --kind=manifest --source=recordings.jsonl \
      --data_dir=~/clasp_data
  python -m clasp_jax.data.build --kind=speech_brown --source=SpeechBrown/ --data_dir=...
  python -m clasp_jax.data.build --kind=fleurs --source=fleurs/ --languages=en_us ...
  python -m clasp_jax.data.build --kind=common_voice --source=cv-corpus-4/en ...

Unusable inputs are skipped and counted (build log and metadata.json); --strict stops at the
first one and names its path. Prints the dataset directory, which training and evaluation
configs take as their data path.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from clasp_jax.data import bad_input
from clasp_jax.common import cli
from clasp_jax.data.sources import common_voice
from clasp_jax.data.sources import registry as readers
from clasp_jax.data import tfds_builder

_KIND = flags.DEFINE_enum("kind", None, readers.KINDS, "Layout of --source.")
_SOURCE = flags.DEFINE_string(
    "source", None, "Manifest file (.jsonl/.csv/.tsv) or the extracted release folder.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Output root; the dataset lands in DATA_DIR/clasp_speech_text/NAME/1.0.0.")
_NAME = flags.DEFINE_string(
    "name", None, "Dataset name (default: the kind, or the manifest's file name).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 80/10/10 sentence split.")
_STRICT = flags.DEFINE_bool("strict", False,
                            "Stop at the first unusable input, naming its path.")
_MAX_DURATION_S = flags.DEFINE_float("max_duration_s", bad_input.AudioLimits.max_duration_s,
                                     "Skip clips longer than this many seconds.")
_MIN_SAMPLE_RATE = flags.DEFINE_integer("min_sample_rate",
                                        bad_input.AudioLimits.min_sample_rate,
                                        "Skip sources sampled below this rate (Hz).")
_SILENCE_PEAK = flags.DEFINE_float("silence_peak", bad_input.AudioLimits.silence_peak,
                                   "Skip clips whose peak magnitude is at or below this.")
_LANGUAGES = flags.DEFINE_list(
    "languages", [], "FLEURS language codes (en_us) or Common Voice locales (en); "
    "default: every one found.")
_COMMON_VOICE_SPLITS = flags.DEFINE_enum(
    "common_voice_splits", "official", common_voice.SPLIT_MODES,
    "official: train/dev/test.tsv; validated: seeded sentence split of validated.tsv.")
_DEFAULT_LANGUAGE = flags.DEFINE_string("default_language", "und",
                                        "Manifest rows without a language get this.")
_DEFAULT_CATEGORY = flags.DEFINE_string("default_category", "uncategorized",
                                        "Manifest rows without a category get this.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Threads decoding audio.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild a dataset that already exists.")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for flag in (_KIND, _SOURCE, _DATA_DIR):
    if flag.value is None:
      print(f"error: --{flag.name} is required (see --help)", file=sys.stderr)
      return 2
  source = os.path.expanduser(_SOURCE.value)
  options = tfds_builder.BuildOptions(
      name=_NAME.value or readers.default_name(_KIND.value, source),
      kind=_KIND.value,
      seed=_SEED.value,
      strict=_STRICT.value,
      limits=bad_input.AudioLimits(max_duration_s=_MAX_DURATION_S.value,
                                   min_sample_rate=_MIN_SAMPLE_RATE.value,
                                   silence_peak=_SILENCE_PEAK.value),
      num_workers=_NUM_WORKERS.value,
      source_path=os.path.abspath(source),
  )
  try:
    examples = readers.read_source(_KIND.value, source, _LANGUAGES.value,
                                   _COMMON_VOICE_SPLITS.value, _DEFAULT_LANGUAGE.value,
                                   _DEFAULT_CATEGORY.value)
    logging.info("read %d utterances from %s", len(examples), source)
    dataset_dir = tfds_builder.build_dataset(
        examples, os.path.expanduser(_DATA_DIR.value), options, overwrite=_OVERWRITE.value)
  except bad_input.BadInputError as error:
    print(f"error: --strict stopped at {error.path}: {error.kind}"
          + (f" ({error.detail})" if error.detail else ""), file=sys.stderr)
    return 1
  except (FileNotFoundError, FileExistsError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(dataset_dir)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
