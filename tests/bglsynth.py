"""Small seeded BlueGene/L-style RAS logs for the custom-format tests (no shared data needed).

One line per event, as in Loghub's BGL data without its leading label column:

    1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO instruction cache parity error corrected

epoch seconds, date, node, local time (UTC-7) with microseconds, node again, event type, component,
level, message. Every node logs normal kernel/app messages at random (Poisson, `mean_gap_s` apart
on average); an anomalous node has one incident: a short burst of FATAL lines of kinds normal nodes
never log (a data TLB error, a machine check, a lost control stream, an rts panic), amid its normal
lines. Labels are per line (1 = an incident line), as BGL's are.
"""

from __future__ import annotations

import time

import numpy as np

T0 = 1_117_838_570  # 2005-06-03 22:42:50 UTC, the example line
LOCAL_OFFSET_S = -7 * 3600  # the local time column of BGL lines (PDT)

# the regex a user writes for these lines: the first field is the time, the third the node
LINE_REGEX = (
    r"(?P<timestamp>\d+) \d{4}\.\d\d\.\d\d (?P<node>\S+) \S+ \S+ (?P<type>\S+) (?P<component>\S+) "
    r"(?P<level>[A-Z]+) (?P<message>.*)"
)

NORMAL = (  # (weight, component, level, message maker)
    (0.30, "KERNEL", "INFO", lambda r: "instruction cache parity error corrected"),
    (0.20, "KERNEL", "INFO", lambda r: f"{r.integers(1, 30)} double-hummer alignment exceptions"),
    (0.20, "KERNEL", "INFO", lambda r: f"CE sym {r.integers(0, 40)}, at 0x{r.integers(0, 2**32):08x}, mask 0x{r.integers(0, 256):02x}"),
    (0.15, "KERNEL", "WARNING", lambda r: f"total of {r.integers(1, 12)} ddr error(s) detected and corrected"),
    (0.15, "APP", "INFO", lambda r: f"ciod: generated {r.integers(1, 64)} core files for program /bgl/apps/job{r.integers(100, 999)}"),
)
FATAL = (
    ("KERNEL", "FATAL", lambda r: "data TLB error interrupt"),
    ("KERNEL", "FATAL", lambda r: f"machine check interrupt (bit=0x{r.integers(0, 64):02x}): L2 dcache unit data parity error"),
    ("APP", "FATAL", lambda r: f"ciod: failed to read message prefix on control stream (CioStream socket to 172.16.{r.integers(0, 255)}.{r.integers(0, 255)}:{r.integers(30000, 40000)}"),
    ("KERNEL", "FATAL", lambda r: "rts panic! - stopping execution"),
)


def node_name(i: int) -> str:
    return f"R{i // 32:02d}-M{(i // 16) % 2}-N{(i // 4) % 4:X}-C:J{2 + 2 * (i % 4):02d}-U{1 + 10 * (i % 2):02d}"


def bgl_line(t_us: int, node: str, component: str, level: str, message: str) -> str:
    sec = t_us // 1_000_000
    local = time.gmtime(sec + LOCAL_OFFSET_S)
    day = time.strftime("%Y.%m.%d", local)
    stamp = time.strftime("%Y-%m-%d-%H.%M.%S", local) + f".{t_us % 1_000_000:06d}"
    return f"{sec} {day} {node} {stamp} {node} RAS {component} {level} {message}"


def make_bgl(
    seed: int, nodes: int, hours: float, anomalous: int = 0, start: int = T0, mean_gap_s: float = 60.0
) -> tuple[list[str], list[int], set[str]]:
    """(lines in time order, per-line labels 0/1, anomalous nodes). Node i is the same node in every
    log made with the same `nodes`; the anomalous ones are the last `anomalous` nodes."""
    rng = np.random.default_rng(seed)
    weights = np.array([w for w, *_ in NORMAL])
    end_us = int((start + hours * 3600) * 1e6)
    events: list[tuple[int, str, int]] = []
    names = [node_name(i) for i in range(nodes)]
    bad = set(names[nodes - anomalous :]) if anomalous else set()
    for name in names:
        t = int(start * 1e6 + rng.exponential(mean_gap_s) * 1e6)
        while t < end_us:
            _, comp, level, make = NORMAL[int(rng.choice(len(NORMAL), p=weights / weights.sum()))]
            events.append((t, bgl_line(t, name, comp, level, make(rng)), 0))
            t += int(rng.exponential(mean_gap_s) * 1e6) + 1
        if name in bad:  # one incident: 1-3 FATAL lines within a few seconds, somewhere in the middle
            t = int((start + rng.uniform(0.3, 0.7) * hours * 3600) * 1e6)
            for _ in range(int(rng.integers(1, 4))):
                comp, level, make = FATAL[int(rng.integers(0, len(FATAL)))]
                events.append((t, bgl_line(t, name, comp, level, make(rng)), 1))
                t += int(rng.integers(1, 3_000_000))
    events.sort()
    return [e[1] for e in events], [e[2] for e in events], bad


def write_example(out_dir: str, nodes: int = 30, train_hours: float = 6.0, test_hours: float = 3.0, anomalous: int = 3) -> None:
    """train.log (normal), test.log (the hours after, with anomalous nodes) and labels.txt (one 0/1 per
    test line) in out_dir: the data of docs/logs.md's worked example."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, _, _ = make_bgl(0, nodes, train_hours)
    test, labels, bad = make_bgl(1, nodes, test_hours, anomalous=anomalous, start=T0 + int(train_hours * 3600))
    (out / "train.log").write_text("\n".join(train) + "\n")
    (out / "test.log").write_text("\n".join(test) + "\n")
    (out / "labels.txt").write_text("".join(f"{y}\n" for y in labels))
    print(f"wrote {out}/train.log ({len(train)} lines), test.log ({len(test)} lines, {sum(labels)} anomalous, nodes "
          f"{', '.join(sorted(bad))}) and labels.txt")


if __name__ == "__main__":
    import sys

    write_example(sys.argv[1] if len(sys.argv) > 1 else "bgl")
