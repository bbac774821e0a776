"""The auxiliary CTC loss against PyTorch's ctc_loss (mean reduction, zero_infinity)."""

import jax
import numpy as np
import pytest

from clasp_jax.trainer import losses

torch = pytest.importorskip("torch")

VOCAB, FRAMES, MAX_LABELS = 6, 12, 5


def _case(seed=0):
  rng = np.random.RandomState(seed)
  logits = rng.randn(5, FRAMES, VOCAB).astype(np.float32) * 2
  frame_counts = np.array([12, 9, 4, 7, 3])
  label_counts = np.array([5, 3, 4, 0, 2])
  labels = rng.randint(1, VOCAB, size=(5, MAX_LABELS))
  labels[2, :4] = [2, 2, 3, 3]  # 4 frames, 4 labels + 2 repeats: cannot be aligned
  labels[4, :2] = [4, 4]  # 3 frames for a repeated pair: just alignable (4, blank, 4)
  frame_mask = np.arange(FRAMES)[None] < frame_counts[:, None]
  label_mask = np.arange(MAX_LABELS)[None] < label_counts[:, None]
  labels = np.where(label_mask, labels, 0)
  return logits, frame_mask, labels, label_mask, frame_counts, label_counts


def test_ctc_loss_matches_pytorch():
  logits, frame_mask, labels, label_mask, frame_counts, label_counts = _case()
  got = jax.jit(losses.ctc_loss)(logits, frame_mask, labels, label_mask)
  log_probs = torch.log_softmax(torch.tensor(logits), dim=-1).transpose(0, 1)  # (T, N, C)
  want = torch.nn.functional.ctc_loss(
      log_probs, torch.tensor(labels), torch.tensor(frame_counts), torch.tensor(label_counts),
      blank=0, reduction="mean", zero_infinity=True)
  np.testing.assert_allclose(got, want.item(), rtol=1e-5)
  per_clip = torch.nn.functional.ctc_loss(
      log_probs, torch.tensor(labels), torch.tensor(frame_counts), torch.tensor(label_counts),
      blank=0, reduction="none")
  assert np.isinf(per_clip[2].item()) and np.isfinite(per_clip[4].item())


def test_padded_frames_and_labels_do_not_matter():
  logits, frame_mask, labels, label_mask, _, _ = _case()
  scrambled_logits = np.where(frame_mask[..., None], logits, 50.0).astype(np.float32)
  scrambled_labels = np.where(label_mask, labels, 3)
  np.testing.assert_allclose(losses.ctc_loss(scrambled_logits, frame_mask, scrambled_labels,
                                             label_mask),
                             losses.ctc_loss(logits, frame_mask, labels, label_mask), rtol=1e-6)
  gradient = jax.grad(losses.ctc_loss)(logits, frame_mask, labels, label_mask)
  assert np.isfinite(gradient).all()
  assert not np.abs(gradient[2]).any()  # the clip that cannot be aligned adds nothing
