"""A training run's state as one pytree, and how it is checkpointed.

    state = TrainState.create(lora, opt_state, seed)
    state, info = trainer.advance(state, examples)      # one step: the state in, the state out
    save(ckpt, state, data=stream.state(), config=config.to_dict())
    state, data = restore(ckpt, step, like=state)

`TrainState` holds everything a step changes on the device: the LoRA adapter, the optimizer
state, the RNG key and the objective's cross-step baseline state, plus the count of steps done;
for a method whose scorer is `ema` (NOVER, docs/answer-likelihood.md) also the EMA-lagged copy of
the adapter that scores its reward and is its KL reference.
The data stream's position is not in it: `ExampleStream` is a host-side Python object whose cursor
is a small JSON dict, saved beside the state (the checkpoint's "data" entry) and restored into the
stream by the caller.

On disk (unchanged from the first checkpoints, so old and new ones load alike): the orbax items
"lora" (the adapter's params tree), "opt_state" (the optimizer tree) and "state", a JSON dict
{"step", "data", "rng", "baseline", "config", "lora": {"rank", "alpha", "dropout"}} that
evaluate, export and the analyses read without rebuilding the run; with an EMA copy, a fourth
item "ema_lora" (its params tree, the layout of "lora"; its rank, alpha and dropout are the
adapter's). A run that keeps an EMA copy refuses, in one line, to resume from a checkpoint
without one (it was saved by a run of another method); any other run ignores the item.
"""

from __future__ import annotations

from typing import Any, Optional

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from markovian_jax import objectives as obj
from markovian_jax.models.lora import LoraAdapter

# The JSON state's keys; "data" and "config" come from the caller.
JSON_KEYS = ("step", "data", "rng", "baseline", "config", "lora")


@struct.dataclass
class TrainState:
  """What a training step takes and returns.

  lora: the adapter; its `params` leaves are float arrays sharded as `train_step.tree_shardings`
    lays them out (rank/alpha/dropout are static).
  opt_state: the optax state of the adapter (same layout as `lora` for the moments; scalar
    counts and the injected learning rate replicated).
  rng: uint32 [2], a raw PRNG key (`jax.random.PRNGKey`), split once per step.
  baseline: `objectives.BaselineState` (float32/int32 scalars: EMA baseline, expert-iteration
    statistics).
  step: the number of training steps done, a host int (static: the schedule and the hooks read
    it without a device round trip, and it is never traced).
  ema_lora: None, or for a method whose scorer is `ema` the EMA-lagged copy of `lora` (same
    layout, dtypes and shardings): the reward scorer and KL reference, moved towards `lora`
    after every objective.scorer_ema_every-th optimizer step (`train_step.ema_update`).
  """

  lora: LoraAdapter
  opt_state: Any
  rng: jax.Array
  baseline: obj.BaselineState
  step: int = struct.field(pytree_node=False, default=0)
  ema_lora: Optional[LoraAdapter] = None

  @classmethod
  def create(cls, lora: LoraAdapter, opt_state, seed: int, *, ema: bool = False) -> "TrainState":
    """Step 0: the run's key is PRNGKey(seed), the baseline state fresh; `ema`: keep an EMA copy,
    starting as a copy of `lora` (its own buffers: the update donates the adapter's)."""
    return cls(
      lora=lora,
      opt_state=opt_state,
      rng=jax.random.PRNGKey(seed),
      baseline=obj.BaselineState.init(),
      step=0,
      ema_lora=jax.tree.map(jnp.copy, lora) if ema else None,
    )

  def to_json(self) -> dict:
    """The host part of the checkpoint's JSON state: step, rng, baseline and the adapter's
    static settings (the keys the checkpoint readers use to rebuild the adapter)."""
    return {
      "step": self.step,
      "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
      "baseline": self.baseline.to_json(),
      "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha, "dropout": self.lora.dropout},
    }

  def with_json(self, saved: dict) -> "TrainState":
    """This state with the step, key and baseline of a checkpoint's JSON state (the arrays are
    restored by orbax into this state's shapes and shardings)."""
    return self.replace(
      step=int(saved["step"]),
      rng=jnp.asarray(np.asarray(saved["rng"], np.uint32)),
      baseline=obj.BaselineState.from_json(saved["baseline"]),
    )


def checkpoint_json(state: TrainState, data: dict, config: dict) -> dict:
  """The checkpoint's JSON state, in the key order of `JSON_KEYS`."""
  out = dict(state.to_json(), data=data, config=config)
  return {k: out[k] for k in JSON_KEYS}


def save(
  ckpt,
  state: TrainState,
  *,
  data: dict,
  config: dict,
  score: Optional[float] = None,
  force: bool = False,
) -> bool:
  """Saves `state` (with the data cursor `data` and the run's `config` dict) as checkpoint
  `state.step` of `ckpt` (`runtime.checkpointing.Checkpointer`); collective on every process."""
  return ckpt.save(
    state.step,
    state.lora.params,
    state.opt_state,
    checkpoint_json(state, data, config),
    score=score,
    force=force,
    ema_params=None if state.ema_lora is None else state.ema_lora.params,
  )


def restore(ckpt, step: int, like: TrainState) -> tuple[TrainState, dict]:
  """Checkpoint `step` of `ckpt` as a TrainState with the shapes, dtypes and shardings of
  `like`, and its JSON state (whose "data" entry is the stream cursor to restore). The EMA copy
  is restored when `like` keeps one (a checkpoint without it: CheckpointError, one line)."""
  params, opt_state, saved = ckpt.restore(step, like.lora.params, like.opt_state)
  state = like.replace(lora=like.lora.replace(params=params), opt_state=opt_state)
  if like.ema_lora is not None:
    ema = ckpt.restore_ema(step, like.ema_lora.params)
    state = state.replace(ema_lora=like.ema_lora.replace(params=ema))
  return state.with_json(saved), saved
