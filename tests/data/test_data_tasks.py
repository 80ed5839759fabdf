"""Task loaders on the original benchmark files (../shared/data): row counts, gold answers on
spot-checked rows (read by hand from the raw files), the reference's data bugs fixed, bad input."""

import json
import os

import pytest

from markovian_jax.data import DataError, load_task, numeric_tasks, task_kind
from markovian_jax.data.mcq_tasks import parse_mathqa_options
from markovian_jax.data.wiki import split_wikitext


def by_id(examples):
  return {e.id: e for e in examples}


# ---------------------------------------------------------------------------------------------
# Row counts and spot-checked rows.


def test_gsm8k(shared_data):
  test = load_task("gsm8k", "test", shared_data / "gsm8k")
  train = load_task("gsm8k", "train", shared_data / "gsm8k")
  assert (len(test), len(train)) == (1319, 7473)
  # test.jsonl line 1: Janet's ducks, "#### 18".
  assert test[0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
  assert test[0].answer == "18" and test[0].choices is None and test[0].id == "gsm8k/test/0"
  # line 147 "#### 2,125" and line 202 "#### 114,200": thousands separators dropped; line 490 "-10".
  assert (test[146].answer, test[201].answer, test[489].answer) == ("2125", "114200", "-10")
  assert train[0].answer == "72"  # Natalia's clips


def test_svamp_question_is_body_plus_question(shared_data):
  all_ = load_task("svamp", "all", shared_data / "svamp")
  assert len(all_) == 1000
  items = by_id(all_)
  # SVAMP.json item chal-1: Answer 51.0, Body without the question sentence.
  assert items["chal-1"].question == (
    "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
    "How much do you have to pay to buy each pack?"
  )
  assert items["chal-1"].answer == "51"  # 51.0 normalised
  assert items["chal-71"].answer == "22090603"  # 22090603.0
  assert items["chal-1000"].question.endswith(" How far did the frog jump?")
  assert items["chal-1000"].answer == "11"
  assert all(e.answer.lstrip("-").isdigit() for e in all_)  # every SVAMP answer is integral


def test_svamp_local_partition_is_disjoint_and_deterministic(shared_data):
  train = load_task("svamp", "train", shared_data / "svamp" / "SVAMP.json")
  test = load_task("svamp", "test", shared_data / "svamp")
  assert (len(train), len(test)) == (700, 300)
  assert not {e.id for e in train} & {e.id for e in test}
  assert [e.id for e in test] == [e.id for e in load_task("svamp", "test", shared_data / "svamp")]


def test_aqua(shared_data):
  test = load_task("aqua", "test", shared_data / "aqua")
  assert len(test) == 254 and len(load_task("aqua", "validation", shared_data / "aqua")) == 254
  # test.json line 2: options ["A)$61", "B)$65", "C)$67.40", "D)$70", "E)$78.20"], correct "E".
  e = test[1]
  assert e.answer == "E" and e.choices == ("$61", "$65", "$67.40", "$70", "$78.20")
  assert e.question.endswith(
    "what was the original price of the item?\n\nChoices:\nA. $61\n"
    "B. $65\nC. $67.40\nD. $70\nE. $78.20"
  )
  assert test[0].answer == "A"


def test_arc_counts_and_numeric_labels(shared_data):
  challenge = load_task("arc", "test", shared_data)
  assert len(challenge) == 1172  # the reference dropped 22 of these (numeric labels)
  assert len(load_task("arc", "test", shared_data / "arc", subset="ARC-Easy")) == 2376
  assert len(load_task("arc", "validation", shared_data, subset="challenge")) == 299
  assert len(load_task("arc", "train", shared_data)) == 1119
  items = by_id(challenge)
  assert items["Mercury_7175875"].answer == "C"  # line 1: answerKey "C"
  # line 45, NYSEDREGENTS_2008_8_34: labels 1-4, answerKey "2" -> "B".
  numeric = items["NYSEDREGENTS_2008_8_34"]
  assert numeric.answer == "B" and len(numeric.choices) == 4
  assert "\n\nChoices:\nA. " in numeric.question and "\nD. " in numeric.question
  # line 386, NYSEDREGENTS_2012_8_42: labels 1-3, answerKey "2" -> "B"; 3 choices kept.
  assert items["NYSEDREGENTS_2012_8_42"].answer == "B"
  assert len(items["NYSEDREGENTS_2012_8_42"].choices) == 3
  assert sum(len(e.choices) == 5 for e in challenge) == 3


def test_mmlu(shared_data):
  test = load_task("mmlu", "test", shared_data / "mmlu")
  assert len(test) == 14079
  subjects = {e.id.split("/")[1] for e in test}
  assert len(subjects) == 57
  ml = load_task("mmlu", "test", shared_data / "mmlu", subject="machine_learning")
  assert len(ml) == 105
  # machine_learning_test.csv row 1: a quoted field with a comma, answer D.
  assert ml[0].answer == "D" and ml[0].choices == (
    "True, True",
    "False, False",
    "True, False",
    "False, True",
  )
  assert ml[0].question.endswith(
    "\n\nChoices:\nA. True, True\nB. False, False\nC. True, False\nD. False, True"
  )
  assert len(load_task("mmlu", "test", shared_data, subject="high_school_chemistry")) == 204
  dev = load_task("mmlu", "dev", shared_data / "mmlu")
  val = load_task("mmlu", "validation", shared_data / "mmlu")
  train = load_task("mmlu", "train", shared_data / "mmlu")
  assert (len(dev), len(val), len(train)) == (285, 1542, 285 + 1542)
  assert {e.id.split("/")[2] for e in train} == {"dev", "validation"}
  assert len(load_task("mmlu", "train", shared_data / "mmlu", train_splits=("dev",))) == 285


def test_mathqa(shared_data):
  test = load_task("mathqa", "test", shared_data / "mathqa")
  assert len(test) == 1000
  assert test[0].answer == "A" and test[0].choices == ("12", "16", "18", "24", "26")
  assert test[0].question.startswith("if log 8 x + log 8 1 / 6 = 1 / 3 , then the value of x is")
  assert all(len(e.choices) == 5 for e in test)


def test_mathqa_options_parser():
  assert parse_mathqa_options("a ) 850 , b ) 1,600 , c ) 1,700 , d ) 2,550 , e ) 3,400", "x") == [
    "850",
    "1,600",
    "1,700",
    "2,550",
    "3,400",
  ]
  assert parse_mathqa_options(
    "['a ) 462 cm ²', 'b ) 530 cm ²', 'c ) 1', 'd ) 2', 'e ) none']", "x"
  ) == ["462 cm ²", "530 cm ²", "1", "2", "none"]
  with pytest.raises(DataError, match="row 7: cannot parse MathQA options"):
    parse_mathqa_options("12, 16, 18", "row 7")


def test_wiki_continuation_local(shared_data):
  from tests.llama3_tokenizer import llama3_tokenizer

  tok = llama3_tokenizer()
  test = load_task("wiki_continuation", "test", shared_data, tokenizer=tok)
  with open(shared_data / "wikitext2" / "test.txt", encoding="utf-8") as f:
    articles = split_wikitext(f)
  assert len(articles) == 62  # ' = Title = ' lines in test.txt
  assert articles[0][0] == "Robert <unk>"
  assert 55 <= len(test) <= 62  # a few articles are shorter than 100 tokens
  first = test[0]
  assert first.question.startswith("Robert <unk> is an English film , television")
  assert articles[0][1].startswith(first.question + first.answer)
  for e in test[:10]:
    assert len(tok.encode(e.question, add_special_tokens=False)) == 50
    assert len(tok.encode(e.answer, add_special_tokens=False)) == 50
  valid = load_task(
    "wiki_continuation",
    "validation",
    shared_data / "wikitext2",
    tokenizer=tok,
    question_length=20,
    target_length=10,
    num_examples=5,
  )
  assert len(valid) == 5 and not {e.question for e in valid} & {e.question for e in test}


def test_arithmetic_generator():
  train = load_task("arithmetic", "train", num_examples=50, seed=3)
  again = load_task("arithmetic", "train", num_examples=50, seed=3)
  test = load_task("arithmetic", "test", num_examples=50, seed=3)
  assert train == again and train != test
  for e in train:
    terms = [int(t) for t in e.question.split(" + ")]
    assert len(terms) == 15 and all(1 <= t <= 99 for t in terms)
    assert e.answer == str(sum(terms))
  small = load_task("arithmetic", "test", num_terms=2, min_value=1, max_value=20, num_examples=400)
  values = {int(t) for e in small for t in e.question.split(" + ")}
  assert values == set(range(1, 21))
  assert len(load_task("arithmetic", "test")) == 200


def test_task_kinds_and_options():
  assert [task_kind(t) for t in ("gsm8k", "arc", "wiki_continuation")] == [
    "numeric",
    "mcq",
    "continuation",
  ]

  from markovian_jax.training.specs import DataSpec

  data = DataSpec(
    arc_subset="ARC-Easy",
    arithmetic_terms=2,
    arithmetic_max=20,
    question_length=30,
    target_length=40,
  )
  assert data.task_options("arithmetic") == {"num_terms": 2, "max_value": 20}
  assert data.task_options("arc") == {"subset": "ARC-Easy"}
  assert data.task_options("wiki_continuation", tokenizer="T")["question_length"] == 30
  assert data.task_options("mmlu") == {"subject": None, "train_splits": ("dev", "validation")}
  assert data.task_options("gsm8k") == {}


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_unknown_task_lists_known_tasks():
  with pytest.raises(DataError, match=r"unknown task 'gsm9k'.*'gsm8k'.*'wiki_continuation'"):
    load_task("gsm9k", "test")


def test_unknown_split_and_option(shared_data):
  with pytest.raises(DataError, match=r"gsm8k: unknown split 'validation'"):
    load_task("gsm8k", "validation", shared_data / "gsm8k")
  with pytest.raises(DataError, match=r"arc: unknown subset 'hard'"):
    load_task("arc", "test", shared_data, subset="hard")
  with pytest.raises(DataError, match=r"gsm8k: unknown option\(s\) \['subset'\]"):
    load_task("gsm8k", "test", shared_data, subset="x")
  with pytest.raises(DataError, match="needs tokenizer"):
    load_task("wiki_continuation", "test", shared_data)
  with pytest.raises(DataError, match="reads no files"):
    numeric_tasks.load_arithmetic("train", "/some/file")


def test_missing_files(tmp_path, shared_data):
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    load_task("gsm8k", "test", tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"train\.json.*aqua train"):
    load_task("aqua", "train", shared_data / "aqua")  # the big train.json is not in the copy
  with pytest.raises(FileNotFoundError, match=r"train\.txt.*wiki_continuation train"):
    load_task("wiki_continuation", "train", shared_data / "wikitext2", tokenizer=object())
  with pytest.raises(FileNotFoundError, match="auxiliary_train"):
    load_task("mmlu", "auxiliary_train", shared_data / "mmlu")


@pytest.mark.parametrize(
  "task, hub_id, options",
  [
    ("gsm8k", "openai/gsm8k", {}),
    ("svamp", "ChilleD/SVAMP", {}),
    ("arc", "allenai/ai2_arc", {}),
    ("mmlu", "cais/mmlu", {}),
    ("aqua", "deepmind/aqua_rat", {}),
    ("mathqa", "allenai/math_qa", {}),
    ("wiki_continuation", "wikimedia/wikipedia", {"tokenizer": object()}),
  ],
)
def test_hub_unreachable_is_a_clear_error(task, hub_id, options):
  # conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: the real load_dataset path fails fast.
  with pytest.raises(DataError, match=rf"could not load {hub_id} .*Pass a local path"):
    load_task(task, "test", **options)


def test_malformed_jsonl_names_file_and_line(tmp_path):
  good = json.dumps({"question": "q", "answer": "work\n#### 5"})
  f = tmp_path / "test.jsonl"
  f.write_text(good + "\n" + good + "\n{\"question\": \"q\", \"answer\": \n")
  with pytest.raises(DataError, match=rf"{f}:3: malformed JSON line"):
    load_task("gsm8k", "test", tmp_path)
  f.write_text(good + "\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
  with pytest.raises(DataError, match=rf"{f}:2: GSM8K answer has no '####'"):
    load_task("gsm8k", "test", f)
  f.write_text(json.dumps({"question": "q"}) + "\n")
  with pytest.raises(DataError, match=rf"{f}:1: missing field 'answer'"):
    load_task("gsm8k", "test", f)
  f.write_text(json.dumps({"question": "q", "answer": "#### many"}) + "\n")
  with pytest.raises(DataError, match=rf"{f}:1: answer ' many' is not a number"):
    load_task("gsm8k", "test", f)
  arc = tmp_path / "arc.jsonl"
  arc.write_text(
    json.dumps(
      {
        "id": "x",
        "question": {
          "stem": "s",
          "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}],
        },
        "answerKey": "C",
      }
    )
    + "\n"
  )
  with pytest.raises(DataError, match=rf"{arc}:1: answerKey 'C' is not among"):
    load_task("arc", "test", arc)


def test_malformed_csv_row_names_file_and_row(tmp_path):
  d = tmp_path / "test"
  d.mkdir()
  f = d / "anatomy_test.csv"
  f.write_text('q1,a,b,c,d,A\n"q2, with comma",a,b,c,d,B\nq3,a,b,c,A\n')
  with pytest.raises(DataError, match=rf"{f}: row 3 \(line 3\): expected 6 columns"):
    load_task("mmlu", "test", tmp_path)
  f.write_text("q1,a,b,c,d,F\n")
  with pytest.raises(DataError, match=rf"{f}: row 1 \(line 1\): gold answer 'F'"):
    load_task("mmlu", "test", tmp_path)
  f.write_text('"multi\nline",a,b,c,d,A\nq,a,b,c,d,Z\n')
  with pytest.raises(DataError, match=rf"{f}: row 2 \(line 3\)"):
    load_task("mmlu", "test", tmp_path)


def test_svamp_malformed_item(tmp_path):
  f = tmp_path / "SVAMP.json"
  f.write_text(
    json.dumps(
      [
        {"ID": "a", "Body": "b", "Question": "q", "Answer": 1.0},
        {"ID": "b", "Body": "b", "Answer": 2.0},
      ]
    )
  )
  with pytest.raises(DataError, match=rf"{f}: item 1: missing field 'Question'"):
    load_task("svamp", "all", tmp_path)
  f.write_text("[{\"ID\": 1,\n\"Body\": }]")
  with pytest.raises(DataError, match=rf"{f}:2: malformed JSON"):
    load_task("svamp", "all", f)


def test_local_path_accepts_benchmark_root(shared_data):
  assert os.path.isdir(shared_data / "gsm8k")
  assert load_task("gsm8k", "test", shared_data)[0].answer == "18"
