"""launch/: the TPU launcher's command sequence, the worker script's jobs, the SLURM example's
process plumbing, and shellcheck on every shell script. Nothing here reaches a cloud."""

import glob
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from clasp_jax.common import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def _load_launcher():
  # launch/ holds scripts, not a package; load the CLI module from its file.
  spec = importlib.util.spec_from_file_location("launch_tpu", os.path.join(LAUNCH, "tpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = _load_launcher()

V4_RUN = ["all", "--dry_run", "--name=clasp-v4", "--zone=us-central2-b", "--project=clasp-proj",
          "--accelerator_type=v4-32", "--features=gs://clasp-bucket/features",
          "--workdir=gs://clasp-bucket/runs/paper",
          "--config=configs/base.py:paper,features=/mnt/clasp-data/features",
          "--", "--config.batch_size=512"]


def _dry_run(argv, capsys):
  assert tpu.main(argv) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def _flag(command, name):
  values = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, command)
  return values[0]


def _remote(command):
  return shlex.split(_flag(command, "command"))


def test_v4_32_dry_run_is_the_whole_run_in_order(capsys):
  commands = _dry_run(V4_RUN, capsys)
  steps = [tuple(c[:5]) if c[0] == "gcloud" else tuple(c[:1]) for c in commands]
  tpu_vm = ("gcloud", "compute", "tpus", "tpu-vm")
  assert steps == [
      tpu_vm + ("create",),   # the slice
      ("git",),               # this repository at HEAD, archived locally ...
      tpu_vm + ("scp",),      # ... copied to every worker ...
      tpu_vm + ("ssh",),      # ... unpacked and set up there
      tpu_vm + ("ssh",),      # the features copied to every worker's disk
      tpu_vm + ("ssh",),      # training started on every worker
      tpu_vm + ("ssh",),      # worker 0's log streamed until training ends
      tpu_vm + ("delete",),
  ]
  create, archive, copy, install, fetch, train, logs, delete = commands

  assert create[5] == "clasp-v4"
  assert _flag(create, "accelerator-type") == "v4-32"
  assert _flag(create, "version") == "tpu-ubuntu2204-base"
  for command in (create, copy, install, fetch, train, logs, delete):
    assert _flag(command, "zone") == "us-central2-b", command
    assert _flag(command, "project") == "clasp-proj", command
  for command in (copy, install, fetch, train):
    assert _flag(command, "worker") == "all", command
  assert _flag(logs, "worker") == "0"
  assert "--quiet" in delete and delete[5] == "clasp-v4"

  tarball = _flag(archive, "output")
  assert archive[-1] == "HEAD" and archive[archive.index("-C") + 1] == ROOT
  assert copy[5:7] == [tarball, "clasp-v4:clasp_jax.tar.gz"]
  setup = _remote(install)
  assert ["tar", "-xzf", "clasp_jax.tar.gz"] == setup[4:7]
  assert setup[-4:] == ["bash", "clasp_jax/launch/worker.sh", "setup", tpu.JAX_VERSION]
  assert _remote(fetch)[-3:] == ["fetch", "gs://clasp-bucket/features", "/mnt/clasp-data/features"]

  remote_train = _remote(train)
  program = remote_train[remote_train.index("--") + 1:]
  assert remote_train[:4] == ["bash", "clasp_jax/launch/worker.sh", "start", "train"]
  assert program == ["python", "-m", "clasp_jax.train",
                     "--config=configs/base.py:paper,features=/mnt/clasp-data/features",
                     "--workdir=gs://clasp-bucket/runs/paper", "--distributed",
                     "--config.batch_size=512"]
  assert _remote(logs) == ["bash", "clasp_jax/launch/worker.sh", "follow", "train"]


def test_each_step_alone_prints_its_part_of_the_run(capsys):
  common = ["--dry_run", "--name=clasp-v4", "--zone=us-central2-b", "--project=clasp-proj"]
  whole = _dry_run(V4_RUN, capsys)
  parts = (
      _dry_run(["create", *common, "--accelerator_type=v4-32"], capsys)
      + _dry_run(["install", *common], capsys)
      + _dry_run(["data", *common, "--features=gs://clasp-bucket/features",
                  "--workdir=gs://clasp-bucket/runs/paper"], capsys)
      + _dry_run(["train", *common, "--workdir=gs://clasp-bucket/runs/paper",
                  "--config=configs/base.py:paper,features=/mnt/clasp-data/features",
                  "--", "--config.batch_size=512"], capsys)
      + _dry_run(["logs", *common], capsys)
      + _dry_run(["delete", *common], capsys))
  assert parts == whole


def test_v5e_defaults_to_its_runtime_and_an_explicit_version_wins(capsys):
  common = ["create", "--dry_run", "--name=n", "--zone=us-west4-a"]
  [create] = _dry_run([*common, "--accelerator_type=v5litepod-16"], capsys)
  assert _flag(create, "version") == "v2-alpha-tpuv5-lite"
  assert not any(a.startswith("--project") for a in create)  # gcloud's default project
  [create] = _dry_run([*common, "--accelerator_type=v5litepod-16", "--version=v2-alpha-x",
                       "--spot"], capsys)
  assert _flag(create, "version") == "v2-alpha-x" and "--spot" in create


def test_gcsfuse_workdir_access_mounts_the_bucket_and_passes_its_path(capsys):
  commands = _dry_run(["train", "--dry_run", "--name=n", "--zone=z", "--config=configs/base.py",
                       "--workdir=gs://clasp-bucket/run", "--workdir_access=gcsfuse"], capsys)
  [train] = commands
  assert "--workdir=/mnt/gcs/clasp-bucket/run" in _remote(train)
  [mount] = _dry_run(["data", "--dry_run", "--name=n", "--zone=z",
                      "--workdir=gs://clasp-bucket/run", "--workdir_access=gcsfuse"], capsys)
  assert _remote(mount)[-2:] == ["mount", "clasp-bucket"]
  assert _flag(mount, "worker") == "all"
  # The default passes the URL through and mounts nothing.
  assert _dry_run(["data", "--dry_run", "--name=n", "--zone=z",
                   "--workdir=gs://clasp-bucket/run"], capsys) == []


def test_git_url_clones_on_the_workers_instead_of_copying(capsys):
  [install] = _dry_run(["install", "--dry_run", "--name=n", "--zone=z",
                        "--git_url=https://example.org/clasp_jax.git", "--ref=v1.0"], capsys)
  remote = _flag(install, "command")
  assert "git clone https://example.org/clasp_jax.git clasp_jax" in remote
  assert "git -C clasp_jax checkout v1.0" in remote
  assert _flag(install, "worker") == "all"


@pytest.mark.parametrize("command", ["embed", "evaluate"])
def test_other_clis_run_on_every_worker_with_their_own_arguments(capsys, command):
  [start] = _dry_run([command, "--dry_run", "--name=n", "--zone=z", "--", "--output=m.json"],
                     capsys)
  assert _flag(start, "worker") == "all"
  remote = _remote(start)
  assert remote[remote.index("--") + 1:] == ["python", "-m", f"clasp_jax.{command}",
                                             "--output=m.json"]


def _run_cli(*argv):
  return subprocess.run([sys.executable, os.path.join(LAUNCH, "tpu.py"), *argv],
                        capture_output=True, text=True, check=False)


@pytest.mark.parametrize("accelerator", ["v4-30", "v5litepod-12", "tpu-v4-32", "v4", "a100-8"])
def test_bad_accelerator_type_is_a_clear_error_with_exit_2(accelerator):
  result = _run_cli("create", "--dry_run", "--name=n", "--zone=z",
                    f"--accelerator_type={accelerator}")
  assert result.returncode == 2
  assert f"unknown accelerator type {accelerator!r}" in result.stderr
  assert result.stdout == ""


def test_data_without_anything_to_copy_or_mount_is_an_error():
  result = _run_cli("data", "--dry_run", "--name=n", "--zone=z")
  assert result.returncode == 2 and "data needs --features, --workdir or both" in result.stderr


def test_workdir_must_be_a_gs_url_with_exit_2():
  result = _run_cli("train", "--dry_run", "--name=n", "--zone=z", "--config=configs/base.py",
                    "--workdir=/tmp/run")
  assert result.returncode == 2 and "expected a gs://BUCKET/PATH URL" in result.stderr


def _record_runs(monkeypatch, fail_at=None):
  """Replaces subprocess.run in the launcher; the call whose verb is `fail_at` fails."""
  ran = []

  def fake_run(command, check):
    ran.append(command)
    remote = next((a for a in command if a.startswith("--command=")), "")
    failed = fail_at and (fail_at in command[4:5] or f"worker.sh {fail_at}" in remote)
    return subprocess.CompletedProcess(command, 7 if failed else 0)

  monkeypatch.setattr(tpu.subprocess, "run", fake_run)
  return ran


def _verbs(ran):
  return [c[4] if c[0] == "gcloud" else c[0] for c in ran]


def test_all_deletes_the_slice_after_a_failed_step(monkeypatch, capsys):
  ran = _record_runs(monkeypatch, fail_at="start")
  argv = [a for a in V4_RUN if a != "--dry_run"]
  assert tpu.main(argv) == 7
  assert _verbs(ran) == ["create", "git", "scp", "ssh", "ssh", "ssh", "delete"]
  capsys.readouterr()


def test_all_keeps_the_slice_when_asked_and_skips_delete_when_create_failed(monkeypatch):
  argv = [a for a in V4_RUN if a != "--dry_run"]
  ran = _record_runs(monkeypatch, fail_at="start")
  assert tpu.main([*argv[:1], "--keep", *argv[1:]]) == 7
  assert "delete" not in _verbs(ran)
  ran = _record_runs(monkeypatch, fail_at="create")
  assert tpu.main(argv) == 7
  assert _verbs(ran) == ["create"]


def test_worker_jobs_outlive_start_and_follow_reports_their_status(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text("")
  env = dict(os.environ, CLASP_VENV=str(venv), CLASP_LOGS=str(tmp_path / "logs"))
  worker = os.path.join(LAUNCH, "worker.sh")
  started = subprocess.run(
      ["bash", worker, "start", "demo", "--", "bash", "-c", "echo first; sleep 0.5; echo last; exit 3"],
      env=env, capture_output=True, text=True, check=True)
  assert "started demo" in started.stdout
  followed = subprocess.run(["bash", worker, "follow", "demo"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
  assert followed.stdout.splitlines() == ["first", "last"]
  assert followed.returncode == 3
  unknown = subprocess.run(["bash", worker, "follow", "other"], env=env, capture_output=True,
                           text=True, check=False)
  assert unknown.returncode == 2 and "no job other" in unknown.stderr


def _executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


def test_slurm_example_gives_each_process_consistent_distributed_arguments(tmp_path):
  """The sbatch script under a stand-in srun (4 tasks on 2 nodes) and python: each process
  must see the same coordinator and count, its own id, and its own GPU."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "scontrol", "#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
  # srun: drop its own options, then start SLURM_NTASKS processes, two per node.
  _executable(bin_dir / "srun", "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
              "for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
              "  SLURM_PROCID=$i SLURM_LOCALID=$((i % 2)) \"$@\" || exit\ndone\n")
  report = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v "
            "in os.environ.items() if k.startswith('CLASP_') or k.startswith('SLURM_')}}))")
  _executable(bin_dir / "python", f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
              f"{shlex.quote(report)} \"$@\"\n")
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text(f"PATH={bin_dir}:$PATH\n")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
             SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
             CLASP_WORKDIR="/shared/run", CLASP_VENV=str(venv),
             CLASP_CONFIG="configs/base.py:paper")
  result = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"),
                           "--config.batch_size=64"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
  processes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert len(processes) == 4
  for process_id, process in enumerate(processes):
    assert process["argv"] == ["-m", "clasp_jax.train", "--config=configs/base.py:paper",
                               "--workdir=/shared/run", "--distributed", "--config.batch_size=64"]
    assert distributed.initialize_arguments(process["env"]) == {
        "coordinator_address": "gpu-a:24242", "num_processes": 4, "process_id": process_id,
        "local_device_ids": [process_id % 2]}


SHELL_SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) +
                       glob.glob(os.path.join(LAUNCH, "*.sbatch")))


def test_launch_has_shell_scripts_to_check():
  assert {os.path.basename(p) for p in SHELL_SCRIPTS} >= {"worker.sh", "slurm_gpu.sbatch"}


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_scripts_are_shellcheck_clean():
  result = subprocess.run(["shellcheck", *SHELL_SCRIPTS], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_readme_example_runs_and_prints_what_the_readme_shows(capsys):
  """launch/README.md's worked example is the exact command; a doc that no longer runs is
  worse than none."""
  with open(os.path.join(LAUNCH, "README.md")) as f:
    readme = f.read()
  block = readme.split("```bash\npython launch/tpu.py all --dry_run", 1)[1].split("```", 1)[0]
  argv = shlex.split("all --dry_run" + block.replace("\\\n", " "))
  printed = _dry_run(argv, capsys)
  create, delete = shlex.join(printed[0]), shlex.join(printed[-1])
  assert create in readme and delete in readme
  assert len(printed) == 8
