r"""Trains and evaluates CLASP.

  python -m clasp_jax.train --config=configs/base.py --workdir=/tmp/clasp
  python -m clasp_jax.train --config=configs/base.py:paper,features=DIR --workdir=DIR
  python -m clasp_jax.train --config=configs/base.py --config.batch_size=512 --workdir=DIR

Running the same command again resumes from the newest checkpoint in --workdir; with no
--config, the config saved in --workdir is used.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from clasp_jax.common import cli as cli_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, optionally with an argument: configs/base.py:paper.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("CLASP_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() first (multi-host TPU/GPU; also CLASP_DISTRIBUTED=1).")


def _config_from_workdir(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise app.UsageError(f"--config is required: {path} does not exist to resume from")
  with open(path) as f:
    config = config_dict.ConfigDict(json.load(f))
  config.lock()
  return config


class _QuietLibraries:
  """Keeps the progress lines readable: Orbax logs every checkpoint step at INFO."""

  NOISY = (os.sep + "orbax" + os.sep,)

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  from clasp_jax.trainer import trainer  # Imported after initialize(): it touches jax.devices().
  config = _CONFIG.value or _config_from_workdir(_WORKDIR.value)
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (trainer.ConfigError, FileNotFoundError) as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parse_flags)
