"""absl flag parsing for the data CLIs: --help exits 0, a bad flag is a one-line error.

absl's own parser exits 1 after --help (which reads as a failure in scripts) and, when a
custom parser is used, lets a bad flag value escape as a traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

_HELP_ARGUMENTS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """flags_parser for absl.app.run: usage (module docstring and flags) on --help."""
  if any(argument in _HELP_ARGUMENTS for argument in argv[1:]):
    usage = (sys.modules["__main__"].__doc__ or "").strip()
    print(f"{usage}\n\nflags:{flags.FLAGS.main_module_help()}")
    sys.exit(0)
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as error:
    print(f"error: {error} (see --help)", file=sys.stderr)
    sys.exit(2)
