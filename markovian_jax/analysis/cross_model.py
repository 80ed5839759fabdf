"""Does another model understand the run's CoTs? Re-score them with a different reader.

    fmt = reader_prompt_format(reader_path)        # the reader family's own prompt format
    result = cross_model_scores(reader_ctx, rows)   # rows: samples.jsonl records of the run
    print(format_table(result, run_name, reader_name))
    plot(result, "cross_model.png", title)
    plot_over_training([(run_name, result)], "cross_model_training.png", title)  # paper's figure

For every logged CoT the reader (any model `load_checkpoint` accepts, any family, with its own
tokenizer and the run's prompts written in the reader's own format, as the reference wrote each
reader's prompts) gives log P(answer | CoT) - log P(answer | CoT'), CoT' being the base model's
greedy CoT that the run logged beside it: the reader's normalised reward R', set against the
run's own R = r - b. If the run logged no CoT' (objective.normalize_reward=False) both sides are
the plain answer log-probs r' and r. Scores are reduced over the answer tokens like the run's
reward (objective.logprob_reduction).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from markovian_jax.analysis.run_inputs import example
from markovian_jax.data import prompts
from markovian_jax.runtime import progress as progress_lib
from markovian_jax.training import evaluation

# The paper's cross-model figure: the reference smooths every logged batch (one per training step)
# with scipy.signal.savgol_filter(values, 40, 3), i.e. a cubic over 40 training steps.
SMOOTHING_STEPS = 40
SMOOTHING_ORDER = 3


def reader_prompt_format(reader_path: str) -> str:
  """The prompt format of the reader's family (`prompts.FAMILY_FORMATS`: Mistral [INST], Qwen
  ChatML, plain otherwise), read from its config without loading weights."""
  from markovian_jax.models.loading import resolve_model_path
  from markovian_jax.planning.shapes import model_config

  config, _ = model_config(resolve_model_path(reader_path), "float32")
  return prompts.family_format(config.model_type)


@dataclasses.dataclass
class CrossModelResult:
  """M = every CoT of the rows. steps int [M]; run float64 [M]: the run's R (or r);
  reader_cot float64 [M]: the reader's log P(answer | CoT); reader_base float64 [M]: the same
  for the question's CoT' (NaN when not logged); normalized: whether R / R' (vs r / r')."""

  steps: np.ndarray
  run: np.ndarray
  reader_cot: np.ndarray
  reader_base: np.ndarray
  normalized: bool

  @property
  def reader(self) -> np.ndarray:
    """The reader's R' = r'(CoT) - r'(CoT') (or r' when there is no CoT')."""
    return self.reader_cot - self.reader_base if self.normalized else self.reader_cot

  def to_json(self) -> dict:
    return {
      k: (v.tolist() if isinstance(v, np.ndarray) else v)
      for k, v in dataclasses.asdict(self).items()
    }


def cross_model_scores(
  reader_ctx,
  rows: Sequence[dict],
  *,
  lora=None,
  reduction: Optional[str] = None,
  batch_size: int = 32,
  progress: progress_lib.Progress = True,
) -> CrossModelResult:
  """Scores every CoT (and each question's CoT') of `rows` with the reader (base + `lora`),
  with one progress bar over both (True: its own; False: none; or a caller's)."""
  reduction = reduction or reader_ctx.spec.objective.loss.logprob_reduction
  normalized = all(r.get("base_cot") is not None and r.get("normalized") for r in rows)
  examples, cots, steps, run = [], [], [], []
  for r in rows:
    ex = example(r)
    examples += [ex] * len(r["cots"])
    cots += list(r["cots"])
    steps += [int(r["step"])] * len(r["cots"])
    run += list(r["normalized"] if normalized else r["rewards"])
  reader_base = np.full(len(cots), np.nan)
  total = len(cots) + (len(rows) if normalized else 0)
  with progress_lib.advancing(
    progress, total, "cross_model (CoTs, then CoT')" if normalized else "cross_model (CoTs)"
  ) as bar:
    reader_cot = evaluation.score_answers(
      reader_ctx, lora, examples, cots, reduction=reduction, batch_size=batch_size, progress=bar
    )
    if normalized:
      per_question = evaluation.score_answers(
        reader_ctx,
        lora,
        [example(r) for r in rows],
        [r["base_cot"] for r in rows],
        reduction=reduction,
        batch_size=batch_size,
        progress=bar,
      )
      reader_base = np.repeat(per_question, [len(r["cots"]) for r in rows])
  return CrossModelResult(
    np.asarray(steps), np.asarray(run, np.float64), reader_cot, reader_base, normalized
  )


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple:
  """(Pearson r, Spearman rho), NaN when either side is constant or there are < 3 points."""
  from scipy import stats

  if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan"), float("nan")
  return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def format_table(result: CrossModelResult, run_name: str, reader_name: str) -> str:
  """Markdown: means of the run's and the reader's rewards, their correlation and sign
  agreement, overall and by thirds of the logged steps."""
  sym = ("R", "R'") if result.normalized else ("r", "r'")
  what = "normalised reward" if result.normalized else "answer log-prob"
  lines = [
    f"Reader {reader_name} on {result.run.size} CoTs of run {run_name} "
    f"({sym[0]} = the run's {what}, {sym[1]} = the reader's)",
    "",
    f"| CoTs | logged steps | mean {sym[0]} (run) | mean {sym[1]} (reader) | Pearson | "
    f"Spearman | same sign |",
    "|---|---|---|---|---|---|---|",
  ]
  uniq = np.unique(result.steps)
  thirds = [("all", uniq)] + (
    [(f"part {i + 1}/3", part) for i, part in enumerate(np.array_split(uniq, 3))]
    if uniq.size >= 3
    else []
  )
  for label, steps in thirds:
    mask = np.isin(result.steps, steps)
    x, y = result.run[mask], result.reader[mask]
    pearson, spearman = _correlations(x, y)
    same = np.mean(np.sign(x) == np.sign(y))
    lines.append(
      f"| {mask.sum()} ({label}) | {steps.min()}-{steps.max()} | {x.mean():+.4f} | "
      f"{y.mean():+.4f} | {pearson:+.3f} | {spearman:+.3f} | {100 * same:.0f}% |"
    )
  return "\n".join(lines)


def plot(result: CrossModelResult, path: str, title: str) -> str:
  """Scatter of the reader's reward against the run's (coloured by step, y = x dashed) and both
  means per logged step; writes the PNG (epath) and returns `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sym = ("R", "R'") if result.normalized else ("r", "r'")
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  points = left.scatter(
    result.run, result.reader, c=result.steps, cmap="viridis", s=14, alpha=0.8, label="one CoT"
  )
  lo = np.nanmin([result.run.min(), result.reader.min()])
  hi = np.nanmax([result.run.max(), result.reader.max()])
  left.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
  fig.colorbar(points, ax=left, label="training step")
  left.set_xlabel(f"run's {sym[0]} (its own scorer)")
  left.set_ylabel(f"reader's {sym[1]}")
  left.set_title("per CoT")
  steps = np.unique(result.steps)
  for values, label in ((result.run, f"run's {sym[0]}"), (result.reader, f"reader's {sym[1]}")):
    right.plot(steps, [values[result.steps == s].mean() for s in steps], "o-", ms=3, label=label)
  right.axhline(0.0, color="k", lw=0.6)
  right.set_xlabel("training step")
  right.set_ylabel("mean over the step's CoTs (nats)")
  right.set_title("per logged step")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
  fig.suptitle(title)
  from markovian_jax.reporting.figures import save_png

  return save_png(fig, plt, path)


def smoothing_points(steps: np.ndarray, window_steps: int = SMOOTHING_STEPS) -> int:
  """Logged points spanning `window_steps` training steps: window_steps / the median spacing of
  the logged `steps` (train.text_every), rounded, at most their number. The reference logged
  every step, so its 40-point window is 40 steps; a run logging every 10 steps gets 4 points."""
  steps = np.unique(np.asarray(steps))
  if steps.size < 2:
    return int(steps.size)
  spacing = float(np.median(np.diff(steps)))
  return int(min(max(round(window_steps / spacing), 1), steps.size))


def smooth(steps: np.ndarray, values: np.ndarray, window_steps: int = SMOOTHING_STEPS) -> tuple:
  """(smoothed float64 [S], points): scipy's Savitzky-Golay filter of `values` (one per logged
  step of `steps`, int [S]) with a cubic over `points` = `smoothing_points` logged steps, as
  the reference's savgol_filter(values, 40, 3) over its every-step log. A window of no more than
  SMOOTHING_ORDER points cannot fit the cubic: the values come back as they are (points = 1)."""
  from scipy.signal import savgol_filter

  values = np.asarray(values, np.float64)
  points = smoothing_points(steps, window_steps)
  if points <= SMOOTHING_ORDER:
    return values.copy(), 1
  return savgol_filter(values, points, SMOOTHING_ORDER), points


def step_means(result: CrossModelResult) -> tuple:
  """(steps int [S], the run's mean R per step [S], the reader's mean R' per step [S])."""
  steps = np.unique(result.steps)
  run = np.array([result.run[result.steps == s].mean() for s in steps])
  reader = np.array([result.reader[result.steps == s].mean() for s in steps])
  return steps, run, reader


def plot_over_training(
  results: Sequence[tuple], path: str, title: str, window_steps: int = SMOOTHING_STEPS
) -> str:
  """The paper's cross-model figure: over training steps, the reader's R' = lp(a | CoT) -
  lp(a | CoT') (solid) and the generating run's own normalised reward R (dashed), each averaged
  over every logged step's CoTs and smoothed by `smooth` over `window_steps` training steps; one
  colour per run of `results` ([(run name, CrossModelResult)]) and, with several runs, their mean
  (black). The y label states the window in training steps and in logged points. Returns
  `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  curves, windows = [], set()
  for k, (name, result) in enumerate(results):
    steps, run, reader = step_means(result)
    color = f"C{k % 10}"
    reader_s, points = smooth(steps, reader, window_steps)
    run_s, _ = smooth(steps, run, window_steps)
    windows.add(points)
    ax.plot(steps, reader_s, "-", color=color, label=f"{name}: reader")
    ax.plot(steps, run_s, "--", color=color, alpha=0.6, label=f"{name}: generator")
    curves.append((steps, reader_s))
  if len(curves) > 1:
    grid = np.unique(np.concatenate([s for s, _ in curves]))
    mean = np.nanmean([np.interp(grid, s, c, left=np.nan, right=np.nan) for s, c in curves], axis=0)
    ax.plot(grid, mean, "k-", lw=2.2, label="mean of runs: reader")
  ax.axhline(0.0, color="k", lw=0.6)
  ax.set_xlabel("training step")
  points = "/".join(str(p) for p in sorted(windows))
  smoothing = (
    "unsmoothed: too few logged steps per window for a cubic"
    if windows == {1}
    else f"Savitzky-Golay, cubic over {window_steps} training steps ({points} logged)"
  )
  ax.set_ylabel(f"normalised reward (nats)\n{smoothing}")
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  ax.set_title(title)
  from markovian_jax.reporting.figures import save_png

  return save_png(fig, plt, path)
