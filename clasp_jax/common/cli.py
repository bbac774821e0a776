"""The command-line conventions of every clasp_jax command, in one place.

  python -m clasp_jax.train|evaluate|embed|transcribe|extract|data.build|data.synthesize

- `--help` (or -h, --helpshort, --helpfull) prints the command's module docstring and its
  flags to stdout and exits 0.
- A bad flag, a bad flag value (a `--config.key=value` override included), a missing
  required flag or a stray argument prints one line `error: ... (see --help)` to stderr and
  exits 2; so does a `FlagError` raised by the command (flags that do not go together).
- Bad input given by the user (`UsageError`: a missing file, an unreadable list) and the
  runtime errors a command declares print one line `error: ...` and exit 1. Anything else is
  a bug and keeps its traceback.
- Long-running commands report with `Progress`: `verb done/total noun (pct%, rate/s, ETA
  h:mm:ss)` on stderr, at most every few seconds and once at the end.

Each command keeps its flags in its own `FlagValues` registry and calls `run`.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO

from absl import flags
from absl import logging
import numpy as np

HELP_ARGUMENTS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "help")
USAGE_EXIT = 2
ERROR_EXIT = 1


def _defined_here(define: Callable[..., flags.FlagHolder]):
  def method(self, *args, **kwargs) -> flags.FlagHolder:
    return define(*args, flag_values=self, **kwargs)
  method.__doc__ = f"absl's {define.__name__}, into this registry."
  return method


class FlagValues(flags.FlagValues):
  """A command's own flag registry: commands share flag names (`--encoder`, `--workdir`), so
  none defines its flags in absl's global one, and all can be imported into one process.

  `FLAGS.DEFINE_string(name, default, help, ...)` and its siblings define a flag here.
  """

  DEFINE_string = _defined_here(flags.DEFINE_string)
  DEFINE_integer = _defined_here(flags.DEFINE_integer)
  DEFINE_float = _defined_here(flags.DEFINE_float)
  DEFINE_bool = _defined_here(flags.DEFINE_bool)
  DEFINE_enum = _defined_here(flags.DEFINE_enum)
  DEFINE_list = _defined_here(flags.DEFINE_list)


class UsageError(Exception):
  """Bad input given by the user (a path that does not exist, a file that cannot be read):
  one line `error: ...`, exit 1."""


class FlagError(UsageError):
  """The command line itself is wrong (flags that do not go together, a flag the chosen mode
  needs): one line `error: ... (see --help)`, exit 2."""


def one_line(error: BaseException | str) -> str:
  """The message on one line, without an embedded traceback (config files report with one)."""
  text = _unquoted(str(error).replace("\\n", "\n").replace("\\'", "'").strip())
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[0].rstrip(":"), lines[-1]]
  return " ".join(lines) or type(error).__name__


def _unquoted(line: str) -> str:
  # A KeyError's message arrives wrapped in quotes (its repr); a quote inside a message stays.
  if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
    return line[1:-1]
  return line


def report_error(message: BaseException | str, *, usage: bool = False) -> int:
  """Prints `error: message` (pointing at --help for a usage error); returns the exit code."""
  suffix = " (see --help)" if usage else ""
  print(f"error: {one_line(message)}{suffix}", file=sys.stderr, flush=True)
  return USAGE_EXIT if usage else ERROR_EXIT


def usage_text(doc: str | None, flag_values: flags.FlagValues) -> str:
  return f"{(doc or '').strip()}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}"


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *,
          required: Sequence[str] = (), arguments: bool = False) -> list[str]:
  """Parses `argv` (argv[0] is the program) into `flag_values` from their defaults.

  Returns the positional arguments when the command takes them (`arguments`), else [].
  Raises FlagError for a bad flag or value, a stray argument or a missing required flag.
  """
  # A second run in one process starts from the defaults again (FlagValues.unparse_flags would
  # do it too, but logs a line about it).
  for name in flag_values:
    flag_values[name].unparse()
  try:
    remaining = flag_values(list(argv))
  except flags.Error as error:
    raise FlagError(one_line(error)) from None
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    # ml_collections raises these for unknown keys, wrong types and bad config arguments.
    raise FlagError(f"bad --config override: {one_line(error)}") from None
  if len(remaining) > 1 and not arguments:
    raise FlagError(f"unexpected argument(s): {' '.join(remaining[1:])}")
  for name in flag_values:
    try:  # ml_collections defers a config file it could not load to the first attribute read.
      getattr(flag_values[name].value, "lock", None)
    except OSError as error:
      reason = str(error.__cause__ or error).strip().splitlines()[-1].strip()
      raise FlagError(f"--{name}: {reason}") from None
  missing = [name for name in required if _is_missing(flag_values[name].value)]
  if missing:
    raise FlagError(f"missing required flag(s): {', '.join('--' + name for name in missing)}")
  return list(remaining[1:])


def _is_missing(value) -> bool:
  return value is None or (isinstance(value, (str, list)) and not value)


def log_to_stderr() -> None:
  """absl INFO logging to stderr, as absl.app.run would set it up (commands log progress)."""
  logging.use_absl_handler()
  if not flags.FLAGS.is_parsed():
    # The command's own flags live elsewhere; absl's handler only needs its defaults.
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.INFO)
  # JAX logs every accelerator it fails to find at INFO; only the command's progress belongs.
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


def run(main: Callable[..., int | None], argv: Sequence[str] | None, *,
        flag_values: flags.FlagValues, doc: str | None, required: Sequence[str] = (),
        errors: tuple[type[BaseException], ...] = (), arguments: bool = False) -> int:
  """Parses the command line, runs `main()` and turns the outcome into an exit code.

  Args:
    main: the command; returns its exit code (None for 0) and reads its flags itself.
    argv: the command line, argv[0] the program name (None: sys.argv).
    flag_values: the command's flags.
    doc: the usage text --help prints above the flags (the module docstring).
    required: flags that must be given.
    errors: runtime errors the command expects (bad checkpoints, unreadable data); reported
      in one line with exit 1, like UsageError.
    arguments: the command takes positional arguments; `main(arguments)` receives them as a
      list (otherwise a stray argument is a usage error and `main()` takes none).
  """
  argv = list(sys.argv if argv is None else argv)
  if any(argument in HELP_ARGUMENTS for argument in argv[1:]):
    print(usage_text(doc, flag_values))
    return 0
  try:
    positional = parse(flag_values, argv, required=required, arguments=arguments)
  except FlagError as error:
    return report_error(error, usage=True)
  log_to_stderr()
  try:
    code = main(positional) if arguments else main()
  except FlagError as error:
    return report_error(error, usage=True)
  except (UsageError, *errors) as error:
    return report_error(error)
  return 0 if code is None else int(code)


def dispatch(argv: Sequence[str], *, program: str, doc: str | None,
             subcommands: dict[str, Callable[[], Callable[[list[str]], int]]]) -> int:
  """`python -m clasp_jax.<program> SUB [flags]`: runs SUB's command (`subcommands[SUB]()`
  returns its run function, imported only then), which sees `<program> SUB` as argv[0] so
  its flags parse as usual; --help lists the sub-commands; anything else is a usage error."""
  argv = list(argv)
  if len(argv) >= 2 and argv[1] in subcommands:
    return subcommands[argv[1]]()([f"{argv[0]} {argv[1]}"] + argv[2:])
  if len(argv) >= 2 and argv[1] in HELP_ARGUMENTS:
    print(f"{(doc or '').strip()}\n\nusage: python -m clasp_jax.{program} "
          f"{{{','.join(subcommands)}}} [flags]")
    return 0
  given = f", got {argv[1]!r}" if len(argv) >= 2 else ""
  return report_error(f"expected a sub-command, one of {', '.join(subcommands)}{given}",
                      usage=True)


def format_duration(seconds: float) -> str:
  """h:mm:ss ('-:--:--' when unknown)."""
  if not math.isfinite(seconds) or seconds < 0:
    return "-:--:--"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
  """One progress line for every long-running command.

  `update(done)` prints `verb done/total noun (pct%, rate/s, ETA h:mm:ss)` to stderr when
  `every_s` seconds have passed since the last line, and always when `done` reaches `total`
  (once). It can be passed where a `progress(done, total)` callback is taken.
  """

  def __init__(self, total: int, noun: str, *, verb: str = "done", every_s: float = 5.0,
               stream: IO[str] | None = None, clock: Callable[[], float] = time.monotonic):
    self.total, self.noun, self.verb, self.every_s = int(total), noun, verb, every_s
    self.stream = stream
    self._clock = clock
    self._start = self._last = clock()
    self._finished = False

  def line(self, done: int, now: float) -> str:
    elapsed = now - self._start
    rate = done / elapsed if elapsed > 0 else math.nan
    if done >= self.total:
      remaining = 0.0
    else:
      remaining = (self.total - done) / rate if rate > 0 else math.nan
    percent = 100.0 * done / self.total if self.total else 100.0
    rate_text = f"{rate:.1f}" if math.isfinite(rate) else "-"
    return (f"{self.verb} {done}/{self.total} {self.noun} ({percent:.0f}%, {rate_text}/s, "
            f"ETA {format_duration(remaining)})")

  def update(self, done: int, total: int | None = None) -> None:
    if total is not None:
      self.total = int(total)
    now = self._clock()
    finished = done >= self.total
    if (finished and not self._finished) or (not finished and now - self._last >= self.every_s):
      print(self.line(done, now), file=self.stream or sys.stderr, flush=True)
      self._last = now
      self._finished = finished

  __call__ = update


def define_npy_output(flag_values: flags.FlagValues, rows: str, more: str = "") -> None:
  """--output of the commands that write one embedding row per input: a float32 .npy."""
  flag_values.DEFINE_string("output", None, f"Where to write the ({rows}, dim) float32 .npy"
                            f"{more}; the name must end in .npy.")


def npy_output(flag_values: flags.FlagValues) -> str:
  """The --output that define_npy_output defined, checked (a usage error otherwise)."""
  if not flag_values.output.endswith(".npy"):
    raise FlagError(f"--output {flag_values.output}: must end in .npy")
  return flag_values.output


def save_npy(path: str, array: np.ndarray) -> None:
  """np.save through a temporary file and a rename: an interrupted run leaves no truncated file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + ".partial.npy"
  np.save(partial, array)
  os.replace(partial, path)
