"""Embeds a text file, one sentence per line, with a sentence-transformers encoder in Flax.

  python -m clasp_jax.embed text --encoder=DIR --input=FILE.txt --output=OUT.npy

DIR is a sentence-transformers folder (LaBSE, all-MiniLM-L6-v2, an XLM-R paraphrase model) or
a plain Hugging Face BERT / XLM-R folder (then mean pooling). FILE.txt is UTF-8; every line is
one sentence, empty lines included, and OUT.npy holds one float32 row per line in input order
(a final newline does not start an extra sentence). The vectors equal
SentenceTransformer(DIR).encode(lines) within float32 rounding.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import os
import sys
import time

from absl import flags

# A private flag registry: the speech sub-command defines flags of the same names, and both
# modules may be imported by one process (tests, the dispatcher).
FLAGS = flags.FlagValues()
flags.DEFINE_string("encoder", None, "sentence-transformers or Hugging Face model folder.",
                    flag_values=FLAGS)
flags.DEFINE_string("input", None, "UTF-8 text file, one sentence per line.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Where to write the (lines, dim) float32 .npy file.",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Sentences per forward pass.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_enum("precision", "highest", ["highest", "high", "default"],
                  "Matmul precision on GPU/TPU; 'highest' matches PyTorch float32 (no effect "
                  "on CPU).", flag_values=FLAGS)
flags.DEFINE_integer("max_length", None, "Truncate at this many tokens instead of the model's "
                     "max_seq_length.", lower_bound=2, flag_values=FLAGS)
flags.DEFINE_bool("data_parallel", False, "Split each batch over all local devices.",
                  flag_values=FLAGS)

_PROGRESS_EVERY_S = 5.0


class UsageError(Exception):
  """Bad input given by the user: reported in one line, exit code 1."""


def read_sentences(path: str) -> list[str]:
  """Lines of a UTF-8 file (BOM and CR of CRLF dropped); a final newline ends the last line."""
  if not os.path.isfile(path):
    raise UsageError(f"--input {path}: no such file")
  with open(path, "rb") as stream:
    raw = stream.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = raw[:error.start].count(b"\n") + 1
    raise UsageError(f"--input {path}: not UTF-8 (line {line}: {error.reason})") from None
  if not text:
    return []
  # str.splitlines would also split on form feeds and U+2028 inside a sentence.
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _usage() -> str:
  return f"{__doc__.strip()}\n\nflags:\n{FLAGS.get_help()}"


def _progress_printer():
  last = [0.0]
  start = time.monotonic()

  def progress(done: int, total: int):
    now = time.monotonic()
    if done == total or now - last[0] >= _PROGRESS_EVERY_S:
      last[0] = now
      rate = done / max(now - start, 1e-9)
      print(f"embedded {done}/{total} sentences ({100 * done / max(total, 1):.0f}%, "
            f"{rate:.0f}/s)", file=sys.stderr, flush=True)

  return progress


def _embed(encoder: str, input_path: str, output_path: str) -> None:
  if not output_path.endswith(".npy"):
    raise UsageError(f"--output {output_path}: must end in .npy")
  if not os.path.isdir(encoder):
    raise UsageError(f"--encoder {encoder}: no such folder")
  sentences = read_sentences(input_path)

  import jax
  import numpy as np

  from clasp_jax.models import text_tower
  from clasp_jax.models.bert_checkpoint import CheckpointError

  try:
    tower = text_tower.load(encoder, precision=FLAGS.precision, max_length=FLAGS.max_length)
  except (CheckpointError, ValueError, OSError, KeyError) as error:
    raise UsageError(f"--encoder {encoder}: {error}") from None
  mesh = None
  if FLAGS.data_parallel:
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
  print(f"embedding {len(sentences)} sentences from {input_path} with {encoder} "
        f"(dim {tower.embedding_dim}, max {tower.max_length} tokens, "
        f"{jax.local_device_count() if mesh else 1} {jax.default_backend()} device(s))",
        file=sys.stderr, flush=True)
  embeddings = tower.embed(sentences, batch_size=FLAGS.batch_size, mesh=mesh,
                           progress=_progress_printer())
  output_dir = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(output_dir, exist_ok=True)
  # Written aside and renamed, so an interrupted run never leaves a truncated .npy behind.
  partial_path = output_path + ".partial.npy"
  np.save(partial_path, embeddings)
  os.replace(partial_path, output_path)
  print(f"wrote {output_path}: {embeddings.shape[0]} x {embeddings.shape[1]} float32",
        file=sys.stderr, flush=True)


def run(argv: list[str]) -> int:
  """Entry point of `python -m clasp_jax.embed text`; argv[0] is the program name."""
  if any(arg in ("-h", "--help", "-help", "--helpfull", "help") for arg in argv[1:]):
    print(_usage())
    return 0
  try:
    FLAGS.unparse_flags()
    extra = FLAGS(argv)[1:]
    if extra:
      raise UsageError(f"unexpected argument(s): {' '.join(extra)} (see --help)")
    missing = [name for name in ("encoder", "input", "output") if not FLAGS[name].value]
    if missing:
      raise UsageError(f"missing required flag(s): {', '.join('--' + name for name in missing)}"
                       " (see --help)")
    _embed(FLAGS.encoder, FLAGS.input, FLAGS.output)
  except flags.Error as error:
    print(f"error: {error} (see --help)", file=sys.stderr)
    return 2
  except UsageError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(run(sys.argv))
