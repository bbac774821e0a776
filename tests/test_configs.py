"""Every config loads, and every launch command in a config's docstring parses (and runs tiny)."""

import glob
import importlib.util
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from clasp_jax.trainer import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))


def _module(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _launch_commands(path):
  """The `python -m clasp_jax.train ...` commands of a docstring, continuation lines joined."""
  doc = _module(path).__doc__.replace("\\\n", " ")
  return [line.strip() for line in doc.splitlines()
          if line.strip().startswith("python -m clasp_jax.train")]


def _parse(command):
  """Parses a launch command's flags as the trainer would; returns the resolved config."""
  arguments = [a for a in shlex.split(command)[3:] if not a.startswith("--workdir")]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  with _in_repo():
    flag_values(["train"] + arguments)
    return flag_values.config


class _in_repo:

  def __enter__(self):
    self.previous = os.getcwd()
    os.chdir(REPO)

  def __exit__(self, *exc):
    os.chdir(self.previous)


def test_there_are_configs():
  assert CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_with_its_documented_launch_commands(path):
  commands = _launch_commands(path)
  assert commands, f"{path} documents no launch command"
  for command in commands:
    config = _parse(command)
    trainer.validate_config(config, num_devices=8)


def test_paper_recipe_matches_the_reference():
  config = _parse("python -m clasp_jax.train --config=configs/base.py:paper,features=/data/f")
  assert config.data.kind == "features" and config.data.directory == "/data/f"
  assert config.optimizer.name == "adam" and config.optimizer.learning_rate == 5e-6
  assert config.batch_size == 32 and config.num_epochs == 400
  assert not config.loss.learn_scale and config.loss.scale_init == 0.07
  assert config.schedule.kind == "step" and config.schedule.step_epochs == 100
  assert config.schedule.gamma == 0.4 and config.early_stopping.patience == 10
  assert tuple(config.model.branch_hidden) == (768, 576)


def test_embedding_width_must_match_the_text_features(tmp_path):
  config = _parse("python -m clasp_jax.train --config=configs/base.py:tiny")
  with config.unlocked():
    config.model.embed_dim = 12
  with pytest.raises(trainer.ConfigError, match="embed_dim=12 must equal the text"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_unknown_config_argument_is_rejected():
  with pytest.raises(Exception, match="unknown config argument 'papr'"):
    _parse("python -m clasp_jax.train --config=configs/base.py:papr")


def test_paper_recipe_runs_one_epoch_on_synthetic_features(tmp_path):
  config = _parse("python -m clasp_jax.train --config=configs/base.py:paper,features=/unused")
  with config.unlocked():
    config.data.kind = "synthetic_features"
    config.data.num_train, config.data.num_validation = 64, 32
    config.data.dims.update({"speech": 24, "spectrogram": 20, "text": 16})
    config.model.embed_dim = 16
    config.num_epochs = 2
  results = trainer.train_and_evaluate(config, str(tmp_path))
  assert results["val/loss"] > 0 and "val/speech_to_text/hits@1" in results
  assert re.search(r'"step": 4\b', (tmp_path / "metrics.jsonl").read_text())
