"""The one command-line convention (common/cli.py), and every command held to it."""

import importlib
import io

import numpy as np
import pytest

from clasp_jax import embed
from clasp_jax.common import cli

# Every command module with its entry point, and the flags it must require.
COMMANDS = {
    "clasp_jax.train": ("workdir",),
    "clasp_jax.evaluate": ("output",),
    "clasp_jax.transcribe": ("encoder", "input"),
    "clasp_jax.inference.speech_embedding": ("encoder", "input", "output"),
    "clasp_jax.inference.text_embedding": ("encoder", "input", "output"),
    "clasp_jax.data.build": ("kind", "source", "data_dir"),
    "clasp_jax.data.synthesize": ("output",),
    "clasp_jax.convert": ("workdir",),
}


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_prints_at_most_every_interval_and_once_at_the_end():
  clock, stream = FakeClock(), io.StringIO()
  progress = cli.Progress(10, "files", verb="embedded", every_s=5.0, stream=stream, clock=clock)
  clock.now += 1.0
  progress.update(1)
  assert stream.getvalue() == ""  # too soon
  clock.now += 4.0
  progress.update(5)  # 5 files in 5 s: 1/s, 5 left
  assert stream.getvalue() == "embedded 5/10 files (50%, 1.0/s, ETA 0:00:05)\n"
  clock.now += 1.0
  progress(6, 10)  # the (done, total) callback form
  assert stream.getvalue().count("\n") == 1
  clock.now += 0.5
  progress.update(10)  # the end is always printed...
  clock.now += 10.0
  progress.update(10)  # ...once
  lines = stream.getvalue().splitlines()
  assert lines[-1] == "embedded 10/10 files (100%, 1.5/s, ETA 0:00:00)"
  assert len(lines) == 2


def test_progress_of_nothing_and_the_default_stream(capsys):
  progress = cli.Progress(0, "sentences", verb="embedded")
  progress.update(0)
  assert capsys.readouterr().err.startswith("embedded 0/0 sentences (100%")


@pytest.mark.parametrize("seconds,text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"),
                                          (float("nan"), "-:--:--"), (-1, "-:--:--")])
def test_format_duration(seconds, text):
  assert cli.format_duration(seconds) == text


def _toy_command():
  flag_values = cli.FlagValues()
  flag_values.DEFINE_string("input", None, "What to read.")
  flag_values.DEFINE_integer("count", 1, "How many.", lower_bound=1)
  calls = []

  def main():
    calls.append((flag_values.input, flag_values.count))
    if flag_values.input == "flag-error":
      raise cli.FlagError("--input flag-error does not go with --count")
    if flag_values.input == "usage-error":
      raise cli.UsageError("--input usage-error: no such file")
    if flag_values.input == "declared":
      raise FileNotFoundError("declared.txt is missing\nsecond line")
    if flag_values.input == "bug":
      raise RuntimeError("a bug keeps its traceback")
    return 3 if flag_values.input == "three" else None

  def run(*arguments):
    return cli.run(main, ["toy", *arguments], flag_values=flag_values, doc="Toy command.",
                   required=("input",), errors=(FileNotFoundError,))

  return run, calls


@pytest.mark.parametrize("arguments,code,message", [
    (["--input=x"], 0, None),
    (["--input=three"], 3, None),
    (["--input=x", "--count=0"], 2,
     "error: flag --count=0: 0 is not a positive integer (see --help)"),
    (["--input=x", "--bogus"], 2, "error: Unknown command line flag 'bogus' (see --help)"),
    ([], 2, "error: missing required flag(s): --input (see --help)"),
    (["--input=x", "stray"], 2, "error: unexpected argument(s): stray (see --help)"),
    (["--input=flag-error"], 2, "error: --input flag-error does not go with --count (see --help)"),
    (["--input=usage-error"], 1, "error: --input usage-error: no such file"),
    (["--input=declared"], 1, "error: declared.txt is missing second line"),
])
def test_run_maps_outcomes_to_exit_codes_and_one_line(capsys, arguments, code, message):
  run, _ = _toy_command()
  assert run(*arguments) == code
  err = capsys.readouterr().err.strip()
  if message is None:
    assert "error" not in err
  else:
    assert err.splitlines()[-1] == message and len(err.splitlines()) == 1


def test_run_help_is_true_and_a_bug_keeps_its_traceback(capsys):
  run, calls = _toy_command()
  assert run("--help") == 0
  shown = capsys.readouterr().out
  assert shown.startswith("Toy command.") and "--input" in shown and "--count" in shown
  assert not calls
  with pytest.raises(RuntimeError, match="a bug"):
    run("--input=bug")


def test_a_second_run_starts_from_the_defaults(capsys):
  run, calls = _toy_command()
  assert run("--input=a", "--count=4") == 0
  assert run("--input=b") == 0
  assert calls == [("a", 4), ("b", 1)]
  assert "unparse" not in capsys.readouterr().err


def test_one_line_drops_embedded_tracebacks_and_repr_quotes():
  assert cli.one_line(KeyError("missing_key\nDid you mean key?")) == "missing_key Did you mean key?"
  config_error = ValueError("Error whilst parsing config file:\n\nTraceback (most recent call "
                            "last):\n  File x\nValueError: unknown config argument 'bogus'")
  assert cli.one_line(config_error) == ("Error whilst parsing config file ValueError: unknown "
                                        "config argument 'bogus'")


@pytest.mark.parametrize("module_name", sorted(COMMANDS))
def test_every_command_follows_the_convention(module_name, capsys):
  """All commands import into one process (own flag registries) and agree on help and errors."""
  module = importlib.import_module(module_name)
  assert module.run(["prog", "--help"]) == 0
  shown = capsys.readouterr().out
  assert shown.startswith(module.__doc__.strip().splitlines()[0])
  for name in COMMANDS[module_name]:
    assert f"--{name}" in shown
  assert module.run(["prog", "--no_such_flag"]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: Unknown command line flag 'no_such_flag' (see --help)")
  assert module.run(["prog"]) == 2
  missing = ", ".join(f"--{name}" for name in COMMANDS[module_name])
  assert capsys.readouterr().err.strip() == (
      f"error: missing required flag(s): {missing} (see --help)")


def test_embed_dispatches_and_refuses_an_unknown_sub_command(capsys):
  assert embed.main(["embed", "--help"]) == 0
  assert "python -m clasp_jax.embed {clasp,speech,text}" in capsys.readouterr().out
  assert embed.main(["embed", "images"]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: expected a sub-command, one of clasp, speech, text, got 'images' (see --help)")
  assert embed.main(["embed"]) == 2
  assert embed.main(["embed", "text", "--help"]) == 0
  assert "--max_length" in capsys.readouterr().out


def test_save_npy_replaces_atomically(tmp_path):
  path = str(tmp_path / "deep" / "out.npy")
  cli.save_npy(path, np.arange(3, dtype=np.float32))
  np.testing.assert_array_equal(np.load(path), [0, 1, 2])
  assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out.npy"]
