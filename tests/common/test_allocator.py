"""Commands restart themselves under tcmalloc when it is installed (clasp_jax/common/allocator.py)."""

import os
import subprocess
import sys

import pytest

from clasp_jax.common import allocator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A command in miniature: restart first, then report the allocator and the arguments it got.
COMMAND = """
import sys
from clasp_jax.common import allocator
if len(sys.argv) > 2:
  allocator._SEARCH_DIRS = (sys.argv[2],)
allocator.reexec_under_tcmalloc()
print(allocator.loaded_allocator(), sys.argv[1:])
"""


def run_command(tmp_path, *args, **environment):
  script = tmp_path / "command.py"
  script.write_text(COMMAND)
  env = {key: value for key, value in os.environ.items()
         if key not in ("LD_PRELOAD", allocator.OPT_OUT_VARIABLE, allocator._RESTARTED_VARIABLE)}
  env.update(environment, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip().splitlines()


needs_tcmalloc = pytest.mark.skipif(allocator.find_tcmalloc() is None,
                                    reason="libtcmalloc-minimal4 is not installed")


@needs_tcmalloc
def test_command_restarts_under_tcmalloc_with_its_arguments(tmp_path):
  assert run_command(tmp_path, "--flag=a b") == ["tcmalloc ['--flag=a b']"]


@needs_tcmalloc
def test_opt_out_keeps_the_system_allocator(tmp_path):
  assert run_command(tmp_path, "x", CLASP_JAX_ALLOCATOR="system") == ["system ['x']"]


def test_a_library_the_loader_refuses_restarts_once_and_runs_on(tmp_path):
  fake = tmp_path / "lib"
  fake.mkdir()
  (fake / "libtcmalloc_minimal.so.4").write_text("not a shared library")
  # The loader warns and ignores the preload; the restarted process must not restart again.
  assert run_command(tmp_path, "x", str(fake)) == [f"system ['x', '{fake}']"]


def test_importing_the_package_restarts_nothing():
  code = "import os, clasp_jax.train, clasp_jax.common.allocator as a; print(os.getpid(), a.loaded_allocator())"
  env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
  env["PYTHONPATH"] = REPO
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split()[1] == "system"
