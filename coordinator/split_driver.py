"""Split computing across two nodes: the head on the device node, the tail on the server node.

The coordinator runs next to the data source (on the device's host). Per image:
- split:   device node runs head.onnx and returns the bottleneck as uint8 + scale/zero point;
           the coordinator forwards those bytes unchanged to the server node's tail.onnx -> logits;
- local:   the device node runs full.onnx (k = L, nothing crosses the link);
- offload: the image goes to the server node as uint8 pixels, which runs full.onnx (k = 0).

Graphs travel as shards (sent once, by digest); each is a job of kind "onnx". `measure_link`
and `SplitSession.time_candidates` feed the planner with the real link and real node timings.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeweave.coordinator.client import ForwardStream, NodeClient
from edgeweave.runtime.codec import Quantized
from edgeweave.splitting.split_artifacts import load_manifest
from edgeweave.splitting.split_planner import LOCAL, OFFLOAD, SPLIT, Candidate, Link, Replanner

MODES = (LOCAL, OFFLOAD, SPLIT)
#: which graph each mode runs where: mode -> (device graph or None, server graph or None)
MODE_GRAPHS: dict[str, tuple[str | None, str | None]] = {
    LOCAL: ("full", None),
    OFFLOAD: (None, "full"),
    SPLIT: ("head", "tail"),
}


def image_as_uint8(images: torch.Tensor) -> Quantized:
    """[0, 1] float images as the 8-bit pixels a camera produced (exact for such images)."""
    q = torch.clamp(torch.round(images * 255.0), 0, 255).to(torch.uint8)
    return Quantized(q=q, scale=1.0 / 255.0, zero_point=0, orig_dtype=torch.float32)


def measure_link(client: NodeClient, small: int = 16, large: int = 16 << 10, repeats: int = 5) -> Link:
    """RTT from tiny echoes; bandwidth from the extra time a `large` echo takes (it crosses twice)."""

    def median_echo(size: int) -> float:
        payload = bytes(size)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            client.echo(payload)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    client.echo(b"warm-up")
    rtt = median_echo(small)
    big = median_echo(large)
    if big - rtt < 0.02 and large < (4 << 20):  # too fast to time well: grow the payload
        return measure_link(client, small, large * 16, repeats)
    bandwidth = 8.0 * 2 * (large - small) / max(big - rtt, 1e-6)
    return Link(bandwidth_bps=bandwidth, rtt_s=rtt)


@dataclass
class _Deployed:
    client: NodeClient
    stream: ForwardStream
    job_id: str


class SplitSession:
    """Graphs shipped, jobs loaded, one Forward stream per node; `classify` runs images in any mode."""

    def __init__(
        self, artifacts: Path, device: NodeClient, server: NodeClient, modes: tuple[str, ...] = MODES,
        device_threads: int = 0, server_threads: int = 0, reply_timeout: float = 60.0,
    ) -> None:
        self.artifacts = Path(artifacts)
        self.manifest = load_manifest(self.artifacts)
        self.device, self.server = device, server
        self.threads = {"device": device_threads, "server": server_threads}
        self.reply_timeout = reply_timeout
        self.jobs: dict[tuple[str, str], _Deployed] = {}  # (side, graph) -> job
        self.streams: dict[str, ForwardStream] = {}
        for mode in modes:
            if mode not in MODE_GRAPHS:
                raise ValueError(f"unknown split mode {mode!r}; choose from {', '.join(MODES)}")
            device_graph, server_graph = MODE_GRAPHS[mode]
            if device_graph:
                self._deploy("device", device_graph, quantize=mode == SPLIT)
            if server_graph:
                self._deploy("server", server_graph, quantize=False)

    def _deploy(self, side: str, graph: str, quantize: bool) -> None:
        if (side, graph) in self.jobs:
            return
        client = self.device if side == "device" else self.server
        shard = f"split.{graph}.onnx"
        digests = client.ensure_shards({shard: self.artifacts / self.manifest["graphs"][graph]})
        job_id = f"split-{graph}-{digests[shard][:12]}{'-q' if quantize else ''}"
        config: dict[str, Any] = {"graph": shard, "quantize_output": quantize}
        if self.threads[side]:
            config["threads"] = self.threads[side]
        client.load(job_id, "onnx", config, {shard: digests[shard]})
        if side not in self.streams:
            self.streams[side] = client.open_stream(reply_timeout=self.reply_timeout)
        self.streams[side].call(job_id, "hold", [])  # the open stream holds the job (node/leases.py)
        self.jobs[(side, graph)] = _Deployed(client, self.streams[side], job_id)

    def _run(self, side: str, graph: str, tensor: torch.Tensor | Quantized, raw: bool = False):
        job = self.jobs.get((side, graph))
        if job is None:
            raise RuntimeError(f"graph {graph!r} is not deployed on the {side} node; include its mode in `modes`")
        (out,), reply = job.stream.call(job.job_id, "run", [tensor], raw=raw)
        return out, reply

    def classify(self, images: torch.Tensor, mode: str = SPLIT) -> torch.Tensor:
        """Logits for a batch of [0, 1] images, computed the way `mode` says."""
        if mode == LOCAL:
            return self._run("device", "full", images)[0]
        if mode == OFFLOAD:
            return self._run("server", "full", image_as_uint8(images))[0]
        if mode == SPLIT:
            bottleneck, _ = self._run("device", "head", images, raw=True)  # Quantized, as sent by the node
            return self._run("server", "tail", bottleneck)[0]
        raise ValueError(f"unknown split mode {mode!r}; choose from {', '.join(MODES)}")

    def bytes_up(self, mode: str) -> int:
        """Tensor bytes one image sends over the device->server link in `mode`."""
        if mode == LOCAL:
            return 0
        if mode == OFFLOAD:
            shape = self.manifest["input_shape"]
            return int(torch.Size(shape[1:]).numel())
        return int(self.manifest["bottleneck_bytes"])

    def time_candidates(self, example: torch.Tensor, repeats: int = 7) -> list[Candidate]:
        """Per-image costs measured on the nodes: device = wall time of the device call (loopback incl.),
        server = the compute time the server reports; bytes from the manifest."""
        example = example[:1]

        def median_call(side: str, graph: str, tensor) -> tuple[float, float]:
            walls, computes = [], []
            self._run(side, graph, tensor)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                _, reply = self._run(side, graph, tensor)
                walls.append(time.perf_counter() - start)
                computes.append(reply.compute_s)
            return statistics.median(walls), statistics.median(computes)

        logits_bytes = 4 * int(self.manifest["model"]["num_classes"])
        candidates = []
        if ("server", "full") in self.jobs:
            _, server_s = median_call("server", "full", image_as_uint8(example))
            candidates.append(Candidate("input (offload all)", OFFLOAD, 0.0, server_s, self.bytes_up(OFFLOAD), logits_bytes))
        if ("device", "head") in self.jobs and ("server", "tail") in self.jobs:
            device_s, _ = median_call("device", "head", example)
            bottleneck, _ = self._run("device", "head", example, raw=True)
            _, server_s = median_call("server", "tail", bottleneck)
            name = f"bottleneck after {self.manifest['bottleneck']['cut']}"
            candidates.append(Candidate(name, SPLIT, device_s, server_s, self.bytes_up(SPLIT), logits_bytes))
        if ("device", "full") in self.jobs:
            device_s, _ = median_call("device", "full", example)
            candidates.append(Candidate("output (all local)", LOCAL, device_s, 0.0, 0, 0))
        return candidates

    def close(self, unload: bool = True) -> None:
        for stream in self.streams.values():
            stream.close()
        if unload:
            for job in self.jobs.values():
                with contextlib.suppress(Exception):  # best effort: the node may be gone already
                    job.client.unload(job.job_id)
        self.streams.clear()
        self.jobs.clear()

    def __enter__(self) -> SplitSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def classify_adaptively(
    session: SplitSession, server: NodeClient, replanner: Replanner, images: torch.Tensor, every: int
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Classify images one at a time in the planner's current mode, re-measuring the link to the
    server every `every` images; the Replanner switches mode when bandwidth moved past its threshold.
    Returns (logits, mode used per image, the re-plans made)."""
    logits, used, replans = [], [], []
    for i in range(len(images)):
        if every > 0 and i > 0 and i % every == 0:
            link = measure_link(server)
            new = replanner.observe(link.bandwidth_bps, link.rtt_s)
            if new is not None:
                replans.append({"image": i, "bandwidth_mbit": link.bandwidth_bps / 1e6, "rtt_ms": link.rtt_s * 1e3,
                                "mode": new.choice.kind, "cut": new.choice.name})
        mode = replanner.current.choice.kind
        used.append(mode)
        logits.append(session.classify(images[i : i + 1], mode))
    return torch.cat(logits), used, replans


def split_demo_step(addresses: list[str] | None = None) -> str:
    """One classification through a 2-node split (for `edgeweave demo`): the head on the first of
    `addresses`, the tail on the second; with no addresses a 2-node local cluster is started."""
    from edgeweave.coordinator.local_cluster import LocalCluster
    from edgeweave.splitting.datasets import load_dataset
    from edgeweave.splitting.split_artifacts import DEMO_SETTINGS, cached_artifacts

    artifacts = cached_artifacts(DEMO_SETTINGS, progress=True)
    manifest = load_manifest(artifacts)
    _, test = load_dataset(DEMO_SETTINGS.dataset, limit=1)
    image, label = test[0]
    with contextlib.ExitStack() as stack:
        if not addresses:
            cluster = stack.enter_context(LocalCluster(2, advertise=False))
            addresses = list(cluster.addresses)
        device, server = (stack.enter_context(NodeClient(a, timeout=30)) for a in addresses[:2])
        session = stack.enter_context(SplitSession(artifacts, device, server, modes=(SPLIT,)))
        logits = session.classify(image[None], SPLIT)
    predicted = int(logits.argmax())
    return (
        f"split classification: label {int(label)}, predicted {predicted}; head on {addresses[0]}, tail on "
        f"{addresses[1]}; sent {manifest['bottleneck_bytes']} B (uint8 bottleneck) instead of "
        f"{manifest['input_bytes_float32']} B float32 input"
    )
