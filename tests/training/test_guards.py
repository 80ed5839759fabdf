"""The collapse guard's thresholds act on the quantities they were set for: the sequence-level
PPO ratio (both ratio references), and a KL threshold per CoT token whatever the reduction."""

import importlib

import pytest

from markovian_jax.training import config_validation, guards


def _spec(**overrides):
  c = importlib.import_module("configs.gsm8k").get_config()
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return config_validation.validate(c)


@pytest.mark.parametrize("reference,legacy_alarm", [("behaviour", False), ("base", True)])
def test_ppo_ratio_alarm_reads_the_sequence_ratio(reference, legacy_alarm):
  spec = _spec(
    **{
      "objective.kind": "ppo",
      "objective.ppo_ratio_reference": reference,
      "objective.ppo_epochs": 4,
    }
  )
  # Multi-epoch PPO: one token's ratio to the sampling policy at 15, sequences' ratios ~1.3.
  assert (
    guards.collapse_alarms({"policy/ppo_ratio_max": 15.0, "policy/ppo_seq_ratio_max": 1.3}, spec)
    == []
  )
  # The collapsed ARC run's sequence-level ratio to the base.
  alarms = guards.collapse_alarms(
    {"policy/ppo_ratio_max": 21.75, "policy/ppo_seq_ratio_max": 21.75}, spec
  )
  assert len(alarms) == 1 and "sequence" in alarms[0] and "21.8 > 10" in alarms[0], alarms
  # Scalars without the sequence tag (a run logged before it existed), read as the report reads
  # them: the per-token maximum is the sequence ratio only for the ratio to the base, mean-reduced.
  legacy = guards.collapse_alarms({"policy/ppo_ratio_max": 21.75}, spec)
  assert legacy == (["PPO sequence ratio max 21.8 > 10"] if legacy_alarm else []), legacy
  summed = _spec(
    **{
      "objective.kind": "ppo",
      "objective.ppo_ratio_reference": reference,
      "objective.ppo_epochs": 4,
      "objective.logprob_reduction": "sum",
    }
  )
  assert guards.collapse_alarms({"policy/ppo_ratio_max": 21.75}, summed) == []


@pytest.mark.parametrize(
  "reduction,kl,alarm",
  [("mean", 4.0, False), ("mean", 6.0, True), ("sum", 400.0, False), ("sum", 600.0, True)],
)
def test_kl_alarm_scales_with_the_logprob_reduction(reduction, kl, alarm):
  """policy/kl is aggregated like the loss: with `sum` it is K = 100 (GSM8K's CoT length) times
  the per-token mean, so collapse_kl = 5 nats per token is 500 for a sum."""
  spec = _spec(**{"objective.logprob_reduction": reduction})
  alarms = guards.collapse_alarms({"policy/kl": kl}, spec)
  assert bool(alarms) == alarm, alarms


@pytest.mark.parametrize(
  "stops,kl,length,alarm",
  [(True, 90.0, 20.0, False), (True, 110.0, 20.0, True), (False, 110.0, 20.0, False)],
)
def test_kl_alarm_of_free_length_cots_reads_the_steps_mean_length(stops, kl, length, alarm):
  """With sampling.cot_stops_at_eos a summed KL covers the step's real CoT tokens: 5 nats per
  token over a mean policy/cot_length of 20 is 100, where K = 100 would allow 500."""
  spec = _spec(**{"objective.logprob_reduction": "sum", "sampling.cot_stops_at_eos": stops})
  alarms = guards.collapse_alarms({"policy/kl": kl, "policy/cot_length": length}, spec)
  assert bool(alarms) == alarm, alarms


class _Run:
  """What a guard acts through, recorded: the checkpointed steps, saves, rollbacks, scalars."""

  def __init__(self, saved):
    self.saved, self.saves, self.rollbacks, self.scalars = list(saved), 0, [], []

  def callables(self):
    return dict(save=self.save, rollback=self.rollbacks.append, saved_steps=lambda: self.saved)

  def save(self):
    self.saves += 1


def _info(step, **scalars):
  from markovian_jax.training.hooks import StepInfo

  return StepInfo(step, scalars)


def test_nonfinite_guard_rolls_back_through_its_callables_then_stops():
  """patience=2, rollback, max_rollbacks=1, checkpoints of steps 2, 4 and 6: the second non-finite
  step in a row (step 6) rolls back to the newest checkpoint before it (4, not its own) and halts
  the round; the next such pair (no checkpointed good step between) is one rollback too many and
  stops, unsaved."""
  run = _Run([2, 4, 6])
  guard = guards.NonFiniteGuard(
    checkpoint_every=2, patience=2, action="rollback", max_rollbacks=1, **run.callables()
  )
  first, second = (
    _info(5, **{"guard/nonfinite_update": 1.0}),
    _info(6, **{"guard/nonfinite_update": 1.0}),
  )
  guard(first)
  assert run.rollbacks == [] and not first.halt
  guard(second)
  assert run.rollbacks == [4] and second.halt and run.saves == 0
  guard(_info(5, **{"guard/nonfinite_update": 1.0}))
  with pytest.raises(guards.TrainingStopped, match="still failing after 1 rollbacks to step 4"):
    guard(_info(6, **{"guard/nonfinite_update": 1.0}))
  assert run.rollbacks == [4] and run.saves == 0
  # action=stop: the state is saved through `save`, then the run stops.
  stop = _Run([2])
  guard = guards.NonFiniteGuard(checkpoint_every=2, patience=1, action="stop", **stop.callables())
  guard(_info(3, **{"train/loss": 1.0}))  # a good step
  with pytest.raises(guards.TrainingStopped, match="1 consecutive non-finite updates at step 4"):
    guard(_info(4, **{"guard/nonfinite_update": 1.0}))
  assert stop.saves == 1 and stop.rollbacks == []


@pytest.mark.parametrize("action", ["warn", "stop", "rollback"])
def test_collapse_guard_writes_its_alarm_and_acts_through_callables(action):
  spec = _spec(**{"train.collapse_action": action, "train.max_rollbacks": 1})
  run = _Run([3])
  written = []
  guard = guards.CollapseGuard(
    spec, write_scalars=lambda step, d: written.append((step, d)), **run.callables()
  )
  guard(_info(4, **{"policy/kl": 0.0}))
  assert written == [(4, {"guard/collapse_alarm": 0.0})]
  alarming = _info(5, **{"policy/kl": 1e6})
  if action == "stop":
    with pytest.raises(guards.TrainingStopped, match="collapse_action=stop"):
      guard(alarming)
    assert run.saves == 1
  else:
    guard(alarming)
    assert run.rollbacks == ([3] if action == "rollback" else [])
    assert alarming.halt == (action == "rollback") and run.saves == 0
  assert written[-1] == (5, {"guard/collapse_alarm": 1.0})
