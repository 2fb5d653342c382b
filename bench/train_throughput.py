"""Training throughput: windows/s (forward + backward + AdamW step) of the real training loop
(training.trainer.train), on the CPU and, when present, a CUDA GPU. Prints figures; never fails.

    .venv/bin/python bench/train_throughput.py                       # SMD machine-2-1, reference model
    .venv/bin/python bench/train_throughput.py --devices cuda --batch-sizes 256,1024,4096 --windows 200000

Data: --data (default ../shared/data/smd/train/machine-2-1.txt relative to the repo; if missing,
random data of the same shape). Model: the reference F=38, W=64, d_model=64, 2 layers, ff 128.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "smd" / "train" / "machine-2-1.txt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SMD-format file (default %(default)s)")
    p.add_argument("--devices", default="auto", help="comma list of cpu,cuda; 'auto' = cpu plus cuda when available")
    p.add_argument("--batch-sizes", default="64,256,1024", help="comma list (default %(default)s)")
    p.add_argument("--windows", type=int, default=4096, help="training windows timed per measurement (default %(default)s)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--ff-dim", type=int, default=128)
    p.add_argument("--variant", default="masked", choices=["plain", "masked"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = p.parse_args(argv)

    import torch

    from stream_detector.core.bundle import Normaliser
    from training.model import TransformerAutoencoder
    from training.trainer import train

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.data.is_file():
        from stream_detector.offline.datafiles import read_table

        values = read_table(args.data, "smd").values
        source = str(args.data)
    else:
        values = np.random.default_rng(0).random((24_000, 38))
        source = f"random [24000, 38] ({args.data} not found)"
    data = Normaliser.fit(values).apply(values)
    starts = np.arange(data.shape[0] - args.window + 1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else args.devices.split(",")
    print(f"data: {source}; model: {args.variant} W={args.window} F={data.shape[1]} d_model={args.d_model} "
          f"layers={args.n_layers} ff={args.ff_dim}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(f"{'device':<6} {'batch':>6} {'windows':>8} {'seconds':>8} {'windows/s':>10}")
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda   (not available)")
            continue
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            model = TransformerAutoencoder(data.shape[1], args.window, args.d_model, 4, args.n_layers, args.ff_dim, 0.1, args.variant)
            common = dict(epochs=1, patience=1, batch_size=bs, lr=1e-3, weight_decay=1e-4, grad_clip=1.0, seed=0,
                          device=torch.device(dev), progress=False)
            train(model, data, starts, starts[:1], max_windows_per_epoch=min(len(starts), 2 * bs), **common)  # warm-up
            n = args.windows
            reps = max(1, -(-n // len(starts)))  # tile starts when asking for more windows than the file has
            many = np.tile(starts, reps)[:n]
            t0 = time.perf_counter()
            res = train(model, data, many, starts[:1], max_windows_per_epoch=n, **common)
            wall = time.perf_counter() - t0
            print(f"{dev:<6} {bs:>6} {n:>8} {wall:>8.2f} {res.windows_per_s:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
