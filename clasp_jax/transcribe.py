"""`python -m clasp_jax.transcribe`: greedy CTC transcripts with a HuBERT / wav2vec2 CTC checkpoint.

  python -m clasp_jax.transcribe --encoder=HF_DIR --input=PATH [--output=OUT.tsv]

One line per file, in input order, `PATH<TAB>TRANSCRIPT`, on stdout (or in --output).
This is the first stage of CLASP's ASR-cascade baseline (transcript -> LaBSE -> cosine).
PATH and audio handling are those of `python -m clasp_jax.embed speech`; HF_DIR must hold a
`*ForCTC` checkpoint and its tokenizer (vocab.json, tokenizer_config.json). The Python API is
`clasp_jax.inference.speech.transcribe`.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import os
import sys

from clasp_jax.common import cli
from clasp_jax.inference import speech
from clasp_jax.inference import speech_embedding

FLAGS = cli.FlagValues()
speech_embedding.define_speech_flags(FLAGS)
FLAGS.DEFINE_string("output", None, "Write the PATH<TAB>TRANSCRIPT lines here instead of "
                    "stdout.")


def main() -> None:
  checkpoint, paths, options = speech_embedding.load_speech_inputs(FLAGS)
  result = speech.transcribe(checkpoint, paths,
                             progress=cli.Progress(len(paths), "files", verb="transcribed"),
                             **options)
  speech_embedding.check_failures(result.failures, FLAGS.skip_bad)
  lines = [f"{path}\t{text}\n" for path, text in zip(result.paths, result.transcripts)]
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w", encoding="utf-8") as output_file:
      output_file.writelines(lines)
    print(f"wrote {len(lines)} transcripts to {FLAGS.output}", file=sys.stderr)
  else:
    sys.stdout.writelines(lines)


def run(argv: list[str] | None = None) -> int:
  """Entry point of `python -m clasp_jax.transcribe`; returns the exit code."""
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__, required=("encoder", "input"),
                 errors=speech_embedding.ERRORS)


if __name__ == "__main__":
  sys.exit(run())
