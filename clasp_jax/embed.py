"""Embeds speech or text with a pretrained tower.

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

SUBCOMMANDS = {
    "speech": "clasp_jax.inference.speech_embedding",
    "text": "clasp_jax.inference.text_embedding",
}


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    print(__doc__.strip(), file=sys.stderr)
    print(f"\nusage: python -m clasp_jax.embed {{{','.join(SUBCOMMANDS)}}} [flags]", file=sys.stderr)
    return 0 if len(argv) >= 2 and argv[1] in ("-h", "--help", "help") else 2
  module = importlib.import_module(SUBCOMMANDS[argv[1]])
  # The sub-command sees itself as the program, so its absl flags parse as usual.
  return module.run([f"{argv[0]} {argv[1]}"] + argv[2:])


if __name__ == "__main__":
  sys.exit(main(sys.argv))
