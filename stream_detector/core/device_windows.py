"""`DeviceWindows`: every entity's window kept on the inference device, so a batch ships one row
per event to it (not one window, W rows, per scored event) and gets back only scores.

DESIGN.md's performance model: with host-gathered windows, host->device copies of full windows
bound ONNX Runtime on a GPU (~0.4M windows/s with host copies vs 0.87M with device-resident
input). The host `WindowStore` stays the master copy (changelog state, model swap, eviction all
work on it unchanged); this module mirrors its rows on the device, with ONNX Runtime only (the
runtime never imports torch):

- `ring`: a device `OrtValue` [capacity, L, F], L = 2W: row number c of a slot (1-based count of
  its events) lives at position (c - 1) mod L. A batch may hold up to L - W events of one entity
  before the windows of the earlier ones are gathered (longer bursts are split into chunks).
- the *update* graph `ScatterND(ring, [slot, position], rows)` is run with IO binding whose
  output is the ring's own buffer; ONNX Runtime's ScatterND kernels (CPU and CUDA) skip their
  input->output copy when both are the same buffer, so an update costs the rows it writes. At
  start-up a probe checks that the update really landed in the ring; if a build does not allow
  writing in place, two rings are used in turn (ping-pong: correct, one device copy per batch).
- the *score* graph: Gather(ring, windows ending at [slot, position]) -> the bundle's model ->
  the bundle's scoring rule in the graph, so only scores [m] and per-feature errors [m, F] come
  back to the host.

The graphs are derived from the bundle's verified model.onnx at load time with the `onnx` package
(a runtime dependency for this reason: every existing bundle gets the device path, and the bundle
format stays as it is). On the CPU provider the service keeps the numpy rings (pipeline.py turns
this module on only when the scorer runs on CUDA, unless asked); the CPU provider runs the same
graphs in the tests.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME, Bundle

if TYPE_CHECKING:
    from stream_detector.core.scorer import Scorer
    from stream_detector.core.windows import Ingested, WindowStore

log = logging.getLogger(__name__)

RING, SLOT, END, INDICES, ROWS, RING_OUT = "sd_ring", "sd_slot", "sd_end", "sd_indices", "sd_rows", "sd_ring_out"
SCORE, FEATURE_ERRORS, PADS = "sd_score", "sd_feature_errors", "sd_pads"
ONNX_IR_VERSION_MAX = 10  # onnxruntime 1.31 refuses IR 14 (what onnx 1.23 writes by default)


class DeviceWindowsError(Exception):
    """The device path cannot be set up; one sentence for the operator."""


def _onnx() -> Any:
    try:
        import onnx

        return onnx
    except ImportError:  # pragma: no cover - onnx is a runtime dependency
        raise DeviceWindowsError("device-resident windows need the 'onnx' package (pip install onnx).") from None


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _reduce(helper: Any, op: str, inp: str, out: str, axis: int, opset: int, consts: list[Any]) -> Any:
    """A Reduce* node over one axis (keepdims=0): axes moved from attribute to input in opset 18
    (ReduceSum: 13)."""
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    if as_input:
        name = f"sd_axes_{out}"
        consts.append(helper.make_tensor(name, 7, [1], [axis]))  # 7 = INT64
        return helper.make_node(op, [inp, name], [out], keepdims=0)
    return helper.make_node(op, [inp], [out], axes=[axis], keepdims=0)


def build_update_model(window_rows: int, n_features: int, opset: int = 17) -> bytes:
    """ScatterND(ring [C, L, F], indices [n, 2], rows [n, F]) -> ring_out."""
    onnx = _onnx()
    h, tp = onnx.helper, onnx.TensorProto
    graph = h.make_graph(
        [h.make_node("ScatterND", [RING, INDICES, ROWS], [RING_OUT])],
        "sd_ring_update",
        [
            h.make_tensor_value_info(RING, tp.FLOAT, ["capacity", window_rows, n_features]),
            h.make_tensor_value_info(INDICES, tp.INT64, ["n", 2]),
            h.make_tensor_value_info(ROWS, tp.FLOAT, ["n", n_features]),
        ],
        [h.make_tensor_value_info(RING_OUT, tp.FLOAT, ["capacity", window_rows, n_features])],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", max(16, opset))])
    model.ir_version = ONNX_IR_VERSION_MAX
    return model.SerializeToString()


def build_grow_model(window_rows: int, n_features: int, opset: int = 17) -> bytes:
    """Pad(ring [C, L, F], pads) -> [C + extra, L, F]: a larger ring, on the device, old slots kept."""
    onnx = _onnx()
    h, tp = onnx.helper, onnx.TensorProto
    graph = h.make_graph(
        [h.make_node("Pad", [RING, PADS], [RING_OUT], mode="constant")],
        "sd_ring_grow",
        [
            h.make_tensor_value_info(RING, tp.FLOAT, ["capacity", window_rows, n_features]),
            h.make_tensor_value_info(PADS, tp.INT64, [6]),
        ],
        [h.make_tensor_value_info(RING_OUT, tp.FLOAT, ["new_capacity", window_rows, n_features])],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", max(13, opset))])
    model.ir_version = ONNX_IR_VERSION_MAX
    return model.SerializeToString()


def build_score_model(bundle: Bundle, ring_rows: int) -> bytes:
    """Gather the windows ending at (slot, end position) from the ring, run the bundle's model on
    them and reduce by its scoring rule: inputs ring [C, L, F], slot [m], end [m] (int64);
    outputs score [m], feature errors [m, F]."""
    onnx = _onnx()
    h, tp = onnx.helper, onnx.TensorProto
    model = onnx.load(str(bundle.model_path))
    opset = _opset(model)
    g = model.graph
    w, f, L = bundle.window, bundle.n_features, ring_rows
    consts = [
        h.make_tensor("sd_offset", tp.INT64, [], [L - w + 1]),  # end - W + 1 + k, shifted by L to stay >= 0
        h.make_tensor("sd_steps", tp.INT64, [1, w], list(range(w))),
        h.make_tensor("sd_L", tp.INT64, [], [L]),
        h.make_tensor("sd_one", tp.INT64, [1], [1]),
        h.make_tensor("sd_flat_shape", tp.INT64, [2], [-1, f]),
        h.make_tensor("sd_positions", tp.INT64, [len(bundle.scoring.positions)], list(bundle.scoring.positions)),
    ]
    gather = [
        h.make_node("Add", [END, "sd_offset"], ["sd_base"]),
        h.make_node("Unsqueeze", ["sd_base", "sd_one"], ["sd_base2"]),
        h.make_node("Add", ["sd_base2", "sd_steps"], ["sd_pos"]),
        h.make_node("Mod", ["sd_pos", "sd_L"], ["sd_posm"]),
        h.make_node("Mul", [SLOT, "sd_L"], ["sd_slot_base"]),
        h.make_node("Unsqueeze", ["sd_slot_base", "sd_one"], ["sd_slot_base2"]),
        h.make_node("Add", ["sd_slot_base2", "sd_posm"], ["sd_flat_idx"]),
        h.make_node("Reshape", [RING, "sd_flat_shape"], ["sd_ring_flat"]),
        h.make_node("Gather", ["sd_ring_flat", "sd_flat_idx"], [INPUT_NAME], axis=0),
    ]
    rule = bundle.scoring
    score_nodes = [h.make_node("Gather", [OUTPUT_NAME, "sd_positions"], ["sd_rp"], axis=1)]
    if rule.reduction == "model_error":
        score_nodes.append(_reduce(h, "ReduceMean", "sd_rp", FEATURE_ERRORS, 1, opset, consts))
        score_nodes.append(_reduce(h, "ReduceSum", FEATURE_ERRORS, SCORE, 1, opset, consts))
    else:
        score_nodes += [
            h.make_node("Gather", [INPUT_NAME, "sd_positions"], ["sd_xp"], axis=1),
            h.make_node("Sub", ["sd_xp", "sd_rp"], ["sd_diff"]),
            h.make_node("Mul", ["sd_diff", "sd_diff"], ["sd_sq"]),
            _reduce(h, "ReduceMean", "sd_sq", FEATURE_ERRORS, 1, opset, consts),
        ]
        op = "ReduceMax" if rule.reduction == "max_squared_error" else "ReduceMean"
        score_nodes.append(_reduce(h, op, FEATURE_ERRORS, SCORE, 1, opset, consts))

    nodes = gather + list(g.node) + score_nodes
    inputs = [
        h.make_tensor_value_info(RING, tp.FLOAT, ["capacity", L, f]),
        h.make_tensor_value_info(SLOT, tp.INT64, ["m"]),
        h.make_tensor_value_info(END, tp.INT64, ["m"]),
    ]
    outputs = [
        h.make_tensor_value_info(SCORE, tp.FLOAT, ["m"]),
        h.make_tensor_value_info(FEATURE_ERRORS, tp.FLOAT, ["m", f]),
    ]
    graph = h.make_graph(
        nodes,
        "sd_device_score",
        inputs,
        outputs,
        initializer=list(g.initializer) + consts,
        value_info=list(g.value_info),
    )
    merged = h.make_model(graph, opset_imports=list(model.opset_import), producer_name="stream-detector device_windows")
    merged.ir_version = min(model.ir_version, ONNX_IR_VERSION_MAX)
    return merged.SerializeToString()


class DeviceWindows:
    """Device mirror of a `WindowStore`'s rings plus the scorer that reads them (see module doc)."""

    def __init__(self, bundle: Bundle, scorer: Scorer, ring_rows: int | None = None) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.window, self.n_features = bundle.window, bundle.n_features
        self.ring_rows = int(ring_rows or 2 * bundle.window)
        if self.ring_rows <= self.window:
            raise DeviceWindowsError(f"the device ring needs more than W={self.window} rows, got {self.ring_rows}.")
        self.max_batch = scorer.max_batch
        self.on_cuda = scorer.on_cuda
        self._device = ("cuda", scorer.device_id) if scorer.on_cuda else ("cpu", 0)
        providers = scorer.session.get_providers()
        opts = scorer.session_options()
        try:
            self._update = ort.InferenceSession(
                build_update_model(self.ring_rows, self.n_features), sess_options=opts, providers=providers
            )
            self._grow = ort.InferenceSession(
                build_grow_model(self.ring_rows, self.n_features), sess_options=opts, providers=providers
            )
            self._score = ort.InferenceSession(
                build_score_model(bundle, self.ring_rows), sess_options=opts, providers=providers
            )
        except DeviceWindowsError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types
            raise DeviceWindowsError(
                f"ONNX Runtime cannot build the device-window graphs: {str(e).splitlines()[0]}"
            ) from None
        self.capacity = 0
        self._rings: list[Any] = []
        self.uploaded_rows = 0  # rows sent to the device since start (the host->device traffic)
        self.in_place = self._probe_in_place()
        if not self.in_place:
            log.warning("ScatterND does not write the device ring in place here; using two rings in turn")
        log.info("device windows on %s: ring of %d rows per entity", self._device[0], self.ring_rows)

    # ------------------------------------------------------------------ device buffers
    def _new_ring(self, capacity: int, host: np.ndarray | None = None) -> Any:
        import onnxruntime as ort

        arr = host if host is not None else np.zeros((capacity, self.ring_rows, self.n_features), np.float32)
        return ort.OrtValue.ortvalue_from_numpy(arr, self._device[0], self._device[1])

    def _sync_all(self, store: WindowStore) -> None:
        """(Re)build the device ring from the host store, before a batch is ingested: at the
        first batch, after a model swap's renormalisation."""
        cap = store.capacity
        host = np.zeros((cap, self.ring_rows, self.n_features), np.float32)
        if len(store):
            slots = np.arange(cap, dtype=np.int64)
            counts = store.counts_of(slots)
            windows = store.windows_of(slots)  # [cap, W, F], oldest first, ending at count - 1
            pos = (counts[:, None] - self.window + np.arange(self.window)[None, :]) % self.ring_rows
            host[slots[:, None], pos] = windows
        self._rings = [self._new_ring(cap, host)]
        if not self.in_place:
            self._rings.append(self._new_ring(cap))  # ScatterND's output: input copied, then rows written
        self.capacity = cap
        self.uploaded_rows += cap * self.window

    def _grow_to(self, capacity: int) -> None:
        """A larger ring, built on the device from the current one (the host store grew inside
        `ingest`, when it already holds rows of this batch that windows of earlier events of the
        same entities must not see)."""
        import onnxruntime as ort

        extra = capacity - self.capacity
        io = self._grow.io_binding()
        io.bind_ortvalue_input(RING, self._rings[0])
        io.bind_cpu_input(PADS, np.array([0, 0, 0, extra, 0, 0], np.int64))
        out = ort.OrtValue.ortvalue_from_shape_and_type(
            [capacity, self.ring_rows, self.n_features], np.float32, *self._device
        )
        io.bind_ortvalue_output(RING_OUT, out)
        self._grow.run_with_iobinding(io)
        self._rings = [out]
        if not self.in_place:
            self._rings.append(self._new_ring(capacity))
        self.capacity = capacity

    def _probe_in_place(self) -> bool:
        """Does an update bound with output = input buffer really land in that buffer? One row
        written into a one-slot ring and read back."""
        self._rings = [self._new_ring(1)]
        probe = np.arange(self.n_features, dtype=np.float32)[None, :] + 1.0
        try:
            self._scatter(np.array([[0, 1]], np.int64), probe, in_place=True)
            ok = bool(np.array_equal(self._rings[0].numpy()[0, 1], probe[0]))
        except Exception as e:  # onnxruntime raises its own exception types
            log.info("in-place ring update refused (%s)", str(e).splitlines()[0])
            ok = False
        self._rings = []
        return ok

    def _scatter(self, indices: np.ndarray, rows: np.ndarray, in_place: bool | None = None) -> None:
        in_place = self.in_place if in_place is None else in_place
        io = self._update.io_binding()
        src = self._rings[0]
        io.bind_ortvalue_input(RING, src)
        io.bind_cpu_input(INDICES, np.ascontiguousarray(indices, dtype=np.int64))
        io.bind_cpu_input(ROWS, np.ascontiguousarray(rows, dtype=np.float32))
        dst = src if in_place else self._rings[1]
        io.bind_ortvalue_output(RING_OUT, dst)
        self._update.run_with_iobinding(io)
        if not in_place:
            self._rings.reverse()  # the updated ring is the current one

    # ------------------------------------------------------------------ per batch
    def update(self, slots: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> None:
        """Write rows [n, F] at (slot, ring position), each (slot, position) at most once."""
        if slots.size:
            self._scatter(np.stack([slots, positions], axis=1), rows)
            self.uploaded_rows += int(slots.size)

    def score(self, slots: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores [m], feature errors [m, F]) of the windows whose newest row is at (slot, end)."""
        m = slots.size
        scores = np.empty(m, dtype=np.float32)
        errors = np.empty((m, self.n_features), dtype=np.float32)
        for a in range(0, m, self.max_batch):
            b = min(m, a + self.max_batch)
            io = self._score.io_binding()
            io.bind_ortvalue_input(RING, self._rings[0])
            io.bind_cpu_input(SLOT, np.ascontiguousarray(slots[a:b], dtype=np.int64))
            io.bind_cpu_input(END, np.ascontiguousarray(ends[a:b], dtype=np.int64))
            io.bind_output(SCORE, "cpu")
            io.bind_output(FEATURE_ERRORS, "cpu")
            self._score.run_with_iobinding(io)
            s, fe = io.get_outputs()
            scores[a:b] = s.numpy()
            errors[a:b] = fe.numpy()
        return scores, errors

    def before_ingest(self, store: WindowStore) -> None:
        """Bring the device ring up to the host store's state before a batch is ingested: built
        from the host at the first batch and after a renormalisation (model swap); whole windows
        re-sent for entities whose state was imported (changelog restore)."""
        store.track_rewrites = True
        if not self._rings or store.rewritten_all:
            store.rewritten_all = False
            store.rewritten.clear()
            self._sync_all(store)
            return
        if store.capacity > self.capacity:
            self._grow_to(store.capacity)
        if store.rewritten:
            self._resend(store, np.fromiter(store.rewritten, dtype=np.int64))
            store.rewritten.clear()

    def process(self, store: WindowStore, ing: Ingested, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mirror one `WindowStore.ingest(..., gather=False)` on the device and score its due
        events: the counterpart of `scorer.score(ing.windows)`. `before_ingest` ran before it."""
        if store.capacity > self.capacity:
            self._grow_to(store.capacity)
        assert ing.counts is not None, "ingest must report counts for the device path"
        n = ing.slots.size
        if n == 0:
            return _empty(self.n_features)
        positions = (ing.counts - 1) % self.ring_rows
        chunk = _occurrence_rank(ing.slots) // (self.ring_rows - self.window)
        if not chunk.any():  # the usual case: one scatter, one score
            self.update(ing.slots, positions, rows)
            if not ing.due.size:
                return _empty(self.n_features)
            return self.score(ing.slots[ing.due], positions[ing.due])
        m = ing.due.size
        scores = np.empty(m, dtype=np.float32)
        errors = np.empty((m, self.n_features), dtype=np.float32)
        due_chunk = chunk[ing.due]
        for c in range(int(chunk.max()) + 1):
            sel = chunk == c
            self.update(ing.slots[sel], positions[sel], rows[sel])
            d = np.flatnonzero(due_chunk == c)
            if d.size:
                scores[d], errors[d] = self.score(ing.slots[ing.due[d]], positions[ing.due[d]])
        return scores, errors

    def _resend(self, store: WindowStore, slots: np.ndarray) -> None:
        """Send whole windows of slots whose host rows were replaced (restored state)."""
        counts = store.counts_of(slots)
        windows = store.windows_of(slots)
        pos = (counts[:, None] - self.window + np.arange(self.window)[None, :]) % self.ring_rows
        self.update(np.repeat(slots, self.window), pos.reshape(-1), windows.reshape(-1, self.n_features))


def _empty(f: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.float32), np.zeros((0, f), np.float32)


def _occurrence_rank(slots: np.ndarray) -> np.ndarray:
    """For each event, how many earlier events of the same slot the batch holds."""
    n = slots.size
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    start = np.empty(n, dtype=bool)
    start[0] = True
    np.not_equal(s[1:], s[:-1], out=start[1:])
    positions = np.arange(n, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = positions - np.maximum.accumulate(np.where(start, positions, 0))
    return rank
