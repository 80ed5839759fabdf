"""`benchmarks/accelerator.py --tiny` end to end (as CI runs it), its FLOP / byte formulas, and
the cost model's layer-scan accounting."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers

# Every figure a row must carry (the JSON holds more: raw times, first-call times).
SAMPLER_FIGURES = ("batch", "full_s", "prefill_s", "tok_s", "decode_tok_s", "decode_steps_s",
                   "prefill_tok_s", "decode_step_bytes", "roofline_steps_s",
                   "hbm_roofline_fraction", "full_first_call_s", "prefill_first_call_s")
OURS_SAMPLER = ("full_compile_s", "prefill_compile_s")
STEP_FIGURES = ("questions", "step_s", "sample_s", "score_s", "update_s", "cot_tok_s",
                "sample_tok_s", "score_tok_s", "update_tok_s", "update_model_flops",
                "update_tflop_s", "update_mfu", "first_step_s", "reward")
DEVICE_MEMORY = "peak_device_bytes"  # None on CPU: jax and torch report no device memory there


def _numbers(row, keys, where):
  for k in keys:
    assert k in row, f"{where}: {k} missing"
    assert isinstance(row[k], (int, float)) and math.isfinite(row[k]), f"{where}: {k}={row[k]}"


def test_tiny_run_has_every_figure(tmp_path):
  helpers.require("torch")
  helpers.require("peft")
  out = tmp_path / "bench"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8 fake devices here
  env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator", "--tiny", f"--out={out}",
       "--hbm_tb_s=0.05", "--peak_tflops=0.5"],
      cwd=str(helpers.REPO), env=env, capture_output=True, text=True, timeout=420)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / "accelerator.json").read_text())
  w = result["workload"]
  assert result["forbidden_modules"] == []
  assert result["device"] == {"kind": "cpu", "hbm_tb_s": 0.05, "peak_bf16_tflops": 0.5}
  for name in ("ours", "torch"):
    side = result[name]
    assert [r["batch"] for r in side["sampler"]] == w["batches"]
    assert [r["questions"] for r in side["step"]] == w["questions"]
    for row in side["sampler"]:
      _numbers(row, SAMPLER_FIGURES + (OURS_SAMPLER if name == "ours" else ()), name)
      assert row[DEVICE_MEMORY] is None
    for row in side["step"]:
      _numbers(row, STEP_FIGURES, name)
      assert DEVICE_MEMORY in row
  for row in result["ours"]["step"]:
    assert set(row["compile_s"]) == {"sample", "score", "update"}
    assert row["compiles_in_timed_steps"] == 0  # nothing recompiles after the first step
  # Same weights on both sides: the torch worker's copies sum to our leaves' sums.
  assert result["torch"]["weights_check"]["weight_sums_max_rel_diff"] < 1e-6
  assert result["torch"]["weights_check"]["leaves"] == 12
  for row in result["ratios"]["sampler"]:
    _numbers(row, ("decode_tok_s", "prefill_tok_s", "tok_s"), "ratio")
  for row in result["ratios"]["step"]:
    _numbers(row, ("step_s", "sample_s", "score_s", "update_s"), "ratio")
  # Rewards are log-probs of a random tiny model: about -log(V) per token on both sides.
  for name in ("ours", "torch"):
    assert all(-9 < r["reward"] < -4 for r in result[name]["step"])
  assert (out / "table.txt").read_text().startswith("tiny on cpu")


def test_8b_formulas():
  from benchmarks import accelerator as acc
  c = acc.llama31_8b()
  layer, head = acc.matmul_params(c)
  norms = (2 * c.num_layers + 1) * c.hidden_size
  assert c.num_layers * layer + head + norms + c.vocab_size * c.hidden_size == c.num_params
  assert c.num_params == 8_030_261_248
  # 20,971,520 LoRA parameters of rank 8 on all 7 projections (PEFT's count for Llama-3.1-8B).
  assert c.num_layers * acc.lora_layer_params(c, 8) == 20_971_520
  # A decode step reads 15.01 GB of bf16 weights (not the 1.05 GB embedding) + the fp32 LoRA.
  weights = 2 * (c.num_params - 128256 * 4096) + 4 * 20_971_520
  assert acc.weight_bytes_per_decode_step(c, 8) == weights
  assert acc.kv_bytes_per_slot(c) == 128 * 1024
  w = acc.Workload("8b", c)
  n, positions = 8 * 12, 8 * 192 + 8 * 12 * 100
  # policy forward + base forward + activation gradients (3 forwards; the LoRA's in two of
  # them), and the LoRA weight gradients (2 per LoRA parameter per position).
  expected = 3 * (2 * positions * c.num_layers * layer + 2 * n * 100 * head) + \
      6 * positions * c.num_layers * acc.lora_layer_params(c, 8)
  assert acc.update_model_flops(c, w, 8) == pytest.approx(expected)


def test_layer_scan_accounting_is_exact_on_a_scan_of_matmuls():
  """XLA counts a loop body once; `layer_scan_costs` recovers every layer."""
  import jax
  import jax.numpy as jnp
  from benchmarks import cost_model

  def costs(layers, unroll):
    def f(x, ws):
      return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]
    with cost_model.layer_unroll(layers, unroll):
      compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((8, 64), jnp.float32),
                                  jax.ShapeDtypeStruct((layers, 64, 64), jnp.float32)).compile()
    return cost_model._costs(compiled)

  reported = costs(6, 1)[0]
  assert reported == pytest.approx(2 * 8 * 64 * 64, rel=1e-3)  # one layer: the loop body once
  flops, _ = cost_model.layer_scan_costs(lambda u: costs(6, u), 6)
  assert flops == pytest.approx(6 * 2 * 8 * 64 * 64, rel=1e-3)
  with pytest.raises(ValueError, match="even"):
    cost_model.layer_scan_costs(lambda u: costs(3, u), 3)


def test_cost_model_rows_on_a_tiny_model():
  """The cost model's rows on a 2-layer model, one device: compiled FLOPs at least the model's
  (the update adds rematerialisation, so more than 1.33x), a decode step's bytes at least its
  weights and KV cache."""
  import dataclasses
  from benchmarks import accelerator as acc, cost_model
  c = acc.tiny("einsum")
  w = dataclasses.replace(acc.Workload("t", c), questions=(2,), group=2, cot=4, step_prompt=8,
                          answer_prefix=2, answer_suffix=2, answer_span=1)
  rows = cost_model.rows(c, w, [(4, 16)], [2], [1], log=lambda r: None)
  decode, update = rows
  assert decode["flops_ratio"] >= 1 and decode["bytes_ratio"] >= 1
  assert update["flops_ratio"] > 1.33
  assert update["bytes_ratio"] is None and update["h100_compute_ms"] > 0
  table = cost_model.markdown(rows)
  assert table.count("\n") == 3 and "decode step B=4, S=16" in table
