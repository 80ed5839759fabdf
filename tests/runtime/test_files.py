"""runtime/files.py: a record rewritten in place is the old one or the new one, never torn.

The failing write is a real one: a child process whose file-size limit (RLIMIT_FSIZE) is below
the new content's size, so the kernel refuses the write part way (EFBIG), as a full disk would
(ENOSPC) after a partial write."""

import os

import pytest

from tests import helpers

_WRITE = """
import resource, signal, sys
from markovian_jax.runtime import files
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write raises instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
  files.write_atomic(sys.argv[1], sys.argv[2] * int(sys.argv[3]))
  print("written")
except OSError as e:
  print("refused", e.errno)
"""


def _write(path, char: str, n: int) -> str:
  out = helpers.run_script(_WRITE, str(path), char, str(n), timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip()


def test_a_failed_rewrite_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  import errno

  path = tmp_path / "summary.json"
  path.write_text("old " * 100)
  assert _write(path, "n", 100_000) == f"refused {errno.EFBIG}"
  assert path.read_text() == "old " * 100
  assert os.listdir(tmp_path) == ["summary.json"]
  assert _write(path, "n", 1000) == "written"
  assert path.read_text() == "n" * 1000
  assert os.listdir(tmp_path) == ["summary.json"]


def test_a_broken_record_names_the_file_and_where_it_breaks(tmp_path):
  """Every JSON record we read, the run's own and a model's config.json, goes through
  files.read_json: a file cut short is a UserError (one line in the CLIs) naming it and the
  position where the text ends."""
  from markovian_jax.models import DecoderConfig
  from markovian_jax.runtime import files
  from markovian_jax.runtime.errors import UserError

  text = '{"model_type": "llama", "hidden_size": '
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(files.BrokenFile) as raised:
    DecoderConfig.from_json_file(str(tmp_path / "config.json"))
  assert isinstance(raised.value, UserError)
  assert str(raised.value) == (
    f"{tmp_path / 'config.json'} is not valid JSON (Expecting value, line 1 column "
    f"{len(text) + 1}): repair it or restore it from a copy"
  )
