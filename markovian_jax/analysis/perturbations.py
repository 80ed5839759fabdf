"""CoT perturbations of the paper's fragility analysis, at character and at token level.

    perturb_text("12 + 7 = 19", "digit_replace", 50, seed=0)       # half the digits changed
    perturb_tokens(ids, "truncate_front", 40, seed=0, vocab=vocab)  # the first 40% of tokens gone

KINDS, each at a severity p in percent (SEVERITIES: 0, 20, ..., 100):
  delete          remove p% of the units, chosen at random
  truncate_front  remove the first p% of the units
  truncate_back   remove the last p% of the units
  digit_replace   replace p% of the digit units, each by a different digit unit
  char_replace    replace p% of the replaceable units, each by a different one
Units are characters (the reference's analysis: digits 0-9; replaceable = ASCII letters and
digits, replaced from the same 62) or token ids (the paper's text: digit tokens are those that
decode to digits only, replaced by a digit token of as many digits and the same leading space;
replaceable = every non-special token, replaced from the whole non-special vocabulary).

Replacement at character level follows the reference by default (REPLACEMENTS, `replacement`):
`bernoulli` replaces each eligible character with probability p by a uniform draw from its
alphabet, which may be the character itself, as the reference's did; `exact` changes exactly
round(p * n / 100) of them, each to a different unit (the token level always does). Deletion
and truncation are exact: p% of n units is round(p * n / 100), half up, in integer arithmetic
(the reference's truncation's float arithmetic kept one character too few at 80%). The choice is
nested: for one CoT, kind and seed, the units perturbed at 40% include those at 20%, with the same
replacements, so a table's severities are one random draw made progressively worse. Everything
is a function of (seed, kind, the CoT's content): deterministic, and independent of the other
CoTs in a batch.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Optional, Sequence
import zlib

import numpy as np

KINDS = ("delete", "truncate_front", "truncate_back", "digit_replace", "char_replace")
SEVERITIES = (0, 20, 40, 60, 80, 100)
LEVELS = ("char", "token")
REPLACEMENTS = ("bernoulli", "exact")  # character-level replacement (module docstring)
DIGITS = string.digits
ALPHANUMERIC = string.ascii_letters + string.digits  # the reference's char_replace alphabet


def check(kind: str, percent: int) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {list(KINDS)}")
  if (
    isinstance(percent, bool)
    or not isinstance(percent, (int, np.integer))
    or not (0 <= percent <= 100)
  ):
    raise ValueError(f"severity must be an integer percent in [0, 100], got {percent!r}")


def count(n: int, percent: int) -> int:
  """How many of n units a severity of `percent` perturbs: round(n * percent / 100), half up."""
  return (n * int(percent) + 50) // 100


def _edit(
  units: list,
  kind: str,
  percent: int,
  rng: np.random.Generator,
  eligible: Sequence[int],
  replace: Optional[Callable[[object, int], object]],
) -> list:
  """`units` with `kind` applied. eligible: the positions a replacement may change;
  replace(unit, draw) -> a different unit, `draw` a seeded integer."""
  n = len(units)
  if kind == "truncate_front":
    return units[count(n, percent) :]
  if kind == "truncate_back":
    return units[: n - count(n, percent)]
  # One seeded order of the candidates, and one draw per candidate, both made for all of them
  # so that a higher severity extends a lower one.
  candidates = range(n) if kind == "delete" else eligible
  order = rng.permutation(len(candidates))
  draws = rng.integers(0, 1 << 30, size=len(candidates))
  chosen = order[: count(len(candidates), percent)]
  if kind == "delete":
    drop = set(chosen.tolist())
    return [u for i, u in enumerate(units) if i not in drop]
  out = list(units)
  for j in chosen:
    out[candidates[j]] = replace(out[candidates[j]], int(draws[j]))
  return out


def _other_in(alphabet: Sequence) -> Callable[[object, int], object]:
  """replace(unit, draw): a member of `alphabet` other than `unit`, picked by `draw`."""
  index = {a: i for i, a in enumerate(alphabet)}
  return lambda unit, draw: alphabet[(index[unit] + 1 + draw % (len(alphabet) - 1)) % len(alphabet)]


def _bernoulli(
  units: list, percent: int, rng: np.random.Generator, eligible: Sequence[int], alphabet: Sequence
) -> list:
  """Each eligible unit replaced with probability percent/100 by a uniform draw from `alphabet`
  (possibly itself). One uniform and one draw per eligible unit, whatever the severity: nested."""
  u = rng.random(len(eligible))
  draws = rng.integers(0, len(alphabet), size=len(eligible))
  out = list(units)
  for j, i in enumerate(eligible):
    if u[j] < percent / 100:
      out[i] = alphabet[int(draws[j])]
  return out


def perturb_text(
  text: str, kind: str, percent: int, seed: int = 0, replacement: str = "bernoulli"
) -> str:
  """`text` with `kind` applied at `percent` severity, character by character; `replacement`
  (REPLACEMENTS) says how the replace kinds choose the characters they change."""
  check(kind, percent)
  if replacement not in REPLACEMENTS:
    raise ValueError(f"unknown replacement {replacement!r}; choose one of {list(REPLACEMENTS)}")
  if percent == 0:
    return text
  chars = list(text)
  rng = np.random.default_rng([int(seed), KINDS.index(kind), zlib.crc32(text.encode("utf-8"))])
  alphabet = DIGITS if kind == "digit_replace" else ALPHANUMERIC
  eligible = [i for i, c in enumerate(chars) if c in alphabet]
  if kind in ("digit_replace", "char_replace") and replacement == "bernoulli":
    return "".join(_bernoulli(chars, percent, rng, eligible, alphabet))
  return "".join(_edit(chars, kind, percent, rng, eligible, _other_in(alphabet)))


@dataclasses.dataclass(frozen=True)
class TokenVocabulary:
  """What token-level replacement draws from.

  ordinary: int64 [V'] the ids a `char_replace` may write and change (non-special tokens).
  digit_groups: {id: int64 [D] the digit tokens with the same leading space and as many digits};
    its keys are the tokens that `digit_replace` changes.
  """

  ordinary: np.ndarray
  digit_groups: dict

  @classmethod
  def from_tokenizer(cls, tokenizer) -> "TokenVocabulary":
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    groups: dict = {}
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
      # Byte-level BPE writes a leading space as "Ġ", SentencePiece as "▁".
      core = piece.lstrip("Ġ▁ ") if isinstance(piece, str) else ""
      if core and all(c in DIGITS for c in core):
        groups.setdefault((len(piece) - len(core), len(core)), []).append(i)
    digit_groups = {}
    for members in groups.values():
      pool = np.asarray(members, np.int64)
      digit_groups.update({i: pool for i in members})
    return cls(np.asarray(ids, np.int64), digit_groups)


def _other_id(pool_of: Callable[[int], np.ndarray]) -> Callable[[int, int], int]:
  def replace(unit: int, draw: int) -> int:
    pool = pool_of(unit)
    others = pool[pool != unit]
    return unit if others.size == 0 else int(others[draw % others.size])

  return replace


def perturb_tokens(
  ids: Sequence[int], kind: str, percent: int, seed: int = 0, *, vocab: TokenVocabulary
) -> list:
  """Token ids `ids` (int [T]) with `kind` applied at `percent` severity, token by token."""
  check(kind, percent)
  units = [int(i) for i in ids]
  if percent == 0:
    return units
  content = np.asarray(units, np.int64).tobytes()
  rng = np.random.default_rng([int(seed), KINDS.index(kind), zlib.crc32(content)])
  if kind == "digit_replace":
    eligible = [i for i, u in enumerate(units) if u in vocab.digit_groups]
    replace = _other_id(lambda u: vocab.digit_groups[u])
  else:
    ordinary = set(vocab.ordinary.tolist())
    eligible = [i for i, u in enumerate(units) if u in ordinary]
    replace = _other_id(lambda u: vocab.ordinary)
  return _edit(units, kind, percent, rng, eligible, replace)


def perturb(
  cot: str,
  kind: str,
  percent: int,
  seed: int = 0,
  *,
  level: str = "char",
  tokenizer=None,
  vocab: Optional[TokenVocabulary] = None,
  replacement: str = "bernoulli",
) -> str:
  """A CoT text perturbed at `level`: 'char' edits the text (`replacement` as perturb_text);
  'token' encodes it with `tokenizer` (no special tokens), edits the ids with `vocab` and decodes
  them back."""
  if level == "char":
    return perturb_text(cot, kind, percent, seed, replacement)
  if level != "token":
    raise ValueError(f"unknown perturbation level {level!r}; choose one of {list(LEVELS)}")
  if tokenizer is None or vocab is None:
    raise ValueError("token-level perturbation needs the tokenizer and its TokenVocabulary")
  ids = tokenizer(cot, add_special_tokens=False)["input_ids"]
  return tokenizer.decode(perturb_tokens(ids, kind, percent, seed, vocab=vocab))
