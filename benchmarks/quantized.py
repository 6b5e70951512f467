"""Quantized weights: edgeweave at each file precision vs llama.cpp on the same GGUF files, one run.

Greedy decoding of the same prompt token ids everywhere (SmolLM2's chat prompt, 21 tokens), medians:

SmolLM2-135M-Instruct, three files (benchmarks/gguf_models.py): the shipped Q4_1 (4-bit exact
shards, the default), a Q8_0 copy (8-bit exact) and an F32 copy (float32 shards), each at its own
precision (quantize=None):
  - 1 node pinned to core 0 (1 torch/ORT thread), the coordinator on core 0 too (1 core in all),
  - 2 nodes pinned to cores 0 and 1,
  - the coordinator computing a share itself (LocalMember) on core 0 + 1 node on core 1,
  - Q4_1 only: 1 node with backend="torch" (torch's int4/int8 kernels instead of ONNX Runtime's
    MatMulNBits), and 1 node with 2 threads (pinned to cores 0-1, the coordinator on 0-1 too:
    llama.cpp -t 2's core budget; the coordinator's quantized LM head keeps its default of one
    ORT thread, see DistributedLlama),
  - llama.cpp (the peer, .venv-peer: `make bench-peer`) on the same file, 1 thread (taskset -c 0)
    and 2 threads (taskset -c 0-1).

Random Llama of TinyLlama-1.1B's shape (SmolLM2's vocabulary): float32 (quantize "none" of the F32
file), q8 (quantize "q8" of the F32 file: requantized) and Q4 (the Q4_0 file at its own
precision), on 1 node, all resident and windowed (DistributedLlama(window=2): the node holds 2
layers and streams the rest from its disk every token); Q4 also with the torch kernels (resident
and windowed) and with 2 threads; llama.cpp on the Q4_0 file (1 and 2 threads) and on the F32
file (1 thread).

The prompt's second token is a near-tie (SmolLM2's top 3 within 0.11 logits in float32), so the
greedy texts part ways early under any rounding: "= llama.cpp tokens" (leading tokens equal to
llama.cpp's on the same file) is reported, but accuracy is measured by quantized_accuracy.py.

Per setting: time to first token (prefill + first token), median per-token decode latency, shard
bytes per node (the manifest's layer files; the coordinator's hub file apart), the peak RSS
(VmHWM) of every node process and of the coordinator during generation (every setting runs in
a fresh coordinator process with fresh nodes; the coordinator's peak is reset with
/proc/self/clear_refs once the model is deployed, so it is the peak while generating), and
whether the tokens equal llama.cpp's on the same file. A setting whose shards had to be written
or shipped is run again, so the figures are the steady ones (no shard writing or receiving). Fixed per-process
overhead is measured apart: an interpreter with torch and onnxruntime imported (no model), an
idle node daemon, and llama.cpp's interpreter with llama_cpp imported.

Top-level JSON keys: ratio_to_llama_cpp (edgeweave 1-node Q4_1 per-token time over llama.cpp's
at 1 thread, same file, same run), ratio_to_llama_cpp_2_threads (1 node with 2 threads over
llama.cpp -t 2), rss_ratio_to_llama_cpp (peak RSS of the 1-node edgeweave node process on the 1B
Q4_0 file over llama.cpp's peak on the same file, 1 thread). Writes benchmarks/results/quantized.json.

    python benchmarks/quantized.py [--quick] [--tokens 32] [--tokens-1b 8] [--skip-1b] [--skip-peer] [--out F]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import gguf_models  # noqa: E402  (the benchmarks' own helper, next to this file)

from edgeweave.coordinator.client import NodeClient  # noqa: E402
from edgeweave.coordinator.local_cluster import LocalCluster  # noqa: E402
from edgeweave.coordinator.local_member import LocalMember  # noqa: E402
from edgeweave.coordinator.tp_driver import DistributedLlama  # noqa: E402
from edgeweave.splitting.checkpoints import open_checkpoint  # noqa: E402
from edgeweave.splitting.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "edgeweave"
NODE_DIR = CACHE / "bench-quant-nodes"  # node shard stores survive runs: shards are shipped once
RESULTS = Path(__file__).parent / "results" / "quantized.json"
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
PEER_SCRIPT = Path(__file__).parent / "peer_llama_cpp.py"
CHAT = [{"role": "user", "content": "Tell me about the history of Paris in a few sentences."}]
COORDINATOR_CORE = 0
MB = 1e6


# -- memory -------------------------------------------------------------------------------------


def status_bytes(pid: int | str, key: str) -> int:
    """A memory line of /proc/PID/status (VmHWM: peak RSS, VmRSS: now) in bytes; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_memory() -> None:
    """Hand freed heap back to the kernel, so RSS measures what is live."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def overhead() -> dict:
    """Fixed per-process memory with no model: a bare interpreter with torch + onnxruntime (what a node
    imports before any weights) and llama.cpp's interpreter with llama_cpp imported."""
    code = ("import torch, onnxruntime, edgeweave.runtime.tp_executor, edgeweave.node.server\n"
            "import json\n"
            "def b(k):\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith(k + ':'): return int(line.split()[1]) * 1024\n"
            "print(json.dumps({'peak_rss': b('VmHWM'), 'rss': b('VmRSS')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = {"python_torch_onnxruntime": json.loads(out.stdout.strip().splitlines()[-1])}
    if PEER_PYTHON.exists():
        out = subprocess.run([str(PEER_PYTHON), str(PEER_SCRIPT), "--baseline"], capture_output=True, text=True,
                             check=True)
        result["llama_cpp_python"] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- edgeweave ----------------------------------------------------------------------------------


def layout_text(layouts: list[dict]) -> str:
    """The projections' layouts in a few words (the full list goes to the JSON)."""
    projections = sorted({row["layout"] for row in layouts
                          if not row["tensor"].startswith(("model.embed", "lm_head"))})
    return ", ".join(projections)


def edgeweave_run(path: str, prompt: list[int], n_tokens: int, *, label: str, nodes: list[list[int]],
                  share: bool = False, quantize: str | None = None, backend: str = "ort", window: int | None = None,
                  coordinator_cores: list[int] | None = None) -> dict:
    """One setting, in a fresh coordinator process (the child): a fresh LocalCluster (one process per
    entry of `nodes`, pinned to those cores, one torch/ORT thread per core); with `share` the
    coordinator computes rank 0 itself."""
    started = time.time()
    cores = set(coordinator_cores or [COORDINATOR_CORE])
    threads = len(cores)
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    checkpoint = open_checkpoint(path)
    names = [f"qbench{i}" for i in range(len(nodes))]
    cluster = LocalCluster(len(nodes), base_dir=NODE_DIR, advertise=False, cpu_affinity=nodes, names=names,
                           start_timeout=180)
    with cluster:
        pids = [proc.pid for proc in cluster.procs]
        idle = [status_bytes(pid, "VmRSS") for pid in pids]
        clients = [NodeClient(a, cluster=cluster.identity, timeout=120) for a in cluster.addresses]
        members = [LocalMember(), *clients] if share else clients
        with DistributedLlama(checkpoint, members, [1.0] * len(members), reply_timeout=600, quantize=quantize,
                              backend=backend, window=window) as llm:
            manifest = llm.manifest
            written = (manifest.root / "manifest.json").stat().st_mtime >= started
            release_memory()
            peak_reset = reset_peak()
            list(llm.generate(prompt, 2))  # warm-up: first-call allocations, ORT's first runs
            begin = time.perf_counter()
            tokens = list(llm.generate(prompt, n_tokens))
            wall = time.perf_counter() - begin
            stats = llm.last_stats
            node_peak = [status_bytes(pid, "VmHWM") for pid in pids]
            node_rss = [status_bytes(pid, "VmRSS") for pid in pids]
            coordinator_peak, coordinator_rss = status_bytes("self", "VmHWM"), status_bytes("self", "VmRSS")
            describe = manifest.data["describe"]
            result = {
                "setting": label, "nodes": len(nodes), "node_cores": nodes, "coordinator_share": share,
                "coordinator_cores": sorted(cores), "cores": len(cores.union(*map(set, nodes))),
                "quantize": quantize, "backend": backend, "window": window,
                "precision": manifest.data.get("precision"), "layouts": manifest.data.get("layouts"),
                "layout": layout_text(manifest.data.get("layouts") or []),
                "load_details": llm.load_details, "fused": llm.fused,
                "ttft_s": stats.ttft_s, "per_token_s": stats.per_token_s, "token_s": stats.token_s,
                "generate_wall_s": wall, "tokens": tokens,
                "shard_bytes_per_rank": [row["bytes"] for row in describe],
                "coordinator_file_bytes": manifest.coordinator_file.stat().st_size,
                "node_idle_rss": idle, "node_peak_rss": node_peak, "node_rss_after": node_rss,
                "node_peak_above_idle": [p - i for p, i in zip(node_peak, idle, strict=True)],
                "coordinator_peak_rss": coordinator_peak if peak_reset else None,
                "coordinator_rss_after": coordinator_rss, "shard_bytes_sent": llm.bytes_sent,
                "shards_written": written,
            }
        for client in clients:
            client.close()
    return result


def edgeweave_setting(path: Path, prompt: list[int], n_tokens: int, **setting) -> dict:
    """A setting in its own coordinator process; run again when that process had to write or ship
    shards, so the memory and times reported are the steady ones."""
    spec = {"path": str(path), "prompt": prompt, "n_tokens": n_tokens, "setting": setting}

    def child() -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             check=False, preexec_fn=lambda: os.sched_setaffinity(0, {COORDINATOR_CORE}))
        if out.returncode != 0:
            raise RuntimeError(f"edgeweave setting {setting['label']!r} on {path.name} failed "
                               f"(exit {out.returncode}):\n{out.stderr[-6000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = child()
    if result["shard_bytes_sent"] or result["shards_written"]:
        first = {"shard_bytes_sent": result["shard_bytes_sent"], "shards_written": result["shards_written"]}
        result = child()
        result["first_try"] = first
    print(f"  done: {path.name}: {setting['label']} ({result['per_token_s'] * 1e3:.1f} ms/token)", file=sys.stderr)
    return result


# -- llama.cpp ----------------------------------------------------------------------------------


def peer_run(path: Path, prompt: list[int], n_tokens: int, threads: int) -> dict:
    """llama.cpp on `path` with `threads` threads, pinned to cores 0..threads-1 (taskset)."""
    cores = "0" if threads == 1 else f"0-{threads - 1}"
    command = ["taskset", "-c", cores, str(PEER_PYTHON), str(PEER_SCRIPT), str(path), "--threads", str(threads),
               "--tokens", str(n_tokens), "--prompt-ids", ",".join(map(str, prompt))]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp on {path} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["model_path"] = result.pop("model")
    result.update(setting=f"llama.cpp, {threads} thread{'s' if threads > 1 else ''}", cores=threads, peer=True)
    print(f"  done: llama.cpp {path.name} -t {threads} ({result['per_token_s'] * 1e3:.1f} ms/token)", file=sys.stderr)
    return result


# -- the benchmark ------------------------------------------------------------------------------


def smollm2(prompt: list[int], n_tokens: int, peer: bool) -> list[dict]:
    rows = []
    for kind in ("Q4_1", "Q8_0", "F32"):
        path = gguf_models.smollm2_path(kind)
        common = {"model": "SmolLM2-135M", "file": kind}
        settings = [
            {"label": "1 node, core 0", "nodes": [[0]]},
            {"label": "2 nodes, cores 0+1", "nodes": [[0], [1]]},
            {"label": "coordinator share + 1 node (core 1)", "nodes": [[1]], "share": True},
        ]
        if kind == "Q4_1":
            settings += [
                {"label": "1 node, core 0, torch kernels", "nodes": [[0]], "backend": "torch"},
                {"label": "1 node, 2 threads (cores 0-1)", "nodes": [[0, 1]], "coordinator_cores": [0, 1]},
            ]
        for setting in settings:
            rows.append({**common, **edgeweave_setting(path, prompt, n_tokens, **setting)})
        if peer:
            for threads in (1, 2):
                rows.append({**common, **peer_run(path, prompt, n_tokens, threads)})
    return rows


def random_1b(prompt: list[int], n_tokens: int, peer: bool) -> list[dict]:
    rows = []
    f32, q4 = gguf_models.random_1b_path("F32"), gguf_models.random_1b_path("Q4_0")
    runs = [("F32", f32, "none", "float32"), ("F32", f32, "q8", "q8 (requantized)"), ("Q4_0", q4, None, "Q4_0 file")]
    for kind, path, quantize, name in runs:
        common = {"model": "random Llama-1.1B", "file": kind}
        settings = [{"label": f"{name}: 1 node, core 0", "nodes": [[0]]},
                    {"label": f"{name}: 1 node, window 2", "nodes": [[0]], "window": 2}]
        if quantize is None:
            settings += [{"label": f"{name}: 1 node, core 0, torch kernels", "nodes": [[0]], "backend": "torch"},
                         {"label": f"{name}: 1 node, window 2, torch kernels", "nodes": [[0]], "window": 2,
                          "backend": "torch"},
                         {"label": f"{name}: 1 node, 2 threads (cores 0-1)", "nodes": [[0, 1]],
                          "coordinator_cores": [0, 1]}]
        for setting in settings:
            rows.append({**common, **edgeweave_setting(path, prompt, n_tokens, quantize=quantize, **setting)})
    if peer:
        for kind, path, threads in (("Q4_0", q4, 1), ("Q4_0", q4, 2), ("F32", f32, 1)):
            rows.append({"model": "random Llama-1.1B", "file": kind, **peer_run(path, prompt, n_tokens, threads)})
    return rows


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def compare(rows: list[dict]) -> None:
    """Per edgeweave row: its time over llama.cpp's on the same file with as many threads as the row's
    cores, and how many leading tokens agree with llama.cpp's."""
    for row in rows:
        if row.get("peer"):
            continue
        peer = find(rows, model=row["model"], file=row["file"], peer=True, cores=row["cores"])
        if peer is None:
            continue
        row["vs_llama_cpp_per_token"] = row["per_token_s"] / peer["per_token_s"]
        row["vs_llama_cpp_ttft"] = row["ttft_s"] / peer["ttft_s"]
        same = 0
        for a, b in zip(row["tokens"], peer["tokens"], strict=False):
            if a != b:
                break
            same += 1
        row["same_tokens_as_llama_cpp"] = f"{same}/{len(row['tokens'])}"


def headline(rows: list[dict]) -> dict:
    out: dict = {}
    one = find(rows, model="SmolLM2-135M", file="Q4_1", setting="1 node, core 0")
    peer1 = find(rows, model="SmolLM2-135M", file="Q4_1", peer=True, cores=1)
    if one and peer1:
        out["ratio_to_llama_cpp"] = one["per_token_s"] / peer1["per_token_s"]
        out["ttft_ratio_to_llama_cpp"] = one["ttft_s"] / peer1["ttft_s"]
    two = find(rows, model="SmolLM2-135M", file="Q4_1", setting="1 node, 2 threads (cores 0-1)")
    peer2 = find(rows, model="SmolLM2-135M", file="Q4_1", peer=True, cores=2)
    if two and peer2:
        out["ratio_to_llama_cpp_2_threads"] = two["per_token_s"] / peer2["per_token_s"]
    big = find(rows, model="random Llama-1.1B", file="Q4_0", setting="Q4_0 file: 1 node, core 0")
    big_peer = find(rows, model="random Llama-1.1B", file="Q4_0", peer=True, cores=1)
    if big and big_peer:
        out["rss_ratio_to_llama_cpp"] = big["node_peak_rss"][0] / big_peer["peak_rss"]
        out["ratio_to_llama_cpp_1b"] = big["per_token_s"] / big_peer["per_token_s"]
    return out


def table(rows: list[dict]) -> Table:
    out = Table(title="quantized weights: greedy decoding, edgeweave vs llama.cpp on the same GGUF files (medians)")
    columns = ("model", "file", "setting", "shard layout", "TTFT ms", "ms/token", "vs llama.cpp", "shard MB/node",
               "node peak RSS MB", "coord. peak MB", "= llama.cpp tokens")
    for column in columns:
        out.add_column(column, justify="left" if column in ("model", "file", "setting", "shard layout") else "right")
    for row in rows:
        if row.get("peer"):
            out.add_row(row["model"], row["file"], row["setting"], "(the file)", f"{row['ttft_s'] * 1e3:.0f}",
                        f"{row['per_token_s'] * 1e3:.1f}", "1.00x", "-", f"{row['peak_rss'] / MB:.0f}", "-", "-")
            continue
        ratio = f"{row['vs_llama_cpp_per_token']:.2f}x" if "vs_llama_cpp_per_token" in row else "-"
        shards = "/".join(f"{b / MB:.0f}" for b in row["shard_bytes_per_rank"])
        peaks = "/".join(f"{b / MB:.0f}" for b in row["node_peak_rss"])
        coord = f"{row['coordinator_peak_rss'] / MB:.0f}" if row.get("coordinator_peak_rss") else "-"
        backend = "" if row["backend"] == "ort" else f" [{row['backend']}]"
        out.add_row(row["model"], row["file"], row["setting"], row["layout"] + backend, f"{row['ttft_s'] * 1e3:.0f}",
                    f"{row['per_token_s'] * 1e3:.1f}", ratio, shards, peaks, coord,
                    row.get("same_tokens_as_llama_cpp", "-"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens on SmolLM2")
    parser.add_argument("--tokens-1b", type=int, default=8, help="new tokens on the 1B model")
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--skip-peer", action="store_true", help="no llama.cpp rows")
    parser.add_argument("--skip-smollm2", action="store_true", help="only the 1B model (its overhead rows stay)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 tokens, no 1B model")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"where the JSON goes (default {RESULTS.relative_to(RESULTS.parents[2])}; a partial "
                             "run, e.g. --skip-1b, belongs in a file of its own)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one edgeweave setting, as JSON
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(edgeweave_run(spec["path"], spec["prompt"], spec["n_tokens"], **spec["setting"])))
        return
    if args.quick:
        args.tokens, args.skip_1b = 8, True
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this benchmark pins processes to cores 0 and 1: it needs 2 cores")
    peer = not args.skip_peer and PEER_PYTHON.exists()
    if not args.skip_peer and not peer:
        print(f"{PEER_PYTHON} is missing (make bench-peer): no llama.cpp rows", file=sys.stderr)
    loadavg_start = Path("/proc/loadavg").read_text().strip()
    started = time.perf_counter()
    os.sched_setaffinity(0, {COORDINATOR_CORE})
    torch.set_num_threads(1)
    files = gguf_models.ensure(include_1b=not args.skip_1b)
    prompt = Tokenizer.from_checkpoint(open_checkpoint(files["smollm2-Q4_1"])).encode_chat(CHAT)
    fixed = overhead()
    rows = [] if args.skip_smollm2 else smollm2(prompt, args.tokens, peer)
    if not args.skip_1b:
        rows += random_1b(prompt, args.tokens_1b, peer)
    idle = [r["node_idle_rss"][0] for r in rows if not r.get("peer") and r["nodes"] == 1]
    fixed["idle_node_daemon_rss"] = statistics.median(idle) if idle else None
    compare(rows)
    top = headline(rows)
    tokenizer = Tokenizer.from_checkpoint(open_checkpoint(files["smollm2-Q4_1"]))
    for row in rows:
        if row["model"] == "SmolLM2-135M" and not row.get("peer"):
            row["text"] = tokenizer.decode(row["tokens"])

    console = Console(width=250)
    console.print(table(rows))
    bare = fixed["python_torch_onnxruntime"]
    line = (f"fixed per-process memory, no model: python + torch + onnxruntime {bare['peak_rss'] / MB:.0f} MB peak; "
            f"an idle node daemon {(fixed['idle_node_daemon_rss'] or 0) / MB:.0f} MB")
    if "llama_cpp_python" in fixed:
        line += f"; python + llama_cpp {fixed['llama_cpp_python']['peak_rss'] / MB:.0f} MB"
    console.print(line, markup=False)
    if "ratio_to_llama_cpp" in top:
        console.print(f"SmolLM2 Q4_1, 1 node / llama.cpp -t 1 per token: {top['ratio_to_llama_cpp']:.2f}x "
                      f"(first token {top['ttft_ratio_to_llama_cpp']:.2f}x)", markup=False)
    if "ratio_to_llama_cpp_2_threads" in top:
        console.print(f"SmolLM2 Q4_1, 1 node with 2 threads / llama.cpp -t 2: {top['ratio_to_llama_cpp_2_threads']:.2f}x",
                      markup=False)
    if "rss_ratio_to_llama_cpp" in top:
        console.print(f"1B Q4_0, node peak RSS / llama.cpp peak RSS: {top['rss_ratio_to_llama_cpp']:.2f}x; "
                      f"per token {top['ratio_to_llama_cpp_1b']:.2f}x", markup=False)
    meta = {"loadavg_start": loadavg_start, "loadavg_end": Path("/proc/loadavg").read_text().strip(),
            "wall_s": time.perf_counter() - started, "prompt_tokens": len(prompt), "prompt_ids": prompt,
            "tokens": args.tokens, "tokens_1b": None if args.skip_1b else args.tokens_1b, "quick": args.quick,
            "coordinator_core": COORDINATOR_CORE, "torch": torch.__version__,
            "files": {k: str(v) for k, v in files.items()}}
    console.print(f"load average at start: {loadavg_start}; {meta['wall_s']:.0f} s", markup=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**top, "overhead": fixed, "meta": meta, "rows": rows}, indent=1))
    console.print(f"wrote {args.out}", markup=False)


if __name__ == "__main__":
    main()
