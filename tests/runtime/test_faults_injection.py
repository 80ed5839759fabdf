"""The test-only fault injector (markovian_jax/runtime/faults.py) does what it claims and nothing
more: a `fill` leaves its filesystem full without failing itself, so a run under it fails (or
not) by its own writes alone."""

import errno
import os
import subprocess

import pytest

from markovian_jax.runtime import faults

TMPFS_KB = 1024
BLOCK_KB = 64  # fill_filesystem's write size


@pytest.fixture
def tmpfs(tmp_path):
  """A 1 MB tmpfs (what the fault matrix's full-disk row mounts, smaller)."""
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root (the full-disk row then injects ENOSPC instead)")
  subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_KB}k", "tmpfs", str(tmp_path)], check=True
  )
  yield tmp_path
  subprocess.run(["umount", "-l", str(tmp_path)], check=False)


def test_fill_leaves_the_disk_full_and_never_raises_itself(tmpfs):
  # The free space at the fill is whatever the run wrote before it: every offset within the
  # filler's 64 KB block (4 KB pages). A buffered filler kept the tail of a partly taken block and
  # raised ENOSPC at close whenever that tail fit its 8 KB buffer (the full-disk row's flake).
  for used_kb in range(0, BLOCK_KB, 4):
    for name in os.listdir(tmpfs):
      os.remove(tmpfs / name)
    if used_kb:
      (tmpfs / "run_files").write_bytes(b"x" * (used_kb * 1024))
    faults.fill_filesystem(tmpfs)  # raised OSError(ENOSPC) at used_kb=4 before the fix
    with pytest.raises(OSError) as full:
      with open(tmpfs / "one_more", "wb", buffering=0) as f:
        f.write(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC, used_kb
    filled = sum(os.path.getsize(tmpfs / n) for n in (".fill", ".fill2"))
    assert filled >= (TMPFS_KB - used_kb - BLOCK_KB) * 1024, (used_kb, filled)
