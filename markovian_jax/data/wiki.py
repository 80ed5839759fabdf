"""wiki_continuation: predict the next `target_length` tokens of an article from its first
`question_length` tokens (docs/reference-differences.md#wiki-ranges).

Sources:
- hub: wikimedia/wikipedia 20231101.en (one `train` split of articles, streamed in index order).
  The reference trained from article 0 and evaluated from article 10000/11000, both skipping
  15200-22400, so its train and eval articles overlapped. Here the index ranges are disjoint:
  test = [10000, 15200), validation = [15200, 22400), train = [0, 10000) then [22400, ...).
- local: WikiText files (`test.txt`/`valid.txt`/`train.txt` as in pytorch/examples, or the
  release's `wiki.{test,valid,train}.tokens` / `.raw`); each file is its own split, and its
  ` = Title = ` heading lines start a new article. A single file is taken whole, whatever the split.

Articles shorter than question_length + target_length tokens are skipped. Token counts exclude
BOS (the reference's binary search counted it, giving one text token fewer). The context is the
text up to the end of token `question_length`; the target is the text after it up to the end of
token `question_length + target_length`, so it keeps its leading space, as in the reference.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Iterator, Optional

from markovian_jax.data import records
from markovian_jax.data.records import DataError, Example

HUB_ID, HUB_CONFIG = "wikimedia/wikipedia", "20231101.en"
HUB_RANGES = {
  "test": ((10000, 15200),),
  "validation": ((15200, 22400),),
  "train": ((0, 10000), (22400, None)),
}
HUB_DEFAULT_SIZE = {"train": 20000, "validation": 256, "test": 1024}
WIKITEXT_FILES = {
  "train": ("train.txt", "wiki.train.tokens", "wiki.train.raw"),
  "validation": ("valid.txt", "wiki.valid.tokens", "wiki.valid.raw"),
  "test": ("test.txt", "wiki.test.tokens", "wiki.test.raw"),
}
_TITLE = re.compile(r"^= [^=].* =$")
# Tokenizing whole articles is slow; a prefix this many characters per needed token is plenty,
# and is trusted only when the needed tokens end well before the cut (a cut can only change the
# last pre-token, and pre-tokens longer than this margin do not occur in prose).
_CHARS_PER_TOKEN = 16
_CUT_MARGIN = 256


def split_wikitext(lines: Iterable[str]) -> list[tuple[str, str]]:
  """WikiText lines -> [(title, body)], a new article at every level-1 ` = Title = ` line.
  The body joins the article's non-empty lines (section headings included) with newlines."""
  articles, title, body = [], None, []
  for line in lines:
    s = line.strip()
    if _TITLE.match(s):
      if title is not None:
        articles.append((title, "\n".join(body)))
      title, body = s[2:-2], []
    elif s and title is not None:
      body.append(s)
  if title is not None:
    articles.append((title, "\n".join(body)))
  return articles


def _cut(text: str, tokenizer, question_length: int, target_length: int):
  need = question_length + target_length
  prefix = text[: need * _CHARS_PER_TOKEN]
  for candidate in (prefix, text) if len(prefix) < len(text) else (text,):
    offsets = tokenizer(candidate, add_special_tokens=False, return_offsets_mapping=True)[
      "offset_mapping"
    ]
    if len(offsets) < need:
      continue
    end = offsets[need - 1][1]
    if candidate is text or end <= len(candidate) - _CUT_MARGIN:
      context_end = offsets[question_length - 1][1]
      return text[:context_end], text[context_end:end]
  return None


def continuation_examples(
  articles: Iterable[tuple[str, str]],
  tokenizer,
  question_length: int,
  target_length: int,
  num_examples: Optional[int],
) -> list[Example]:
  """(id, text) articles -> context/target examples, skipping articles that are too short."""
  if tokenizer is None:
    raise DataError(
      "wiki_continuation needs tokenizer=... (contexts and targets are cut by token count)"
    )
  if question_length < 1 or target_length < 1:
    raise DataError(
      f"wiki_continuation: question_length and target_length must be >= 1, got "
      f"{question_length}, {target_length}"
    )
  out = []
  for item_id, text in articles:
    if num_examples is not None and len(out) >= num_examples:
      break
    pair = _cut(text, tokenizer, question_length, target_length)
    if pair is not None:
      out.append(Example(question=pair[0], answer=pair[1], id=item_id))
  return out


def _hub_articles(split: str) -> Iterator[tuple[str, str]]:
  ranges = HUB_RANGES[split]
  last = max(stop or float("inf") for _, stop in ranges)
  for index, (where, row) in enumerate(
    records.hub_rows(HUB_ID, HUB_CONFIG, "train", streaming=True)
  ):
    if index >= last:
      return
    if any(start <= index and (stop is None or index < stop) for start, stop in ranges):
      yield f"wikipedia/{index}", records.field(row, "text", where)


def load_wiki_continuation(
  split: str,
  path: Optional[str] = None,
  *,
  tokenizer=None,
  question_length: int = 50,
  target_length: int = 50,
  num_examples: Optional[int] = None,
) -> list[Example]:
  """Context/target pairs. num_examples: a cap (local default: every long-enough article; hub
  default: train 20,000 / validation 256 / test 1,024)."""
  if split not in WIKITEXT_FILES:
    raise DataError(
      f"wiki_continuation: unknown split {split!r}; choose one of {sorted(WIKITEXT_FILES)}"
    )
  if tokenizer is None:
    raise DataError(
      "wiki_continuation needs tokenizer=... (contexts and targets are cut by token count)"
    )
  if path is None:
    n = HUB_DEFAULT_SIZE[split] if num_examples is None else num_examples
    return continuation_examples(_hub_articles(split), tokenizer, question_length, target_length, n)
  if os.path.isfile(path):
    file = path
  elif os.path.isdir(path):
    file = records.first_existing(path, WIKITEXT_FILES[split], f"wiki_continuation {split}")
  else:
    raise FileNotFoundError(f"{path}: no such file or directory (wiki_continuation data)")
  with open(file, encoding="utf-8") as f:
    articles = split_wikitext(f)
  if not articles:
    raise DataError(f"{file}: no ' = Title = ' heading lines, so no articles were found")
  name = os.path.basename(file)
  return continuation_examples(
    ((f"wikitext/{name}/{i}", body) for i, (_, body) in enumerate(articles)),
    tokenizer,
    question_length,
    target_length,
    num_examples,
  )
