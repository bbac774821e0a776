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
  if len(argv) >= 2 and argv[1] in SUBCOMMANDS:
    module = importlib.import_module(SUBCOMMANDS[argv[1]])
    # The sub-command sees itself as the program, so its flags parse as usual.
    return module.run([f"{argv[0]} {argv[1]}"] + argv[2:])
  if len(argv) >= 2 and argv[1] in cli.HELP_ARGUMENTS:
    print(f"{__doc__.strip()}\n\nusage: python -m clasp_jax.embed {{{','.join(SUBCOMMANDS)}}} "
          "[flags]")
    return 0
  given = f", got {argv[1]!r}" if len(argv) >= 2 else ""
  return cli.report_error(f"expected a sub-command, one of {', '.join(SUBCOMMANDS)}{given}",
                          usage=True)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
