"""Per-process shards, exact resumption, shaping and global batches of the input pipeline."""

import json

import jax
import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from clasp_jax.data.sources import manifest
from clasp_jax.data import pipeline
from clasp_jax.data import reader
from clasp_jax.data import tfds_builder
from clasp_jax.data.sampling import EpochSampler

tfds.disable_progress_bar()
NUM_TRAIN = 48


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
  """48 training clips of 0.2 to 1.6 s (distinct tones) in a built manifest dataset."""
  root = tmp_path_factory.mktemp("pipeline")
  rows = []
  for number in range(NUM_TRAIN):
    seconds = 0.2 + 0.03 * number
    time = np.arange(int(seconds * 16000)) / 16000
    audio = (0.2 + 0.01 * number) * np.sin(2 * np.pi * (150 + 10 * number) * time)
    soundfile.write(root / f"{number}.wav", audio.astype(np.float32), 16000)
    rows.append({"audio": f"{number}.wav", "text": f"Utterance {number} of the corpus.",
                 "language": "en", "category": f"c{number % 3}", "split": "train"})
  (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  options = tfds_builder.BuildOptions(name="pipeline", kind="manifest", num_workers=2)
  dataset_dir = tfds_builder.build_dataset(manifest.read_examples(root / "m.jsonl"),
                                           str(root / "data"), options)
  return reader.open_split(dataset_dir, "train")


class RecordingSource:
  """A real split that remembers which indices were read (to check per-process reads)."""

  def __init__(self, split):
    self.split = split
    self.lengths = split.lengths
    self.read_indices = set()

  def __len__(self):
    return len(self.split)

  def read(self, indices):
    self.read_indices.update(int(i) for i in indices)
    return self.split.read(indices)


CONFIGS = {
    "plain": pipeline.PipelineConfig(global_batch_size=8, max_duration_s=1.5, seed=4),
    "bucketed_random_crop": pipeline.PipelineConfig(
        global_batch_size=8, max_duration_s=1.5, seed=4, random_crop=True,
        length_buckets_s=(0.5, 1.0), bucket_window=3, peak_normalize=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_processes_read_disjoint_shards_that_cover_the_split(train_split, name):
  config = CONFIGS[name]
  processes = [pipeline.InputPipeline(RecordingSource(train_split), config, process_index=p,
                                      process_count=2) for p in range(2)]
  steps = processes[0].steps_per_epoch
  assert steps == NUM_TRAIN // 8
  ids = [[], []]
  for p, process in enumerate(processes):
    for batch in process.iterate(0, steps):
      assert batch.arrays["audio"].shape[0] == 4  # the local half of the global batch
      ids[p] += list(batch.host["id"])
  assert not set(ids[0]) & set(ids[1])
  assert len(ids[0]) == len(set(ids[0])) == NUM_TRAIN // 2
  all_ids = {record["id"] for record in train_split.read(range(NUM_TRAIN))}
  assert set(ids[0]) | set(ids[1]) == all_ids
  # Each process decoded only its own shard.
  assert not processes[0].source.read_indices & processes[1].source.read_indices
  # Both processes pad every step to the same length (the global batch's).
  for step in range(steps):
    assert processes[0].pad_length(step) == processes[1].pad_length(step)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("restart_step", [3, 7])
def test_restart_at_step_k_continues_the_uninterrupted_sequence(train_split, name,
                                                                restart_step):
  config = CONFIGS[name]
  total_steps = 10  # more than one epoch (6 steps)
  uninterrupted = list(pipeline.InputPipeline(train_split, config).iterate(0, total_steps))
  resumed = list(pipeline.InputPipeline(train_split, config).iterate(
      restart_step, total_steps - restart_step))
  assert [b.step for b in resumed] == list(range(restart_step, total_steps))
  for expected, actual in zip(uninterrupted[restart_step:], resumed):
    assert expected.arrays.keys() == actual.arrays.keys()
    for key in expected.arrays:
      np.testing.assert_array_equal(expected.arrays[key], actual.arrays[key])
    for key in expected.host:
      np.testing.assert_array_equal(expected.host[key], actual.host[key])
  # Consecutive epochs are shuffled differently (the order depends on the step).
  first_epoch = np.concatenate([b.arrays["example_index"] for b in uninterrupted[:6]])
  assert sorted(first_epoch) == list(range(NUM_TRAIN))
  assert not np.array_equal(uninterrupted[0].arrays["example_index"],
                            uninterrupted[6].arrays["example_index"])


def test_crop_pad_and_mask(train_split):
  config = pipeline.PipelineConfig(global_batch_size=8, max_duration_s=1.0, shuffle=False)
  source_pipeline = pipeline.InputPipeline(train_split, config)
  for batch in source_pipeline.iterate(0, source_pipeline.steps_per_epoch):
    audio, mask = batch.arrays["audio"], batch.arrays["audio_mask"]
    assert audio.shape == mask.shape == (8, 16000)
    for row, index in enumerate(batch.arrays["example_index"]):
      stored = train_split[int(index)]["audio"].astype(np.float32) / tfds_builder.INT16_SCALE
      kept = min(len(stored), 16000)
      assert mask[row].sum() == kept and mask[row, :kept].all()
      np.testing.assert_array_equal(audio[row, :kept], stored[:kept])  # crop from the start
      assert not audio[row, kept:].any()


def test_length_buckets_pad_less_and_keep_each_epoch_a_permutation(train_split):
  plain = pipeline.InputPipeline(train_split, CONFIGS["plain"])
  bucketed = pipeline.InputPipeline(train_split, CONFIGS["bucketed_random_crop"])
  steps = plain.steps_per_epoch
  bucketed_lengths = [bucketed.pad_length(step) for step in range(steps)]
  assert set(bucketed_lengths) <= {8000, 16000, 24000}
  assert sum(bucketed_lengths) < sum(plain.pad_length(step) for step in range(steps))
  for step in range(steps):
    batch = bucketed.batch(step)
    assert batch.arrays["audio"].shape[1] == bucketed_lengths[step]
    longest = train_split.lengths[batch.arrays["example_index"]].max()
    assert bucketed_lengths[step] >= min(longest, 24000)
  epoch = np.concatenate([bucketed.sampler.global_indices(step) for step in range(steps)])
  assert sorted(epoch) == list(range(NUM_TRAIN))


def test_full_pass_sees_every_example_once_with_a_valid_mask(train_split):
  config = pipeline.PipelineConfig(global_batch_size=10, max_duration_s=1.0, full_pass=True)
  batches = list(pipeline.InputPipeline(train_split, config).iterate())
  assert len(batches) == 5
  valid_indices = np.concatenate([b.arrays["example_index"][b.arrays["valid"]]
                                  for b in batches])
  np.testing.assert_array_equal(valid_indices, np.arange(NUM_TRAIN))
  assert batches[-1].arrays["valid"].sum() == NUM_TRAIN - 40


def test_full_pass_with_length_buckets_visits_the_shortest_clips_first(train_split):
  """Evaluation batches of similar clips pad to small buckets; every clip still comes once."""
  plain = pipeline.PipelineConfig(global_batch_size=10, max_duration_s=1.5, full_pass=True,
                                  length_buckets_s=(0.5, 1.0))
  stored = pipeline.PipelineConfig(global_batch_size=10, max_duration_s=1.5, full_pass=True)
  by_length = list(pipeline.InputPipeline(train_split, plain).iterate())
  in_order = list(pipeline.InputPipeline(train_split, stored).iterate())
  visited = np.concatenate([b.arrays["example_index"][b.arrays["valid"]] for b in by_length])
  assert sorted(visited) == list(range(NUM_TRAIN))
  lengths = train_split.lengths[visited]
  assert np.all(np.diff(lengths) >= 0)
  assert (sum(b.arrays["audio"].shape[1] for b in by_length)
          < sum(b.arrays["audio"].shape[1] for b in in_order))


def test_global_batches_are_sharded_over_the_data_axis(train_split):
  mesh = jax.make_mesh((8,), ("data",))

  def encode_texts(texts):
    codes = np.zeros((len(texts), 40), np.int32)
    for row, text in enumerate(texts):
      raw = list(text.encode("utf-8"))[:40]
      codes[row, :len(raw)] = raw
    return {"text_bytes": codes}

  config = pipeline.PipelineConfig(global_batch_size=16, max_duration_s=0.5, seed=2)
  global_pipeline = pipeline.InputPipeline(train_split, config, mesh=mesh,
                                           text_encoder=encode_texts)
  local_pipeline = pipeline.InputPipeline(train_split, config, text_encoder=encode_texts)
  for batch in global_pipeline.iterate(0, 2):
    expected, host = local_pipeline.local_batch(batch.step)
    assert set(batch.arrays) == {"audio", "audio_mask", "valid", "example_index",
                                 "text_bytes"}
    for name, value in batch.arrays.items():
      assert isinstance(value, jax.Array)
      assert value.shape[0] == 16
      assert value.sharding.spec == jax.sharding.PartitionSpec("data")
      assert len(value.addressable_shards) == 8
      assert value.addressable_shards[0].data.shape[0] == 2
      np.testing.assert_array_equal(np.asarray(value), expected[name])
    decoded = [bytes(row[row > 0].astype(np.uint8)).decode() for row in
               np.asarray(batch.arrays["text_bytes"])]
    assert decoded == [text[:40] for text in host["text"]]


def test_batch_that_does_not_divide_over_devices_is_a_clear_error(train_split):
  mesh = jax.make_mesh((8,), ("data",))
  with pytest.raises(ValueError, match="does not divide"):
    pipeline.InputPipeline(train_split, pipeline.PipelineConfig(global_batch_size=12),
                           mesh=mesh)


def test_epoch_sampler_order_is_what_the_pipeline_reads(train_split):
  """The pipeline follows the shared EpochSampler (the order other pipelines use too)."""
  config = CONFIGS["plain"]
  sampler = EpochSampler(NUM_TRAIN, 8, config.seed)
  batch = pipeline.InputPipeline(train_split, config).batch(8)
  np.testing.assert_array_equal(batch.arrays["example_index"], sampler.global_indices(8))
