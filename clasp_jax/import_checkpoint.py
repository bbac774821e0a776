r"""Imports one of the authors' released fusion encoders (a `torch.save(model)` file) as a workdir.

  python -m clasp_jax.import_checkpoint --checkpoint=clasp.pt \
      --config=configs/base.py:paper,features=/data/clasp_features --workdir=/tmp/clasp_authors

The file is read by an allow-listed unpickler: only tensors, storages, torch.nn layers and the
authors' class names (HubertLabseConcat, HubertLabseGating, Wav2vecConcat) are accepted, as
inert records; a file that names anything else (a pickle can call any function) is refused
before anything in it runs. PyTorch is not needed.

The workdir gets the training config given (its model settings and feature widths replaced by
the checkpoint's, inputs L2-normalised as the authors' inference requires) and the weights as
its best checkpoint, so every command reads it:

  python -m clasp_jax.evaluate --workdir=/tmp/clasp_authors --split=test --ties=paper \
      --output=metrics.json
  python -m clasp_jax.train --config=configs/base.py:paper,stage=4,features=/data/clasp_features \
      --config.init_from=/tmp/clasp_authors --workdir=/tmp/clasp_finetuned
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import sys

from ml_collections import config_flags

from clasp_jax.common import cli
from clasp_jax.common.config_args import ConfigError

FLAGS = cli.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config the workdir records, e.g. configs/base.py:paper,features=DIR "
    "(its model settings come from the checkpoint).", flag_values=FLAGS, lock_config=False)
_CHECKPOINT = FLAGS.DEFINE_string("checkpoint", None, "The authors' .pt file (torch.save(model)).")
_WORKDIR = FLAGS.DEFINE_string("workdir", None, "The workdir to write.")
_OVERWRITE = FLAGS.DEFINE_bool("overwrite", False, "Replace a workdir that holds a run.")


def main() -> None:
  from clasp_jax.inference import authors_checkpoint  # pylint: disable=g-import-not-at-top
  imported = authors_checkpoint.write_workdir(_CHECKPOINT.value, _WORKDIR.value, _CONFIG.value,
                                              overwrite=_OVERWRITE.value)
  settings = imported.settings
  print(f"imported {imported.class_name} ({settings['fusion']} fusion, {settings['mode']} mode, "
        f"inputs {imported.dims['speech']} + {imported.dims['spectrogram']} -> "
        f"{settings['embed_dim']}) into {_WORKDIR.value}")


def run(argv: list[str] | None = None) -> int:
  from clasp_jax.models import torch_pickle  # pylint: disable=g-import-not-at-top
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__,
                 required=("checkpoint", "config", "workdir"),
                 errors=(torch_pickle.UnsafeCheckpointError, FileNotFoundError, ConfigError))


if __name__ == "__main__":
  sys.exit(run())
