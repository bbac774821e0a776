"""Embeds a text file, one sentence per line, with a sentence-transformers encoder in Flax.

  python -m clasp_jax.embed text --encoder=DIR --input=FILE.txt --output=OUT.npy

DIR is a sentence-transformers folder (LaBSE, all-MiniLM-L6-v2, an XLM-R paraphrase model) or
a plain Hugging Face BERT / XLM-R folder (then mean pooling). FILE.txt is UTF-8; every line is
one sentence, empty lines included, and OUT.npy holds one float32 row per line in input order
(a final newline does not start an extra sentence). The vectors equal
SentenceTransformer(DIR).encode(lines) within float32 rounding. --text_rule prepares each line
first, e.g. as the authors prepared Common Voice sentences:

  python -m clasp_jax.embed text --encoder=DIR --input=cv_sentences.txt --output=OUT.npy \
      --text_rule=lowercase_no_punctuation
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import os
import sys

from clasp_jax.common import cli

FLAGS = cli.FlagValues()
FLAGS.DEFINE_string("encoder", None, "sentence-transformers or Hugging Face model folder.")
FLAGS.DEFINE_string("input", None, "UTF-8 text file, one sentence per line.")
cli.define_npy_output(FLAGS, "lines")
FLAGS.DEFINE_integer("batch_size", 64, "Sentences per forward pass.", lower_bound=1)
FLAGS.DEFINE_enum("precision", "highest", ["highest", "high", "default"],
                  "Matmul precision on GPU/TPU; 'highest' matches PyTorch float32 (no effect "
                  "on CPU).")
FLAGS.DEFINE_integer("max_length", None, "Truncate at this many tokens instead of the model's "
                     "max_seq_length.", lower_bound=2)
FLAGS.DEFINE_bool("data_parallel", False, "Split each batch over all local devices.")
# Kept in step with clasp_jax.data.text_prep.RULES (not imported here: it would load before
# the flags are parsed for nothing).
FLAGS.DEFINE_enum("text_rule", "as_is", ["as_is", "lowercase", "lowercase_no_punctuation"],
                  "Prepare every line first: as_is, lowercase, or lowercase_no_punctuation "
                  "(the authors' preparation of Common Voice sentences).")


def read_sentences(path: str) -> list[str]:
  """Lines of a UTF-8 file (BOM and CR of CRLF dropped); a final newline ends the last line."""
  if not os.path.isfile(path):
    raise cli.UsageError(f"--input {path}: no such file")
  with open(path, "rb") as stream:
    raw = stream.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = raw[:error.start].count(b"\n") + 1
    raise cli.UsageError(f"--input {path}: not UTF-8 (line {line}: {error.reason})") from None
  if not text:
    return []
  # str.splitlines would also split on form feeds and U+2028 inside a sentence.
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def main() -> None:
  cli.npy_output(FLAGS)
  if not os.path.isdir(FLAGS.encoder):
    raise cli.UsageError(f"--encoder {FLAGS.encoder}: no such folder")
  from clasp_jax.data import text_prep
  sentences = [text_prep.prepare(sentence, FLAGS.text_rule)
               for sentence in read_sentences(FLAGS.input)]

  # Imported after the checks, so that bad input is reported before JAX starts.
  import jax  # pylint: disable=g-import-not-at-top

  from clasp_jax.common import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import text_tower  # pylint: disable=g-import-not-at-top

  try:
    tower = text_tower.load(FLAGS.encoder, precision=FLAGS.precision, max_length=FLAGS.max_length)
  except (hf_checkpoint.CheckpointError, ValueError, OSError, KeyError) as error:
    raise cli.UsageError(f"--encoder {FLAGS.encoder}: {error}") from None
  mesh = mesh_lib.data_mesh(jax.local_devices()) if FLAGS.data_parallel else None
  print(f"embedding {len(sentences)} sentences from {FLAGS.input} with {FLAGS.encoder} "
        f"(dim {tower.embedding_dim}, max {tower.max_length} tokens, "
        f"{mesh.size if mesh else 1} {jax.default_backend()} device(s))",
        file=sys.stderr, flush=True)
  embeddings = tower.embed(sentences, batch_size=FLAGS.batch_size, mesh=mesh,
                           progress=cli.Progress(len(sentences), "sentences", verb="embedded"))
  cli.save_npy(FLAGS.output, embeddings)
  print(f"wrote {FLAGS.output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32",
        file=sys.stderr, flush=True)


def run(argv: list[str] | None = None) -> int:
  """Entry point of `python -m clasp_jax.embed text`; argv[0] is the program name."""
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__,
                 required=("encoder", "input", "output"))


if __name__ == "__main__":
  sys.exit(run())
