"""Device-resident windows (device_windows.py): the ring update + gather + score graphs give the
same results as host-gathered windows. Run on ONNX Runtime's CPU provider here (the same graphs
the CUDA provider runs); the gpu-marked test repeats the comparison on CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from bundle_factory import make_bundle
from stream_detector.core.bundle import ScoringRule
from stream_detector.core.device_windows import DeviceWindows, _occurrence_rank
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from test_pipeline import SETTINGS, W, flatten, run, stream

F = 4


def core(tmp_path, provider="cpu", device=False, settings=SETTINGS, name="b", kind="mean", scoring=None):
    b = make_bundle(tmp_path, window=W, threshold=12.0, center=[10.0] * F, scale=[2.0] * F, name=name, kind=kind)
    if scoring is not None:
        b = dataclasses.replace(b, scoring=scoring)
    return DetectorCore(b, Scorer(b, provider=provider, intra_op_threads=1), settings, clock=lambda: 1_800_000_000.0,
                        device_windows=device)


def assert_same(a, b):
    """Same scored events and alerts; scores (and the thresholds learned from them) equal up to
    float32 reduction order (ONNX Runtime's reductions vs numpy's)."""
    assert [(i, op, ev) for i, _, _, op, ev in a] == [(i, op, ev) for i, _, _, op, ev in b]
    np.testing.assert_allclose([x[1] for x in a], [x[1] for x in b], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], rtol=1e-5, atol=1e-6)


def test_ring_update_is_in_place_on_the_cpu_provider(tmp_path):
    b = make_bundle(tmp_path, window=W)
    dw = DeviceWindows(b, Scorer(b, provider="cpu", intra_op_threads=1))
    assert dw.in_place and dw.ring_rows == 2 * W


@pytest.mark.parametrize("batches", [[97], [1, 7, 300, 64], [10_000]])
def test_device_windows_match_host_windows(tmp_path, rng, batches):
    # [10_000]: the whole stream in one batch, 400 events per entity: more than the ring's
    # L - W = 8 spare rows, so updates and gathers are split into chunks
    keys, rows, times, parts = stream(rng, spikes=((1, 120), (4, 250)))
    host = flatten(run(core(tmp_path, name="h"), keys, rows, times, parts, batches))
    dev_core = core(tmp_path, device=True, name="d")
    dev = flatten(run(dev_core, keys, rows, times, parts, batches))
    assert_same(host, dev)
    assert sum(1 for x in dev if x[4] == "open") >= 2
    # host->device traffic: the initial ring, then one row per event (no windows)
    assert dev_core.device.uploaded_rows <= len(keys) + dev_core.store.capacity * W


@pytest.mark.parametrize("reduction,kind", [("max_squared_error", "mean"), ("model_error", "zeros")])
def test_scoring_rules_in_the_graph(tmp_path, rng, reduction, kind):
    rule = ScoringRule(positions=(-2, -1), reduction=reduction)
    keys, rows, times, parts = stream(rng, steps=60, spikes=((2, 40),))
    host = flatten(run(core(tmp_path, name="h", kind=kind, scoring=rule), keys, rows, times, parts, [50]))
    dev = flatten(run(core(tmp_path, device=True, name="d", kind=kind, scoring=rule), keys, rows, times, parts, [50]))
    assert_same(host, dev)


def test_growth_eviction_and_slot_reuse(tmp_path, rng):
    # one event of each of 1100 entities, more than the store's first capacity (1024): the device
    # ring grows on the device; then W + 3 events each of 550 entities. With a cap of 600
    # entities those are new again, evict the least recently seen and take over their slots.
    ids = list(range(1100)) + list(range(550)) * (W + 3)
    keys = [f"e{e}" for e in ids]
    x = rng.normal(size=(len(keys), F)).astype(np.float32) * 2 + 10
    times = np.arange(len(keys), dtype=np.int64) + 1_700_000_000_000
    parts = np.zeros(len(keys), np.int32)
    capped = DetectionSettings(max_entities=600, threshold=SETTINGS.threshold)
    for settings in (SETTINGS, capped):
        host = flatten(run(core(tmp_path, name="h", settings=settings), keys, x, times, parts, [700, 1500]))
        dev_core = core(tmp_path, device=True, name="d", settings=settings)
        dev = flatten(run(dev_core, keys, x, times, parts, [700, 1500]))
        assert_same(host, dev)
        assert len(dev) == 550 * 5 if settings is SETTINGS else len(dev) > 1000  # uncapped: events 8..12 of 12
    assert dev_core.store.evicted_lru > 0


def test_restored_state_and_model_swap_are_sent_to_the_device(tmp_path, rng):
    keys, rows, times, parts = stream(rng, spikes=((0, 150), (5, 300)))
    whole = flatten(run(core(tmp_path, name="whole"), keys, rows, times, parts, [100]))
    first = core(tmp_path, device=True, name="first")
    cut = 160 * 6
    part1 = run(first, keys[:cut], rows[:cut], times[:cut], parts[:cut], [100])
    second = core(tmp_path, device=True, name="second")
    run(second, keys[:60], rows[:60], times[:60], parts[:60], [60])  # the device ring exists already
    for p, k in first.entities():
        second.restore(p, k, orjson.loads(orjson.dumps(first.state_of(p, k), option=orjson.OPT_SERIALIZE_NUMPY)))
    part2 = run(second, keys[cut:], rows[cut:], times[cut:], parts[cut:], [100])
    assert_same(whole, flatten(part1) + [(i + cut, *rest) for i, *rest in flatten(part2)])

    new = make_bundle(tmp_path, window=W, threshold=12.0, center=[9.0, 11.0, 10.0, 8.0], scale=[1.5, 3.0, 2.0, 0.5],
                      name="new", model_version="v-new")
    host, dev = core(tmp_path, name="h2"), core(tmp_path, device=True, name="d2")
    for c in (host, dev):
        run(c, keys[:cut], rows[:cut], times[:cut], parts[:cut], [100])
        c.swap_model(new, Scorer(new, provider="cpu", intra_op_threads=1))
    tail = (keys[cut:], rows[cut:], times[cut:], parts[cut:])
    assert dev.device is not None
    assert_same(flatten(run(host, *tail, [100])), flatten(run(dev, *tail, [100])))


def test_occurrence_rank():
    assert _occurrence_rank(np.array([3, 1, 3, 3, 1, 0])).tolist() == [0, 0, 1, 2, 1, 0]


@pytest.mark.gpu
def test_cuda_device_windows_match_cpu_host_windows(tmp_path, rng):
    keys, rows, times, parts = stream(rng, spikes=((1, 120), (4, 250)))
    cpu = flatten(run(core(tmp_path, name="h"), keys, rows, times, parts, [97, 1000]))
    gpu_core = core(tmp_path, provider="cuda", device=None, name="d")  # auto: on because the scorer runs on CUDA
    assert gpu_core.scorer.on_cuda and gpu_core.device is not None
    gpu = flatten(run(gpu_core, keys, rows, times, parts, [97, 1000]))
    assert [(i, op, ev) for i, _, _, op, ev in cpu] == [(i, op, ev) for i, _, _, op, ev in gpu]
    np.testing.assert_allclose([x[1] for x in gpu], [x[1] for x in cpu], rtol=1e-4, atol=1e-5)
