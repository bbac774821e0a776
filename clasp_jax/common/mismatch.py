"""One wording for weights that do not fit a model, wherever weights are matched to one.

Hugging Face checkpoints (models/hf_checkpoint.py), pretrained towers placed into a train state
(trainer/state.py) and another run's weights (trainer/init_from.py) all report what is missing,
what is left over and what has another shape, in the same terms.
"""

from __future__ import annotations

from typing import Sequence

LISTED = 8  # Names shown per kind of problem; the count covers the rest.


def listing(items: Sequence[str], separator: str = ", ") -> str:
  shown = separator.join(items[:LISTED])
  return shown + (f"{separator}... ({len(items)} in all)" if len(items) > LISTED else "")


def problems(missing: Sequence[str] = (), unused: Sequence[str] = (),
             mismatched: Sequence[str] = (), *, unused_word: str = "unused") -> list[str]:
  """'N missing tensor(s): a, b', 'N unused ...', 'N shape mismatch(es): ...'; [] when none."""
  found = []
  if missing:
    found.append(f"{len(missing)} missing tensor(s): {listing(missing)}")
  if unused:
    found.append(f"{len(unused)} {unused_word} tensor(s): {listing(unused)}")
  if mismatched:
    found.append(f"{len(mismatched)} shape mismatch(es): {listing(mismatched, '; ')}")
  return found
