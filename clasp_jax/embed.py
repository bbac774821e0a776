"""Embeds speech or text with a trained CLASP model or a pretrained tower.

  python -m clasp_jax.embed clasp --workdir=W --input=PATH --output=OUT.npy [--text]
  python -m clasp_jax.embed speech --encoder=HF_DIR --input=PATH --output=OUT.npy
  python -m clasp_jax.embed text --encoder=DIR --input=FILE.txt --output=OUT.npy

Each sub-command lives in its own module; `--help` after the sub-command lists its flags.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import importlib
import sys

from clasp_jax.common import cli

SUBCOMMANDS = {
    "clasp": "clasp_jax.inference.clasp_embedding",
    "speech": "clasp_jax.inference.speech_embedding",
    "text": "clasp_jax.inference.text_embedding",
}


def main(argv: list[str]) -> int:
  return cli.dispatch(argv, program="embed", doc=__doc__, subcommands={
      name: (lambda module=module: importlib.import_module(module).run)
      for name, module in SUBCOMMANDS.items()})


if __name__ == "__main__":
  sys.exit(main(sys.argv))
