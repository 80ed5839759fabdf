"""benchmarks/methods.py: the runs it launches share one protocol and differ only in variant and
seed; a finished run is kept; an unknown variant is one line."""

import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from benchmarks import methods
from markovian_jax import objectives
from markovian_jax.training import config_validation
from tests import helpers


def _parsed(args, monkeypatch):
  """The config the train CLI builds from `args` (ml_collections' own flag parser, which reads
  the overrides from sys.argv)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  monkeypatch.setattr(sys, "argv", ["train", *args])
  fv(sys.argv)
  return fv.config


def test_every_variant_runs_the_same_protocol(tmp_path, monkeypatch):
  monkeypatch.chdir(helpers.REPO)
  assert methods.VARIANTS == ("markovian", *objectives.METHOD_NAMES) and len(methods.VARIANTS) == 15
  protocols = set()
  for variant in methods.VARIANTS:
    for seed in (0, 1):
      workdir = methods.run_dir(str(tmp_path), variant, seed)
      c = _parsed(methods.train_args("configs/demo.py", variant, seed, 40, workdir), monkeypatch)
      assert c.variant == variant and c.train.seed == seed and c.workdir == workdir
      spec = config_validation.validate(c)
      method = objectives.method_of(spec.objective.loss)
      assert (method is None) is (variant == "markovian"), variant
      assert variant.endswith("_markovian") is (method is not None and spec.prompt.markovian)
      protocols.add(
        (
          spec.train.num_steps,
          spec.train.eval_every,
          spec.train.checkpoint_every,
          spec.sampling.cot_stops_at_eos,
          spec.eval.temperature,
          spec.sampling.cot_length,
          spec.train.group_size,
          spec.eval.num_examples,
        )
      )
  assert protocols == {(40, 20, 20, True, 0.0, 16, 8, 32)}


def test_a_finished_run_is_kept_and_a_stopped_one_resumed(tmp_path):
  workdir = methods.run_dir(str(tmp_path), "jepo", 1)
  fresh = methods.run_args("configs/demo.py", "jepo", 1, 40, workdir)
  assert fresh == methods.train_args("configs/demo.py", "jepo", 1, 40, workdir)
  (tmp_path / "jepo-s1" / "checkpoints" / "20").mkdir(parents=True)
  assert not methods.finished(workdir, 40)
  assert methods.run_args("configs/demo.py", "jepo", 1, 40, workdir) == [
    *fresh,
    "--config.train.resume=True",
  ]
  (tmp_path / "jepo-s1" / "checkpoints" / "40").mkdir()
  assert methods.finished(workdir, 40) and not methods.finished(workdir, 80)
  assert methods._one("configs/demo.py", "jepo", 1, 40, str(tmp_path))[2:] == (0, 0.0, "kept")
  assert sorted(os.listdir(tmp_path / "jepo-s1" / "checkpoints")) == ["20", "40"]


def test_an_unknown_variant_is_one_line(tmp_path):
  res = subprocess.run(
    [sys.executable, "-m", "benchmarks.methods", "--variants=verifree,bogus", f"--root={tmp_path}"],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert res.returncode == 2, res.stderr[-2000:]
  errors = [line for line in res.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and "bogus" in errors[0] and "verifree_markovian" in errors[0], errors
  assert list(tmp_path.iterdir()) == []
