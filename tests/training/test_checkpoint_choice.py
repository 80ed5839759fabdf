"""Choosing a run's checkpoint and restoring its adapter (training.checkpoint_choice), on
checkpoints written here by the Checkpointer: the latest step, a given step, a step that was not
saved, the best by stored validation score (against hand-computed argmaxes, ties to the earliest),
no score at all, a torn latest checkpoint, and the adapter restored with the rank, alpha, dropout
and targets the checkpoint recorded, not a config's (an old checkpoint that records none: the
run's config.json, else the given config)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from markovian_jax.models import init_lora
from markovian_jax.runtime.checkpointing import BrokenCheckpoint, Checkpointer
from markovian_jax.runtime.errors import CheckpointError
from markovian_jax.training import checkpoint_choice as choice

# What the run recorded: a rank-2 adapter on q and v, alpha 5, dropout 0.25. Every config below
# says otherwise, so a setting taken from the wrong place shows.
RECORDED = {"rank": 2, "alpha": 5.0, "dropout": 0.25}
RUN_CONFIG = {
  "task": "gsm8k",
  "model": {"path": "the/run/model", "dtype": "bfloat16"},
  "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"]},
}
# The command's config: the same adapter shape as the run's config (an old checkpoint restored
# through either must fit), other alpha, dropout and model.
OTHER_CONFIG = {
  "lora": {"rank": 4, "alpha": 16.0, "dropout": 0.1, "targets": ["q", "v"]},
  "model": {"path": "another/model", "dtype": "float32"},
}


def _adapter(config, step: int):
  """The recorded adapter with step-dependent, nonzero A and B (a zero B would restore equal to
  any fresh template's)."""
  lora = init_lora(config, jax.random.PRNGKey(0), targets=RUN_CONFIG["lora"]["targets"], **RECORDED)
  leaves, tree = jax.tree.flatten(lora.params)
  keys = jax.random.split(jax.random.PRNGKey(100 + step), len(leaves))
  return lora.replace(
    params=jax.tree.unflatten(
      tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
  )


def _run(
  tmp_path,
  config,
  scores: dict,
  *,
  state=None,
  max_to_keep: int = 10,
  keep_best: bool = False,
  config_json=None,
) -> tuple:
  """(checkpoint dir, {step: adapter saved}) of a run directory under tmp_path: one checkpoint per
  step of `scores` (score None: saved without one), as Trainer.save writes them."""
  run = tmp_path / "run"
  run.mkdir()
  if config_json is not None:
    (run / "config.json").write_text(json.dumps(config_json))
  ckpt = Checkpointer(str(run / "checkpoints"), max_to_keep=max_to_keep, keep_best=keep_best)
  saved = {}
  for step, score in scores.items():
    lora = _adapter(config, step)
    record = {"step": step, "lora": RECORDED, "config": RUN_CONFIG} if state is None else state
    ckpt.save(step, lora.params, {"count": np.int32(step)}, record, score=score)
    saved[step] = lora
  ckpt.close()
  return str(run / "checkpoints"), saved


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_config):
  """(checkpoint dir, {step: adapter}) of a run saved at steps 1, 3 and 5 without scores, with
  its config.json; tests that change it work on a copy."""
  return _run(
    tmp_path_factory.mktemp("plain"),
    tiny_config,
    {1: None, 3: None, 5: None},
    config_json=RUN_CONFIG,
  )


def _copy(plain_run, tmp_path) -> str:
  return shutil.copytree(os.path.dirname(plain_run[0]), tmp_path / "run") / "checkpoints"


def _one_line(e) -> str:
  text = str(e.value)
  assert "\n" not in text, text
  return text


def test_latest_a_given_step_and_a_missing_one(plain_run):
  ckpt, _ = plain_run
  assert choice.choose_step(ckpt) == (5, "the latest step")
  assert choice.choose_step(ckpt, 3) == (3, "--step")
  with pytest.raises(CheckpointError) as e:
    choice.choose_step(ckpt, 4)
  line = _one_line(e)
  assert line.startswith("--step 4: no checkpoint for that step")
  assert "saved steps: [1, 3, 5]" in line
  with pytest.raises(CheckpointError, match="--step or --best, not both"):
    choice.choose_step(ckpt, 3, best=True)


def test_a_missing_or_empty_directory_is_one_line(tmp_path):
  with pytest.raises(CheckpointError) as e:
    choice.choose_step(str(tmp_path / "nowhere"))
  assert "no such directory" in _one_line(e) and str(tmp_path / "nowhere") in str(e.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError) as e:
    choice.choose_step(str(tmp_path / "empty"), best=True)
  assert "no checkpoints in" in _one_line(e)


@pytest.mark.parametrize(
  "scores, best",
  [
    ({1: 0.25, 2: 0.75, 3: 0.5}, 2),  # neither the latest nor the earliest
    ({1: 0.5, 2: 0.75, 3: 0.75}, 2),  # a tie goes to the earlier step
    ({1: 0.9, 2: None, 3: 0.1}, 1),  # a step saved without a score does not compete
  ],
)
def test_best_by_the_stored_selection_score(tmp_path, tiny_config, scores, best):
  ckpt, _ = _run(tmp_path, tiny_config, scores)
  step, why = choice.choose_step(ckpt, best=True)
  assert step == best and why.startswith("best by selection")
  assert f"({scores[best]:.4f})" in why


def test_best_among_the_steps_retention_kept(tmp_path, tiny_config):
  """As training saves: the latest two plus the best by score (keep_best). Step 2 (0.9) survives
  retention and is chosen over the later, lower ones."""
  scores = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.35, 5: 0.3}
  ckpt, _ = _run(tmp_path, tiny_config, scores, max_to_keep=2, keep_best=True)
  assert choice.saved_steps(ckpt) == [2, 4, 5]
  assert choice.choose_step(ckpt, best=True).step == 2


def test_best_without_any_score(plain_run):
  """No stored score and no events (test_export covers the events' selection accuracy)."""
  ckpt, _ = plain_run
  with pytest.raises(choice.NoSelectionScore) as e:
    choice.choose_step(ckpt, best=True)
  assert "none of the saved steps [1, 3, 5]" in _one_line(e)
  # The analyses' default: the latest step when nothing scores the steps.
  assert choice.choose_step(ckpt, best=True, latest_if_unscored=True) == (
    5,
    "the latest step (no selection score)",
  )


def test_the_adapter_has_the_recorded_settings_not_the_configs(plain_run, tiny_config):
  ckpt, saved = plain_run
  settings = choice.adapter_settings(ckpt, 1, OTHER_CONFIG)
  assert settings == {
    "rank": 2,
    "alpha": 5.0,
    "dropout": 0.25,
    "targets": ("q", "v"),
    "model": "the/run/model",
    "dtype": "bfloat16",
  }
  lora = choice.restore_adapter(ckpt, 1, tiny_config, config=OTHER_CONFIG)
  assert (lora.rank, lora.alpha, lora.dropout) == (2, 5.0, 0.25)
  assert sorted(lora.targets) == ["q", "v"]
  # The step asked for, bit for bit (step 3's arrays differ).
  jax.tree.map(np.testing.assert_array_equal, lora.params, saved[1].params)
  assert not np.array_equal(
    lora.params["layers"]["attn"]["q"]["b"], saved[3].params["layers"]["attn"]["q"]["b"]
  )


def test_an_old_checkpoint_falls_back_to_the_runs_config_then_the_given_one(tmp_path, tiny_config):
  """A checkpoint whose state records no adapter (no "lora" entry, no config)."""
  run = tmp_path / "run"
  ckpt = Checkpointer(str(run / "checkpoints"))
  lora = init_lora(tiny_config, jax.random.PRNGKey(0), rank=4, targets=("q", "v"))
  ckpt.save(3, lora.params, {"count": np.int32(3)}, {"step": 3})
  ckpt.close()
  ckpt = str(run / "checkpoints")
  (run / "config.json").write_text(json.dumps(RUN_CONFIG))
  for expected in (RUN_CONFIG, OTHER_CONFIG):  # the run's config.json, else the given config
    restored = choice.restore_adapter(ckpt, 3, tiny_config, config=OTHER_CONFIG)
    want = expected["lora"]
    assert (restored.rank, restored.alpha, restored.dropout) == (
      want["rank"],
      want["alpha"],
      want["dropout"],
    )
    assert sorted(restored.targets) == sorted(want["targets"])
    assert choice.adapter_settings(ckpt, 3, OTHER_CONFIG)["model"] == expected["model"]["path"]
    (run / "config.json").unlink(missing_ok=True)
  # Nothing names the adapter: one line naming the step.
  with pytest.raises(CheckpointError) as e:
    choice.adapter_settings(ckpt, 3)
  assert "checkpoint step 3" in _one_line(e) and "records no LoRA rank" in str(e.value)


def _tear(ckpt_dir, step: int, how: str):
  """Damages a complete checkpoint as a failing disk would: its array files cut in half, or its
  JSON state cut off (as benchmarks/faults.py tears a run's)."""
  base = os.path.join(ckpt_dir, str(step))
  if how == "json":
    with open(os.path.join(base, "state", "metadata"), "w") as f:
      f.write('{"step": ')
    return
  # orbax may merge the per-process store into the item's own d/ when it finalises: both go.
  for d, _, names in os.walk(os.path.join(base, "lora")):
    for name in names if os.path.basename(d) == "d" else ():
      with open(os.path.join(d, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, name)) // 2)


@pytest.mark.parametrize("how", ["truncated", "json"])
def test_a_torn_latest_checkpoint_is_named_in_one_line(plain_run, tmp_path, tiny_config, how):
  ckpt, saved = str(_copy(plain_run, tmp_path)), plain_run[1]
  _tear(ckpt, 5, how)
  # A read-only command does not skip it: the latest is still step 5, and reading it says why.
  assert choice.choose_step(ckpt).step == 5
  with pytest.raises(BrokenCheckpoint) as e:
    choice.restore_adapter(ckpt, 5, tiny_config)
  line = _one_line(e)
  assert "checkpoint step 5 in" in line and "is broken" in line
  # The step before is intact.
  jax.tree.map(
    np.testing.assert_array_equal,
    choice.restore_adapter(ckpt, 3, tiny_config).params,
    saved[3].params,
  )
