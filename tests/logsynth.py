"""Small seeded HDFS-style logs for the log-path tests (no shared data needed).

A normal block: allocateBlock, 3 x Receiving, 3 x PacketResponder terminating, 3 x Received,
3 x addStoredBlock, each replica a few seconds apart. Anomalous blocks either contain a line of a
kind never seen in normal blocks ("unknown": writeBlock ... received exception) or stop after
the receiving lines ("truncated"). Lines are returned in time order with the block labels.
"""

from __future__ import annotations

import numpy as np

T0 = 1_226_262_000  # 2008-11-09 20:20:00 UTC, as in HDFS_v1


def _stamp(t: int) -> str:
    import time

    g = time.gmtime(t)
    return time.strftime("%y%m%d %H%M%S", g)


def _ip(rng: np.random.Generator) -> str:
    return f"10.251.{rng.integers(1, 255)}.{rng.integers(1, 255)}"


def block_lines(rng: np.random.Generator, blk: str, start: int, kind: str = "normal") -> list[tuple[int, str]]:
    ips = [_ip(rng) for _ in range(3)]
    t = start
    out: list[tuple[int, str]] = []

    def add(level: str, comp: str, msg: str) -> None:
        nonlocal t
        out.append((t, f"{_stamp(t)} {rng.integers(10, 999)} {level} {comp}: {msg}"))
        t += int(rng.integers(0, 3))

    add("INFO", "dfs.FSNamesystem", f"BLOCK* NameSystem.allocateBlock: /user/root/rand/_temporary/part-{rng.integers(0, 99999):05d}. {blk}")
    for ip in ips:
        add("INFO", "dfs.DataNode$DataXceiver", f"Receiving block {blk} src: /{ip}:{rng.integers(30000, 60000)} dest: /{ip}:50010")
    if kind == "unknown":
        add("WARN", "dfs.DataNode$DataXceiver", f"writeBlock {blk} received exception java.io.IOException: Could not read from stream")
    if kind == "truncated":
        return out
    for i in range(3):
        add("INFO", "dfs.DataNode$PacketResponder", f"PacketResponder {i} for block {blk} terminating")
    size = int(rng.integers(1000, 67108864))
    for ip in ips:
        add("INFO", "dfs.DataNode$PacketResponder", f"Received block {blk} of size {size} from /{ip}")
    for ip in ips:
        add("INFO", "dfs.FSNamesystem", f"BLOCK* NameSystem.addStoredBlock: blockMap updated: {ip}:50010 is added to {blk} size {size}")
    return out


def make_log(seed: int, n_normal: int, anomalies: dict[str, int] | None = None, start: int = T0, spacing: int = 7) -> tuple[list[str], dict[str, str]]:
    """(lines in time order, block -> 'normal' | 'unknown' | 'truncated')."""
    rng = np.random.default_rng(seed)
    kinds = ["normal"] * n_normal
    for k, n in (anomalies or {}).items():
        kinds += [k] * n
    order = rng.permutation(len(kinds))
    events: list[tuple[int, int, str]] = []
    labels: dict[str, str] = {}
    for j, i in enumerate(order.tolist()):
        blk = f"blk_{'-' if rng.random() < 0.5 else ''}{rng.integers(10**17, 9 * 10**17)}"
        labels[blk] = kinds[i]
        for t, line in block_lines(rng, blk, start + j * spacing, kinds[i]):
            events.append((t, len(events), line))
    events.sort()
    return [line for _, _, line in events], labels


def train_tiny_bundle(out_dir, seed: int = 0, n_normal: int = 120, context: int = 8, epochs: int = 4, lr: float = 5e-3,
                      log_model: str = "sequence", idle_check_s: float = 300.0):
    """Fit a tiny log model (CPU, one thread) on a normal-only synthetic log; returns the bundle path.
    `log_model="sequence"`: the Transformer (session timeout 600 s); `"counts"`: the count-vector
    model (fit's defaults, idle checks after `idle_check_s`)."""
    import torch

    from training.logs import LogFitSettings, fit_log

    torch.set_num_threads(1)
    lines, _ = make_log(seed, n_normal)
    data = out_dir / "train.log"
    data.write_text("\n".join(lines) + "\n")
    if log_model == "counts":
        fit_log(LogFitSettings(data=data, out=out_dir / "bundle", log_model="counts", idle_check_s=idle_check_s, seed=seed, threads=1))
    else:
        fit_log(LogFitSettings(
            data=data, out=out_dir / "bundle", log_model="sequence", context=context, d_model=16, n_heads=2, n_layers=1, ff_dim=32,
            dropout=0.0, epochs=epochs, batch_size=32, lr=lr, patience=50, seed=seed, threads=1, session_timeout_s=600.0, threshold_margin=1.5,
        ))
    return out_dir / "bundle"
