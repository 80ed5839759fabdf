"""Exporting a training checkpoint: the PEFT adapter loads in transformers + peft and gives our
logits, `sample --lora` reads it, merged weights equal base + LoRA, --best picks the step by
validation score only, and bad input exits 2 with one line."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from markovian_jax.models import hf, load_checkpoint, logits
from markovian_jax.training import checkpoint_choice, export
from tests import helpers
from tests.helpers import one_error_line, run_module


@pytest.fixture(scope="module")
def ckpt_dir(demo_runs):
  return os.path.join(demo_runs["markovian"], "checkpoints")


@pytest.fixture(scope="module")
def peft_dir(ckpt_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("peft"))
  record = export.export(ckpt_dir, out, fmt="peft", overwrite=True)
  assert record["step"] == 4 and record["chosen_by"] == "the latest step"
  return out


def _ids(config):
  return np.random.RandomState(0).randint(0, config.vocab_size, (2, 24))


@pytest.mark.slow
def test_peft_export_loads_in_transformers_and_gives_our_logits(tiny_model_dir, ckpt_dir, peft_dir):
  torch = helpers.require("torch")
  peft = helpers.require("peft")
  transformers = helpers.require("transformers")
  config, params = load_checkpoint(tiny_model_dir)
  lora = checkpoint_choice.restore_adapter(ckpt_dir, 4, config)
  assert (lora.rank, lora.alpha) == (8, 16.0)
  ids = _ids(config)
  ours, ours_base = (np.asarray(logits(config, params, ids, a)) for a in (lora, None))
  with open(os.path.join(peft_dir, hf.ADAPTER_CONFIG_NAME)) as f:
    assert json.load(f)["base_model_name_or_path"] == tiny_model_dir
  base = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
  with torch.no_grad():
    theirs_base = base(torch.tensor(ids)).logits.numpy()
    model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    theirs = model(torch.tensor(ids)).logits.numpy()
  # Two float32 programs' logits: 64 float32 ulps of max|logit| (measured: <= 4).
  np.testing.assert_allclose(theirs, ours, atol=helpers.ulps(64, of=ours), rtol=0)
  # The trained adapter moved the logits, and PEFT moves them the same way.
  delta, their_delta = ours - ours_base, theirs - theirs_base
  assert np.abs(delta).max() > 1e-4
  np.testing.assert_allclose(
    their_delta, delta, atol=helpers.ulps(128, of=ours) + 0.02 * np.abs(delta).max()
  )


@pytest.mark.slow
def test_sample_and_training_read_the_exported_adapter(tiny_model_dir, ckpt_dir, peft_dir):
  from markovian_jax.sample import sample_texts

  config, _ = load_checkpoint(tiny_model_dir)
  restored = checkpoint_choice.restore_adapter(ckpt_dir, 4, config)
  loaded = hf.load_peft_adapter(peft_dir, config)  # what sample --lora and lora.init_from read
  assert sorted(loaded.targets) == sorted(restored.targets)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, restored.params)
  rows = sample_texts(
    tiny_model_dir, ["3 + 4 ="], lora_dir=peft_dir, max_new_tokens=4, temperature=0.0
  )
  assert len(rows) == 1 and len(rows[0]["tokens"]) == 4


@pytest.mark.slow
def test_merged_export_equals_base_plus_lora(tiny_model_dir, ckpt_dir, tmp_path):
  record = export.export(ckpt_dir, str(tmp_path / "merged"), fmt="merged", step=2)
  assert record["step"] == 2 and record["format"] == "merged"
  config, params = load_checkpoint(tiny_model_dir)
  lora = checkpoint_choice.restore_adapter(ckpt_dir, 2, config)
  merged_config, merged = load_checkpoint(str(tmp_path / "merged"))
  assert merged_config == config
  ids = _ids(config)
  unmerged = np.asarray(logits(config, params, ids, lora))
  np.testing.assert_allclose(
    np.asarray(logits(config, merged, ids)), unmerged, rtol=0, atol=helpers.ulps(32, of=unmerged)
  )  # measured: <= 4 ulps of max
  assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")


def _events_with_selection(run_dir, scores: dict):
  from tensorboardX import SummaryWriter

  writer = SummaryWriter(str(run_dir))
  for step, acc in scores.items():
    writer.add_scalar("selection/anchor/accuracy", acc, step)
    writer.add_scalar("eval/anchor/accuracy", 1.0 - acc, step)  # never used to choose
  writer.close()


@pytest.mark.slow
def test_best_uses_the_selection_split_never_the_test_split(demo_runs, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(demo_runs["markovian"], run)
  ckpt = str(run / "checkpoints")
  # Training stores each checkpoint's selection score; drop it to exercise the scalars path.
  for metrics in run.glob("checkpoints/*/metrics"):
    shutil.rmtree(metrics)
  for events in run.glob("events.out.tfevents*"):
    events.unlink()
  with pytest.raises(checkpoint_choice.NoSelectionScore, match="--best: none of the saved steps"):
    checkpoint_choice.best_step(ckpt)
  _events_with_selection(run, {0: 0.9, 2: 0.5, 3: 0.8, 4: 0.25})  # 0 and 3 were not saved
  step, why = checkpoint_choice.best_step(ckpt)
  assert step == 2 and "selection/anchor/accuracy = 0.5000" in why


def test_best_prefers_the_score_stored_with_the_checkpoint(tmp_path):
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(
    str(tmp_path),
    item_names=("lora", "opt_state", "state"),
    options=ocp.CheckpointManagerOptions(best_fn=lambda m: m["score"], best_mode="max"),
  )
  for step, score in ((1, 0.2), (2, 0.7), (3, 0.7), (4, 0.1)):
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.JsonSave({"step": step})),
      metrics={"score": score},
    )
  manager.wait_until_finished()
  step, why = checkpoint_choice.best_step(str(tmp_path))
  assert step == 2 and "stored with the checkpoint (0.7000)" in why  # ties: the earliest


def _run_export(*args):
  return run_module("markovian_jax.export", *args)


@pytest.mark.slow
def test_export_cli(ckpt_dir, tmp_path):
  done = _run_export(f"--checkpoint_dir={ckpt_dir}", "--step=2", f"--out={tmp_path / 'a'}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "exported step 2 (--step) as peft" in done.stdout
  assert sorted(os.listdir(tmp_path / "a")) == [
    "adapter_config.json",
    "adapter_model.safetensors",
    "export.json",
  ]
  line = one_error_line(
    _run_export(f"--checkpoint_dir={ckpt_dir}", "--step=3", f"--out={tmp_path / 'b'}")
  )
  assert "--step 3: no checkpoint for that step" in line and "saved steps: [2, 4]" in line
  assert not (tmp_path / "b").exists()
  # Training stored each checkpoint's selection score: --best exports the top one.
  best = _run_export(f"--checkpoint_dir={ckpt_dir}", "--best", f"--out={tmp_path / 'c'}")
  assert best.returncode == 0, best.stderr[-3000:]
  record = json.loads((tmp_path / "c" / "export.json").read_text())
  assert record["step"] == checkpoint_choice.best_step(ckpt_dir)[0]
  line = one_error_line(_run_export(f"--checkpoint_dir={ckpt_dir}", f"--out={tmp_path / 'a'}"))
  assert "--out" in line and "not empty" in line
  line = one_error_line(
    _run_export(f"--checkpoint_dir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'd'}")
  )
  assert "no such directory" in line
  # A full disk: the export's files lead to /dev/full, where every write fails with ENOSPC.
  full = tmp_path / "full"
  full.mkdir()
  for name in ("adapter_config.json", "adapter_model.safetensors", "export.json"):
    (full / name).symlink_to("/dev/full")
  line = one_error_line(
    _run_export(f"--checkpoint_dir={ckpt_dir}", "--step=2", f"--out={full}", "--overwrite")
  )
  assert line.startswith("error: no space left on device writing"), line
  assert f"free space in {full} or set --out to a directory on another disk" in line, line


@pytest.mark.parametrize("scores, best", [({2: 0.25, 4: 0.75}, 4), ({2: 0.75, 4: 0.25}, 2)])
@pytest.mark.slow
def test_best_follows_distinct_stored_scores(demo_runs, tmp_path, scores, best):
  """With distinct selection scores stored beside the checkpoints the best step is the higher
  one, whether it is the latest or the earliest (tied scores could not tell these apart)."""
  import json as json_lib

  run = tmp_path / "run"
  shutil.copytree(demo_runs["markovian"], run)
  for step, score in scores.items():
    (run / "checkpoints" / str(step) / "metrics" / "metrics").write_text(
      json_lib.dumps({"score": score})
    )
  step, why = checkpoint_choice.best_step(str(run / "checkpoints"))
  assert step == best and f"({scores[best]:.4f})" in why
  done = _run_export(
    f"--checkpoint_dir={run / 'checkpoints'}", "--best", f"--out={tmp_path / 'out'}"
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert json_lib.loads((tmp_path / "out" / "export.json").read_text())["step"] == best
