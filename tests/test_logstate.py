"""Log sessions move with their partition: with a changelog, an entity's state carries its log
session (`LogDetectorCore` + `LogStage.resume`), so a block whose partition moves to another
consumer half way through its life goes on with the counts / token context it had. The rows the
model sees after the move, and so the scores and alerts, are those of a service that never moved;
lines read again after a crash (at-least-once) are not counted twice. The control: a stage that
starts cold after the same restore makes other rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from logsynth import make_log, train_tiny_bundle
from stream_detector.core.bundle import load_bundle
from stream_detector.service.changelog import StateAssembler, StateTracker
from stream_detector.logs.spec import load_log_spec
from stream_detector.logs.core import LogDetectorCore
from stream_detector.logs.stage import IDLE, LogStage, SavedSession
from stream_detector.core.pipeline import DetectionSettings, DetectorCore
from stream_detector.core.scorer import Scorer
from stream_detector.core.thresholds import ThresholdParams

TOPIC, PART, CHUNK = "logs", 3, 50


@pytest.fixture(scope="module", params=["counts", "sequence"])
def bundle_path(request, tmp_path_factory):
    return train_tiny_bundle(tmp_path_factory.mktemp(f"logstate-{request.param}"), log_model=request.param, idle_check_s=300.0)


@pytest.fixture(scope="module")
def log_lines():
    # blocks overlap (~13 s each, one starts every 12 s); the log spans longer than the idle check
    # (300 s, counts) and the session timeout (600 s, sequence), so both come after the move too
    lines, _ = make_log(23, 60, {"unknown": 4, "truncated": 4}, spacing=12)
    return [line.encode() for line in lines]


class _Member:
    """One consumer's detector (stage + core + changelog tracker), as the service wires them."""

    def __init__(self, path, resume_sessions: bool = True) -> None:
        bundle = load_bundle(path)
        self.spec = load_log_spec(bundle)
        self.stage = LogStage(self.spec)
        settings = DetectionSettings(idle_timeout_ms=None, threshold=ThresholdParams(warmup=20, history=200))
        core = DetectorCore(bundle, Scorer(bundle, provider="cpu", intra_op_threads=1), settings)
        self.core = LogDetectorCore(core, self.spec, self.stage if resume_sessions else None)
        self.window = bundle.window
        self.tracker = StateTracker(bundle.window, 200)
        self.rows: dict[str, list[tuple[int, bytes, float]]] = defaultdict(list)  # entity -> (kind, row, score)

    def feed(self, lines: list[bytes], first_offset: int) -> None:
        batch, dead = self.stage.feed(lines, topic=TOPIC, partition=PART, offset=np.arange(first_offset, first_offset + len(lines)))
        assert not dead
        self.tracker.note_batch(batch)
        res = self.core.process(batch)
        score = np.full(batch.n, -1.0)  # not scored
        score[res.index] = res.score
        for k, kind, row, s in zip(batch.keys, batch.kind.tolist(), batch.rows, score.tolist()):
            self.rows[k].append((kind, row.tobytes(), s))

    def changelog(self) -> StateAssembler:
        """The compacted changelog partition after a checkpoint, read back."""
        topic: dict[str, bytes | None] = {}
        for r in self.tracker.snapshot(self.core, [PART]):
            topic[r.key] = r.value
        asm = StateAssembler(self.window)
        for key, value in topic.items():
            asm.add(key, value)
        return asm

    def restore(self, asm: StateAssembler) -> int:
        n = 0
        for key, state, _, why in asm.states():
            assert why is None, why
            self.core.restore(PART, key, state)
            n += 1
        return n


def _run(path, lines, cut: int, replay_from: int, resume_sessions: bool = True):
    """Member A reads lines [0, cut) and checkpoints; member B restores A's changelog and reads
    from `replay_from` (< cut: at-least-once, the lines since the committed offset again) to the end."""
    a = _Member(path)
    for s in range(0, cut, CHUNK):
        a.feed(lines[s : min(cut, s + CHUNK)], s)
    asm = a.changelog()
    b = _Member(path, resume_sessions)
    assert b.restore(asm) > 0
    b.feed(lines[replay_from : cut + CHUNK], replay_from)
    for s in range(cut + CHUNK, len(lines), CHUNK):
        b.feed(lines[s : s + CHUNK], s)
    return a, b


def test_a_moved_partition_goes_on_with_the_rows_scores_and_alerts_it_would_have_had(bundle_path, log_lines):
    cut = 6 * CHUNK
    whole = _Member(bundle_path)
    after: dict[str, list] = defaultdict(list)  # what the unmoved service made from the chunk at `cut` on
    for s in range(0, len(log_lines), CHUNK):
        before = {k: len(v) for k, v in whole.rows.items()}
        whole.feed(log_lines[s : s + CHUNK], s)
        if s >= cut:
            for k, v in whole.rows.items():
                after[k].extend(v[before.get(k, 0) :])
    after = {k: v for k, v in after.items() if v}
    a, b = _run(bundle_path, log_lines, cut, replay_from=cut - 30)
    assert b.stage.fenced > 0  # the 30 lines read again were skipped, not counted twice
    assert not b.stage._fences  # and once the stream went past them, the fences are gone
    moved_mid_life = [k for k in b.rows if k in a.rows]
    assert len(moved_mid_life) >= 3, moved_mid_life  # blocks with rows on both sides of the move
    assert dict(b.rows) == dict(after)
    assert any(kind == IDLE for v in b.rows.values() for kind, _, _ in v) or b.spec.features.idle_check_s is None

    # exactly-once: the committed offsets and the state agree, nothing is read again
    _, exact = _run(bundle_path, log_lines, cut, replay_from=cut)
    assert exact.stage.fenced == 0 and dict(exact.rows) == dict(after)
    # control: the same restore with a stage that starts every session again from nothing
    _, cold = _run(bundle_path, log_lines, cut, replay_from=cut, resume_sessions=False)
    assert dict(cold.rows) != dict(after)


def test_drop_partitions_forgets_the_sessions_of_a_revoked_partition(bundle_path, log_lines):
    m = _Member(bundle_path)
    m.feed(log_lines[:CHUNK], 0)
    assert m.stage._ctx and len(m.stage.featurizer)
    m.core.drop_partitions([PART + 1])
    assert m.stage._ctx  # another partition's revocation leaves them
    m.core.drop_partitions([PART])
    assert not m.stage._ctx and len(m.stage.featurizer) == 0 and not m.core.entities()


@pytest.mark.parametrize("bad, why", [
    ({"start_ms": 1}, "does not have the expected fields"),
    (dict.fromkeys(SavedSession.__dataclass_fields__, 0), "line is not a str"),
    ({**dict.fromkeys(SavedSession.__dataclass_fields__, 0), "line": "", "topic": "t", "idle_pending": 1, "open": True}, "idle_pending is not a bool"),
])
def test_a_saved_session_of_the_wrong_shape_is_refused_in_one_sentence(bad, why):
    with pytest.raises(ValueError, match=why):
        SavedSession.from_state(bad)


def test_part_of_a_log_batch_is_still_a_log_batch(bundle_path, log_lines):
    """A batch cut down after a rebalance (service._restrict) keeps what alerts need: the row kind,
    the template and the sample line."""
    m = _Member(bundle_path)
    batch, _ = m.stage.feed(log_lines[:20], topic=TOPIC, partition=PART)
    idx = np.array([1, 4, 7])
    part = batch.take(idx)
    assert type(part) is type(batch) and part.keys == [batch.keys[i] for i in idx]
    np.testing.assert_array_equal(part.rows, batch.rows[idx])
    assert part.kind.tolist() == batch.kind[idx].tolist() and part.token.tolist() == batch.token[idx].tolist()
    assert part.line == [batch.line[i] for i in idx] and part.line_index.tolist() == batch.line_index[idx].tolist()
