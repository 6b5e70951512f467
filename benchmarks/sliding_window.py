"""Sliding-window weight scheduling vs all-resident vs Hugging Face Accelerate disk offload.

Model: a random-weight 1.1B Llama (TinyLlama's shape: 22 layers, hidden 2048, 32 heads, 4 KV
heads, MLP 5632) written once in float32 (4.4 GB) to ~/.cache/edgeweave/models/random-1b and cut
for one node (rank 0 of 1, 176 MB per layer file). float32, not float16: CPU kernels are fast in
float32 (float16 matmuls are upcast and 2-3x slower), which puts the windowed runs in the
I/O-bound regime this scheduler is for, and Accelerate gets the same dtype. Each configuration
runs in its own subprocess: the coordinator hub (embedding, norms, LM head, float32) and one
`TensorParallelExecutor` in-process, driven by `TensorParallelHub.forward` (no network: this
measures the store, not the transport). Peak RSS is sampled from outside with psutil and read
from the kernel (VmHWM); "above base" is the peak minus the child's VmHWM right before the
executor was built (interpreter, torch, hub).

Cold page cache: before each configuration every file is dropped with posix_fadvise(DONTNEED)
(and /proc/sys/vm/drop_caches when writable). The store reads with O_DIRECT, leaving nothing in
the page cache, so every windowed token re-reads from disk; to compare like with like the
Accelerate child drops the checkpoint's and its offload folder's pages before each token too (a
device without spare RAM has no page cache to hold a model it cannot hold itself).

I/O floor = layer bytes per token / read bandwidth, measured in the same run with the store's own
reader (`safetensors_read.read_file_into`: one reused slot buffer, O_DIRECT, concurrent chunk
reads) on the same 22 layer files: a cold first read after dropping every cache the guest can
drop, and steady re-reads (3 passes before each edgeweave configuration and 3 after the last; a
row's floor comes from the 6 passes around it, as the host's disk drifts). This is a VM and its
host caches the files it reads, so the token loop (which reads every layer every token) sees the
steady re-read rate, not the cold one: the "within 1.2x of the I/O floor" goal is judged against
the steady floor; the cold figure is reported beside it. Per token the windowed rows also report
the stall (time the compute waited for a read) and the rest (compute, hub, scheduling).

    python benchmarks/sliding_window.py [--tokens 6] [--skip-accelerate] [--read-threads N]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

MODEL_DIR = Path.home() / ".cache" / "edgeweave" / "models" / "random-1b"
SHARD_DIR = Path.home() / ".cache" / "edgeweave" / "models" / "random-1b-shards"
RESULTS = Path(__file__).parent / "results" / "sliding_window.json"
PROMPT = [1, 450, 7483, 310, 3444, 338, 3681, 29889]
MB = 1e6


def vm_hwm() -> int:
    """The kernel's peak RSS of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_page_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches(paths: list[str]) -> bool:
    drop_page_cache(paths)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


# -- children ---------------------------------------------------------------------------------


def child_edgeweave(window: int | None, tokens: int, threads: int = 0, read_threads: int = 0) -> dict:
    import torch

    from edgeweave.runtime import safetensors_read
    from edgeweave.runtime.tp_executor import TensorParallelExecutor
    from edgeweave.runtime.tp_hub import TensorParallelHub
    from edgeweave.splitting.tensor_parallel import Manifest

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    if read_threads:
        safetensors_read.READ_THREADS = read_threads
    manifest = Manifest.load(SHARD_DIR)
    hub = TensorParallelHub.from_file(manifest.config, manifest.coordinator_file)
    base = vm_hwm()
    config = {"model": manifest.data["config"], "rank": 0, "window": window, "dtype": "float32"}
    start = time.perf_counter()
    executor = TensorParallelExecutor(config, manifest.node_files(0))
    setup_s = time.perf_counter() - start

    def reduce(op, layer, x, position):
        return executor.forward(op, layer, position, "bench", [x])[0]

    start = time.perf_counter()
    logits = hub.forward(PROMPT, 0, reduce)[-1]
    ttft = time.perf_counter() - start
    step_s, stall_s, read_s, out = [], [], [], []
    for _ in range(tokens):
        out.append(int(logits.argmax()))
        before = executor.store.stats()
        start = time.perf_counter()
        logits = hub.forward([out[-1]], len(PROMPT) + len(out) - 1, reduce)[-1]
        step_s.append(time.perf_counter() - start)
        after = executor.store.stats()
        stall_s.append(after["stall_s"] - before["stall_s"])
        read_s.append(after.get("read_s", 0) - before.get("read_s", 0))
    stats = executor.stats()["layer_store"]
    executor.close()
    return {"setup_s": setup_s, "ttft_s": ttft, "token_s": step_s, "token_stall_s": stall_s, "token_read_s": read_s,
            "tokens": out, "base_hwm": base, "hwm": vm_hwm(), "store": stats}


def child_accelerate(max_cpu_bytes: int, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    files = sorted(glob.glob(str(MODEL_DIR / "*.safetensors")))
    with tempfile.TemporaryDirectory(prefix="accelerate-offload-") as offload:
        base = vm_hwm()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            MODEL_DIR, dtype=torch.float32, device_map="auto", max_memory={"cpu": max_cpu_bytes},
            offload_folder=offload,
        ).eval()
        setup_s = time.perf_counter() - start
        placement = list(getattr(model, "hf_device_map", {}).values())

        def cold() -> None:
            drop_page_cache(files + [str(p) for p in Path(offload).rglob("*") if p.is_file()])

        cold()
        ids = torch.tensor([PROMPT])
        start = time.perf_counter()
        result = model(ids, use_cache=True)
        ttft = time.perf_counter() - start
        past, logits = result.past_key_values, result.logits[0, -1]
        step_s, out = [], []
        for _ in range(tokens):
            out.append(int(logits.argmax()))
            cold()
            start = time.perf_counter()
            result = model(torch.tensor([[out[-1]]]), past_key_values=past, use_cache=True)
            step_s.append(time.perf_counter() - start)
            past, logits = result.past_key_values, result.logits[0, -1]
    return {"setup_s": setup_s, "ttft_s": ttft, "token_s": step_s, "tokens": out, "base_hwm": base,
            "hwm": vm_hwm(), "disk_modules": placement.count("disk"), "cpu_modules": placement.count("cpu")}


# -- parent -----------------------------------------------------------------------------------


def prepare() -> None:
    """Write the random checkpoint and the single-node shards once (both reused when present)."""
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.random_llama import write_random_llama
    from edgeweave.splitting.tensor_parallel import plan_shards, write_shards

    write_random_llama(MODEL_DIR, "1b", seed=0, dtype="float32")
    checkpoint = open_checkpoint(MODEL_DIR)
    write_shards(checkpoint, plan_shards(checkpoint.config, [1.0]), SHARD_DIR, dtype="float32")


def read_rates(paths: list[str], passes: int, cold: bool) -> list[float]:
    """Bytes/s of `passes` reads of all `paths` with the store's own reader; the first one cold if `cold`.

    Same reader, same bytes: `read_file_into` into ONE reused slot buffer (as the windowed store
    does), O_DIRECT with concurrent chunk reads. Cold: after dropping every cache the guest can
    (the host's cache is out of reach: if the host read these files recently, this is not cold).
    """
    from edgeweave.runtime.safetensors_read import aligned_buffer, read_file_into

    buffer = aligned_buffer(max(os.path.getsize(p) for p in paths))
    read_file_into(paths[-1], buffer)  # fault the buffer in: the store's slots are warm after the first pass too
    if cold:
        drop_all_caches(paths)
    rates = []
    for _ in range(passes):
        total, start = 0, time.perf_counter()
        for path in paths:
            total += read_file_into(path, buffer)
        rates.append(total / (time.perf_counter() - start))
    drop_page_cache(paths)
    return rates


def run_child(args: list[str], cold_paths: list[str]) -> dict:
    drop_all_caches(cold_paths)
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed with exit code {proc.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "sampled_peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=6, help="decode tokens per configuration")
    parser.add_argument("--skip-accelerate", action="store_true")
    parser.add_argument("--child", choices=["edgeweave", "accelerate"], help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-cpu", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--read-threads", type=int, default=0,
                        help="concurrent chunk reads per layer file (default: the store's, 4)")
    args = parser.parse_args()
    if args.child == "edgeweave":
        print(json.dumps(child_edgeweave(args.window or None, args.tokens, args.threads, args.read_threads)))
        return
    if args.child == "accelerate":
        print(json.dumps(child_accelerate(args.max_cpu, args.tokens)))
        return

    prepare()
    from edgeweave.splitting.tensor_parallel import Manifest

    manifest = Manifest.load(SHARD_DIR)
    n_layers = manifest.config.num_layers
    layer_paths = [str(p) for p in manifest.node_files(0).values()]
    layer_bytes = [os.path.getsize(p) for p in layer_paths]
    per_token = sum(layer_bytes)
    cold_paths = layer_paths + sorted(glob.glob(str(MODEL_DIR / "*.safetensors")))
    from edgeweave.runtime import safetensors_read

    if args.read_threads:
        safetensors_read.READ_THREADS = args.read_threads
    read_threads = safetensors_read.READ_THREADS
    # The host's disk drifts by tens of % within a minute, so steady re-reads are measured next to
    # each edgeweave configuration: 3 passes before it and 3 after it, its floor from those 6.
    cold_bandwidth, *first_passes = read_rates(layer_paths, 4, cold=True)
    passes = [first_passes]

    configs = [("all resident", 0), (f"window L/4 = {n_layers // 4}", n_layers // 4), ("window 2", 2)]
    rows = []
    for k, (name, window) in enumerate(configs):
        if k:
            passes.append(read_rates(layer_paths, 3, cold=False))
        result = run_child(["--child", "edgeweave", "--window", str(window), "--tokens", str(args.tokens),
                            "--read-threads", str(args.read_threads)], cold_paths)
        rows.append({"config": name, "window": window or None, **result})
        print(f"  done: {name}", file=sys.stderr)
    passes.append(read_rates(layer_paths, 3, cold=False))  # after the last edgeweave configuration
    if not args.skip_accelerate:
        # room for embedding + LM head (float32) and as many layers as the L/4 window holds
        outer = 2 * manifest.config.vocab_size * manifest.config.hidden_size * 4
        max_cpu = outer + (n_layers // 4) * layer_bytes[0]
        result = run_child(["--child", "accelerate", "--max-cpu", str(max_cpu), "--tokens", str(args.tokens)],
                           cold_paths)
        rows.append({"config": f"accelerate disk offload (cpu {max_cpu / MB:.0f} MB)", "window": None, **result})

    for k, row in enumerate(rows[: len(configs)]):
        row["steady_read_bytes_per_s"] = statistics.median(passes[k] + passes[k + 1])
        row["io_floor_s"] = per_token / row["steady_read_bytes_per_s"]
    steady_rates = [rate for group in passes for rate in group]
    bandwidth = statistics.median(steady_rates)
    floor_s, cold_floor_s = per_token / bandwidth, per_token / cold_bandwidth

    # what the resident run holds beyond the shard files: activations, KV cache, kernel scratch
    compute_overhead = max(rows[0]["hwm"] - rows[0]["base_hwm"] - per_token, 0)
    print(f"\nrandom 1.1B Llama, float32, {n_layers} layers x {layer_bytes[0] / MB:.1f} MB = {per_token / MB:.0f} MB "
          f"per token; prompt {len(PROMPT)} tokens, {args.tokens} decode tokens")
    print(f"store's reader ({read_threads} concurrent O_DIRECT chunk reads into one reused buffer): cold first read "
          f"{cold_bandwidth / MB:.0f} MB/s ({cold_floor_s:.2f} s/token), steady re-read {bandwidth / MB:.0f} MB/s "
          f"(median of {len(steady_rates)} passes, {min(steady_rates) / MB:.0f}-{max(steady_rates) / MB:.0f}) "
          f"-> I/O floor {floor_s:.2f} s/token")
    host_cached = cold_bandwidth >= 0.8 * bandwidth
    if host_cached:
        print("  (the first read was about as fast as the re-reads: the VM host still cached the files, not cold)")
    print("/floor is against the steady re-read floor (the bandwidth the token loop sees: the VM host caches "
          "re-reads), for edgeweave rows from the 6 passes around that row; /cold against the cold read; "
          "stall = waiting for reads, rest = the other time of a token; loop MB/s = bytes per token / token time")
    header = (f"{'config':<40} {'ttft s':>7} {'token s':>8} {'/floor':>7} {'/cold':>6} {'stall s':>8} {'rest s':>7} "
              f"{'loop MB/s':>10} {'peak RSS MB':>12} {'above base MB':>14} {'goal MB':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        row["median_token_s"] = statistics.median(row["token_s"])
        row["peak_rss"] = max(row["hwm"], row["sampled_peak_rss"])
        row["above_base"] = row["hwm"] - row["base_hwm"]
        row["vs_floor"] = row["median_token_s"] / row.get("io_floor_s", floor_s)
        row["vs_cold_floor"] = row["median_token_s"] / cold_floor_s
        window = row["window"]
        row["goal_above_base"] = None if not window or row["config"].startswith("accelerate") else (
            (window + 1) / n_layers * per_token + compute_overhead)
        goal = f"{row['goal_above_base'] / MB:.0f}" if row["goal_above_base"] else "-"
        stall = rest = loop = "-"
        if "token_stall_s" in row and window:  # the rate at which the token loop streamed its layers
            row["loop_bytes_per_s"] = per_token / row["median_token_s"]
            loop = f"{row['loop_bytes_per_s'] / MB:.0f}"
        if "token_stall_s" in row:  # stall: compute waiting for a read; rest: compute, hub, scheduling
            row["median_stall_s"] = statistics.median(row["token_stall_s"])
            rest_s = [t - w for t, w in zip(row["token_s"], row["token_stall_s"], strict=True)]
            row["median_rest_s"] = statistics.median(rest_s)
            stall, rest = f"{row['median_stall_s']:.2f}", f"{row['median_rest_s']:.2f}"
        print(f"{row['config']:<40} {row['ttft_s']:>7.2f} {row['median_token_s']:>8.2f} {row['vs_floor']:>7.2f} "
              f"{row['vs_cold_floor']:>6.2f} {stall:>8} {rest:>7} {loop:>10} {row['peak_rss'] / MB:>12.0f} "
              f"{row['above_base'] / MB:>14.0f} {goal:>8}")
    print()
    goals = {}
    for row in rows[1:3]:
        name = row["config"]
        goals[name] = {"vs_floor": row["vs_floor"], "within_1.2x_of_floor": row["vs_floor"] <= 1.2,
                       "memory_goal_met": row["above_base"] <= row["goal_above_base"]}
        memory_met = "met" if goals[name]["memory_goal_met"] else "missed"
        line = (f"{name}: {row['vs_floor']:.2f}x the steady I/O floor of {row['io_floor_s']:.2f} s (goal <= 1.2x: "
                f"{'met' if row['vs_floor'] <= 1.2 else 'missed'}), peak above base {row['above_base'] / MB:.0f} MB "
                f"(goal <= {row['goal_above_base'] / MB:.0f} MB: {memory_met})")
        if not args.skip_accelerate:
            accel = rows[-1]
            speedup = accel["median_token_s"] / row["median_token_s"]
            goals[name].update(vs_accelerate=speedup, faster_2x_than_accelerate=speedup >= 2,
                               less_memory_than_accelerate=row["peak_rss"] < accel["peak_rss"])
            line += (f"; {speedup:.2f}x faster per token than accelerate (goal >= 2x: "
                     f"{'met' if speedup >= 2 else 'missed'}), peak RSS {row['peak_rss'] / MB:.0f} MB vs "
                     f"{accel['peak_rss'] / MB:.0f} MB")
        print(line)
    print(f"memory goal: peak above base <= (window+1)/L x {per_token / MB:.0f} MB + {compute_overhead / MB:.0f} MB "
          "(the resident run's memory beyond its shard files)")
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows[:3])
    print(f"edgeweave configs generated identical tokens: {same}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": "random-1b float32 (TinyLlama-1.1B shape)", "layers": n_layers, "layer_bytes": layer_bytes[0],
        "bytes_per_token": per_token, "compute_overhead_bytes": compute_overhead, "read_threads": read_threads,
        "cold_read_bytes_per_s": cold_bandwidth, "steady_read_bytes_per_s": bandwidth,
        "steady_read_passes_bytes_per_s": passes,
        "io_floor_s": floor_s, "io_floor_cold_s": cold_floor_s, "cold_read_was_host_cached": host_cached,
        "io_floor_basis": "steady re-read with the store's reader: the bandwidth the token loop sees "
                          "(the VM host caches re-reads); io_floor_cold_s is the cold first read",
        "goals": goals, "prompt_tokens": len(PROMPT), "decode_tokens": args.tokens, "identical_tokens": same,
        "rows": rows,
    }, indent=1))
    print(f"wrote {RESULTS}")

if __name__ == "__main__":
    main()
