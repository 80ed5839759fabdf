"""CoT perturbations on fixed strings and token lists: a severity of p% perturbs exactly p% of the
eligible units, more severe draws extend less severe ones, and a seed fixes everything."""

import numpy as np
import pytest

from markovian_jax.analysis import perturbations as P

TEXT = "Step 1: 12 + 7 = 19, then 19 * 3 = 57. Answer 57!"


def _changed(a: str, b: str) -> list:
  assert len(a) == len(b)
  return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def _is_subsequence(short, long) -> bool:
  it = iter(long)
  return all(any(c == d for d in it) for c in short)


@pytest.mark.parametrize(
  "n, pct, expected",
  [
    (10, 20, 2),
    (10, 80, 8),
    (7, 50, 4),
    (5, 30, 2),
    (3, 0, 0),
    (3, 100, 3),
    (0, 60, 0),
    (10, 60, 6),
  ],
)
def test_count_is_exact_and_rounds_half_up(n, pct, expected):
  assert P.count(n, pct) == expected


def test_truncations_remove_exactly_the_fraction_from_their_end():
  text = "abcdefghij"
  assert P.perturb_text(text, "truncate_front", 20) == "cdefghij"
  assert P.perturb_text(text, "truncate_back", 20) == "abcdefgh"
  # 80%: the reference's int(len * (1 - 0.8)) kept 1 character; exactly 2 remain here.
  assert P.perturb_text(text, "truncate_back", 80) == "ab"
  assert P.perturb_text(text, "truncate_front", 80) == "ij"
  for kind in P.KINDS:
    assert P.perturb_text(text, kind, 0) == text
  assert P.perturb_text(text, "truncate_front", 100) == ""
  assert P.perturb_text(text, "delete", 100) == ""


@pytest.mark.parametrize("pct", P.SEVERITIES)
def test_delete_removes_exactly_p_percent_of_the_characters(pct):
  out = P.perturb_text(TEXT, "delete", pct, seed=3)
  assert len(out) == len(TEXT) - P.count(len(TEXT), pct)
  assert _is_subsequence(out, TEXT)


@pytest.mark.parametrize("pct", P.SEVERITIES)
def test_digit_replace_changes_exactly_p_percent_of_the_digits(pct):
  digits = [i for i, c in enumerate(TEXT) if c.isdigit()]
  out = P.perturb_text(TEXT, "digit_replace", pct, seed=1, replacement="exact")
  changed = _changed(TEXT, out)
  assert len(changed) == P.count(len(digits), pct)
  assert set(changed) <= set(digits) and all(out[i].isdigit() for i in changed)


@pytest.mark.parametrize("pct", P.SEVERITIES)
def test_char_replace_changes_exactly_p_percent_of_the_alphanumerics(pct):
  alnum = [i for i, c in enumerate(TEXT) if c in P.ALPHANUMERIC]
  out = P.perturb_text(TEXT, "char_replace", pct, seed=1, replacement="exact")
  changed = _changed(TEXT, out)
  assert len(changed) == P.count(len(alnum), pct)
  assert set(changed) <= set(alnum) and all(out[i] in P.ALPHANUMERIC for i in changed)
  assert [c for i, c in enumerate(out) if i not in alnum] == [
    c for i, c in enumerate(TEXT) if i not in alnum
  ]  # spaces and punctuation untouched


def test_severities_are_nested_and_seeded():
  for kind, mode in [(k, m) for k in ("digit_replace", "char_replace") for m in P.REPLACEMENTS]:
    outs = [P.perturb_text(TEXT, kind, p, seed=7, replacement=mode) for p in P.SEVERITIES]
    for lower, higher in zip(outs, outs[1:]):
      low = _changed(TEXT, lower)
      assert set(low) <= set(_changed(TEXT, higher))
      assert all(lower[i] == higher[i] for i in low)  # the same replacement characters
  deletes = [P.perturb_text(TEXT, "delete", p, seed=7) for p in P.SEVERITIES]
  for lower, higher in zip(deletes, deletes[1:]):
    assert _is_subsequence(higher, lower)
  for kind in P.KINDS:
    assert P.perturb_text(TEXT, kind, 40, seed=7) == P.perturb_text(TEXT, kind, 40, seed=7)
  assert P.perturb_text(TEXT, "delete", 40, seed=7) != P.perturb_text(TEXT, "delete", 40, seed=8)
  assert P.perturb_text(TEXT, "char_replace", 40, seed=7) != P.perturb_text(
    TEXT, "char_replace", 40, seed=8
  )


def test_a_text_without_digits_has_nothing_to_replace():
  assert P.perturb_text("no digits here", "digit_replace", 100) == "no digits here"


# ------------------------------------------------------------------ tokens
# ids 0-1 special; 10-19 one-digit tokens, 20-29 two-digit tokens, 30-39 " d" (leading space).
VOCAB = P.TokenVocabulary(
  ordinary=np.arange(2, 100),
  digit_groups={
    **{i: np.arange(10, 20) for i in range(10, 20)},
    **{i: np.arange(20, 30) for i in range(20, 30)},
    **{i: np.arange(30, 40) for i in range(30, 40)},
  },
)
IDS = [0, 50, 11, 60, 25, 61, 12, 33, 70, 71, 21, 1]  # digit tokens at 2, 4, 6, 7, 10


@pytest.mark.parametrize("pct", P.SEVERITIES)
def test_token_truncation_and_deletion_counts(pct):
  k = P.count(len(IDS), pct)
  assert P.perturb_tokens(IDS, "truncate_front", pct, vocab=VOCAB) == IDS[k:]
  assert P.perturb_tokens(IDS, "truncate_back", pct, vocab=VOCAB) == IDS[: len(IDS) - k]
  out = P.perturb_tokens(IDS, "delete", pct, seed=2, vocab=VOCAB)
  assert len(out) == len(IDS) - k and _is_subsequence(out, IDS)


@pytest.mark.parametrize("pct", P.SEVERITIES)
def test_token_digit_replace_keeps_digit_count_and_spacing(pct):
  out = P.perturb_tokens(IDS, "digit_replace", pct, seed=4, vocab=VOCAB)
  changed = [i for i, (a, b) in enumerate(zip(IDS, out)) if a != b]
  assert len(changed) == P.count(5, pct) and set(changed) <= {2, 4, 6, 7, 10}
  for i in changed:  # a different token of the same group
    assert out[i] in VOCAB.digit_groups[IDS[i]] and out[i] != IDS[i]


@pytest.mark.parametrize("pct", P.SEVERITIES)
def test_token_char_replace_never_touches_special_tokens(pct):
  out = P.perturb_tokens(IDS, "char_replace", pct, seed=4, vocab=VOCAB)
  changed = [i for i, (a, b) in enumerate(zip(IDS, out)) if a != b]
  assert len(changed) == P.count(10, pct) and not {0, len(IDS) - 1} & set(changed)
  assert all(2 <= out[i] < 100 for i in changed)
  assert P.perturb_tokens(IDS, "char_replace", pct, seed=4, vocab=VOCAB) == out


def _word_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {
    "<s>": 0,
    "</s>": 1,
    "a": 2,
    "b": 3,
    "1": 4,
    "2": 5,
    "12": 6,
    "34": 7,
    "Ġ7": 8,
    "Ġ8": 9,
    "<unk>": 10,
  }
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
  )


def test_token_vocabulary_from_a_tokenizer():
  vocab = P.TokenVocabulary.from_tokenizer(_word_tokenizer())
  assert set(vocab.ordinary.tolist()) == {2, 3, 4, 5, 6, 7, 8, 9}  # no special tokens
  assert sorted(vocab.digit_groups) == [4, 5, 6, 7, 8, 9]
  assert vocab.digit_groups[4].tolist() == [4, 5] and vocab.digit_groups[6].tolist() == [6, 7]
  assert vocab.digit_groups[8].tolist() == [8, 9]


def test_perturb_at_token_level_round_trips_through_the_tokenizer():
  tok = _word_tokenizer()
  vocab = P.TokenVocabulary.from_tokenizer(tok)
  assert (
    P.perturb("a 1 b 12", "digit_replace", 100, level="token", tokenizer=tok, vocab=vocab)
    == "a 2 b 34"
  )
  assert (
    P.perturb("a 1 b 12", "truncate_back", 50, level="token", tokenizer=tok, vocab=vocab) == "a 1"
  )


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown perturbation 'shuffle'"):
    P.perturb_text("x", "shuffle", 20)
  with pytest.raises(ValueError, match="integer percent"):
    P.perturb_text("x", "delete", 0.2)
  with pytest.raises(ValueError, match="integer percent"):
    P.perturb_text("x", "delete", 120)
  with pytest.raises(ValueError, match="level"):
    P.perturb("x", "delete", 20, level="word")
  with pytest.raises(ValueError, match="tokenizer"):
    P.perturb("x", "delete", 20, level="token")


@pytest.mark.parametrize(
  "kind,alphabet", [("char_replace", P.ALPHANUMERIC), ("digit_replace", P.DIGITS)]
)
def test_character_replacement_is_bernoulli_per_character_by_default(kind, alphabet):
  """The reference's rule: each eligible character is redrawn with probability p from its
  alphabet (possibly itself), so the number changed is Binomial(n, p (1 - 1/|alphabet|)), not
  exactly p%, nor p% chosen and then redrawn (whose count varies, but far less)."""
  from scipy import stats

  rng = np.random.default_rng(0)
  text = "".join(rng.choice(list(alphabet + "  .,"), size=4000))
  eligible = [i for i, c in enumerate(text) if c in alphabet]
  others = set(range(len(text))) - set(eligible)
  n, counts, seeds = len(eligible), [], 40
  for seed in range(seeds):
    out = P.perturb_text(text, kind, 40, seed=seed)
    assert len(out) == len(text) and all(out[i] == text[i] for i in others)
    counts.append(len(_changed(text, out)))
  q = 0.4 * (1 - 1 / len(alphabet))
  var = n * q * (1 - q)
  # The mean of 40 draws within 5 standard errors, and their variance within the chi-square
  # interval of Binomial draws (1e-4 each side). The interval excludes exactly p% (variance 0)
  # and p% chosen then redrawn uniformly (variance k/|A| (1 - 1/|A|) for k = p% of n).
  assert abs(np.mean(counts) - n * q) < 5 * (var / seeds) ** 0.5, (np.mean(counts), n * q)
  low, high = (stats.chi2.ppf(t, seeds - 1) / (seeds - 1) for t in (1e-4, 1 - 1e-4))
  chosen_var = P.count(n, 40) / len(alphabet) * (1 - 1 / len(alphabet))
  assert chosen_var * high < var * low  # the check can tell the two apart
  assert var * low < np.var(counts, ddof=1) < var * high, (np.var(counts, ddof=1), var)
  full = P.perturb_text(text, kind, 100, seed=0)
  kept = sum(full[i] == text[i] for i in eligible)  # redrawn as itself: ~1/|alphabet| of them
  assert 0 < kept < 3 * n / len(alphabet), kept


def test_table3_overall_row_weights_each_task_by_its_n():
  """The Overall row pools the questions: per kind, the tasks' severity-averaged differences
  weighted by their n (hand-computed here), as the reference's QA aggregation; the overall
  column the same weighting of each task's mean over kinds."""
  from markovian_jax.analysis import fragility

  kinds = fragility.PAPER_KINDS

  def rows(n, values):  # values[kind] at 20% and 40% severity
    return [
      fragility.Comparison(k, p, v, 0.5, n, True)
      for k, (v20, v40) in zip(kinds, values)
      for p, v in ((20, v20), (40, v40))
    ]

  # arc: every kind +0.30 (0.2 and 0.4), n 300; gsm8k: kind i at i/10 (both severities), n 900.
  arc = fragility.table3_row(rows(300, [(0.2, 0.4)] * 5))
  gsm = fragility.table3_row(rows(900, [(i / 10, i / 10) for i in range(5)]))
  assert arc["n"] == 300 and gsm["n"] == 900
  overall = fragility.table3_overall({"arc": arc, "gsm8k": gsm})
  for i, k in enumerate(kinds):
    assert overall[k] == pytest.approx((300 * 0.3 + 900 * i / 10) / 1200, rel=1e-12)
  assert overall["overall"] == pytest.approx((300 * 0.3 + 900 * 0.2) / 1200, rel=1e-12)
  assert overall["n"] == 1200
  text = fragility.format_table3({"arc": arc, "gsm8k": gsm})
  line = next(ln for ln in text.splitlines() if ln.startswith("| **Overall** |"))
  assert [float(c) for c in line.split("|")[2:-1]] == pytest.approx(
    [0.075, 0.15, 0.225, 0.3, 0.375, 0.225], abs=5e-4
  )
  assert "weighted by their n questions (arc 300, gsm8k 900)" in text


def test_analyze_table3_over_the_saved_analyses_of_a_parent(tmp_path):
  """`analyze table3 --workdir=PARENT` pairs each task's Markovian and non-Markovian runs from
  their saved fragility JSON and weights the Overall row by each task's n (hand-computed)."""
  import json
  import types

  from markovian_jax import analyze
  from markovian_jax.analysis import fragility

  def save(name, task, markovian, n, wrong):
    """A run whose CoTs all read right unperturbed and `wrong` of n read wrong when perturbed."""
    keys = [(0, f"{task}/{i}") for i in range(n)]
    bad = np.arange(n) < wrong
    correct = {(k, p): (np.ones(n, bool) if p == 0 else ~bad) for k in P.KINDS for p in (0, 20, 40)}
    logprobs = {k: np.zeros(n) for k in correct}
    result = fragility.FragilityResult("char", P.KINDS, (0, 20, 40), keys, logprobs, correct)
    run = tmp_path / name
    (run / "analysis").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": task, "prompt": {"markovian": markovian}}))
    (run / "analysis" / "fragility_char.json").write_text(
      json.dumps({"protocol": {"task": task}, **result.to_json()})
    )

  save("arc_m", "arc", True, 10, 5)  # Markovian loses 0.5, non-Markovian 0.1: +0.4
  save("arc_nm", "arc", False, 10, 1)
  save("gsm8k_m", "gsm8k", True, 30, 3)  # 0.1 vs 0.0: +0.1
  save("gsm8k_nm", "gsm8k", False, 30, 0)
  text = analyze.run_table3(types.SimpleNamespace(workdir=str(tmp_path), level="char"))
  rows = {
    line.split("|")[1].strip(): [float(c) for c in line.split("|")[2:-1]]
    for line in text.splitlines()
    if line.startswith("| ") and "---" not in line and not line.startswith("| task")
  }
  assert rows["arc"] == pytest.approx([0.4] * 6) and rows["gsm8k"] == pytest.approx([0.1] * 6)
  assert rows["**Overall**"] == pytest.approx([(10 * 0.4 + 30 * 0.1) / 40] * 6)
  assert (tmp_path / "analysis" / "table3.md").read_text() == text
  (tmp_path / "gsm8k_nm" / "config.json").write_text(
    json.dumps({"task": "gsm8k", "prompt": {"markovian": True}})
  )
  with pytest.raises(analyze.AnalysisError, match="task gsm8k needs one Markovian and one non"):
    analyze.run_table3(types.SimpleNamespace(workdir=str(tmp_path), level="char"))
