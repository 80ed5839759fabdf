"""The repository's own documentation (docs/) stays true to the code and self-contained:

* docs/configuration.md is exactly what `markovian_jax.training.config_reference` prints now;
* no file of the repository cites a document that a clone does not contain (the design notes the
  project was planned from live outside it);
* every `docs/<page>.md#<anchor>` that a file cites, and every link between the docs pages, names
  a page that exists and a heading on it;
* docs/method.md names every registered objective variant, every named config variant and every
  key of the objective and prompt sections, so a variant added to a registry cannot go
  undocumented.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

from markovian_jax import objectives
from markovian_jax.configs import base
from markovian_jax.data.prompts import PROMPT_FORMATS
from markovian_jax.training import config_reference

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
# The planning documents outside the repository, assembled so that this file does not cite them.
_OUTSIDE_NAMES = ("ALGORITHM", "REFERENCE", "ENVIRONMENT", "ANCHORS", "DESIGN")
OUTSIDE = re.compile(r"\b(?:" + "|".join(_OUTSIDE_NAMES) + r")\.md\b")
# `docs/page.md` or `docs/page.md#anchor`, as code and the README cite the pages.
DOCS_CITATION = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
# A relative markdown link inside a docs page: [text](page.md#anchor), (../README.md), (#anchor).
MD_LINK = re.compile(r"\]\((?!https?:|mailto:)([^)\s#]*)(?:#([^)\s]+))?\)")
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "runs", "workdir"}
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".sh", ".sbatch", ".yaml", ".yml", ""}


def repo_files() -> list[pathlib.Path]:
  """The files of the checkout that git would commit (tracked, or new and not ignored); the
  whole tree but build and venv directories where there is no git."""
  try:
    out = subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=REPO,
      capture_output=True,
      check=True,
      timeout=60,
    ).stdout
    paths = [REPO / p for p in out.decode().split("\0") if p]
  except (OSError, subprocess.SubprocessError):
    paths = [
      p
      for p in REPO.rglob("*")
      if not _SKIP_DIRS & set(p.relative_to(REPO).parts)
      and not any(part.endswith(".egg-info") for part in p.parts)
    ]
  return sorted(
    p for p in paths if p.is_file() and not p.is_symlink() and p.suffix in _TEXT_SUFFIXES
  )


def _texts(paths) -> list[tuple[str, str]]:
  out = []
  for p in paths:
    try:
      out.append((str(p.relative_to(REPO)), p.read_text(encoding="utf-8")))
    except UnicodeDecodeError:
      continue  # a binary file
  return out


def outside_citations(texts) -> list[str]:
  """'path:line: name' for each citation of a document outside the repository."""
  return [
    f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
    for path, text in texts
    for m in OUTSIDE.finditer(text)
  ]


def slug(heading: str) -> str:
  """A heading's anchor as GitHub renders it: lower case, punctuation dropped, spaces -> '-'."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
  """Every heading anchor of a markdown page (GitHub numbers repeated headings -1, -2, ...)."""
  seen, out = {}, set()
  in_code = False
  for line in page.read_text(encoding="utf-8").splitlines():
    if line.startswith("```"):
      in_code = not in_code
    m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      s = slug(m.group(1))
      out.add(s if s not in seen else f"{s}-{seen[s]}")
      seen[s] = seen.get(s, 0) + 1
  return out


def broken_citations(texts, docs: pathlib.Path = DOCS) -> list[str]:
  """Each `docs/page.md#anchor` in `texts` whose page or heading does not exist."""
  bad = []
  for path, text in texts:
    for m in DOCS_CITATION.finditer(text):
      page, anchor = docs / m.group(1), m.group(2)
      if not page.is_file():
        bad.append(f"{path}: {m.group(0)}: no page {page.name}")
      elif anchor and anchor not in anchors(page):
        bad.append(f"{path}: {m.group(0)}: no heading with anchor #{anchor}")
  return bad


def broken_links(docs: pathlib.Path = DOCS) -> list[str]:
  """Each relative link in a docs page whose target file or heading does not exist."""
  bad = []
  for page in sorted(docs.glob("*.md")):
    for m in MD_LINK.finditer(page.read_text(encoding="utf-8")):
      target = (page.parent / m.group(1)).resolve() if m.group(1) else page
      if not target.exists():
        bad.append(f"{page.name}: ({m.group(0)[2:-1]}): no file {m.group(1)}")
      elif m.group(2) and target.suffix == ".md" and m.group(2) not in anchors(target):
        bad.append(f"{page.name}: ({m.group(0)[2:-1]}): no heading #{m.group(2)}")
  return bad


def test_configuration_reference_is_current():
  committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
  assert committed == config_reference.render(), (
    "docs/configuration.md is out of date with the config; regenerate it: "
    f"{config_reference.COMMAND}"
  )


def test_configuration_reference_lists_every_key_with_its_choices():
  """Every key of the built config has a row; choices come from the validators, e.g. the
  registered baselines, and descriptions from configs/schema.py."""
  page = config_reference.render()
  for key, _ in config_reference._leaves(base.get_config("gsm8k")):
    assert f"| `{key}` |" in page, key
  row = next(line for line in page.splitlines() if line.startswith("| `objective.baseline` |"))
  assert all(f"`{b}`" in row.split("|")[4] for b in objectives.BASELINES), row
  row = next(line for line in page.splitlines() if line.startswith("| `sampling.cot_length` |"))
  assert "`50` (gsm8k: 100, arithmetic: 150, mmlu: 150, mathqa: 150)" in row, row


def test_no_file_cites_a_document_outside_the_repository():
  found = outside_citations(_texts(repo_files()))
  assert not found, (
    "these cite a document a clone does not contain; cite docs/<page>.md#<anchor> "
    "or state the fact:\n" + "\n".join(found)
  )


def test_docs_citations_and_links_resolve():
  # This file's own examples of broken citations are not citations.
  texts = [(p, t) for p, t in _texts(repo_files()) if p != "tests/repo/test_docs.py"]
  assert any(DOCS_CITATION.search(t) for p, t in texts if p.endswith(".py")), (
    "no module cites docs/: the check below would pass vacuously"
  )
  assert not broken_citations(texts), "\n".join(broken_citations(texts))
  assert not broken_links(), "\n".join(broken_links())


@pytest.mark.parametrize(
  "planted,found",
  [
    ("# the KL slice (" + "REFERENCE" + ".md §7.4)\n", "outside"),
    ("# see docs/reference-differences.md#no-such-heading\n", "anchor"),
    ("# see docs/no-such-page.md\n", "page"),
  ],
)
def test_the_checkers_catch_a_planted_citation(planted, found):
  texts = [("markovian_jax/x.py", "import os\n" + planted)]
  if found == "outside":
    assert outside_citations(texts) == [f"markovian_jax/x.py:2: {'REFERENCE'}.md"]
  else:
    bad = broken_citations(texts)
    assert len(bad) == 1 and (("no heading" in bad[0]) == (found == "anchor")), bad


def test_the_slugs_are_githubs():
  assert slug("How we differ from the `reference` code") == "how-we-differ-from-the-reference-code"
  assert slug("log P(answer | CoT), the reward") == "log-panswer--cot-the-reward"
  assert slug("ema_batch and EMA after resume") == "ema_batch-and-ema-after-resume"


def test_method_names_every_variant_and_objective_key():
  method = (DOCS / "method.md").read_text(encoding="utf-8")
  names = {
    "objective.kind": objectives.OBJECTIVES,
    "objective.kl_estimator": objectives.KL_ESTIMATORS,
    "objective.logprob_reduction": objectives.REDUCTIONS,
    "objective.loss_aggregation": objectives.AGGREGATIONS,
    "objective.baseline": objectives.BASELINES,
    "objective.reward_grad": objectives.REWARD_GRADS,
    "objective.ppo_ratio_reference": objectives.PPO_RATIO_REFERENCES,
    "objective.reward_kind": objectives.REWARD_KINDS,
    "prompt.format": PROMPT_FORMATS,
    "config variants": tuple(base.VARIANTS),
  }
  # A name counts in backticks, alone or as the value of a setting: `ppo`, `kind=ppo`.
  named = lambda n: re.search(r"`(?:[\w.]+=)?" + re.escape(n) + "`", method)  # noqa: E731
  missing = [f"{what}: {n}" for what, choices in names.items() for n in choices if not named(n)]
  c = base.get_config("gsm8k")
  missing += [
    f"key {s}.{k}"
    for s in ("objective", "prompt")
    for k in c[s]
    if not re.search(r"`" + re.escape(f"{s}.{k}") + r"(=[^`]*)?`", method)
  ]
  assert not missing, "docs/method.md does not describe: " + ", ".join(missing)
