"""absl flag parsing whose --help exits 0 (absl's own exits 1, which reads as a failure)."""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

_HELP_ARGUMENTS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """flags_parser for absl.app.run: prints the module docstring and flags for --help."""
  if any(argument in _HELP_ARGUMENTS for argument in argv[1:]):
    usage = (sys.modules["__main__"].__doc__ or "").strip()
    print(f"{usage}\n\nflags:{flags.FLAGS.main_module_help()}")
    sys.exit(0)
  return flags.FLAGS(list(argv))
