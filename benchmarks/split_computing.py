"""Split computing benchmark (BottleFit on MNIST-5k): accuracy, bytes on the wire, latency per image.

Side by side in one run:
1. accuracy of the unsplit model vs the split with its uint8 bottleneck, on the full test set;
2. bytes per image over the link: bottleneck vs the raw float32 input, its uint8 pixels, PNG of it
   (and JPEG where Pillow is installed), plus the serialized ForwardRequest sizes;
3. end-to-end latency per image (median) for all-local (device node and coordinator pinned to one
   core), full offload and the planner's choice, over links shaped with tc tbf to 1, 10 and 100
   Mbit/s between two network namespaces (needs root; skipped otherwise).

Prints a table and writes benchmarks/results/split_computing.json.
Usage: python benchmarks/split_computing.py [--images 40] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the network-namespace test bed lives with the tests

from edgeweave.coordinator.split_driver import image_as_uint8  # noqa: E402
from edgeweave.proto import pb  # noqa: E402
from edgeweave.runtime.codec import encode, quantize_uint8  # noqa: E402
from edgeweave.security import create_secret  # noqa: E402
from edgeweave.splitting.bottleneck import load_student, load_teacher  # noqa: E402
from edgeweave.splitting.datasets import load_arrays, load_dataset  # noqa: E402
from edgeweave.splitting.split_artifacts import DEMO_SETTINGS, TrainSettings, cached_artifacts  # noqa: E402
from edgeweave.splitting.training import accuracy  # noqa: E402

FULL_SETTINGS = TrainSettings(teacher_epochs=4, distill_epochs=2, finetune_epochs=3)
BANDWIDTHS_MBIT = (1, 10, 100)
RESULTS = ROOT / "benchmarks" / "results" / "split_computing.json"


def png_bytes(image: torch.Tensor) -> int:
    """Size of a greyscale 8-bit PNG of `image` (H, W uint8), written with zlib (no Pillow needed)."""
    h, w = image.shape
    raw = b"".join(b"\x00" + bytes(image[row].tolist()) for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    return len(png + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def jpeg_bytes(image: torch.Tensor) -> int | None:
    try:
        from PIL import Image
    except ImportError:
        return None
    out = io.BytesIO()
    Image.fromarray(image.numpy()).save(out, format="JPEG", quality=90)
    return len(out.getvalue())


def wire_sizes(directory: Path, n: int) -> dict:
    arrays = load_arrays(FULL_SETTINGS.dataset)
    pixels = arrays["test_images"][:n, 0]
    images = pixels.float()[:, None] / 255.0
    student, _, _ = load_student(directory)
    with torch.no_grad():
        bottleneck = quantize_uint8(student.head()(images[:1]))
    request = lambda t: pb.ForwardRequest(job_id="split-x", seq=1, op="run", tensors=[pb.Tensor(**encode(t))]).ByteSize()  # noqa: E731
    jpeg = [jpeg_bytes(p) for p in pixels]
    sizes = {
        "raw_float32": images[0].numel() * 4,
        "raw_uint8": images[0].numel(),
        "png_mean": statistics.mean(png_bytes(p) for p in pixels),
        "jpeg_q90_mean": statistics.mean(jpeg) if None not in jpeg else None,
        "bottleneck_uint8": bottleneck.q.numel(),
        "message_offload_uint8": request(image_as_uint8(images[:1])),
        "message_split_bottleneck": request(bottleneck),
        "message_raw_float32": request(images[:1]),
    }
    sizes["reduction_vs_raw_float32"] = 1 - sizes["bottleneck_uint8"] / sizes["raw_float32"]
    return sizes


def accuracies(directory: Path) -> dict:
    teacher, _ = load_teacher(directory)
    student, _, _ = load_student(directory)
    _, test = load_dataset(FULL_SETTINGS.dataset)
    batches = [(test.tensors[0][i : i + 500], test.tensors[1][i : i + 500]) for i in range(0, len(test), 500)]
    unsplit, split = accuracy(teacher, batches), accuracy(student, batches)
    return {"test_images": len(test), "unsplit": unsplit, "split_bottleneck_uint8": split,
            "loss_points": 100 * (unsplit - split)}


def wait_ready(path: Path, proc, log: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return json.loads(path.read_text())["address"]


class CpuQuota:
    """A cgroup (v1 cpu controller) that caps the device node at a share of one core: a slower device."""

    MIN_QUOTA_US = 1_000  # the kernel's smallest quota; the period grows so that quota / period = share

    def __init__(self) -> None:
        self.path = Path(f"/sys/fs/cgroup/cpu/edgeweave-bench-{os.getpid()}")

    def __enter__(self) -> CpuQuota:
        self.path.mkdir()
        return self

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def set_share(self, share: float | None) -> None:
        (self.path / "cpu.cfs_quota_us").write_text("-1")
        if share is not None:
            (self.path / "cpu.cfs_period_us").write_text(str(round(self.MIN_QUOTA_US / share)))
            (self.path / "cpu.cfs_quota_us").write_text(str(self.MIN_QUOTA_US))

    def __exit__(self, *exc: object) -> None:
        root = self.path.parent / "cgroup.procs"
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                root.write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def latencies(directory: Path, images: int, device_shares: list[float | None]) -> list[dict]:
    from netns import Testbed

    rows = []
    with Testbed(2) as bed, tempfile.TemporaryDirectory() as tmp, CpuQuota() as quota:
        secret = str(create_secret(Path(tmp) / "cluster.secret"))  # mutual TLS, as deployed
        addresses = []
        for host in range(2):  # host 0: device (core 0), host 1: server (core 1)
            ready = Path(tmp) / f"n{host}.ready"
            log_path = Path(tmp) / f"n{host}.log"
            log = open(log_path, "wb")  # noqa: SIM115 - the node keeps it open
            proc = bed.popen(host, ["taskset", "-c", str(host), sys.executable, "-m", "edgeweave", "node", "--name",
                                    f"bench-split-{host}", "--host", bed.ips[host], "--interface", bed.ips[host],
                                    "--port", "0", "--no-advertise", "--secret-file", secret,
                                    "--data-dir", str(Path(tmp) / f"d{host}"),
                                    "--ready-file", str(ready)], stdout=log, stderr=log)
            addresses.append(wait_ready(ready, proc, log_path))
            if host == 0:
                quota.add(proc.pid)  # `ip netns exec` and taskset exec, so this is the node's pid
        for share, mbit in itertools.product(device_shares, BANDWIDTHS_MBIT):
            quota.set_share(share)
            for host in range(2):
                bed.shape(host, rate_mbit=mbit)
            argv = ["taskset", "-c", "0", sys.executable, "-m", "edgeweave", "--secret-file", secret, "split", "run", "--device-peer",
                    addresses[0], "--server-peer", addresses[1], "--artifacts", str(directory), "--images",
                    str(images), "--mode", "all", "--json"]
            result = bed.run(0, argv, timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"split run failed at {mbit} Mbit/s:\n{result.stderr[-3000:]}")
            report = json.loads(result.stdout.strip().splitlines()[-1])
            modes = {m: r["latency_ms_median"] for m, r in report["modes"].items()}
            chosen = report["plan"]["kind"]
            best_baseline = min(modes["local"], modes["offload"])
            rows.append({
                "device": "1 core" if share is None else f"1 core at {share:.0%}",
                "bandwidth_mbit": mbit,
                "measured_bandwidth_mbit": report["plan"]["link"]["bandwidth_bps"] / 1e6,
                "rtt_ms": report["plan"]["link"]["rtt_s"] * 1e3,
                "local_ms": modes["local"], "offload_ms": modes["offload"], "split_ms": modes["split"],
                "chosen": chosen, "chosen_ms": modes[chosen],
                "chosen_vs_best_baseline": modes[chosen] / best_baseline,
                "predicted_ms": {row["kind"]: row["predicted_s"] * 1e3 for row in report["plan"]["table"]},
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="images per mode and bandwidth (latency medians)")
    parser.add_argument("--quick", action="store_true", help="use the small demo model instead of the full one")
    parser.add_argument("--slow-device-share", type=float, default=0.1,
                        help="also run with the device node capped at this share of its core (0 = skip)")
    args = parser.parse_args()
    started = time.perf_counter()
    directory = cached_artifacts(DEMO_SETTINGS if args.quick else FULL_SETTINGS, progress=True)
    manifest = json.loads((directory / "manifest.json").read_text())
    result = {"artifacts": str(directory), "model": manifest["model"], "bottleneck": manifest["bottleneck"],
              "accuracy": accuracies(directory), "bytes_per_image": wire_sizes(directory, 200)}
    if os.geteuid() == 0:
        shares = [None] + ([args.slow_device_share] if args.slow_device_share else [])
        result["latency"] = latencies(directory, args.images, shares)
    else:
        result["latency"] = "skipped: needs root for network namespaces and tc"
    result["elapsed_s"] = time.perf_counter() - started

    acc, sizes = result["accuracy"], result["bytes_per_image"]
    print(f"\naccuracy on {acc['test_images']} test images: unsplit {acc['unsplit']:.4f}, split with uint8 bottleneck "
          f"{acc['split_bottleneck_uint8']:.4f} (loss {acc['loss_points']:.2f} points)")
    print("\nbytes per image         tensor  message")
    print(f"  raw float32 input   {sizes['raw_float32']:8d}  {sizes['message_raw_float32']:7d}")
    print(f"  raw uint8 pixels    {sizes['raw_uint8']:8d}  {sizes['message_offload_uint8']:7d}")
    print(f"  PNG (mean)          {sizes['png_mean']:8.0f}")
    if sizes["jpeg_q90_mean"] is not None:
        print(f"  JPEG q90 (mean)     {sizes['jpeg_q90_mean']:8.0f}")
    print(f"  bottleneck uint8    {sizes['bottleneck_uint8']:8d}  {sizes['message_split_bottleneck']:7d}   "
          f"({100 * sizes['reduction_vs_raw_float32']:.1f}% less than raw float32)")
    if isinstance(result["latency"], list):
        print("\nmedian ms per image                   local  offload   split   chosen        chosen/best(local,offload)  measured Mbit/s")
        for r in result["latency"]:
            print(f"  {r['device']:<15} {r['bandwidth_mbit']:>4} Mbit/s     {r['local_ms']:7.2f} {r['offload_ms']:8.2f} {r['split_ms']:7.2f}   "
                  f"{r['chosen']:<8} {r['chosen_ms']:7.2f}  {r['chosen_vs_best_baseline']:6.2f}"
                  f"                 {r['measured_bandwidth_mbit']:8.2f}")
    else:
        print(f"\nlatency: {result['latency']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS.relative_to(ROOT)} ({result['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
