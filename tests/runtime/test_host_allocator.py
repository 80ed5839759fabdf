"""host_allocator: the re-exec decision, and a real re-exec onto tcmalloc."""

import os
import subprocess
import sys

import pytest

from markovian_jax.runtime import host_allocator
from markovian_jax.training.config_validation import InvalidConfig
from tests import helpers

_MAPS = """\
55d0c0a00000-55d0c0a2e000 r--p 00000000 08:01 1234 /usr/bin/python3.11
7f52c0400000-7f52c0428000 r--p 00000000 08:01 5678 /usr/lib/x86_64-linux-gnu/libc.so.6
7f52c0600000-7f52c0620000 r-xp 00002000 08:01 9012 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10
7ffd1c3f0000-7ffd1c411000 rw-p 00000000 00:00 0 [stack]
7f52c0700000-7f52c0701000 rw-p 00000000 00:00 0
"""


class Execed(Exception):
  pass


@pytest.fixture
def no_exec(monkeypatch):
  """os.execve replaced by a recorder that stops the call where the process would be replaced."""
  calls = []

  def fake(path, argv, env):
    calls.append((path, argv, env))
    raise Execed()

  monkeypatch.setattr(host_allocator.os, "execve", fake)
  monkeypatch.delenv("MARKOVIAN_ALLOCATOR_REEXEC", raising=False)
  return calls


def test_mapped_tcmalloc_reads_the_maps_path():
  assert host_allocator.mapped_tcmalloc(_MAPS) == (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10"
  )
  without = "\n".join(line for line in _MAPS.splitlines() if "tcmalloc" not in line)
  assert host_allocator.mapped_tcmalloc(without) is None


def test_preload_value_puts_the_allocator_first():
  assert host_allocator.preload_value("libtcmalloc.so.4") == "libtcmalloc.so.4"
  assert host_allocator.preload_value("libtcmalloc.so.4", "/a/libx.so:/b/liby.so") == (
    "libtcmalloc.so.4 /a/libx.so /b/liby.so"
  )


def test_unknown_setting_names_the_key(no_exec):
  with pytest.raises(InvalidConfig, match=r"config.host_allocator: 'jemalloc' is not one of"):
    host_allocator.ensure("jemalloc")
  assert not no_exec


def test_system_and_already_mapped_do_not_reexec(no_exec, monkeypatch):
  assert host_allocator.ensure("system").startswith("system malloc")
  monkeypatch.setattr(host_allocator, "mapped_tcmalloc", lambda: "/lib/libtcmalloc.so.4")
  assert host_allocator.ensure("tcmalloc") == "tcmalloc (/lib/libtcmalloc.so.4)"
  assert not no_exec


def test_reexecs_the_same_command_with_tcmalloc_preloaded(no_exec, monkeypatch):
  monkeypatch.setattr(host_allocator, "mapped_tcmalloc", lambda: None)
  monkeypatch.setattr(host_allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
  monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so")
  with pytest.raises(Execed):
    host_allocator.ensure("tcmalloc")
  ((path, argv, env),) = no_exec
  assert path == sys.executable
  assert argv == [sys.executable, *sys.orig_argv[1:]]
  assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 /opt/libother.so"
  assert env["MARKOVIAN_ALLOCATOR_REEXEC"] == "1"


def test_missing_or_unloadable_tcmalloc_continues_on_system_malloc(no_exec, monkeypatch):
  monkeypatch.setattr(host_allocator, "mapped_tcmalloc", lambda: None)
  monkeypatch.setattr(host_allocator, "find_tcmalloc", lambda: None)
  line = host_allocator.ensure("tcmalloc")
  assert "not installed" in line and "libtcmalloc-minimal4" in line
  assert "config.host_allocator=system" in line
  # A re-executed process that still lacks it must not restart again (no loop).
  monkeypatch.setattr(host_allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
  monkeypatch.setenv("MARKOVIAN_ALLOCATOR_REEXEC", "1")
  assert "is not mapped" in host_allocator.ensure("tcmalloc")
  assert not no_exec


@pytest.mark.slow
def test_a_real_process_restarts_onto_tcmalloc_once():
  if host_allocator.find_tcmalloc() is None:
    helpers.missing(f"tcmalloc is not installed ({host_allocator.INSTALL_HINT})")
  code = (
    "from markovian_jax.runtime import host_allocator as h\n"
    "print('before', flush=True)\n"
    "print('line', h.ensure('tcmalloc'))\n"
    "print('mapped', h.mapped_tcmalloc())\n"
  )
  env = {
    k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MARKOVIAN_ALLOCATOR_REEXEC")
  }
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  # The first process printed "before", then became the second, which ran everything again.
  assert lines[:2] == ["before", "before"], lines
  assert lines[2].startswith("line tcmalloc (") and "/libtcmalloc" in lines[3], lines
  assert len(lines) == 4, lines
