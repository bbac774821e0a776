"""absl flag parsing for every clasp_jax CLI: --help exits 0, a bad flag is a one-line error.

absl's own parser exits 1 after --help (which reads as a failure in scripts) and lets a bad
flag value, or a bad `--config.key=value` override, escape as a traceback.
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
    print(f"error: {_one_line(error)} (see --help)", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    # ml_collections raises these for unknown keys, wrong types and bad config arguments.
    print(f"error: bad --config override: {_one_line(error)}", file=sys.stderr)
    sys.exit(2)


def _one_line(error: Exception) -> str:
  """The message without an embedded traceback (config files report errors with one)."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip().strip("'\"") for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[0].rstrip(":"), lines[-1]]
  return " ".join(lines)
