#!/usr/bin/env python3
r"""Runs clasp_jax on a Cloud TPU VM or pod slice through gcloud.

  python launch/tpu.py COMMAND --name=NAME --zone=ZONE [--project=PROJECT] [--dry_run] [flags]

Commands, in the order a run uses them:
  create    create the TPU VM (--accelerator_type, runtime --version pinned per generation)
  install   copy this repository (`git archive` of --ref) to every worker and set it up there:
            a virtual environment, the README's ./setup.sh, and the pinned jax[tpu]
  data      copy --features from gs:// to every worker's disk; mount --workdir's bucket
  train     python -m clasp_jax.train --config=... --workdir=... --distributed on every worker,
            detached from the ssh session (arguments after `--` go to the trainer)
  embed, evaluate
            python -m clasp_jax.embed / clasp_jax.evaluate on every worker, likewise (the
            arguments after `--` are the CLI's own)
  logs      stream a job's log from worker 0 until the job ends; exit with its status
  delete    delete the TPU VM
  all       create, install, data, train, logs, delete; delete also runs after a failure
            (a forgotten pod slice bills by the hour) unless --keep

--dry_run prints every command, one per line, as a shell would run it, instead of running it:
the gcloud commands and the one local command (`git archive`). See launch/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runtime versions Google recommends for JAX per TPU generation (TPU software versions page).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# v4 and v5p count TensorCores (two per chip, at least one 4-chip host); v5e and v6e count
# chips, in the slice shapes Cloud TPU offers.
_CORE_COUNTED = ("v4", "v5p")
_CHIP_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)

# The jax[tpu] build installed on the workers: the version the tests run with, so a pod runs
# what CI checked. setup.py accepts any jax >= 0.6, which would leave the TPU build to chance.
JAX_VERSION = "0.10.2"

# Paths on the workers. The ssh commands start in the home folder.
REMOTE_REPOSITORY = "clasp_jax"
REMOTE_DATA = "/mnt/clasp-data"
REMOTE_MOUNTS = "/mnt/gcs"
WORKER_SCRIPT = f"{REMOTE_REPOSITORY}/launch/worker.sh"

COMMANDS = ("create", "install", "data", "train", "embed", "evaluate", "logs", "delete", "all")
CLI_MODULES = {"train": "clasp_jax.train", "embed": "clasp_jax.embed",
               "evaluate": "clasp_jax.evaluate"}


def accelerator_type(value: str) -> str:
  """argparse type: a TPU accelerator type this launcher knows a runtime version for."""
  match = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-([1-9][0-9]*)", value)
  size = int(match.group(2)) if match else 0
  if match and match.group(1) in _CORE_COUNTED:
    valid = size % 8 == 0
  else:
    valid = size in _CHIP_COUNTS
  if not valid:
    raise argparse.ArgumentTypeError(
        f"unknown accelerator type {value!r}: expected v4-N or v5p-N (N TensorCores, a "
        f"multiple of 8: v4-8, v4-32, ...) or v5litepod-N or v6e-N (N chips, one of "
        f"{', '.join(map(str, _CHIP_COUNTS))})")
  return value


def gcs_url(value: str) -> str:
  """argparse type: a gs:// URL below a bucket (every worker has to reach the same place)."""
  if not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?", value):
    raise argparse.ArgumentTypeError(f"expected a gs://BUCKET/PATH URL, got {value!r}")
  return value.rstrip("/")


def _split_bucket(url: str) -> tuple[str, str]:
  bucket, _, path = url[len("gs://"):].partition("/")
  return bucket, path


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--name", required=True, help="TPU VM name.")
  parser.add_argument("--zone", required=True, help="Zone, e.g. us-central2-b for v4.")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's).")
  parser.add_argument("--dry_run", action="store_true",
                      help="Print the commands, one per line, instead of running them.")


def _add_create(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--accelerator_type", required=True, type=accelerator_type,
                      help="v4-32, v5litepod-16, ...")
  parser.add_argument("--version", help="TPU runtime version (default: the one Google "
                      "recommends for JAX on the accelerator's generation).")
  parser.add_argument("--spot", action="store_true", help="A Spot TPU (cheaper, preemptible).")


def _add_install(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ref", default="HEAD", help="The commit to install (default HEAD; "
                      "uncommitted changes are not copied).")
  parser.add_argument("--git_url", help="Clone this URL on the workers instead of copying "
                      "a `git archive` of the local repository.")
  parser.add_argument("--jax_version", default=JAX_VERSION, help="jax[tpu] version.")


def _add_data(parser: argparse.ArgumentParser, *, workdir_required: bool) -> None:
  parser.add_argument("--features", type=gcs_url, help=f"gs:// feature folder to copy to "
                      f"{REMOTE_DATA}/<its name> on every worker (the trainer memory-maps it).")
  parser.add_argument("--workdir", type=gcs_url, required=workdir_required,
                      help="gs://BUCKET/PATH for checkpoints and logs.")
  parser.add_argument(
      "--workdir_access", choices=("direct", "gcsfuse"), default="direct",
      help="direct (default): pass the gs:// URL through; the trainer writes config, "
      "metrics, TensorBoard logs and checkpoints through etils.epath, tensorboardX and "
      f"Orbax, which read and write gs:// themselves. gcsfuse: mount the bucket at "
      f"{REMOTE_MOUNTS}/BUCKET on every worker and give the trainer that path.")


def _add_train(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True,
                      help="The trainer's --config, relative to the repository root.")


def _add_worker(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--worker", default="all", help="Workers to run on (default all: on "
                      "a pod slice every host has to run the program).")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/tpu.py", description=__doc__.split("\n\n")[0],
      epilog="Arguments after `--` go to the clasp_jax command (train, embed, evaluate, all).")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  helps = {
      "create": "create the TPU VM", "install": "install the project on every worker",
      "data": "copy features / mount the workdir bucket on every worker",
      "train": "start training on every worker", "embed": "run clasp_jax.embed",
      "evaluate": "run clasp_jax.evaluate", "logs": "stream a job's log from worker 0",
      "delete": "delete the TPU VM", "all": "create ... delete in one go"}
  sub = {name: commands.add_parser(name, help=helps[name]) for name in COMMANDS}
  for parser_ in sub.values():
    _add_common(parser_)
  for name in ("create", "all"):
    _add_create(sub[name])
  for name in ("install", "all"):
    _add_install(sub[name])
  _add_data(sub["data"], workdir_required=False)
  for name in ("train", "all"):
    _add_data(sub[name], workdir_required=True)
    _add_train(sub[name])
  for name in ("embed", "evaluate"):
    _add_worker(sub[name])
  sub["logs"].add_argument("--job", default="train", choices=tuple(CLI_MODULES),
                           help="Which job's log (default train).")
  sub["all"].add_argument("--keep", action="store_true",
                          help="Do not delete the TPU VM at the end (or after a failure).")
  return parser


class Plan:
  """The gcloud (and local) command lines of one TPU VM, as argument lists."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

  def _tpu(self, verb: str, *rest: str, positional: tuple[str, ...] = ()) -> list[str]:
    """A `gcloud compute tpus tpu-vm` command; its positional arguments default to the name."""
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *(positional or (self.args.name,)),
            *self.where, *rest]

  def ssh(self, worker: str, command: str) -> list[str]:
    return self._tpu("ssh", f"--worker={worker}", f"--command={command}")

  def create(self) -> list[list[str]]:
    args = self.args
    generation = args.accelerator_type.split("-")[0]
    command = self._tpu("create", f"--accelerator-type={args.accelerator_type}",
                        f"--version={args.version or RUNTIME_VERSIONS[generation]}",
                        # The workers read and write gs:// with the VM's service account.
                        "--scopes=https://www.googleapis.com/auth/cloud-platform")
    return [command + (["--spot"] if args.spot else [])]

  def install(self) -> list[list[str]]:
    args = self.args
    setup = f"bash {WORKER_SCRIPT} setup {shlex.quote(args.jax_version)}"
    if args.git_url:
      fetch = (f"rm -rf {REMOTE_REPOSITORY} && git clone {shlex.quote(args.git_url)} "
               f"{REMOTE_REPOSITORY} && git -C {REMOTE_REPOSITORY} checkout {shlex.quote(args.ref)}")
      return [self.ssh("all", f"{fetch} && {setup}")]
    tarball = os.path.join(tempfile.gettempdir(), f"clasp_jax-{args.name}.tar.gz")
    unpack = (f"rm -rf {REMOTE_REPOSITORY} && tar -xzf clasp_jax.tar.gz && "
              "rm clasp_jax.tar.gz")
    return [
        ["git", "-C", REPOSITORY, "archive", "--format=tar.gz",
         f"--prefix={REMOTE_REPOSITORY}/", f"--output={tarball}", args.ref],
        self._tpu("scp", "--worker=all",
                  positional=(tarball, f"{args.name}:clasp_jax.tar.gz")),
        self.ssh("all", f"{unpack} && {setup}"),
    ]

  def data(self) -> list[list[str]]:
    args, commands = self.args, []
    if args.features:
      destination = f"{REMOTE_DATA}/{os.path.basename(args.features)}"
      commands.append(self.ssh("all", f"bash {WORKER_SCRIPT} fetch "
                                      f"{shlex.quote(args.features)} {shlex.quote(destination)}"))
    if args.workdir and args.workdir_access == "gcsfuse":
      bucket, _ = _split_bucket(args.workdir)
      commands.append(self.ssh("all", f"bash {WORKER_SCRIPT} mount {shlex.quote(bucket)}"))
    return commands

  def workdir(self) -> str:
    """The workdir as the trainer on a worker sees it."""
    if self.args.workdir_access == "direct":
      return self.args.workdir
    bucket, path = _split_bucket(self.args.workdir)
    return f"{REMOTE_MOUNTS}/{bucket}/{path}".rstrip("/")

  def start(self, job: str, cli_arguments: list[str], worker: str = "all") -> list[list[str]]:
    program = ["python", "-m", CLI_MODULES[job], *cli_arguments]
    return [self.ssh(worker, f"bash {WORKER_SCRIPT} start {job} -- {shlex.join(program)}")]

  def train(self, extra: list[str]) -> list[list[str]]:
    arguments = [f"--config={self.args.config}", f"--workdir={self.workdir()}",
                 "--distributed", *extra]
    return self.start("train", arguments)

  def logs(self, job: str) -> list[list[str]]:
    # Worker 0 is process 0, the one that writes the progress lines.
    return [self.ssh("0", f"bash {WORKER_SCRIPT} follow {job}")]

  def delete(self) -> list[list[str]]:
    return [self._tpu("delete", "--quiet")]


def _run(commands: list[list[str]], dry_run: bool) -> int:
  for command in commands:
    if dry_run:
      print(shlex.join(command))
      continue
    print("+", shlex.join(command), file=sys.stderr, flush=True)
    status = subprocess.run(command, check=False).returncode
    if status:
      return status
  return 0


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
  if "--" in argv:
    at = argv.index("--")
    return argv[:at], argv[at + 1:]
  return argv, []


def main(argv: list[str] | None = None) -> int:
  own, passthrough = _split_passthrough(sys.argv[1:] if argv is None else list(argv))
  parser = build_parser()
  args = parser.parse_args(own)
  if passthrough and args.command not in ("train", "embed", "evaluate", "all"):
    parser.error(f"{args.command} takes no arguments after --")
  if args.command == "data" and not (args.features or args.workdir):
    parser.error("data needs --features, --workdir or both")
  plan, dry_run = Plan(args), args.dry_run

  if args.command in ("embed", "evaluate"):
    return _run(plan.start(args.command, passthrough, worker=args.worker), dry_run)
  if args.command == "train":
    return _run(plan.train(passthrough), dry_run)
  if args.command == "logs":
    return _run(plan.logs(args.job), dry_run)
  if args.command != "all":
    return _run(getattr(plan, args.command)(), dry_run)

  status = _run(plan.create(), dry_run)
  if status:
    return status  # Nothing was created, so there is nothing to delete.
  status = _run(plan.install() + plan.data() + plan.train(passthrough) + plan.logs("train"),
                dry_run)
  if not args.keep:
    status = _run(plan.delete(), dry_run) or status
  return status


if __name__ == "__main__":
  sys.exit(main())
