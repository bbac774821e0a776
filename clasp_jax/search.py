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


def main(argv: list[str]) -> int:
  if len(argv) >= 2 and argv[1] in SUBCOMMANDS:
    from clasp_jax.inference import archive_search
    # The sub-command sees itself as the program, so its flags parse as usual.
    return archive_search.SUBCOMMANDS[argv[1]]([f"{argv[0]} {argv[1]}"] + argv[2:])
  if len(argv) >= 2 and argv[1] in cli.HELP_ARGUMENTS:
    print(f"{__doc__.strip()}\n\nusage: python -m clasp_jax.search {{{','.join(SUBCOMMANDS)}}} "
          "[flags]")
    return 0
  given = f", got {argv[1]!r}" if len(argv) >= 2 else ""
  return cli.report_error(f"expected a sub-command, one of {', '.join(SUBCOMMANDS)}{given}",
                          usage=True)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
