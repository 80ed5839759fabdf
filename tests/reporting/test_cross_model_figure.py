"""The paper's cross-model figure by its content: every logged step, each curve scipy's
Savitzky-Golay filter (a cubic) of the per-step means over a window stated in training steps, as
the reference's savgol_filter(values, 40, 3) over its every-step log; axes in training steps."""

import matplotlib
import numpy as np
import pytest
from scipy.signal import savgol_filter

from markovian_jax.analysis import cross_model
from markovian_jax.reporting import figures

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)


def _result(steps, shift, cots_per_step=3, seed=0):
  """Every logged step with `cots_per_step` CoTs of noisy rewards; the reader's R' = R + 0.5 -
  0.25 per CoT, its CoT' scored 0.25."""
  rng = np.random.default_rng(seed)
  per_cot = np.repeat(steps, cots_per_step)
  run = np.sin(per_cot / 90.0) + shift + rng.normal(scale=0.3, size=per_cot.size)
  reader_cot = run + 0.5 + rng.normal(scale=0.2, size=per_cot.size)
  return cross_model.CrossModelResult(per_cot, run, reader_cot, np.full(run.shape, 0.25), True)


def _drawn(monkeypatch, results, **kw):
  """The figure plot_over_training draws (its save is caught; nothing is written)."""
  caught = {}

  def save(fig, plt, path):
    caught["fig"] = fig
    return path

  monkeypatch.setattr(figures, "save_png", save)
  cross_model.plot_over_training(results, "unused.png", "t", **kw)
  plt.close(caught["fig"])
  return caught["fig"].axes[0]


def _means(result):
  steps = np.unique(result.steps)
  return (
    steps,
    np.array([result.run[result.steps == s].mean() for s in steps]),
    np.array([result.reader[result.steps == s].mean() for s in steps]),
  )


@pytest.mark.parametrize("every, window_steps, points", [(1, 40, 40), (5, 40, 8), (5, 60, 12)])
def test_curves_are_scipys_savgol_of_every_logged_step(monkeypatch, every, window_steps, points):
  steps = np.arange(0, 400, every)
  a, b = _result(steps, 0.0, seed=1), _result(steps[3:], 1.0, seed=2)
  ax = _drawn(monkeypatch, [("a", a), ("b", b)], window_steps=window_steps)
  lines = {line.get_label(): line for line in ax.get_lines()}
  for name, result in (("a", a), ("b", b)):
    logged, run, reader = _means(result)
    for label, values in ((f"{name}: reader", reader), (f"{name}: generator", run)):
      x, y = lines[label].get_data()
      np.testing.assert_array_equal(x, logged)  # every logged step, in training steps
      # float64 both sides, one library: equal up to the last bits of the per-step means.
      np.testing.assert_allclose(y, savgol_filter(values, points, 3), rtol=1e-12, atol=1e-12)
  assert ax.get_xlabel() == "training step"
  assert f"cubic over {window_steps} training steps ({points} logged)" in ax.get_ylabel()


def test_a_window_too_short_for_the_cubic_is_drawn_unsmoothed_and_says_so(monkeypatch):
  # Logged every 10 steps, a 30-step window holds 3 points: no cubic fits, nothing is smoothed.
  steps = np.arange(0, 200, 10)
  a = _result(steps, 0.0)
  ax = _drawn(monkeypatch, [("a", a)], window_steps=30)
  _, y = {l.get_label(): l for l in ax.get_lines()}["a: reader"].get_data()
  np.testing.assert_array_equal(y, _means(a)[2])
  assert "unsmoothed" in ax.get_ylabel()
  # Fewer logged steps than the window: the window shrinks to all of them.
  assert cross_model.smoothing_points(np.arange(0, 60, 10), 400) == 6


def test_analyze_cross_model_reads_every_logged_step_and_shows_progress(
  tmp_path, tiny_model_dir, capsys
):
  """`analyze cross_model` with its defaults scores the CoTs of every logged step (34 here, more
  than the 32 questions it used to stop at), draws them all, and shows its progress (done/total,
  elapsed<time left, rate) as training does."""
  import json
  import re
  import types

  from markovian_jax import analyze
  from tests.run_fixtures import synthetic_run

  run = synthetic_run(tmp_path / "run", steps=340)  # logged every 10 steps
  samples = tmp_path / "run" / "samples.jsonl"
  # One CoT per logged question keeps the reader's work small.
  logged = [
    {**r, "cots": r["cots"][:1], "rewards": r["rewards"][:1], "normalized": r["normalized"][:1]}
    for r in map(json.loads, open(samples))
  ]
  samples.write_text("".join(json.dumps(r) + "\n" for r in logged))
  assert len(logged) == 34
  f = types.SimpleNamespace(
    workdir=run, compare=None, reader=tiny_model_dir, num_cots=None, batch_size=8, smooth_steps=40
  )
  text = analyze.run_cross_model(f)
  assert f"on {len(logged)} CoTs of run run" in text
  saved = json.loads((tmp_path / "run" / "analysis" / "cross_model.json").read_text())
  assert sorted(set(saved["steps"])) == [r["step"] for r in logged]
  # 34 CoTs, then the 34 questions' CoT': one bar over both passes.
  err = capsys.readouterr().err
  assert re.search(
    r"cross_model \(CoTs, then CoT'\): 100%\|[^|]*\| 68/68 "
    r"\[\d\d:\d\d<00:00, +[\d.?]+ ?(row/s|s/row)\]",
    err,
  ), err[-2000:]
