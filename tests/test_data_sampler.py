"""The mixture sampler: deterministic, exact proportions, rank slices, epochs, state."""

from __future__ import annotations

from collections import Counter

import pytest

from llamalab.data import MixtureSampler
from llamalab.data.sampler import permute
from llamalab.errors import LlamalabError

WINDOWS = {"web": 50, "books": 7, "code": 13}
WEIGHTS = {"web": 0.67, "books": 0.2, "code": 0.13}


def order(n: int, **kw) -> list[tuple[str, int]]:
    return MixtureSampler(WINDOWS, kw.pop("weights", WEIGHTS), **kw).take(n)


def test_same_seed_same_order_other_seed_other_order():
    assert order(300, seed=3) == order(300, seed=3)
    assert order(300, seed=3) != order(300, seed=4)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_rank_gets_its_stride_of_the_one_rank_order(world_size):
    steps, per_step = 9, 5
    full = order(steps * per_step * world_size, seed=1)
    for rank in range(world_size):
        s = MixtureSampler(WINDOWS, WEIGHTS, seed=1, rank=rank, world_size=world_size)
        mine = [item for _ in range(steps) for item in s.take(per_step)]
        assert mine == full[rank::world_size]
        assert s.position == steps * per_step * world_size


def test_proportions_are_exact_and_epochs_are_permutations():
    s = MixtureSampler(WINDOWS, WEIGHTS, seed=0)
    n = 1000
    items = s.take(n)
    counts = Counter(name for name, _ in items)
    for name, w in WEIGHTS.items():
        assert abs(counts[name] - w * n) <= 1, (name, counts[name])
    # Every epoch of a source visits each of its windows exactly once.
    for name, size in WINDOWS.items():
        seq = [w for src, w in items if src == name]
        for e in range(len(seq) // size):
            assert sorted(seq[e * size : (e + 1) * size]) == list(range(size))
        assert s.epochs()[name] == pytest.approx(counts[name] / size)
    # Table 1's arithmetic: the small source is seen for many more epochs.
    assert s.epochs()["books"] > s.epochs()["web"]


def test_without_weights_sources_go_by_size():
    s = MixtureSampler(WINDOWS, None, seed=0)
    counts = Counter(name for name, _ in s.take(7000))
    total = sum(WINDOWS.values())
    for name, size in WINDOWS.items():
        assert abs(counts[name] - 7000 * size / total) <= 1
    assert s.epochs() == pytest.approx({n: 100.0 for n in WINDOWS})


def test_zero_weight_and_unknown_sources():
    s = MixtureSampler(WINDOWS, {"web": 1, "books": 0}, seed=0)
    assert {name for name, _ in s.take(100)} == {"web"}
    with pytest.raises(LlamalabError, match="unknown sources wiki"):
        MixtureSampler(WINDOWS, {"wiki": 1.0})
    with pytest.raises(LlamalabError, match="no whole window"):
        MixtureSampler({"a": 0, "b": 3}, {"a": 1, "b": 1})


def test_state_round_trip_continues_the_same_order():
    a = MixtureSampler(WINDOWS, WEIGHTS, seed=5)
    a.take(37)
    state = a.state_dict()
    b = MixtureSampler(WINDOWS, WEIGHTS, seed=5)
    b.load_state_dict(state)
    assert b.take(80) == a.take(80)
    assert b.epochs() == a.epochs()
    # Resuming on two ranks continues the same global order.
    r0 = MixtureSampler(WINDOWS, WEIGHTS, seed=5, rank=0, world_size=2)
    r1 = MixtureSampler(WINDOWS, WEIGHTS, seed=5, rank=1, world_size=2)
    r0.load_state_dict(b.state_dict())
    r1.load_state_dict(b.state_dict())
    nxt = b.take(20)
    assert r0.take(10) == nxt[0::2] and r1.take(10) == nxt[1::2]
    other = MixtureSampler(WINDOWS, {"web": 1.0}, seed=5)
    with pytest.raises(LlamalabError, match="other data"):
        other.load_state_dict(state)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 17, 256, 1000, 4099])
def test_permute_is_a_bijection(n):
    for key in (0, 12345):
        assert sorted(permute(i, n, key) for i in range(n)) == list(range(n))
    if n >= 10:
        assert [permute(i, n, 1) for i in range(n)] != list(range(n))


def test_table_1_proportions_over_ten_thousand_sequences_on_one_and_two_ranks():
    # The paper's seven sources and proportions (Table 1), over windows of unequal counts.
    table1 = {"cc": 0.67, "c4": 0.15, "github": 0.045, "wiki": 0.045, "books": 0.045,
              "arxiv": 0.025, "se": 0.02}  # fmt: skip
    windows = {name: 97 + 31 * i for i, name in enumerate(table1)}
    one = MixtureSampler(windows, table1, seed=9).take(10_000)
    counts = Counter(name for name, _ in one)
    for name, weight in table1.items():
        assert abs(counts[name] / 10_000 - weight) <= 0.01, (name, counts[name])
    ranks = [MixtureSampler(windows, table1, seed=9, rank=r, world_size=2) for r in (0, 1)]
    two = [ranks[i % 2].take(1)[0] for i in range(10_000)]
    assert two == one  # world size 2 sees exactly the sequences world size 1 sees
