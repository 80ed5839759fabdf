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
  spec = _spec(**{"objective.kind": "ppo", "objective.ppo_ratio_reference": reference,
                  "objective.ppo_epochs": 4})
  # Multi-epoch PPO: one token's ratio to the sampling policy at 15, sequences' ratios ~1.3.
  assert guards.collapse_alarms({"policy/ppo_ratio_max": 15.0,
                                 "policy/ppo_seq_ratio_max": 1.3}, spec) == []
  # The collapsed ARC run's sequence-level ratio to the base.
  alarms = guards.collapse_alarms({"policy/ppo_ratio_max": 21.75,
                                   "policy/ppo_seq_ratio_max": 21.75}, spec)
  assert len(alarms) == 1 and "sequence" in alarms[0] and "21.8 > 10" in alarms[0], alarms
  # Scalars without the sequence tag (a run logged before it existed), read as the report reads
  # them: the per-token maximum is the sequence ratio only for the ratio to the base, mean-reduced.
  legacy = guards.collapse_alarms({"policy/ppo_ratio_max": 21.75}, spec)
  assert legacy == (["PPO sequence ratio max 21.8 > 10"] if legacy_alarm else []), legacy
  summed = _spec(**{"objective.kind": "ppo", "objective.ppo_ratio_reference": reference,
                    "objective.ppo_epochs": 4, "objective.logprob_reduction": "sum"})
  assert guards.collapse_alarms({"policy/ppo_ratio_max": 21.75}, summed) == []


@pytest.mark.parametrize("reduction,kl,alarm", [("mean", 4.0, False), ("mean", 6.0, True),
                                                ("sum", 400.0, False), ("sum", 600.0, True)])
def test_kl_alarm_scales_with_the_logprob_reduction(reduction, kl, alarm):
  """policy/kl is aggregated like the loss: with `sum` it is K = 100 (GSM8K's CoT length) times
  the per-token mean, so collapse_kl = 5 nats per token is 500 for a sum."""
  spec = _spec(**{"objective.logprob_reduction": reduction})
  alarms = guards.collapse_alarms({"policy/kl": kl}, spec)
  assert bool(alarms) == alarm, alarms
