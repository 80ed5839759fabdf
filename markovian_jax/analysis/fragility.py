"""How much does the answer depend on the CoT? Perturb CoTs and score the answer again.

    result = fragility_scores(ctx, lora, examples, cots, level="char", accuracy=True)
    result.effect("delete", 40)             # float [N]: log P(answer | CoT) - log P(.. | perturbed)
    print(format_run(result))               # one run: mean effect per kind x severity
    print(format_comparison(compare(markovian, non_markovian), "logprob"))  # the paper's table

Each CoT is perturbed by every `perturbations.KINDS` at every severity, at character or token
level; the scorer (base + `lora`; None = the base model, as the reference's analysis) gives
log P(answer | answer prompt with the perturbed CoT), reduced over the answer tokens like the
run's reward, and with `accuracy` the reader's greedy answer is extracted and checked as in
evaluation. The effect of a perturbation is the drop from the unperturbed CoT: positive when the
perturbation hurts. `compare` pairs two runs' CoTs by (step, question id) when both logged the
same questions (same data seed) and reports, per kind and severity, the mean difference of
effects (A - B) and how often A's effect is the larger (the paper's "consistency"); without
common questions it compares all pairs.

`fragility_scores` takes a RunContext and plain lists, so a training hook can call it on the
step's own rollout (examples, CoT texts) with the current adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from markovian_jax.analysis import perturbations
from markovian_jax.data import extraction
from markovian_jax.runtime import progress as progress_lib
from markovian_jax.training import evaluation

METRICS = ("logprob", "accuracy")


@dataclasses.dataclass
class FragilityResult:
  """Scores of N CoTs under every perturbation.

  level: 'char' or 'token'. keys: N hashable names of the CoTs (e.g. (step, question id)), for
  pairing runs. logprobs: {(kind, percent): float64 [N]}; correct: the same of bool [N], or None
  without accuracy. Severity 0 is the unperturbed CoT, shared by every kind.
  """

  level: str
  kinds: tuple
  severities: tuple
  keys: list
  logprobs: dict
  correct: Optional[dict] = None

  def values(self, metric: str, kind: str, percent: int) -> np.ndarray:
    table = self.logprobs if metric == "logprob" else self.correct
    if table is None:
      raise ValueError(f"no {metric} scores (fragility_scores(accuracy=True) gives accuracy)")
    return np.asarray(table[(kind, percent)], np.float64)

  def effect(self, kind: str, percent: int, metric: str = "logprob") -> np.ndarray:
    """float64 [N]: the score of the unperturbed CoT minus that of the perturbed one."""
    return self.values(metric, kind, 0) - self.values(metric, kind, percent)

  @classmethod
  def from_json(cls, d: dict) -> "FragilityResult":
    """The result `to_json` wrote (keys come back as tuples where they were lists)."""

    def table(src):
      return {
        (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])): np.asarray(v, np.float64)
        for k, v in src.items()
      }

    correct = None
    if "accuracy" in d:
      correct = {k: v.astype(bool) for k, v in table(d["accuracy"]).items()}
    return cls(
      d["level"],
      tuple(d["kinds"]),
      tuple(d["severities"]),
      [tuple(k) if isinstance(k, list) else k for k in d["keys"]],
      table(d["logprob"]),
      correct,
    )

  def to_json(self) -> dict:
    out = {
      "level": self.level,
      "kinds": list(self.kinds),
      "severities": list(self.severities),
      "keys": [list(k) if isinstance(k, tuple) else k for k in self.keys],
      "logprob": {f"{k}/{p}": v.tolist() for (k, p), v in self.logprobs.items()},
    }
    if self.correct is not None:
      out["accuracy"] = {
        f"{k}/{p}": np.asarray(v, float).tolist() for (k, p), v in self.correct.items()
      }
    return out


def perturbed_cots(
  cots: Sequence[str],
  kinds: Sequence[str],
  severities: Sequence[int],
  *,
  level: str = "char",
  seed: int = 0,
  tokenizer=None,
  vocab=None,
  replacement: str = "bernoulli",
) -> dict:
  """{(kind, percent): N texts} for every kind and non-zero severity, plus ('original', 0)."""
  if level == "token" and vocab is None:
    vocab = perturbations.TokenVocabulary.from_tokenizer(tokenizer)
  out = {("original", 0): list(cots)}
  for kind in kinds:
    for pct in severities:
      if pct:
        out[(kind, pct)] = [
          perturbations.perturb(
            c,
            kind,
            pct,
            seed,
            level=level,
            tokenizer=tokenizer,
            vocab=vocab,
            replacement=replacement,
          )
          for c in cots
        ]
  return out


# ------------------------------------------------------------------ the paper's protocol inputs


def heldout_examples(ctx, num: int) -> list:
  """The paper's fresh held-out questions: a seeded subset (eval.seed, MMLU stratified) of `num`
  items of the run's eval split (wiki: its held-out article range; QA: the test split); 0 = all."""
  from markovian_jax.data import selection
  from markovian_jax.training.run_context import read_examples

  spec = ctx.spec
  split = read_examples(spec, spec.data.eval_split, ctx.tokenizer)
  return selection.eval_subset(
    split, num or len(split), spec.eval.seed, selection.strata(spec.task)
  )


def generate_cots(
  ctx,
  lora,
  examples: Sequence,
  *,
  seed: int = 0,
  batch_size: int = 32,
  temperature: Optional[float] = None,
  progress: progress_lib.Progress = True,
) -> list:
  """One CoT per example, sampled by base + `lora` (the run's adapter) at the training
  temperature (or `temperature`), as in training: cot_length tokens, or up to the first EOS
  with sampling.cot_stops_at_eos (the text stops before it): N strings.
  `progress`: a bar of the questions done (True: its own; False: none; or a caller's)."""
  import jax

  from markovian_jax import sampling
  from markovian_jax.training import pipeline
  from markovian_jax.training.run_context import fetch

  s = ctx.spec.sampling
  t = s.temperature if temperature is None else temperature
  rng, out = jax.random.PRNGKey(seed), []
  batch_size = min(batch_size, len(examples))
  with progress_lib.advancing(progress, len(examples), "sample CoTs", unit="question") as bar:
    for start in range(0, len(examples), batch_size):
      chunk = list(examples[start : start + batch_size])
      real = len(chunk)
      chunk = chunk + [chunk[-1]] * (batch_size - real)  # one batch shape, one compile
      rng, key = jax.random.split(rng)
      cot = sampling.generate(
        ctx.model,
        ctx.params,
        [ctx.cot_prompt_ids(ex) for ex in chunk],
        max_new_tokens=ctx.cot_length,
        min_new_tokens=pipeline.min_new_tokens(ctx.spec),
        rng=key,
        temperature=t,
        top_k=s.top_k,
        top_p=s.top_p,
        lora=lora,
        eos_ids=ctx.eos_ids,
        mesh=ctx.mesh,
      )
      out += pipeline.decode_cots(ctx, fetch(cot.tokens), fetch(cot.lengths))[:real]
      bar.update(real)
  return out


def _correct(ctx, examples: Sequence, answers: Sequence[str]) -> np.ndarray:
  """Whether each reader answer, extracted by the task's primary method, is the gold answer."""
  first_line = ctx.spec.eval.answer_first_line
  method = extraction.methods(ctx.task)[0]
  hits = []
  for ex, text in zip(examples, answers):
    read = evaluation.first_line(text) if first_line else text
    pred = extraction.extract_all(ctx.task, read, len(ex.choices) if ex.choices else None)[method]
    hits.append(extraction.is_correct(pred, ex.answer, ctx.task))
  return np.asarray(hits, bool)


def fragility_scores(
  ctx,
  lora,
  examples: Sequence,
  cots: Sequence[str],
  *,
  level: str = "char",
  kinds: Sequence[str] = perturbations.KINDS,
  severities: Sequence[int] = perturbations.SEVERITIES,
  seed: int = 0,
  accuracy: bool = False,
  keys: Optional[list] = None,
  reduction: Optional[str] = None,
  batch_size: int = 32,
  vocab: Optional[perturbations.TokenVocabulary] = None,
  replacement: str = "bernoulli",
  progress: progress_lib.Progress = True,
) -> FragilityResult:
  """Scores every perturbation of `cots` (N texts, one per example) under base + `lora`.

  reduction: over the answer tokens (default: the run's objective.logprob_reduction).
  accuracy: also read an answer greedily (eval.answer_max_tokens) and check it; not for
    wiki_continuation, whose answer is scored by log-prob only.
  vocab: the tokenizer's TokenVocabulary for level='token' (built once when None).
  replacement: character-level replacement, `perturbations.REPLACEMENTS` (the reference's
    per-character Bernoulli by default).
  progress: one bar over all the rows scored and read (True: its own; False: none; or a
    caller's).
  """
  for kind in kinds:
    perturbations.check(kind, 0)
  severities = tuple(sorted({0, *severities}))
  variants = perturbed_cots(
    cots,
    kinds,
    severities,
    level=level,
    seed=seed,
    tokenizer=ctx.tokenizer,
    vocab=vocab,
    replacement=replacement,
  )
  names = list(variants)
  flat_examples = [ex for _ in names for ex in examples]
  flat_cots = [c for name in names for c in variants[name]]
  reduction = reduction or ctx.spec.objective.loss.logprob_reduction
  read = accuracy and (ctx.task in extraction.NUMERIC_TASKS or ctx.task in extraction.MCQ_TASKS)
  # Rows scored, then (with accuracy) the same rows read: one bar over both passes.
  with progress_lib.advancing(
    progress, len(flat_cots) * (1 + read), f"fragility {level} (score{', read' if read else ''})"
  ) as bar:
    lp = evaluation.score_answers(
      ctx, lora, flat_examples, flat_cots, reduction=reduction, batch_size=batch_size, progress=bar
    )
    answers = (
      evaluation.read_answers(
        ctx,
        lora,
        flat_examples,
        flat_cots,
        answer_max_tokens=ctx.spec.eval.answer_max_tokens,
        batch_size=batch_size,
        progress=bar,
      )
      if read
      else None
    )
  n = len(cots)
  by_name = {name: lp[i * n : (i + 1) * n] for i, name in enumerate(names)}
  correct_by = None
  if read:
    hits = _correct(ctx, flat_examples, answers)
    correct_by = {name: hits[i * n : (i + 1) * n] for i, name in enumerate(names)}

  def table(source):
    return {
      (k, p): source[("original", 0) if p == 0 else (k, p)] for k in kinds for p in severities
    }

  return FragilityResult(
    level,
    tuple(kinds),
    severities,
    list(keys or range(n)),
    table(by_name),
    None if correct_by is None else table(correct_by),
  )


# ------------------------------------------------------------------ two runs


@dataclasses.dataclass
class Comparison:
  """One row of the paper's table: A minus B at (kind, percent)."""

  kind: str
  percent: int
  mean_difference: float  # mean over comparisons of effect_A - effect_B
  consistency: float  # fraction where effect_A > effect_B (ties count half)
  comparisons: int
  paired: bool


def compare(a: FragilityResult, b: FragilityResult, metric: str = "logprob") -> list:
  """Rows of effect_A - effect_B for every kind and non-zero severity both runs scored."""
  common = [k for k in dict.fromkeys(a.keys) if k in set(b.keys)]
  ia = {k: a.keys.index(k) for k in common}
  ib = {k: b.keys.index(k) for k in common}
  rows = []
  for kind in [k for k in a.kinds if k in b.kinds]:
    for pct in [p for p in a.severities if p and p in b.severities]:
      ea, eb = a.effect(kind, pct, metric), b.effect(kind, pct, metric)
      if common:
        da = np.asarray([ea[ia[k]] for k in common])
        db = np.asarray([eb[ib[k]] for k in common])
        diff = da - db
        wins = np.mean((diff > 0) + 0.5 * (diff == 0))
        rows.append(Comparison(kind, pct, float(diff.mean()), float(wins), len(common), True))
      else:
        diff = ea[:, None] - eb[None, :]
        wins = np.mean((diff > 0) + 0.5 * (diff == 0))
        rows.append(
          Comparison(kind, pct, float(ea.mean() - eb.mean()), float(wins), diff.size, False)
        )
  return rows


_TITLES = {
  "delete": "Delete",
  "truncate_front": "Truncate Front",
  "truncate_back": "Truncate Back",
  "digit_replace": "Digit Replace",
  "char_replace": "Character Replace",
}


def format_comparison(
  rows: Sequence[Comparison], metric: str = "logprob", names: tuple = ("A", "B")
) -> str:
  """The paper's Table 1 layout (markdown)."""
  unit = "nats" if metric == "logprob" else "accuracy"
  lines = [
    f"| Perturbation Type | Degree | Mean Effect Difference ({unit}, {names[0]} - "
    f"{names[1]}) | Overall Consistency | Total Comparisons |",
    "|---|---|---|---|---|",
  ]
  last = None
  for r in rows:
    title = f"**{_TITLES[r.kind]}**" if r.kind != last else ""
    last = r.kind
    n = f"{r.comparisons:,}" + ("" if r.paired else " (unpaired)")
    lines.append(
      f"| {title} | {r.percent}% | {r.mean_difference:+.4f} | {100 * r.consistency:.1f}% | {n} |"
    )
  return "\n".join(lines)


def format_run(result: FragilityResult, metric: str = "logprob") -> str:
  """One run's mean effect per kind (rows) and severity (columns), markdown; the unperturbed
  mean score in the header."""
  pcts = [p for p in result.severities if p]
  base = result.values(metric, result.kinds[0], 0).mean()
  what = "log-prob drop (nats)" if metric == "logprob" else "accuracy drop"
  lines = [
    f"{result.level}-level perturbations of {len(result.keys)} CoTs; unperturbed mean "
    f"{'log-prob' if metric == 'logprob' else 'accuracy'} {base:.4f}; cells: mean {what}",
    "",
    "| Perturbation | " + " | ".join(f"{p}%" for p in pcts) + " |",
    "|---|" + "---|" * len(pcts),
  ]
  for kind in result.kinds:
    cells = [f"{result.effect(kind, p, metric).mean():+.4f}" for p in pcts]
    lines.append(f"| {_TITLES[kind]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------ the paper's tables

# The paper's column order (Table 2) and short names.
PAPER_KINDS = ("char_replace", "delete", "digit_replace", "truncate_back", "truncate_front")
_SHORT = {
  "char_replace": "CharRep",
  "delete": "Delete",
  "digit_replace": "DigitRep",
  "truncate_back": "TruncBack",
  "truncate_front": "TruncFront",
}


def markovian_first(runs: Sequence[tuple]) -> tuple:
  """Two (name, markovian, payload) runs ordered Markovian first, so that every difference is
  Markovian minus non-Markovian whichever order they were given in (given order when both or
  neither are Markovian)."""
  a, b = runs
  return (b, a) if b[1] and not a[1] else (a, b)


def _grid(rows: Sequence[Comparison]) -> tuple:
  cells = {(r.kind, r.percent): r.mean_difference for r in rows}
  kinds = [k for k in PAPER_KINDS if any(r.kind == k for r in rows)]
  pcts = sorted({r.percent for r in rows})
  return cells, kinds, pcts


def format_table2(rows: Sequence[Comparison], unit: str = "nats") -> str:
  """The paper's Table 2 layout (markdown): severities (rows) x perturbation kinds (columns) of
  the mean difference of effects, a mean column per severity and a column-mean row."""
  cells, kinds, pcts = _grid(rows)
  lines = [
    "| severity | " + " | ".join(_SHORT[k] for k in kinds) + " | mean |",
    "|---|" + "---|" * (len(kinds) + 1),
  ]
  for p in pcts:
    vals = [cells[(k, p)] for k in kinds]
    lines.append(
      f"| {p}% | " + " | ".join(f"{v:+.3f}" for v in vals) + f" | {np.mean(vals):+.3f} |"
    )
  means = [np.mean([cells[(k, p)] for p in pcts]) for k in kinds]
  lines.append(
    "| column mean | " + " | ".join(f"{v:+.3f}" for v in means) + f" | {np.mean(means):+.3f} |"
  )
  lines.append("")
  lines.append(
    f"Cells: Markovian drop - non-Markovian drop ({unit}); positive = the Markovian "
    "CoT matters more. Signs of the column means: "
    + ", ".join(
      f"{_SHORT[k]} {'+' if v > 0 else '-' if v < 0 else '0'}" for k, v in zip(kinds, means)
    )
    + "."
  )
  return "\n".join(lines)


def table3_row(rows: Sequence[Comparison]) -> dict:
  """{kind: the accuracy difference averaged over severities, ..., "overall": their mean, "n":
  the questions compared (the task's weight in the Overall row)}."""
  cells, kinds, pcts = _grid(rows)
  out = {k: float(np.mean([cells[(k, p)] for p in pcts])) for k in kinds}
  out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
  out["n"] = max((r.comparisons for r in rows), default=0)
  return out


def table3_overall(by_task: dict) -> dict:
  """Table 3's Overall row over {task: table3_row(...)}: per kind (and the overall column) the
  tasks' values weighted by their n, i.e. the mean over every compared question pooled, as the
  reference aggregates its QA tasks; "n": the questions in all."""
  rows = list(by_task.values())
  out = {}
  for k in [k for k in PAPER_KINDS if any(k in r for r in rows)] + ["overall"]:
    weights = [(r[k], r.get("n", 1)) for r in rows if k in r]
    total = sum(n for _, n in weights)
    out[k] = float(sum(v * n for v, n in weights) / total) if total else float("nan")
  out["n"] = sum(r.get("n", 1) for r in rows)
  return out


def format_table3(by_task: dict) -> str:
  """The paper's Table 3 layout (markdown): one row per task ({task: table3_row(...)}), the
  accuracy difference per perturbation kind averaged over severities, the overall mean, and the
  Overall row (`table3_overall`, weighted by n)."""
  kinds = [k for k in PAPER_KINDS if any(k in r for r in by_task.values())]
  lines = [
    "| task | " + " | ".join(_SHORT[k] for k in kinds) + " | overall |",
    "|---|" + "---|" * (len(kinds) + 1),
  ]
  for task, row in by_task.items():
    lines.append(
      f"| {task} | " + " | ".join(f"{row[k]:+.3f}" for k in kinds) + f" | {row['overall']:+.3f} |"
    )
  overall = table3_overall(by_task)
  lines.append(
    "| **Overall** | "
    + " | ".join(f"{overall[k]:+.3f}" for k in kinds)
    + f" | {overall['overall']:+.3f} |"
  )
  lines += [
    "",
    "Overall: each column's tasks weighted by their n questions ("
    + ", ".join(f"{task} {row.get('n', 1)}" for task, row in by_task.items())
    + ").",
  ]
  return "\n".join(lines)
