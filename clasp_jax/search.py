"""Searches an audio archive by text in any language with a trained CLASP model.

  python -m clasp_jax.search index --workdir=W --audio=DIR --index=I [--transcripts=FILE.tsv]
  python -m clasp_jax.search query --index=I "text in any language" -k 10 [--json]
  python -m clasp_jax.search query --index=I --audio_query=FILE.wav
  python -m clasp_jax.search serve --index=I [--port=8080] [--host=127.0.0.1]

`index` embeds every audio file under DIR with the model's speech tower (again: only new and
changed files); `query` and `serve` embed queries with the model the index records. Each
sub-command lives in clasp_jax/inference/archive_search.py; `--help` after it lists its flags.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import sys

from clasp_jax.common import cli

SUBCOMMANDS = ("index", "query", "serve")


def _command(name: str):
  from clasp_jax.inference import archive_search  # The model code loads only for a command.
  return archive_search.SUBCOMMANDS[name]


def main(argv: list[str]) -> int:
  return cli.dispatch(argv, program="search", doc=__doc__, subcommands={
      name: (lambda name=name: _command(name)) for name in SUBCOMMANDS})


if __name__ == "__main__":
  sys.exit(main(sys.argv))
