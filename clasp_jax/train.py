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

import faulthandler
import logging as std_logging
import os
import signal
import sys

from absl import logging
from ml_collections import config_flags

from clasp_jax.common import cli
from clasp_jax.common import workdir as workdir_files
from clasp_jax.common.config_args import ConfigError

FLAGS = cli.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, optionally with an argument: configs/base.py:paper.",
    flag_values=FLAGS, lock_config=True)
_WORKDIR = FLAGS.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_DISTRIBUTED = FLAGS.DEFINE_bool(
    "distributed", os.environ.get("CLASP_DISTRIBUTED", "") == "1",
    "Start JAX's multi-process runtime first (multi-host TPU/GPU; also CLASP_DISTRIBUTED=1): "
    "auto-detected on Cloud TPU and SLURM, or from CLASP_COORDINATOR_ADDRESS, "
    "CLASP_NUM_PROCESSES and CLASP_PROCESS_ID (clasp_jax/common/distributed.py).")


def _config_from_workdir(workdir: str):
  try:
    config = workdir_files.read_config(workdir)
  except workdir_files.WorkdirError as error:
    raise cli.FlagError(f"--config is required: {error}, nothing to resume from") from None
  config.lock()
  return config


class _QuietLibraries:
  """Keeps the progress lines readable: Orbax logs every checkpoint step at INFO."""

  NOISY = (os.sep + "orbax" + os.sep,)

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def main() -> None:
  # `kill -USR1 <pid>` prints every thread's Python stack to stderr: what a stuck process (of
  # a multi-process run, say) is waiting for.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _DISTRIBUTED.value:
    from clasp_jax.common import distributed
    try:
      distributed.initialize_from_environment()
    except ValueError as error:  # A malformed CLASP_* variable: the user's to fix.
      raise cli.UsageError(str(error)) from None
  from clasp_jax.trainer import trainer  # Imported after initialize(): it touches jax.devices().
  from clasp_jax.trainer import embedded
  config = _CONFIG.value or _config_from_workdir(_WORKDIR.value)
  if embedded.wants_corpus(config):
    # The embedded default: make the corpus, train, and report on the test split.
    embedded.run(config, _WORKDIR.value)
  else:
    trainer.train_and_evaluate(config, _WORKDIR.value)


def run(argv: list[str] | None = None) -> int:
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__, required=("workdir",),
                 errors=(ConfigError, FileNotFoundError))


if __name__ == "__main__":
  sys.exit(run())
