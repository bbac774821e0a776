"""sentence-transformers heads in JAX against the PyTorch modules, and head config parsing."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

from clasp_jax.models import bert
from clasp_jax.models import sentence_encoder

try:
  from sentence_transformers.sentence_transformer.modules import Dense, Pooling
except ImportError:  # sentence-transformers < 6
  from sentence_transformers.models import Dense, Pooling


def _right_padded_batch(seed: int = 0, batch: int = 5, length: int = 9, dim: int = 6):
  rng = np.random.default_rng(seed)
  tokens = rng.normal(size=(batch, length, dim)).astype(np.float32) * 3
  lengths = np.array([1, length, 4, 2, 7])[:batch]
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
  return tokens, mask


@pytest.mark.parametrize("modes", [("cls",), ("max",), ("mean",), ("mean_sqrt_len_tokens",),
                                   ("weightedmean",), ("lasttoken",), ("cls", "mean", "max")])
def test_pooling_matches_sentence_transformers(modes):
  tokens, mask = _right_padded_batch()
  reference = Pooling(tokens.shape[-1], pooling_mode=modes if len(modes) > 1 else modes[0])
  expected = reference({"token_embeddings": torch.from_numpy(tokens),
                        "attention_mask": torch.from_numpy(mask)})["sentence_embedding"]
  pooled = sentence_encoder.pool_tokens(jnp.asarray(tokens), jnp.asarray(mask), modes)
  np.testing.assert_allclose(np.asarray(pooled), expected.numpy(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("activation,out_features,use_residual",
                         [(name, 4, False) for name in sorted(sentence_encoder.DENSE_ACTIVATIONS)]
                         + [("Tanh", 6, True), ("Tanh", 4, True)])
def test_dense_matches_sentence_transformers(tmp_path, activation, out_features, use_residual):
  torch.manual_seed(0)
  activation_module = getattr(torch.nn, activation)()
  reference = Dense(6, out_features, activation_function=activation_module,
                    use_residual=use_residual)
  reference.save(str(tmp_path))
  with open(tmp_path / "config.json") as stream:
    spec = sentence_encoder._dense_spec(json.load(stream), "dense_2", str(tmp_path))
  assert spec.activation == activation and spec.use_residual == use_residual
  params = sentence_encoder.dense_params_from_folder(spec, str(tmp_path))
  vectors = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
  with torch.no_grad():
    expected = reference({"sentence_embedding": torch.from_numpy(vectors)})["sentence_embedding"]
  ours = sentence_encoder.DenseHead(spec).apply({"params": params}, jnp.asarray(vectors))
  np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=1e-6, rtol=1e-6)


def test_normalize_keeps_zero_vectors_finite():
  vectors = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(sentence_encoder.l2_normalize(vectors)),
                             [[0.6, 0.8], [0.0, 0.0]])


def test_legacy_and_new_pooling_configs_agree():
  legacy = {"word_embedding_dimension": 8, "pooling_mode_cls_token": True,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}
  # Legacy flags concatenate in sentence-transformers' fixed order, not in file order.
  assert sentence_encoder.pooling_modes_from_config(legacy) == ("cls", "max", "mean")
  assert sentence_encoder.pooling_modes_from_config({"pooling_mode": "cls"}) == ("cls",)
  assert sentence_encoder.pooling_modes_from_config({"pooling_mode_cls_token": False}) == ("mean",)
  with pytest.raises(ValueError, match="unsupported pooling"):
    sentence_encoder.pooling_modes_from_config({"pooling_mode": "attention"})


def test_unknown_dense_activation_is_refused(tmp_path):
  config = {"in_features": 4, "out_features": 4, "activation_function": "my_package.Swoosh"}
  with pytest.raises(ValueError, match="unsupported Dense activation"):
    sentence_encoder._dense_spec(config, "dense_2", str(tmp_path))


def test_unsupported_module_type_is_refused(tmp_path):
  (tmp_path / "modules.json").write_text(json.dumps([
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_LSTM", "type": "sentence_transformers.models.LSTM"}]))
  with pytest.raises(ValueError, match="unsupported module type"):
    sentence_encoder.read_sentence_transformers_folder(tmp_path)


def test_roberta_positions_skip_the_padding_index():
  config = bert.BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                           intermediate_size=16, max_position_embeddings=12, pad_token_id=1,
                           position_offset=2)
  input_ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 2, 1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(bert.position_ids_for(input_ids, config)),
                                [[2, 3, 4, 5, 1, 1], [2, 3, 1, 1, 1, 1]])
  assert config.max_tokens == 10


def test_unsupported_architectures_are_refused():
  base = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 16, "max_position_embeddings": 12}
  with pytest.raises(ValueError, match="unsupported model_type 'mpnet'"):
    bert.BertConfig.from_hf({**base, "model_type": "mpnet"})
  with pytest.raises(ValueError, match="position_embedding_type"):
    bert.BertConfig.from_hf({**base, "model_type": "bert",
                             "position_embedding_type": "relative_key"})


def test_top_layers_regex_does_not_confuse_layer_numbers():
  pattern = bert.top_layers_regex(12, 2)
  assert re.search(pattern, "text/transformer/encoder/layer_11/mlp/output/kernel")
  assert re.search(pattern, "encoder/layer_10/attention/query/bias")
  assert not re.search(pattern, "encoder/layer_1/attention/query/bias")
  assert not re.search(pattern, "myencoder/layer_10/attention/query/bias")
  with pytest.raises(ValueError):
    bert.top_layers_regex(12, 13)


def test_training_mode_applies_dropout_and_reaches_every_layer():
  config = bert.BertConfig(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2,
                           intermediate_size=32, max_position_embeddings=16)
  head = (sentence_encoder.PoolingSpec(("cls",)),
          sentence_encoder.DenseSpec("dense_2", 16, 8, True, "Tanh"), sentence_encoder.NormalizeSpec())
  model = sentence_encoder.SentenceEncoder(config, head)
  input_ids = jnp.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
  attention_mask = (input_ids != 0).astype(jnp.int32)
  params = model.init(jax.random.PRNGKey(0), input_ids, attention_mask)["params"]
  rngs = {"dropout": jax.random.PRNGKey(1)}
  frozen = model.apply({"params": params}, input_ids, attention_mask)
  training = model.apply({"params": params}, input_ids, attention_mask, deterministic=False,
                         rngs=rngs)
  assert frozen.shape == training.shape == (2, 8)
  assert not np.allclose(np.asarray(frozen), np.asarray(training))

  def loss(params):
    ztext = model.apply({"params": params}, input_ids, attention_mask, deterministic=False,
                        rngs=rngs)
    return (ztext[0] @ ztext[1]).sum()  # (d,) . (d,) -> ()

  grads = jax.grad(loss)(params)
  for path in (("transformer", "encoder", "layer_0", "attention", "query", "kernel"),
               ("transformer", "encoder", "layer_1", "mlp", "output", "kernel"),
               ("dense_2", "linear", "kernel")):
    leaf = grads
    for key in path:
      leaf = leaf[key]
    assert np.abs(np.asarray(leaf)).max() > 0, path
