"""The tiny audio-mode training recipe the tests share: the tone corpus (helpers/corpora.py)
with a LaBSE-shaped text tower (helpers/checkpoints.py), which learns in a few dozen steps."""

from configs import base


def audio_config(dataset: str, encoder: str, *, total_steps: int = 24):
  """Audio-mode CLASP on `dataset` with the sentence encoder folder `encoder`; evaluates and
  checkpoints every `total_steps // 2` steps."""
  config = base.get_config("tiny,speech=audio")
  config.data.kind = "audio"
  config.data.datasets = dataset
  config.data.max_duration_s = 1.0
  config.data.length_buckets_s = (0.5,)
  config.model.text.kind = "encoder"
  config.model.text.encoder = encoder
  config.model.text.max_length = 16
  config.batch_size = config.eval_batch_size = 16
  config.total_steps = total_steps
  config.schedule.warmup_steps = 2
  config.optimizer.learning_rate = 3e-3
  config.log_every_steps = 4
  config.eval_every_steps = config.checkpoint_every_steps = total_steps // 2
  return config
