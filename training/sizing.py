"""Settings sized to the data: the window, the model and the optimiser for a short or narrow history.

`fit` calls `size_to_data(settings, table)` before training. A setting the user gave (a flag, a
config key, or a keyword to `FitSettings`, i.e. a name in `settings.model_fields_set`) is kept as
given; the others are chosen here, and for a long history they are exactly the `FitSettings`
defaults. The rules:

- A history in which nothing moves (every feature constant within every entity) is refused in one
  sentence: it holds no normal variation, the normaliser's floor would be the only scale, and the
  first change after it would score as a catastrophe and hold an alert open for good.
- Window (not given): the largest of 64, 32, 16, 8 the data supports. A window W is supported
  when the window plan (training.windows) gives at least `TRAIN_WINDOWS_PER_STEP` x W training
  windows (the training rows span about five windows or more, so windows are not all one stretch
  seen at shifted offsets) and at least `MIN_VAL_WINDOWS` validation windows (early stopping and
  the calibrated threshold rest on that many scores). A window given explicitly must meet the
  same two minimums; if it does not, the error names the largest window that does. If even a
  window of 8 does not, one sentence says the history is too short.
- Model width (d_model not given): the largest of 64, 32, 16, 8 whose square is at most the
  number of usable rows, so the encoder's ~16 x d_model^2 weights stay within ~16 per row; 64
  from 4,096 rows on. ff_dim (not given) follows as 2 x d_model, the default's ratio.
- Optimiser, for a short history only (fewer than `SHORT_HISTORY` = 2,048 training windows,
  8 default batches): batch_size = the largest power of two <= 1/8 of the windows drawn per
  epoch (at least 16), so a pass is 8 or more steps; patience = a fifth of the epochs, at least
  3. The epochs are the default's 8 passes, as for a long history. (Until 2026-12 a short history
  got enough epochs for 480 optimiser steps, the old default's 15 x 8,192 / 256: on the 300- and
  750-row datasets of the generality suite that gave 0.33 and 0.38 false openings per 1,000 rows
  against 0.24 and 0.20 with 8 passes, docs/quality.md "The training budget".)
  From 2,048 training windows on, the defaults stand.
- Detectors (not given): a single series (one feature) whose validation part holds at least
  `ZSCORE_MIN_VAL_WINDOWS` = 100 windows (500 rows at the default 20 %) adds the `zscore`
  detector to the Transformer (training/composite.py). Measured (docs/quality.md, generality
  suite, 3 seeds): on one-feature series the autoencoder's error is a weak and seed-dependent
  signal of level shifts and spikes, and the window's own z-score is a strong one (event F1,
  Transformer alone -> with the z-score: 3,000-row histories 0.76 -> 0.88 on seed 0, 750-row ones
  0.698 -> 0.855, 300-row ones 0.819 -> 0.850); on multivariate server metrics (SMD) the max z
  over 38 features fires on their legitimate jumps and the Transformer alone is better. The 100:
  under 500 validation scores each member's tail rests on the 10 % of them above the 90 %
  quantile (core/calibration.py); with fewer than 100 scores that is fewer than 10, and the
  z-score, whose tail is the thin part of its distribution, then paged on noise (a 300-row series
  has 60 validation windows). Set when that tail was an exponential through two quantiles, and
  measured again with the predictive tail that replaced it: one model per 300-row series, event
  F1 0.911 for the Transformer alone against 0.687 with the z-score (0.02 against 0.76 false
  openings per 1,000 rows; docs/quality.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_detector.offline.datafiles import DataFileError, DataTable
from training.settings import FitSettings
from training.windows import WindowingError, WindowPlan, plan_windows

log = logging.getLogger(__name__)

WINDOW_LADDER = (64, 32, 16, 8)  # tried in order when --window is not given
WIDTH_LADDER = (64, 32, 16, 8)  # d_model, when --d-model is not given
TRAIN_WINDOWS_PER_STEP = 4  # a window W needs at least 4 x W training windows
MIN_VAL_WINDOWS = 20  # and at least 20 validation windows
SHORT_HISTORY = 2048  # fewer training windows than this: batch and patience are sized to the data
UNIVARIATE_DETECTORS = ("transformer", "zscore")  # detectors of a one-feature history, when not given
ZSCORE_MIN_VAL_WINDOWS = 100  # validation windows the z-score's calibrated tail needs to join by default


@dataclass(frozen=True)
class Sizing:
    settings: FitSettings  # every value decided: the given ones and the chosen ones
    plan: WindowPlan
    chosen: dict[str, Any] = field(default_factory=dict)  # values chosen here that differ from the FitSettings defaults


def size_to_data(s: FitSettings, table: DataTable) -> Sizing:
    _refuse_constant(table)
    given = s.model_fields_set
    values: dict[str, Any] = {}
    plan = _choose_window(s, table, auto="window" not in given)
    values["window"] = plan.window
    if "d_model" not in given:
        width = _choose_width(table.n_rows, s.n_heads)
        if width is not None:
            values["d_model"] = width
            if "ff_dim" not in given:
                values["ff_dim"] = 2 * width
    n_train = int(plan.train_starts.size)
    if n_train < SHORT_HISTORY:
        per_epoch = min(n_train, s.max_windows_per_epoch) if s.max_windows_per_epoch else n_train
        if "batch_size" not in given:
            values["batch_size"] = max(16, 1 << max(0, (per_epoch // 8).bit_length() - 1))
        if "patience" not in given:
            values["patience"] = max(s.patience, math.ceil(s.epochs / 5))
    if "detectors" not in given and len(table.features) == 1 and plan.val_starts.size >= ZSCORE_MIN_VAL_WINDOWS:
        values["detectors"] = UNIVARIATE_DETECTORS
    sized = FitSettings.model_validate({**s.model_dump(), **values})
    defaults = {name: info.default for name, info in FitSettings.model_fields.items()}
    chosen = {k: v for k, v in values.items() if k not in given and v != defaults[k]}
    if chosen.keys() - {"window"}:
        log.info(
            "%s, %d usable rows and %d training windows: %s (sized to the data; see training/sizing.py)",
            "short history" if n_train < SHORT_HISTORY else "history",
            table.n_rows,
            n_train,
            ", ".join(f"{k} {','.join(v) if isinstance(v, tuple) else v}" for k, v in chosen.items() if k != "window"),
        )
    return Sizing(sized, plan, chosen)


def _refuse_constant(table: DataTable) -> None:
    """One sentence when no feature moves within any entity: there is no normal variation to learn,
    and every later change would score as far beyond it (the normaliser's floor is the only scale)."""
    if table.n_rows == 0 or any(np.ptp(entity.values, axis=0).any() for entity in table.by_entity()):
        return
    n = len(table.features)
    what = f"{table.features[0]} is" if n == 1 else f"every one of its {n} features is"
    raise DataFileError(
        f"{table.source}: {what} constant over all {table.n_rows} usable rows, so there is no normal variation "
        "to learn; train on a history in which it moves."
    )


def supports(plan: WindowPlan) -> bool:
    return plan.train_starts.size >= TRAIN_WINDOWS_PER_STEP * plan.window and plan.val_starts.size >= MIN_VAL_WINDOWS


def _try_plan(s: FitSettings, table: DataTable, window: int) -> WindowPlan | None:
    try:
        return plan_windows(table, window, s.val_fraction, s.gap_factor, s.stride)
    except WindowingError:
        return None


def _counts(plan: WindowPlan | None) -> tuple[int, int]:
    return (0, 0) if plan is None else (int(plan.train_starts.size), int(plan.val_starts.size))


def _smallest_window(s: FitSettings) -> int:
    return s.mask_steps + 1 if s.variant == "masked" else 2


def _choose_window(s: FitSettings, table: DataTable, auto: bool) -> WindowPlan:
    if not auto:
        plan = _try_plan(s, table, s.window)
        if plan is not None and supports(plan):
            return plan
        best = _largest_supported(s, table, s.window - 1)
        if best is None:
            raise _too_short(s, table, max(_smallest_window(s), min(s.window, WINDOW_LADDER[-1])))
        n_train, n_val = _counts(plan)
        raise WindowingError(
            f"{table.source} cannot support a window of {s.window} rows: it gives {n_train} training and {n_val} "
            f"validation windows of {s.window}, where fit needs at least {TRAIN_WINDOWS_PER_STEP * s.window} and "
            f"{MIN_VAL_WINDOWS}; the largest window it supports is {best} rows (--window {best}, or leave --window out "
            f"to let fit choose)."
        )
    smallest = _smallest_window(s)
    ladder = [w for w in WINDOW_LADDER if w >= smallest]
    refused: list[str] = []
    for w in ladder:
        plan = _try_plan(s, table, w)
        if plan is not None and supports(plan):
            _log_window(plan, f"the largest of {'/'.join(map(str, ladder))} this data supports", refused)
            return plan
        refused.append(_shortfall(w, *_counts(plan)))
    if smallest > WINDOW_LADDER[-1]:  # mask_steps rules out the short rungs: any window above it will do
        best = _largest_supported(s, table, ladder[-1] - 1)
        if best is not None:
            plan = _try_plan(s, table, best)
            assert plan is not None
            _log_window(plan, f"the largest above mask_steps ({s.mask_steps}) this data supports", refused)
            return plan
    raise _too_short(s, table, max(smallest, WINDOW_LADDER[-1]))


def _log_window(plan: WindowPlan, what: str, refused: list[str]) -> None:
    why = f" ({'; '.join(refused)})" if refused else ""
    log.info(
        "window %d rows, chosen: %s, with %d training and %d validation windows (at least %d x W and %d needed)%s",
        plan.window,
        what,
        plan.train_starts.size,
        plan.val_starts.size,
        TRAIN_WINDOWS_PER_STEP,
        MIN_VAL_WINDOWS,
        why,
    )


def _shortfall(window: int, n_train: int, n_val: int) -> str:
    if n_train < TRAIN_WINDOWS_PER_STEP * window:
        return f"{window} gives {n_train} training windows, fewer than {TRAIN_WINDOWS_PER_STEP * window}"
    return f"{window} gives {n_val} validation windows, fewer than {MIN_VAL_WINDOWS}"


def _largest_supported(s: FitSettings, table: DataTable, hi: int) -> int | None:
    """The largest window in [max(8, smallest), hi] the data supports; support only shrinks as the window grows."""
    lo = max(_smallest_window(s), WINDOW_LADDER[-1])
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        plan = _try_plan(s, table, mid)
        if plan is not None and supports(plan):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _too_short(s: FitSettings, table: DataTable, window: int) -> WindowingError:
    n_train, n_val = _counts(_try_plan(s, table, window))
    need_rows = max(
        math.ceil(MIN_VAL_WINDOWS / s.val_fraction),
        math.ceil(((TRAIN_WINDOWS_PER_STEP + 1) * window - 1) / (1.0 - s.val_fraction)),
    )
    if table.n_rows < window:
        return WindowingError(
            f"{table.source} has {table.n_rows} usable rows, fewer than one window of {window}, too few to train on "
            f"(fit needs about {need_rows} rows without time gaps)."
        )
    return WindowingError(
        f"{table.source} has {table.n_rows} usable rows, too few to train on: even a window of {window} gives "
        f"{n_train} training and {n_val} validation windows, where fit needs at least "
        f"{TRAIN_WINDOWS_PER_STEP * window} and {MIN_VAL_WINDOWS} (about {need_rows} rows without time gaps)."
    )


def _choose_width(n_rows: int, n_heads: int) -> int | None:
    fits = [d for d in WIDTH_LADDER if d % n_heads == 0]
    for d in fits:
        if d * d <= n_rows:
            return d
    return fits[-1] if fits else None
