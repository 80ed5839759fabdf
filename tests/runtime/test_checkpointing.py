"""Orbax checkpoints: round trip into sharded targets, retention, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from markovian_jax.models import init_lora
from markovian_jax.runtime import sharding
from markovian_jax.runtime.checkpointing import Checkpointer, CheckpointError


def _state(config, seed):
  lora = jax.tree.map(lambda x: x + seed, init_lora(config, jax.random.PRNGKey(seed)))
  tx = optax.adamw(1e-3)
  return lora, tx.init(lora)


def test_round_trip_into_sharded_targets(tmp_path, tiny_config):
  lora, opt = _state(tiny_config, 1)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  state = {"step": 7, "cursor": {"epoch": 0, "index": 3}, "rng": [1, 2]}
  assert ckpt.save(7, lora.params, opt, state)
  mesh = sharding.make_mesh((2, 2, 2))
  target = jax.device_put(
    jax.tree.map(jnp.zeros_like, lora.params), sharding.param_shardings(lora.params, mesh)
  )
  got_lora, got_opt, got_state = ckpt.restore(None, target, jax.tree.map(jnp.zeros_like, opt))
  assert got_state == state
  for a, b in zip(jax.tree.leaves(got_lora), jax.tree.leaves(lora.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q_a = got_lora["layers"]["attn"]["q"]["a"]
  assert q_a.sharding == target["layers"]["attn"]["q"]["a"].sharding
  for a, b in zip(jax.tree.leaves(got_opt), jax.tree.leaves(opt)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_retention_keeps_latest_and_best(tmp_path, tiny_config):
  lora, opt = _state(tiny_config, 0)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, keep_best=True)
  scores = {1: 0.1, 2: 0.9, 3: 0.2, 4: None, 5: 0.3}
  for step, score in scores.items():
    ckpt.save(step, lora.params, opt, {"step": step}, score=score)
  assert ckpt.all_steps() == [2, 4, 5]  # best (2) + latest two (4, 5)
  assert ckpt.restore_state(2) == {"step": 2}


def test_errors_name_the_problem(tmp_path, tiny_config):
  lora, opt = _state(tiny_config, 0)
  empty = Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="no checkpoints in"):
    empty.restore(None, lora.params, opt)
  ckpt = Checkpointer(str(tmp_path / "one"))
  ckpt.save(3, lora.params, opt, {"step": 3})
  with pytest.raises(CheckpointError, match="available: \\[3\\]"):
    ckpt.restore(5, lora.params, opt)
