r"""Converts a trained model to a PyTorch folder, or a PyTorch folder / checkpoint to a workdir.

  python -m clasp_jax.convert --to=torch --workdir=W --output=DIR [--checkpoint=best]
  python -m clasp_jax.convert --from=torch --input=DIR --workdir=W
  python -m clasp_jax.convert --from=torch --input=clasp.pt --workdir=W \
      [--config=configs/base.py:paper,features=FEATURES]

--to=torch writes DIR: the fusion encoder under the authors' tensor names (fusion.safetensors
and a weights-only fusion.pt state_dict that their classes load with strict=True), for audio
models the SSL encoder as a Hugging Face folder (ssl_encoder/) and the spectrogram encoder
(spectrogram_encoder.safetensors), the text tower as a sentence-transformers folder
(text_encoder/), clasp.json (the settings that rebuild the model) and README.md (how to load
and run it with clasp_jax.torch).

--from=torch reads such a folder back into a workdir whose best checkpoint every command uses
(config.json; the tower folders are copied into it); a round trip gives identical parameters.
Given one of the authors' released whole-module .pt files instead, it reads it with the
allow-listed unpickler of import_checkpoint (nothing in the file runs; a file that would run
code is refused) under --config (default configs/base.py:paper).
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import os
import sys

from ml_collections import config_flags

from clasp_jax.common import cli
from clasp_jax.common import workdir as workdir_files
from clasp_jax.common.config_args import ConfigError

FLAGS = cli.FlagValues()
FLAGS.DEFINE_enum("to", None, ["torch"], "Export the workdir to a PyTorch folder.")
FLAGS.DEFINE_enum("from", None, ["torch"], "Import a PyTorch folder or the authors' .pt file.")
FLAGS.DEFINE_string("workdir", None, "The training workdir to read (--to) or write (--from).")
FLAGS.DEFINE_string("output", None, "--to=torch: the folder to write.")
FLAGS.DEFINE_string("input", None, "--from=torch: a folder of --to=torch, or the authors' .pt.")
FLAGS.DEFINE_string("checkpoint", "best", "--to=torch: 'best', 'latest' or a step number.")
FLAGS.DEFINE_bool("overwrite", False, "Replace an existing export or workdir.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "--from=torch with an authors' .pt: the training config the workdir records "
    "(default configs/base.py:paper; its model settings come from the checkpoint).",
    flag_values=FLAGS, lock_config=False)


def _export() -> None:
  from clasp_jax.inference import torch_conversion  # pylint: disable=g-import-not-at-top
  from clasp_jax.trainer.checkpointing import parse_checkpoint_choice  # pylint: disable=g-import-not-at-top
  if not FLAGS.output:
    raise cli.FlagError("--to=torch needs --output")
  if FLAGS.input or _CONFIG.value is not None:
    raise cli.FlagError("--input and --config go with --from=torch")
  try:
    checkpoint = parse_checkpoint_choice(FLAGS.checkpoint)
  except ValueError as error:
    raise cli.FlagError(str(error)) from None
  settings = torch_conversion.export_workdir(
      FLAGS.workdir, FLAGS.output, checkpoint=checkpoint, overwrite=FLAGS.overwrite,
      log=lambda line: print(line, file=sys.stderr))
  fusion = settings["fusion"]
  print(f"wrote {FLAGS.output}: step {settings['source']['step']}, {fusion['kind']} fusion, "
        f"{fusion['mode']} mode, {settings['speech_kind']} speech, "
        f"{'text tower' if settings['text_encoder'] else 'no text tower'}")


def _import() -> None:
  if not FLAGS.input:
    raise cli.FlagError("--from=torch needs --input")
  if FLAGS.output:
    raise cli.FlagError("--output goes with --to=torch")
  if os.path.isdir(FLAGS.input):
    if _CONFIG.value is not None:
      raise cli.FlagError("--config goes with an authors' .pt file (a folder has clasp.json)")
    from clasp_jax.inference import torch_conversion  # pylint: disable=g-import-not-at-top
    settings = torch_conversion.import_folder(FLAGS.input, FLAGS.workdir,
                                              overwrite=FLAGS.overwrite)
    print(f"imported {FLAGS.input} ({settings['fusion']['kind']} fusion, "
          f"{settings['speech_kind']} speech) into {FLAGS.workdir}")
    return
  if not os.path.exists(FLAGS.input):
    raise cli.UsageError(f"--input {FLAGS.input}: no such file or folder")
  from clasp_jax.inference import authors_checkpoint  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if config is None:
    from configs import base  # pylint: disable=g-import-not-at-top
    config = base.get_config("paper")
  imported = authors_checkpoint.write_workdir(FLAGS.input, FLAGS.workdir, config,
                                              overwrite=FLAGS.overwrite)
  print(f"imported {imported.class_name} ({imported.settings['fusion']} fusion) into "
        f"{FLAGS.workdir}")


def main() -> None:
  direction = [name for name in ("to", "from") if FLAGS[name].value]
  if len(direction) != 1:
    raise cli.FlagError("give exactly one of --to=torch and --from=torch")
  _export() if direction == ["to"] else _import()


def run(argv: list[str] | None = None) -> int:
  from clasp_jax.inference import torch_conversion  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import hf_checkpoint, torch_pickle  # pylint: disable=g-import-not-at-top
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__, required=("workdir",),
                 errors=(torch_conversion.ConversionError, torch_pickle.UnsafeCheckpointError,
                         hf_checkpoint.CheckpointError, workdir_files.WorkdirError,
                         FileNotFoundError, ConfigError))


if __name__ == "__main__":
  sys.exit(run())
