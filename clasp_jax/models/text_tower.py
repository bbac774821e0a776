"""The text tower: a sentence-transformers model folder run in Flax.

  tower = text_tower.load("/models/LaBSE")
  ztext = text_tower.embed_texts(["a sentence", "une phrase"], tower)   # (2, 768) float32

`load()` reads the folder's transformer (BERT or XLM-R; safetensors or PyTorch .bin, loaded
with weights_only=True), its sentence-transformers head and its fast tokenizer. Sentences are
tokenised once, sorted by length and cut into batches padded to a few bucketed lengths, so the
jitted encoder compiles at most once per (rows, bucket) pair instead of once per batch.

For training, `tower.model.apply({"params": tower.params}, input_ids, attention_mask)` is the
pure function; `tower.pad_batch` makes its inputs at a fixed bucket length.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.common.mesh import DATA_AXIS
from clasp_jax.models import compilation
from clasp_jax.models import bert
from clasp_jax.models import bert_checkpoint
from clasp_jax.models import hf_checkpoint
from clasp_jax.models import sentence_encoder

DEFAULT_BATCH_SIZE = 64
SMALLEST_BUCKET = 16


def bucket_lengths(max_length: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
  """Padded lengths 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... up to and including `max_length`.

  Four steps per doubling: every padded token costs as much as a real one (sentence-transformers
  pads each batch to its own longest sentence), so the ladder is fine enough to keep the padding
  of a length-sorted batch near a tenth on average, while the number of compiled shapes stays
  logarithmic in the maximum length (21 up to 512 tokens).
  """
  lengths = {max_length}
  length = smallest
  while length < max_length:
    lengths.add(length)
    length += max(4, (1 << (length.bit_length() - 1)) // 4)
  return tuple(sorted(lengths))


def padded_rows(rows: int, batch_size: int, row_multiple: int = 1) -> int:
  """Rows of a batch after padding: full batches stay, the last one rounds up to a power of 2.

  Keeps the number of distinct batch shapes at log2(batch_size) + 1 for any input size.
  """
  padded = min(batch_size, 1 << max(rows - 1, 0).bit_length())
  return -(-padded // row_multiple) * row_multiple


def _apply_encoder(model: sentence_encoder.SentenceEncoder, params: Any, input_ids: jax.Array,
                   attention_mask: jax.Array) -> jax.Array:
  return model.apply({"params": params}, input_ids, attention_mask)


@functools.cache
def batch_encoder():
  """The jitted encoder forward pass, (model, params, ids, mask) -> sentence vectors.

  One for the process, so that every load of the same architecture shares its compilations;
  made on first use because its XLA options depend on the backend.
  """
  return compilation.jit_transformer_inference(_apply_encoder, static_argnums=0)


@dataclasses.dataclass
class TextTower:
  """A loaded sentence encoder: Flax module, its parameters and its tokenizer."""

  model: sentence_encoder.SentenceEncoder
  params: Any
  tokenizer: Any
  max_length: int
  buckets: tuple[int, ...]
  source: str = ""

  @property
  def embedding_dim(self) -> int:
    return self.model.embedding_dim

  @property
  def pad_token_id(self) -> int:
    return int(self.tokenizer.pad_token_id)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids with special tokens, truncated at `max_length` (sentence-transformers' rule)."""
    if not texts:
      return []
    encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                             padding=False, return_attention_mask=False,
                             return_token_type_ids=False)
    return encoded["input_ids"]

  def bucket_for(self, length: int) -> int:
    for bucket in self.buckets:
      if bucket >= length:
        return bucket
    raise ValueError(f"{length} tokens exceed the maximum length {self.max_length}")

  def pad_batch(self, token_ids: Sequence[Sequence[int]], length: int | None = None,
                rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to (rows, length) int32 ids and mask; default length is the fitting bucket.

    Filler rows (beyond len(token_ids)) attend to their first position only, so every row of
    the batch has a finite embedding.
    """
    rows = len(token_ids) if rows is None else rows
    longest = max((len(ids) for ids in token_ids), default=1)
    length = self.bucket_for(longest) if length is None else length
    if longest > length or len(token_ids) > rows:
      raise ValueError(f"batch of {len(token_ids)} x {longest} tokens does not fit "
                       f"({rows}, {length})")
    input_ids = np.full((rows, length), self.pad_token_id, dtype=np.int32)
    attention_mask = np.zeros((rows, length), dtype=np.int32)
    for row, ids in enumerate(token_ids):
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
    attention_mask[len(token_ids):, 0] = 1
    return input_ids, attention_mask

  def batches(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
              row_multiple: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (row indices into `texts`, input_ids, attention_mask), longest sentences first."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    token_ids = self.tokenize(texts)
    # Sorting by length keeps sentences of similar length together, so little is padded.
    order = np.argsort([-len(ids) for ids in token_ids], kind="stable")
    for start in range(0, len(order), batch_size):
      indices = order[start:start + batch_size]
      input_ids, attention_mask = self.pad_batch(
          [token_ids[index] for index in indices],
          rows=padded_rows(len(indices), batch_size, row_multiple))
      yield indices, input_ids, attention_mask

  def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
            mesh: jax.sharding.Mesh | None = None, data_axis: str = DATA_AXIS,
            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(len(texts), embedding_dim) float32 sentence embeddings, rows in input order.

    With a `mesh`, each batch is split over its `data_axis` (parameters replicated); batch rows
    are then rounded up to a multiple of that axis' size.
    """
    embeddings = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
    params, put_batch, row_multiple = self.params, jnp.asarray, 1
    if mesh is not None:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      by_row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis))
      params = jax.device_put(self.params, replicated)
      put_batch = lambda array: jax.device_put(array, by_row)
      row_multiple = mesh.shape[data_axis]
    done = 0
    in_flight: collections.deque = collections.deque()

    def collect():
      nonlocal done
      indices, batch_embeddings = in_flight.popleft()
      embeddings[indices] = np.asarray(batch_embeddings)[:len(indices)]
      done += len(indices)
      if progress is not None:
        progress(done, len(texts))

    for indices, input_ids, attention_mask in self.batches(texts, batch_size, row_multiple):
      # Dispatch is asynchronous: the next batch is padded and sent while this one runs.
      encoded = batch_encoder()(self.model, params, put_batch(input_ids),
                                put_batch(attention_mask))
      in_flight.append((indices, encoded))
      if len(in_flight) > 2:
        collect()
    while in_flight:
      collect()
    return embeddings


def _load_tokenizer(folder: str, do_lower_case: bool):
  import transformers  # Heavy import, only needed once a tower is loaded.

  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(f"{folder}: needs a fast (tokenizers) tokenizer, got "
                     f"{type(tokenizer).__name__}")
  if do_lower_case:
    # sentence-transformers lowercases by prepending a Lowercase normalizer when the
    # tokenizer's own normalizer does not already have one.
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    has_lowercase = isinstance(current, normalizers.Lowercase) or (
        isinstance(current, normalizers.Sequence)
        and any(isinstance(step, normalizers.Lowercase) for step in current))
    if not has_lowercase:
      steps = [normalizers.Lowercase()]
      if isinstance(current, normalizers.Sequence):
        steps += list(current)
      elif current is not None:
        steps.append(current)
      backend.normalizer = normalizers.Sequence(steps)
  return tokenizer


def _resolve_max_length(folder: sentence_encoder.SentenceTransformerFolder, tokenizer,
                        config: bert.BertConfig, override: int | None) -> int:
  if override is not None:
    max_length = override
  elif folder.max_seq_length is not None:
    max_length = int(folder.max_seq_length)
  else:
    # sentence-transformers' rule without a max_seq_length: the tokenizer's limit, capped by
    # the position table.
    max_length = min(int(tokenizer.model_max_length), config.max_position_embeddings)
  if max_length > config.max_tokens:
    logging.warning("max length %d exceeds the %d positions of %s; truncating at %d",
                    max_length, config.max_tokens, folder.transformer_dir, config.max_tokens)
    max_length = config.max_tokens
  if max_length < 2:
    raise ValueError(f"max length {max_length} leaves no room for tokens")
  return max_length


def _check_head_dims(model: sentence_encoder.SentenceEncoder, source: str) -> None:
  dim = model.transformer.hidden_size
  for step in model.head:
    if isinstance(step, sentence_encoder.PoolingSpec):
      dim = len(step.modes) * model.transformer.hidden_size
    elif isinstance(step, sentence_encoder.DenseSpec):
      if step.in_features != dim:
        raise ValueError(f"{source}: {step.name} expects {step.in_features} inputs but the "
                         f"previous module gives {dim}")
      dim = step.out_features


def _check_param_tree(model: sentence_encoder.SentenceEncoder, params: Any, source: str) -> None:
  """The converted tree must be exactly what the Flax module would create."""
  dummy = jnp.zeros((1, 2), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, dummy + 1))["params"]
  expected_shapes = {jax.tree_util.keystr(path): leaf.shape
                     for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  actual_shapes = {jax.tree_util.keystr(path): np.shape(leaf)
                   for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  if expected_shapes != actual_shapes:
    differing = sorted(set(expected_shapes.items()) ^ set(actual_shapes.items()))
    raise hf_checkpoint.CheckpointError(f"{source}: converted parameters differ from the Flax "
                                        f"model at {differing[:8]}")


def _check_folder(path: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such model folder")
  if not any(os.path.isfile(os.path.join(path, name)) for name in ("modules.json", "config.json")):
    raise FileNotFoundError(f"{path}: not a sentence-transformers or Hugging Face model folder "
                            "(no modules.json or config.json)")


def _encoder_module(path: str, folder: sentence_encoder.SentenceTransformerFolder,
                    tensor_names, precision: str, dtype: Any) -> sentence_encoder.SentenceEncoder:
  """The Flax module of a folder; `tensor_names` (names or a tensor dict) says if it has a pooler."""
  config = bert.BertConfig.from_hf(hf_checkpoint.read_config(folder.transformer_dir),
                                   with_pooler=bert_checkpoint.has_pooler(tensor_names),
                                   precision=precision, dtype=dtype)
  model = sentence_encoder.SentenceEncoder(config, folder.head)
  _check_head_dims(model, path)
  return model


def module_from_folder(path: str | os.PathLike, *, precision: str = "highest",
                       dtype: Any = jnp.float32) -> sentence_encoder.SentenceEncoder:
  """The Flax module `load(path).model` would be, without reading the transformer's weights.

  Reads the folder's configs, its small Dense head files and the transformer's tensor names
  (safetensors header or shard index), so that a model can be built and shaped from its
  config alone and its weights read once, by `load`.
  """
  path = os.fspath(path)
  _check_folder(path)
  folder = sentence_encoder.read_sentence_transformers_folder(path)
  names = hf_checkpoint.tensor_names(folder.transformer_dir)
  return _encoder_module(path, folder, names, precision, dtype)


def load(path: str | os.PathLike, *, precision: str = "highest", dtype: Any = jnp.float32,
         max_length: int | None = None, ignore_unused: Sequence[str] = ()) -> TextTower:
  """Loads a sentence-transformers (or plain Hugging Face BERT / XLM-R) folder.

  Args:
    path: folder with modules.json (sentence-transformers) or config.json (Hugging Face).
    precision: matmul precision, "highest" (float32 parity with PyTorch) or "default".
    dtype: activation dtype of the transformer (parameters stay float32).
    max_length: overrides the folder's max_seq_length (tokens, special tokens included).
    ignore_unused: regexes of checkpoint tensors allowed to stay unused (e.g. r"^lm_head\\.").

  Raises:
    hf_checkpoint.CheckpointError: missing, unused or mis-shaped tensors.
    ValueError / OSError: folder layouts or configurations this tower does not implement.
  """
  path = os.fspath(path)
  _check_folder(path)
  folder = sentence_encoder.read_sentence_transformers_folder(path)
  tensors = hf_checkpoint.read_weights(folder.transformer_dir)
  model = _encoder_module(path, folder, tensors, precision, dtype)
  transformer_params = bert_checkpoint.bert_params_from_hf(
      tensors, model.transformer, ignore_unused=ignore_unused, source=folder.transformer_dir)
  del tensors
  params = {"transformer": transformer_params, **folder.head_params}
  _check_param_tree(model, params, path)
  tokenizer = _load_tokenizer(folder.transformer_dir, folder.do_lower_case)
  resolved_length = _resolve_max_length(folder, tokenizer, model.transformer, max_length)
  return TextTower(model=model, params=jax.device_put(params), tokenizer=tokenizer,
                   max_length=resolved_length, buckets=bucket_lengths(resolved_length),
                   source=path)


def embed_texts(texts: Sequence[str], encoder: str | os.PathLike | TextTower,
                batch_size: int = DEFAULT_BATCH_SIZE, **embed_kwargs) -> np.ndarray:
  """Sentence embeddings (len(texts), dim) float32 in input order; `encoder` is a folder or tower.

  Same vectors as `SentenceTransformer(folder).encode(texts)` (within float32 rounding).
  """
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings, not one string")
  tower = encoder if isinstance(encoder, TextTower) else load(encoder)
  return tower.embed(texts, batch_size=batch_size, **embed_kwargs)


def trainable_top_layers_regex(tower: TextTower, num_top: int, include_head: bool = True) -> str:
  """Regex for the trainer's freeze schedule: the top `num_top` transformer layers (+ Dense head).

  Matches '/'-joined parameter paths with re.search, so it also works when the tower's tree is
  nested under a prefix such as 'text/'.
  """
  pattern = bert.top_layers_regex(tower.model.transformer.num_layers, num_top,
                                  prefix="transformer/encoder/")
  dense_names = [step.name for step in tower.model.head
                 if isinstance(step, sentence_encoder.DenseSpec)]
  if include_head and dense_names:
    pattern = f"{pattern}|(?:^|/)(?:{'|'.join(dense_names)})/"
  return pattern


def load_params(config) -> Any:
  """Pretrained `text_encoder` parameters for a training config (None: precomputed text).

  Reads `config.model.text.encoder` when `config.model.text.kind` is 'encoder'. The tower
  module itself comes from `module_from_folder`, so the weights are read once, here.
  """
  text = config.model.text
  if text.kind != "encoder":
    return None
  return load(text.encoder, max_length=text.max_length or None).params
