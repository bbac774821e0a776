"""The authors' PyTorch fusion encoders, rebuilt from CLASP_REFERENCE.md (Pipeline 4).

Used as the reference in parity tests and benchmarks (needs the `torch` extra). Parameter
names follow theirs (`audio_seq.N`, `image_seq.N`, `mix_seq.N`; gated: `text_seq`,
`input_gate_text.0`, ...), so tests can map weights one to one.
"""

import torch
from torch import nn


def branch(in_dim: int) -> nn.Sequential:
  return nn.Sequential(
      nn.Linear(in_dim, 768), nn.BatchNorm1d(768), nn.ReLU(), nn.Dropout(0.15),
      nn.Linear(768, 576), nn.BatchNorm1d(576), nn.LeakyReLU(), nn.Dropout(0.1),
      nn.Linear(576, 768))


class ConcatFusion(nn.Module):

  def __init__(self, speech_dim: int = 1024, spectrogram_dim: int = 1000):
    super().__init__()
    self.audio_seq = branch(speech_dim)
    self.image_seq = branch(spectrogram_dim)
    self.mix_seq = nn.Sequential(
        nn.Linear(1536, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(),
        nn.Linear(1024, 800), nn.LeakyReLU(), nn.Linear(800, 768))

  def forward(self, speech, spectrogram):
    both = torch.cat([self.audio_seq(speech), self.image_seq(spectrogram)], dim=1)
    return self.mix_seq(both)


def gate(activation) -> nn.Sequential:
  return nn.Sequential(nn.Linear(768, 768), activation)


class GatedFusion(nn.Module):

  def __init__(self, speech_dim: int = 1024, spectrogram_dim: int = 1000):
    super().__init__()
    self.text_seq = branch(speech_dim)  # The authors' name for the speech branch.
    self.image_seq = branch(spectrogram_dim)
    self.input_gate_text, self.input_gate_image = gate(nn.Sigmoid()), gate(nn.Sigmoid())
    self.forget_gate_text, self.forget_gate_image = gate(nn.Sigmoid()), gate(nn.Sigmoid())
    self.tanh_text, self.tanh_image = gate(nn.Tanh()), gate(nn.Tanh())
    self.weight = nn.Sequential(nn.Linear(1536, 1536), nn.Softmax(dim=1))

  def forward(self, speech, spectrogram):
    x1 = self.text_seq(speech)
    x2 = self.image_seq(spectrogram)
    x1 = self.input_gate_text(x1) * self.tanh_text(x1) + self.forget_gate_text(x1) * x1
    x2 = self.input_gate_image(x2) * self.tanh_image(x2) + self.forget_gate_image(x2) * x2
    w = self.weight(torch.cat([x1, x2], dim=1))
    return w[:, :768] * x1 + w[:, 768:] * x2
