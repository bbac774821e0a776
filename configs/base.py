r"""CLASP fusion-encoder training: speech features -> fusion encoder, aligned to text embeddings.

Embedded default: trains offline on generated `synthetic_features` (a few minutes on 2 CPU
cores) and reports retrieval metrics on its validation split:

  python -m clasp_jax.train --config=configs/base.py --workdir=/tmp/clasp

Paper recipe (CLASP_REFERENCE.md, Pipeline 4-6): precomputed HuBERT-large (1024-d) and
spectrogram (1000-d) features aligned to LaBSE (768-d), concat fusion, the paper's fixed logit
scale exp(log 0.07), Adam 5e-6, batch 32, StepLR every 100 epochs x 0.4, up to 400 epochs,
early stopping on validation loss with patience 10 (evaluated once per epoch). FEATURES names
a folder with train/ validation/ test/ feature splits (see clasp_jax/data/features.py):

  python -m clasp_jax.train --config=configs/base.py:paper,features=/data/clasp_features \
      --workdir=/tmp/clasp_paper

Small smoke-test size (used by the tests):

  python -m clasp_jax.train --config=configs/base.py:tiny --workdir=/tmp/clasp_tiny

Any field can be overridden: --config.batch_size=512 --config.loss.kind=sigmoid.
"""

import ml_collections

from clasp_jax.common.config_args import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, paper=False, tiny=False, features="", fusion="concat", mode="joint")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.kind = "synthetic_features"
  config.data.directory = ""
  config.data.seed = 0
  config.data.num_train = 32_768
  config.data.num_validation = 1_024
  config.data.num_test = 1_024
  config.data.noise = 2.0
  config.data.dims = ml_collections.ConfigDict({"speech": 1024, "spectrogram": 1000, "text": 768})
  config.data.prefetch = 2

  config.model = ml_collections.ConfigDict()
  config.model.fusion = arg.fusion  # 'concat' | 'gated'
  config.model.mode = arg.mode  # 'joint' | 'speech' | 'spectrogram'
  config.model.embed_dim = 768
  config.model.branch_hidden = (768, 576)
  config.model.branch_dropout = (0.15, 0.1)
  config.model.fusion_hidden = (1024, 800)
  # Matmul precision on GPU/TPU: 'highest' computes as PyTorch's float32 does (the fusion
  # encoder is small, so it costs little); 'default' rounds inputs to tf32/bf16.
  config.model.precision = "highest"

  # Text tower: '' uses the precomputed text embeddings of the data (the paper: LaBSE, frozen).
  # A sentence-transformers folder runs that encoder on the data's sentences instead, frozen
  # but for its top `trainable_top_layers` layers (and Dense head), truncating at max_length.
  config.text = ml_collections.ConfigDict()
  config.text.encoder = ""
  config.text.trainable_top_layers = 0
  config.text.max_length = 64

  config.loss = ml_collections.ConfigDict()
  config.loss.kind = "softmax"  # 'softmax' (InfoNCE) | 'sigmoid' (SigLIP)
  config.loss.learn_scale = True
  config.loss.scale_init = 1 / 0.07
  config.loss.max_scale = 100.0
  config.loss.bias_init = -10.0  # sigmoid only

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # 'adam' | 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.grad_clip_norm = 1.0  # 0 disables clipping.

  config.schedule = ml_collections.ConfigDict()
  config.schedule.kind = "warmup_cosine"  # 'constant' | 'warmup_cosine' | 'step'
  config.schedule.warmup_steps = 100
  config.schedule.final_fraction = 0.01  # warmup_cosine: end at this fraction of the peak.
  config.schedule.step_epochs = 100  # step: decay every this many epochs ...
  config.schedule.gamma = 0.4  # ... by this factor (the paper's StepLR).

  # Parameters whose '/'-joined path matches this regex are not updated ('' freezes none).
  config.frozen_params = ""

  config.batch_size = 128  # Global, over all devices and processes.
  config.eval_batch_size = 128
  config.total_steps = 800
  config.num_epochs = 0  # When > 0, overrides total_steps.
  config.log_every_steps = 100
  config.eval_every_steps = 200  # 0 evaluates once per epoch.
  config.checkpoint_every_steps = 400
  config.keep_checkpoints = 2
  config.max_nonfinite_steps = 10  # Stop after this many consecutive non-finite steps.

  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.metric = "val/loss"
  config.early_stopping.mode = "min"
  config.early_stopping.patience = 0  # Evaluations without improvement; 0 disables.

  # Retrieval evaluators run at each evaluation; results are logged as '<name>/<metric>'.
  config.evals = ml_collections.ConfigDict()
  config.evals.val = ml_collections.ConfigDict({"type": "retrieval", "split": "validation"})

  if arg.paper:
    config.data.kind = "features"
    config.data.directory = arg.features
    config.loss.learn_scale = False
    config.loss.scale_init = 0.07  # exp(log 0.07): the paper's fixed scale, kept for fidelity.
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 5e-6
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 0.0
    config.schedule.kind = "step"
    config.batch_size = 32
    config.eval_batch_size = 16
    config.num_epochs = 400
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2_000
    config.log_every_steps = 200
    config.early_stopping.patience = 10
  elif arg.features:
    config.data.kind = "features"
    config.data.directory = arg.features

  if arg.tiny:
    config.data.num_train = 512
    config.data.num_validation = 128
    config.data.num_test = 128
    config.data.dims = ml_collections.ConfigDict({"speech": 24, "spectrogram": 20, "text": 16})
    config.data.noise = 0.5
    config.model.embed_dim = 16
    config.model.branch_hidden = (32, 24)
    config.model.fusion_hidden = (32, 24)
    config.batch_size = 32
    config.eval_batch_size = 32
    config.total_steps = 60
    config.schedule.warmup_steps = 5
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
  return config
