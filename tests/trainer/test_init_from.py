"""Starting from another workdir's weights (the paper's restarts): what is taken, what is not."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax.common.config_args import ConfigError
from clasp_jax.models.clasp import ClaspModel, example_batch
from clasp_jax.trainer import init_from
from clasp_jax.trainer.checkpointing import Checkpointer

DIMS = {"speech": 12, "spectrogram": 10, "text": 8}


def variables(seed, **model_args):
  model = ClaspModel(embed_dim=8, branch_hidden=(16, 12), fusion_hidden=(16, 12), **model_args)
  out = model.init(jax.random.key(seed), example_batch(DIMS), train=False)
  return out["params"], out["batch_stats"]


def write_workdir(path, params, batch_stats, step):
  """A checkpoint laid out as the trainer's: the train state's fields and a JSON record."""
  checkpointer = Checkpointer(str(path), every_steps=1, keep=2)
  stats = jax.tree.map(lambda x: x + step, batch_stats)  # Statistics a run would have moved.
  state = {"step": jnp.asarray(step), "params": params, "batch_stats": stats,
           "opt_state": {"mu": jax.tree.map(jnp.ones_like, params)}, "rng": jnp.zeros(2)}
  checkpointer.save(step, state, {"step": step}, force=True)
  checkpointer.close()
  return stats


def test_takes_the_best_checkpoint_else_the_newest(tmp_path):
  trained_params, batch_stats = variables(0)
  write_workdir(tmp_path, variables(2)[0], batch_stats, step=5)
  newest_stats = write_workdir(tmp_path, trained_params, batch_stats, step=9)
  fresh_params, fresh_stats = variables(1)
  # No evaluation chose a best step: the newest checkpoint.
  params, stats, step = init_from.load_variables(str(tmp_path), fresh_params, fresh_stats)
  assert step == 9
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, trained_params))
  jax.tree.map(np.testing.assert_array_equal, stats, jax.tree.map(np.asarray, newest_stats))
  assert jax.tree.structure(params) == jax.tree.structure(fresh_params)
  # An older step on request.
  params, _, step = init_from.load_variables(str(tmp_path), fresh_params, fresh_stats,
                                             checkpoint=5)
  assert step == 5
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, variables(2)[0]))
  # The best step, when one was kept, is the default.
  best_params = variables(3)[0]
  checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=2)
  checkpointer.save_best(7, types.SimpleNamespace(step=jnp.asarray(7), params=best_params,
                                                  batch_stats=batch_stats), {"step": 7})
  checkpointer.close()
  params, _, step = init_from.load_variables(str(tmp_path), fresh_params, fresh_stats)
  assert step == 7
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, best_params))


def test_a_model_that_does_not_fit_is_a_clear_error(tmp_path):
  params, batch_stats = variables(0)
  write_workdir(tmp_path, params, batch_stats, step=3)
  wider = variables(1, speech_branch_hidden=(20, 12))
  with pytest.raises(ConfigError,
                     match=r"shape mismatch\(es\): speech_encoder/speech_branch/linear_0"):
    init_from.load_variables(str(tmp_path), *wider)
  single = variables(1, mode="speech")
  with pytest.raises(ConfigError, match=r"unexpected tensor\(s\): speech_encoder/mix"):
    init_from.load_variables(str(tmp_path), *single)
  with pytest.raises(ConfigError, match="not a training workdir"):
    init_from.load_variables(str(tmp_path / "nowhere"), params, batch_stats)


def test_the_trainer_starts_a_new_stage_from_the_weights_of_another_workdir(tmp_path):
  """Stage 2 starts from stage 1's best weights with a fresh optimizer: at learning rate 0 its
  parameters stay exactly stage 1's (a random start would differ everywhere)."""
  from clasp_jax.trainer import trainer
  from configs import base
  stage1 = base.get_config("tiny")
  stage1.total_steps = stage1.eval_every_steps = stage1.checkpoint_every_steps = 10
  trainer.train_and_evaluate(stage1, str(tmp_path / "stage1"))
  stage2 = base.get_config("tiny")
  stage2.total_steps = stage2.eval_every_steps = stage2.checkpoint_every_steps = 2
  stage2.optimizer.learning_rate = 0.0
  stage2.init_from = str(tmp_path / "stage1")
  trainer.train_and_evaluate(stage2, str(tmp_path / "stage2"))
  checkpoints = {}
  for stage in ("stage1", "stage2"):
    checkpointer = Checkpointer(str(tmp_path / stage), every_steps=0, keep=1)
    checkpoints[stage] = checkpointer.read("latest")[0]
    checkpointer.close()
  chex = pytest.importorskip("chex")
  chex.assert_trees_all_equal(checkpoints["stage2"]["params"], checkpoints["stage1"]["params"])
  assert int(checkpoints["stage2"]["step"]) == 2
