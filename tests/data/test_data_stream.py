"""ExampleStream: seeded epochs, exact resume from a JSON round-tripped state, disjoint shards."""

import json

import pytest

from markovian_jax.data import DataError, Example, ExampleStream
from markovian_jax.data.stream import epoch_order

EXAMPLES = [Example(question=f"q{i}", answer=str(i), id=str(i)) for i in range(10)]


def ids(examples):
  return [int(e.id) for e in examples]


def test_same_seed_same_order_and_epochs_reshuffle():
  a, b = ExampleStream(EXAMPLES, seed=7), ExampleStream(EXAMPLES, seed=7)
  first = ids(a.take(25))
  assert first == ids(b.take(25))
  assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
  assert first[:10] != first[10:20]  # epoch 1 is a different permutation
  assert first[:10] == epoch_order(10, 7, 0) and first[10:20] == epoch_order(10, 7, 1)
  assert ids(ExampleStream(EXAMPLES, seed=8).take(10)) != first[:10]
  assert ids(ExampleStream(EXAMPLES, seed=7, shuffle=False).take(12)) == list(range(10)) + [0, 1]


def test_restore_continues_identically():
  reference = ExampleStream(EXAMPLES, seed=3)
  expected = ids(reference.take(37))
  for cut in (0, 5, 10, 13, 36):
    run = ExampleStream(EXAMPLES, seed=3)
    seen = ids(run.take(cut))
    state = json.loads(json.dumps(run.state()))  # what a checkpoint stores
    resumed = ExampleStream(EXAMPLES, seed=3)
    resumed.restore(state)
    assert seen + ids(resumed.take(37 - cut)) == expected, cut
  assert state["epoch"] == 3 and state["index"] == 6


def test_process_shards_are_disjoint_every_k_th():
  streams = [ExampleStream(EXAMPLES, seed=1, process_index=p, process_count=3) for p in range(3)]
  assert [len(s) for s in streams] == [3, 3, 3]
  order = epoch_order(10, 1, 0)
  shards = [ids(s.take(3)) for s in streams]
  assert shards == [order[0:9:3], order[1:9:3], order[2:9:3]]
  assert len(set(sum(shards, []))) == 9  # disjoint; the 10th example waits for a later epoch
  nxt = [ids(s.take(3)) for s in streams]
  assert nxt[0] == epoch_order(10, 1, 1)[0:9:3]
  state = streams[1].state()
  other = ExampleStream(EXAMPLES, seed=1, process_index=1, process_count=3)
  other.restore(state)
  assert ids(other.take(4)) == ids(streams[1].take(4))


def test_restore_refuses_other_data_or_settings():
  state = ExampleStream(EXAMPLES, seed=3).state()
  with pytest.raises(DataError, match="seed=3, but this stream has seed=4"):
    ExampleStream(EXAMPLES, seed=4).restore(state)
  changed = EXAMPLES[:9] + [Example(question="other", answer="9")]
  with pytest.raises(DataError, match="fingerprint"):
    ExampleStream(changed, seed=3).restore(state)
  with pytest.raises(DataError, match="process_count=1"):
    ExampleStream(EXAMPLES, seed=3, process_count=2).restore(state)
  with pytest.raises(DataError, match="missing 'fingerprint'"):
    ExampleStream(EXAMPLES, seed=3).restore(
      {"epoch": 0, "index": 0, "seed": 3, "num_examples": 10, "process_count": 1}
    )
  with pytest.raises(DataError, match="invalid cursor"):
    ExampleStream(EXAMPLES, seed=3).restore(dict(state, index=11))


def test_bad_construction():
  with pytest.raises(DataError, match="at least one example"):
    ExampleStream([], seed=0)
  with pytest.raises(DataError, match="process_index 2 is not in"):
    ExampleStream(EXAMPLES, seed=0, process_index=2, process_count=2)
  with pytest.raises(DataError, match="cannot be split over 11 processes"):
    ExampleStream(EXAMPLES, seed=0, process_count=11)
