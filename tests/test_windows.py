"""WindowStore against a naive per-event reference (random interleavings, batch splits, hops),
eviction, partition drop and state round-trip."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import orjson
import pytest

from stream_detector.core.events import NO_TIME
from stream_detector.core.windows import STEP_MEMORY, WindowStore, hop_phase


class NaiveWindows:
    """One event at a time, a deque per entity: obviously right, slow."""

    def __init__(self, window: int, hop: int) -> None:
        self.window, self.hop = window, hop
        self.rows: dict[tuple[int, str], deque] = {}
        self.count: dict[tuple[int, str], int] = {}

    def push(self, partition: int, key: str, row: np.ndarray) -> np.ndarray | None:
        e = (partition, key)
        self.rows.setdefault(e, deque(maxlen=self.window)).append(row.copy())
        self.count[e] = self.count.get(e, 0) + 1
        c = self.count[e]
        if c >= self.window and c % self.hop == hop_phase(key, self.hop):
            return np.stack(self.rows[e])
        return None


def random_stream(rng: np.random.Generator, n: int, n_entities: int, n_partitions: int, f: int):
    ent = rng.integers(0, n_entities, size=n)
    # bursts: repeat the previous entity sometimes so batches hold several events of one entity
    burst = rng.random(n) < 0.3
    for i in range(1, n):
        if burst[i]:
            ent[i] = ent[i - 1]
    keys = [f"k{e}" for e in ent]
    parts = (ent % n_partitions).astype(np.int32)
    rows = rng.normal(size=(n, f)).astype(np.float32)
    return parts, keys, rows


@pytest.mark.parametrize("hop", [1, 3])
@pytest.mark.parametrize("window", [1, 4, 7])
def test_matches_naive_reference(rng, window, hop):
    f = 3
    parts, keys, rows = random_stream(rng, 1500, n_entities=13, n_partitions=3, f=f)
    store = WindowStore(window, f, max_entities=100, hop=hop, initial_capacity=2)  # forces growth
    ref = NaiveWindows(window, hop)
    expected = {}
    for i in range(len(keys)):
        w = ref.push(int(parts[i]), keys[i], rows[i])
        if w is not None:
            expected[i] = w
    got = {}
    i = 0
    while i < len(keys):
        size = int(rng.integers(1, 200))
        j = min(len(keys), i + size)
        rows_in = rows[i:j].copy()
        ing = store.ingest(parts[i:j], keys[i:j], rows_in)
        np.testing.assert_array_equal(rows_in, rows[i:j])  # input not mutated
        assert ing.windows.shape == (ing.due.size, window, f)
        assert np.all(np.diff(ing.due) > 0)
        for d, w in zip(ing.due.tolist(), ing.windows):
            got[i + d] = w
        i = j
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=f"event {k}")
    assert len(store) == len({(int(p), k) for p, k in zip(parts, keys)})


def test_same_key_on_two_partitions_is_two_entities():
    store = WindowStore(2, 1)
    ing = store.ingest([0, 1, 0, 1], ["a", "a", "a", "a"], np.array([[1], [10], [2], [20]], np.float32))
    assert ing.due.tolist() == [2, 3]
    np.testing.assert_array_equal(ing.windows[:, :, 0], [[1, 2], [10, 20]])


def test_lru_eviction_at_cap_and_reset_slots():
    store = WindowStore(2, 1, max_entities=3)
    one = np.ones((1, 1), np.float32)
    for t, k in enumerate(["a", "b", "c"]):
        store.ingest([0], [k], one, np.array([t]))
    store.ingest([0], ["a"], one, np.array([3]))  # a is now the most recent; b the least
    ing = store.ingest([0], ["d"], one, np.array([4]))
    assert ing.evicted == 1 and store.evicted_lru == 1
    assert (0, "b") not in store and (0, "a") in store and (0, "d") in store
    assert ing.reset_slots.tolist() == [int(ing.slots[0])]
    # the reused slot starts empty: d needs two events of its own before it is due
    assert store.ingest([0], ["d"], one, np.array([5])).due.tolist() == [0]


def test_batch_with_more_entities_than_cap_is_refused_clearly():
    store = WindowStore(2, 1, max_entities=2)
    with pytest.raises(ValueError, match="more distinct entities than max_entities"):
        store.ingest([0, 0, 0], ["a", "b", "c"], np.zeros((3, 1), np.float32))


def test_idle_eviction_by_event_time():
    store = WindowStore(2, 1, max_entities=10, idle_timeout_ms=1000)
    z = np.zeros((1, 1), np.float32)
    store.ingest([0], ["old"], z, np.array([0]))
    store.ingest([0], ["new"], z, np.array([900]))
    assert len(store) == 2
    ing = store.ingest([0], ["new"], z, np.array([1500]))  # old last seen 1500 ms ago
    assert ing.evicted == 1 and (0, "old") not in store and (0, "new") in store
    # events without a time never make an entity idle
    store.ingest([0], ["timeless"], z, np.array([NO_TIME]))
    store.ingest([0], ["new"], z, np.array([99_000]))
    assert (0, "timeless") in store and (0, "new") in store


def test_idle_eviction_spares_entities_of_the_current_batch():
    store = WindowStore(2, 1, max_entities=10, idle_timeout_ms=1000)
    z = np.zeros((2, 1), np.float32)
    store.ingest([0], ["a"], z[:1], np.array([0]))
    store.ingest([0], ["a"], z[:1], np.array([1]))
    # a returns after a long silence in the same batch as a late clock: it keeps its window
    ing = store.ingest([0, 0], ["b", "a"], z, np.array([10_000, 10_001]))
    assert ing.evicted == 0 and store.count_of(store.slot_of(0, "a")) == 3


def test_drop_partitions():
    store = WindowStore(2, 1)
    store.ingest([0, 1, 2], ["a", "b", "c"], np.zeros((3, 1), np.float32))
    freed = store.drop_partitions([1, 2])
    assert len(freed) == 2 and store.entities() == [(0, "a")]


def test_state_round_trip_continues_identically(rng):
    w, f = 5, 2
    parts, keys, rows = random_stream(rng, 300, n_entities=4, n_partitions=2, f=f)
    a = WindowStore(w, f, hop=2)
    b = WindowStore(w, f, hop=2)
    a.ingest(parts[:150], keys[:150], rows[:150])
    b2 = WindowStore(w, f, hop=2)
    b.ingest(parts[:150], keys[:150], rows[:150])
    for p, k in b.entities():
        st = b.export_state(p, k)
        assert st is not None and st["rows"].shape == (min(st["count"], w), f)
        b2.import_state(p, k, {"count": st["count"], "last_time_ms": st["last_time_ms"], "rows": st["rows"].tolist()})
    ra = a.ingest(parts[150:], keys[150:], rows[150:])
    rb = b2.ingest(parts[150:], keys[150:], rows[150:])
    np.testing.assert_array_equal(ra.due, rb.due)
    np.testing.assert_array_equal(ra.windows, rb.windows)
    assert b.export_state(9, "nobody") is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="hop"):
        WindowStore(4, 2, hop=0)
    store = WindowStore(4, 2)
    with pytest.raises(ValueError, match="shape"):
        store.ingest([0], ["a"], np.zeros((1, 3), np.float32))


def test_a_fleet_reporting_in_lockstep_is_scored_evenly_over_the_hop():
    """Every entity sends one event per tick: with a hop of 16 each is scored once per 16 ticks, at
    its own phase, so every tick scores about 1/16 of the fleet (not the whole fleet every 16th)."""
    n, hop = 1600, 16
    store = WindowStore(4, 1, max_entities=n, hop=hop)
    keys = [f"host-{i}" for i in range(n)]
    due = [store.ingest(np.zeros(n, dtype=np.int64), keys, np.zeros((n, 1), np.float32)).due.size for _ in range(48)]
    steady = due[16:]  # counts 17..48: every window full
    assert sum(steady) == n * len(steady) // hop
    assert max(steady) <= 2 * n / hop and min(steady) >= n / hop / 2, steady


# ---------------------------------------------------------------------------------- time gaps


class NaiveGapWindows(NaiveWindows):
    """The reference with time gaps, one event at a time in plain Python: the rule of
    core/windows.py's docstring (a step over gap_factor x the entity's typical step restarts its
    window; the typical step is a geometric mean of recent steps, each at most gap_factor x it)."""

    def __init__(self, window: int, hop: int, gap_factor: float) -> None:
        super().__init__(window, hop)
        self.gap_factor = gap_factor
        self.last: dict[tuple[int, str], int] = {}
        self.typical: dict[tuple[int, str], float] = {}
        self.run: dict[tuple[int, str], int] = {}

    def push_at(self, partition: int, key: str, row: np.ndarray, t: int) -> np.ndarray | None:
        e = (partition, key)
        last, typical = self.last.get(e), self.typical.get(e, 0.0)
        step = t - last if last is not None and t != NO_TIME else 0
        run = self.run.get(e, 0)
        if typical > 0 and step > self.gap_factor * typical:
            run = 0
        if step > 0:
            x = min(step, self.gap_factor * typical) if typical > 0 else step
            typical = math.exp(math.log(typical) + STEP_MEMORY * (math.log(x) - math.log(typical))) if typical else x
        self.typical[e], self.run[e] = typical, run + 1
        if t != NO_TIME:
            self.last[e] = t if last is None else max(last, t)
        self.rows.setdefault(e, deque(maxlen=self.window)).append(row.copy())
        self.count[e] = self.count.get(e, 0) + 1
        if self.run[e] >= self.window and self.count[e] % self.hop == hop_phase(key, self.hop):
            return np.stack(self.rows[e])
        return None


def gappy_times(rng: np.random.Generator, keys: list[str]) -> np.ndarray:
    """Per entity: a rate of its own (1 s or 5 min), steps jittered by +-20 %, now and then a gap of
    5-50 steps, a repeated or out-of-order time, or no time at all."""
    rate = {k: (1_000 if int(k[1:]) % 2 else 300_000) for k in set(keys)}
    clock = {k: 1_700_000_000_000 for k in rate}
    out = np.empty(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        u = rng.random()
        if u < 0.03:
            clock[k] += int(rate[k] * rng.uniform(5, 50))
        elif u < 0.05:
            clock[k] -= int(rate[k] * rng.uniform(0, 2))
        else:
            clock[k] += int(rate[k] * rng.uniform(0.8, 1.2))
        out[i] = NO_TIME if u > 0.98 else clock[k]
    return out


@pytest.mark.parametrize("hop", [1, 3])
def test_time_gaps_restart_windows_as_the_naive_reference_does(rng, hop):
    w, f = 6, 2
    parts, keys, rows = random_stream(rng, 3000, n_entities=9, n_partitions=2, f=f)
    times = gappy_times(rng, keys)
    store = WindowStore(w, f, hop=hop, gap_factor=3.0, initial_capacity=2)
    ref = NaiveGapWindows(w, hop, 3.0)
    expected = {i: x for i in range(len(keys)) if (x := ref.push_at(int(parts[i]), keys[i], rows[i], int(times[i]))) is not None}
    got, i = {}, 0
    while i < len(keys):
        j = min(len(keys), i + int(rng.integers(1, 200)))
        ing = store.ingest(parts[i:j], keys[i:j], rows[i:j], times[i:j])
        got.update({i + d: x for d, x in zip(ing.due.tolist(), ing.windows)})
        i = j
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=f"event {k}")
    plain = NaiveWindows(w, hop)
    n_plain = sum(plain.push(int(parts[i]), keys[i], rows[i]) is not None for i in range(len(keys)))
    # the stream has gaps, and they cost some scored windows but not most of them
    assert store.gap_restarts > 20 and 0.5 * n_plain < len(got) < n_plain


def test_a_gap_restarts_only_the_window_and_a_window_never_spans_one():
    w = 4
    store = WindowStore(w, 1, gap_factor=3.0)
    plain = WindowStore(w, 1)
    t = [1_000 * i for i in range(8)] + [7_000 + 600_000 + 1_000 * i for i in range(5)]  # 10 min silence after row 7
    rows = np.arange(len(t), dtype=np.float32)[:, None]
    ing = store.ingest(np.zeros(len(t), np.int64), ["a"] * len(t), rows, np.array(t))
    assert ing.due.tolist() == [3, 4, 5, 6, 7, 11, 12] and store.gap_restarts == 1
    np.testing.assert_array_equal(ing.windows[5, :, 0], [8, 9, 10, 11])  # only rows after the gap
    assert store.count_of(store.slot_of(0, "a")) == len(t)  # the entity itself goes on
    # without a gap rule the window after the silence joins rows from before and after it
    assert plain.ingest(np.zeros(len(t), np.int64), ["a"] * len(t), rows, np.array(t)).due.tolist() == list(range(3, 13))


def test_an_entity_whose_rate_slows_down_is_scored_again_after_a_few_restarts():
    store = WindowStore(4, 1, gap_factor=3.0)
    t = np.concatenate([np.arange(30) * 60_000, 29 * 60_000 + np.arange(1, 61) * 300_000])  # 1 min, then 5 min
    ing = store.ingest(np.zeros(t.size, np.int64), ["a"] * t.size, np.zeros((t.size, 1), np.float32), t)
    assert 1 <= store.gap_restarts <= 10
    assert set(range(t.size - 30, t.size)) <= set(ing.due.tolist())  # at the new rate every event is scored


def test_gap_state_round_trips_and_older_states_restore_as_before(rng):
    w, f = 5, 1
    t = np.array([1_000 * i for i in range(10)] + [9_000 + 60_000 + 1_000 * i for i in range(8)])
    rows = rng.normal(size=(t.size, f)).astype(np.float32)
    zero = np.zeros(t.size, np.int64)
    a, b = WindowStore(w, f, gap_factor=3.0), WindowStore(w, f, gap_factor=3.0)
    a.ingest(zero[:12], ["k"] * 12, rows[:12], t[:12])  # two rows after the gap
    st = a.export_state(0, "k")
    assert st is not None and st["run"] == 2 and st["step_ms"] > 0
    b.import_state(0, "k", orjson.loads(orjson.dumps(st, option=orjson.OPT_SERIALIZE_NUMPY)))
    ra, rb = (s.ingest(zero[12:], ["k"] * 6, rows[12:], t[12:]) for s in (a, b))
    assert ra.due.tolist() == rb.due.tolist() == [2, 3, 4, 5]
    np.testing.assert_array_equal(ra.windows, rb.windows)
    # a state written before gaps were known: the window ran since the entity was first seen
    old = {k: v for k, v in st.items() if k not in ("run", "step_ms")}
    c = WindowStore(w, f, gap_factor=3.0)
    c.import_state(0, "k", orjson.loads(orjson.dumps(old, option=orjson.OPT_SERIALIZE_NUMPY)))
    assert c.ingest(zero[12:13], ["k"], rows[12:13], t[12:13]).due.tolist() == [0]


def test_a_gap_factor_of_one_or_less_is_refused():
    with pytest.raises(ValueError, match="gap_factor"):
        WindowStore(4, 1, gap_factor=1.0)
