"""Raw log lines → the `EventBatch` the scoring core consumes (the log stage of issue 8).

Shared by training (`training/logs.py` builds its training rows with it), `replay --format log` and
`run`, so the three cannot drift apart. Per line: parse (logs/parse.py) → template id in match-only mode
(templates; a line no learned template matches is token 0, "unknown template") → one event per
entity named by the line → per-entity sessions (logs/features.py: inactivity timeout, end template,
cap + eviction) → the event's input row, which carries the entity's last K tokens and gaps
(layout in logs/spec.py).

Besides one row per (line, entity), the stage adds two kinds of rows:
- a session-start row before the first event of every session (never alerts: its score is 0), so
  that the first real event already has a full window of W = 2 rows and is scored;
- a session-end row when a session ends by inactivity timeout (or an end template): the model
  scores how likely the session was to end there, which is how a block that stops early (missing
  events) is caught. Sessions still open when the input ends (`flush`) are incomplete: no end row.

With a bucketed count-vector bundle (layout `template-bucket-counts/1`) a row carries the counts of
the entity's lines in the current time bucket (`features.bucket_s`, aligned to the epoch) instead:
each line is judged against what its entity did in the same bucket so far.

With a count-vector bundle (layout `template-counts/1`) a row carries the session's cumulative
template counts instead, and there are no end rows: the session is the entity's whole life (a
long `session_timeout_s` only evicts state), so a pause (HDFS: hours between a block's write and
its deletion) never starts a "new" session that looks abnormal. Instead, an entity inactive for
`idle_check_s` gets one idle-check row: its counts at rest are judged once per pause (a block
whose write stopped half way is caught there), and an entity still inside that pause when the
input ends is never judged for what has not happened yet.

Time is event time: the line's timestamp, else the transport's (Kafka) timestamp. Timeouts are
noticed at the entity's next event, or by the stage's clock (the highest event time seen) at the
end of every batch. Lines that cannot be parsed are returned as (index, reason) for the dead-letter
path; they never reach the model.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_type_hints

import numpy as np

from stream_detector.core.events import NO_TIME, EventBatch
from stream_detector.logs.features import LogFeaturizer, Session
from stream_detector.logs.parse import LineParser, LogLineError
from stream_detector.logs.spec import IDLE_TOKEN, LogModelSpec, gap_feature

log = logging.getLogger(__name__)

LINE, START, END, IDLE = 0, 1, 2, 3  # row kinds (also the `row:kind` feature of a count row)
ROW_KINDS = ("line", "session-start", "session-end", "idle-check")


@dataclass(frozen=True)
class LogEventBatch(EventBatch):
    """An EventBatch plus, per row, what it stands for (for alerts and per-entity decisions)."""

    kind: np.ndarray  # int8 [n]: LINE, START, END or IDLE
    token: np.ndarray  # int32 [n]: the row's newest token (template id, the start/end token, IDLE_TOKEN)
    line: list[str]  # [n]: the raw line (END: the session's last line)
    line_index: np.ndarray  # int64 [n]: index of the input line in the fed sequence (-1 for END/IDLE rows)

    def take(self, idx: np.ndarray) -> LogEventBatch:
        b = EventBatch.take(self, idx)
        return LogEventBatch(
            b.keys,
            b.rows,
            b.event_time_ms,
            b.topic,
            b.partition,
            b.offset,
            kind=self.kind[idx],
            token=self.token[idx],
            line=[self.line[i] for i in idx.tolist()],
            line_index=self.line_index[idx],
        )


@dataclass(frozen=True)
class SessionRecord:
    entity: str
    start_ms: int
    end_ms: int
    events: int
    reason: str  # logs.features.SessionEnd
    complete: bool  # ended by timeout or end template (sequence layout: an end row was scored)


class _Context:
    __slots__ = ("tokens", "gaps", "counts", "bucket", "source", "line", "time_ms")

    def __init__(self, vocab_size: int = 0) -> None:
        self.tokens: list[int] = []
        self.gaps: list[float] = []
        self.counts = np.zeros(vocab_size, dtype=np.float32) if vocab_size else None  # count models only
        self.bucket = -1  # bucketed count layout: the time bucket `counts` belong to
        self.source: tuple[str, int, int] = ("", 0, 0)
        self.line = ""
        self.time_ms = 0


class LogStage:
    """Streaming: feed batches of raw lines in arrival order. Not thread-safe."""

    def __init__(self, spec: LogModelSpec, record_sessions: bool = False) -> None:
        self.spec = spec
        self.parser = LineParser(spec.parser)
        self.templates = spec.templates
        # the featurizer keeps sessions only: the stage counts per time bucket itself (bucketed layout)
        sessions_only = spec.features.model_copy(update={"bucket_s": None})
        self.featurizer = LogFeaturizer(spec.vocab_size, sessions_only, spec.end_template_ids)
        bucket = spec.features.bucket_s if spec.bucketed else None
        self._bucket_ms = None if bucket is None else int(round(bucket * 1000))
        self._ctx: dict[str, _Context] = {}
        self._timeout_ms = int(round(spec.features.session_timeout_s * 1000))
        self._end_gap = gap_feature(spec.features.session_timeout_s)
        self.clock_ms = NO_TIME  # highest event time seen
        self._counts = spec.counts
        idle = spec.features.idle_check_s
        self._idle_ms = None if idle is None else int(round(idle * 1000))
        # entity -> time of its last event, least recently active first; an entity leaves it when
        # its idle check is made (or its session closes) and comes back with its next event
        self._pending_idle: OrderedDict[str, int] = OrderedDict()
        self.record_sessions = record_sessions
        self.sessions: list[SessionRecord] = []
        self.lines_parsed = 0
        self.unknown_lines = 0
        # Sessions resumed from a changelog (`resume`): entity -> (topic, partition, offset) of the
        # last line in the restored state, so a line read again after a crash is not counted twice;
        # the featurizer takes the resumed sessions in one go before the next feed.
        self._fences: dict[str, tuple[str, int, int]] = {}
        self._resumed: list[tuple[str, int, int, int]] = []
        self.fenced = 0  # (line, entity) events skipped by those fences

    # ------------------------------------------------------------------ public
    def feed(
        self,
        lines: Sequence[str | bytes],
        keys: Sequence[str | bytes | None] | None = None,
        transport_time_ms: Sequence[int] | np.ndarray | None = None,
        topic: str | Sequence[str] = "",
        partition: int | Sequence[int] | np.ndarray = 0,
        offset: Sequence[int] | np.ndarray | None = None,
        expire: bool = True,
    ) -> tuple[LogEventBatch, list[tuple[int, str]]]:
        """Rows for a batch of raw lines (+ end rows of sessions that timed out by the stage's clock
        after the batch, when `expire`), and the lines that could not be used as (index, reason)."""
        self._settle()
        n = len(lines)
        topics = [topic] * n if isinstance(topic, str) else list(topic)
        parts = (
            np.full(n, int(partition), dtype=np.int64)  # type: ignore[arg-type]  # np.isscalar does not narrow
            if np.isscalar(partition)
            else np.asarray(partition, dtype=np.int64)
        )
        offs = np.arange(n, dtype=np.int64) if offset is None else np.asarray(offset, dtype=np.int64)
        out = _RowBuilder(self.spec)
        dead: list[tuple[int, str]] = []
        parse, match = self.parser.parse, self.templates.match
        for i in range(n):
            key = keys[i] if keys is not None else None
            try:
                p = parse(lines[i], key=key)
            except LogLineError as e:
                dead.append((i, str(e)))
                continue
            t = p.timestamp_ms
            if t is None:
                t = None if transport_time_ms is None else int(transport_time_ms[i])
                if t is None or t == NO_TIME or t < 0:
                    dead.append((i, "log line carries no timestamp and its message has none either."))
                    continue
            tid = match(p.message)
            self.lines_parsed += 1
            if tid == 0:
                self.unknown_lines += 1
            raw = lines[i]
            text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
            text = text.rstrip("\r\n")
            src = (topics[i], int(parts[i]), int(offs[i]))
            for entity in p.entities:
                self._event(out, entity, t, tid, src, text, i)
            if t > self.clock_ms:
                self.clock_ms = t
        if expire and self.clock_ms != NO_TIME:
            self._idle_checks(out, self.clock_ms)
            self._closed(out, self.featurizer.expire(self.clock_ms).sessions)
        if self._fences and n:
            self._passed_fences(topics, parts, offs)
        return out.build(), dead

    def flush(self) -> None:
        """End of input: close every open session as incomplete (no end row, nothing scored)."""
        self._settle()
        self._closed(_RowBuilder(self.spec), self.featurizer.close_all().sessions)

    def resume(self, entity: str, partition: int, saved: SavedSession, last_row: np.ndarray | None) -> None:
        """Carry on an entity's session from the state a checkpoint saved (`LogDetectorCore.state_of`),
        after its partition moved here: the context its next row builds on comes from the last row
        of its restored window (the count vector, or the last K tokens and gaps), the rest from
        `saved`. No open session: its next line starts one, as it would have. An entity that
        already has a session here (its lines also come through another partition) keeps it.
        Either way, lines of this partition up to the saved one are not used again: at-least-once
        reads them again after a crash, and the restored state holds them already."""
        self._fences[entity] = (saved.topic, int(partition), saved.offset)
        if not saved.open or entity in self._ctx:
            return
        ctx = _Context(self.spec.vocab_size if self._counts else 0)
        if last_row is not None:
            if ctx.counts is not None:  # a count model
                ctx.counts[:] = last_row[:-1]
            else:
                k = self.spec.context
                tokens = last_row[:k]
                m = k - int(np.argmax(tokens != self.spec.pad_id)) if (tokens != self.spec.pad_id).any() else 0
                ctx.tokens = [int(x) for x in tokens[k - m :]]
                ctx.gaps = [float(x) for x in last_row[2 * k - m :]] if m else []
        ctx.source = (saved.topic, int(partition), saved.offset)
        ctx.line, ctx.time_ms = saved.line, saved.line_ms
        if self._bucket_ms is not None:  # the restored counts are those of its last line's bucket
            ctx.bucket = saved.line_ms // self._bucket_ms
        self._ctx[entity] = ctx
        self._resumed.append((entity, saved.start_ms, saved.line_ms, saved.events))
        if self._idle_ms is not None and saved.idle_pending:
            self._pending_idle[entity] = saved.line_ms

    def drop_partitions(self, partitions: Sequence[int] | set[int]) -> int:
        """Forget the sessions of entities whose last line came through these partitions (revoked:
        their new owner resumes them from the changelog); returns how many."""
        self._settle()
        drop = set(int(p) for p in partitions)
        gone = [e for e, c in self._ctx.items() if c.source[1] in drop]
        for e in gone:
            del self._ctx[e]
            self._pending_idle.pop(e, None)
            self._fences.pop(e, None)
        self.featurizer.forget(gone)
        return len(gone)

    # ------------------------------------------------------------------ internals
    def _settle(self) -> None:
        """Hand the sessions resumed since the last call to the featurizer, and keep the idle-check
        queue in time order (it is walked from the front)."""
        if self._resumed:
            self.featurizer.resume(self._resumed)
            self._resumed = []
            self._pending_idle = OrderedDict(sorted(self._pending_idle.items(), key=lambda kv: kv[1]))

    def _passed_fences(self, topics: list[str], parts: np.ndarray, offs: np.ndarray) -> None:
        """Forget the fences that this batch's lines went past: offsets only grow within a
        partition, so no line they hold can come again (a rewind restores, and fences, anew)."""
        newest: dict[tuple[str, int], int] = {}
        for t, p, o in zip(topics, parts.tolist(), offs.tolist()):
            if o > newest.get((t, p), -1):
                newest[(t, p)] = o
        self._fences = {e: f for e, f in self._fences.items() if f[2] >= newest.get((f[0], f[1]), -1)}

    def _idle_checks(self, out: _RowBuilder, now_ms: int) -> None:
        """One idle-check row for each entity inactive for longer than idle_check_s by `now_ms`."""
        pending, idle = self._pending_idle, self._idle_ms
        if idle is None:  # no idle checks: nothing is ever pending
            return
        while pending:
            entity, last = next(iter(pending.items()))
            if now_ms - last <= idle:
                break
            del pending[entity]
            self._idle_row(out, entity, last)

    def _idle_row(self, out: _RowBuilder, entity: str, last_ms: int) -> None:
        assert self._idle_ms is not None  # idle rows are made only with idle checks on
        ctx = self._ctx.get(entity)
        if ctx is not None:
            out.add(entity, ctx, IDLE, IDLE_TOKEN, last_ms + self._idle_ms, ctx.source, ctx.line, -1)

    def _event(
        self, out: _RowBuilder, entity: str, t: int, tid: int, src: tuple[str, int, int], text: str, i: int
    ) -> None:
        fence = self._fences.get(entity)
        if fence is not None and fence[0] == src[0] and fence[1] == src[1]:
            if src[2] <= fence[2]:  # read again after a crash: the resumed session already holds it
                self.fenced += 1
                return
            del self._fences[entity]
        if self._idle_ms is not None:
            last = self._pending_idle.get(entity)
            if last is not None and t - last > self._idle_ms:  # its pause ended before the clock noticed it
                del self._pending_idle[entity]
                self._idle_row(out, entity, last)
        fb = self.featurizer.add_batch((entity,), (t,), (tid,))
        before = [s for s in fb.sessions if not (s.entity == entity and s.reason in ("end-template", "max-length"))]
        after = [s for s in fb.sessions if s.entity == entity and s.reason in ("end-template", "max-length")]
        if before:
            self._closed(out, before)
        ctx = self._ctx.get(entity)
        if fb.position[0] == 0 or ctx is None:  # a new session: the start row first
            ctx = self._ctx[entity] = _Context(self.spec.vocab_size if self._counts else 0)
            if not self._counts:
                ctx.tokens.append(self.spec.bos_id)
                ctx.gaps.append(0.0)
            out.add(entity, ctx, START, self.spec.bos_id, t, src, text, i)
        if ctx.counts is not None:  # a count model (self._counts)
            if self._bucket_ms is not None:
                b = t // self._bucket_ms
                if b > ctx.bucket:  # a new time bucket: count afresh (a late line counts in the current one)
                    if ctx.bucket >= 0:
                        ctx.counts[:] = 0.0
                    ctx.bucket = b
            ctx.counts[tid] += 1.0
        else:
            ctx.tokens.append(tid)
            ctx.gaps.append(gap_feature(float(fb.gap_s[0])))
        ctx.source, ctx.line, ctx.time_ms = src, text, t
        out.add(entity, ctx, LINE, tid, t, src, text, i)
        if self._idle_ms is not None:
            self._pending_idle[entity] = t
            self._pending_idle.move_to_end(entity)
        if after:
            self._closed(out, after, end_gap=0.0)

    def _closed(self, out: _RowBuilder, sessions: list[Session], end_gap: float | None = None) -> None:
        for s in sessions:
            ctx = self._ctx.pop(s.entity, None)
            self._pending_idle.pop(s.entity, None)
            self._fences.pop(s.entity, None)
            complete = s.reason in ("timeout", "end-template")
            if complete and ctx is not None and not self._counts:
                ctx.tokens.append(self.spec.end_id)
                ctx.gaps.append(self._end_gap if end_gap is None else end_gap)
                t_end = ctx.time_ms + (self._timeout_ms if s.reason == "timeout" else 0)
                out.add(s.entity, ctx, END, self.spec.end_id, t_end, ctx.source, ctx.line, -1)
            if self.record_sessions:
                self.sessions.append(SessionRecord(s.entity, s.start_ms, s.end_ms, s.events, s.reason, complete))


class _RowBuilder:
    """Accumulates rows; each row is the context's last K tokens and gaps, left-padded."""

    def __init__(self, spec: LogModelSpec) -> None:
        self.k = spec.context
        self.counts = spec.counts
        self.width = spec.n_features
        self.pad = float(spec.pad_id)
        self.rows: list[np.ndarray] = []
        self.keys: list[str] = []
        self.kind: list[int] = []
        self.token: list[int] = []
        self.time: list[int] = []
        self.topic: list[str] = []
        self.partition: list[int] = []
        self.offset: list[int] = []
        self.line: list[str] = []
        self.line_index: list[int] = []

    def add(
        self, entity: str, ctx: _Context, kind: int, token: int, t: int, src: tuple[str, int, int], line: str, i: int
    ) -> None:
        if self.counts:
            row = np.empty(self.width, dtype=np.float32)
            row[:-1] = ctx.counts
            row[-1] = kind
            self._append(row, entity, kind, token, t, src, line, i)
            return
        k = self.k
        if len(ctx.tokens) > k:  # keep only what the model sees
            del ctx.tokens[:-k]
            del ctx.gaps[:-k]
        m = len(ctx.tokens)
        row = np.zeros(2 * k, dtype=np.float32)
        row[: k - m] = self.pad
        row[k - m : k] = ctx.tokens
        row[2 * k - m :] = ctx.gaps
        self._append(row, entity, kind, token, t, src, line, i)

    def _append(
        self, row: np.ndarray, entity: str, kind: int, token: int, t: int, src: tuple[str, int, int], line: str, i: int
    ) -> None:
        self.rows.append(row)
        self.keys.append(entity)
        self.kind.append(kind)
        self.token.append(token)
        self.time.append(t)
        self.topic.append(src[0])
        self.partition.append(src[1])
        self.offset.append(src[2])
        self.line.append(line)
        self.line_index.append(i)

    def build(self) -> LogEventBatch:
        n = len(self.keys)
        rows = np.stack(self.rows) if n else np.zeros((0, self.width), dtype=np.float32)
        return LogEventBatch(
            keys=self.keys,
            rows=rows,
            event_time_ms=np.asarray(self.time, dtype=np.int64),
            topic=self.topic,
            partition=np.asarray(self.partition, dtype=np.int32),
            offset=np.asarray(self.offset, dtype=np.int64),
            kind=np.asarray(self.kind, dtype=np.int8),
            token=np.asarray(self.token, dtype=np.int32),
            line=self.line,
            line_index=np.asarray(self.line_index, dtype=np.int64),
        )


@dataclass(slots=True)
class SavedSession:
    """What the log stage needs to carry on an entity's session elsewhere, besides its window
    (`LogStage.resume`). Kept per (partition, entity) by `LogDetectorCore` as of the rows the core
    has applied, which is what a checkpoint saves (the stage itself runs ahead of the core by the
    batches decoded and not yet scored); saved in the entity's changelog state under "log"."""

    start_ms: int  # the session's first event
    events: int = 0  # lines of the session so far
    line: str = ""  # its last line (the sample line of idle-check and session-end alerts)
    line_ms: int = 0  # and that line's time
    topic: str = ""  # and where it came from: lines up to it that are read again are not counted twice
    offset: int = -1
    idle_pending: bool = False  # no idle-check row since its last line
    open: bool = True  # False after a session-end row: its next line starts a new session

    @classmethod
    def from_state(cls, saved: Any) -> SavedSession:
        """ValueError (one sentence) for a saved session that is incomplete or of the wrong types."""
        types = get_type_hints(cls)  # field -> int, str or bool
        if not isinstance(saved, dict) or set(saved) != set(types):
            raise ValueError("the saved log session does not have the expected fields.")
        for name, want in types.items():
            v = saved[name]
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise ValueError(f"the saved log session's {name} is not a {want.__name__}.")
        return cls(**saved)
