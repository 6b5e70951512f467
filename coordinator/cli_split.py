"""`edgeweave split ...`: train a BottleFit split, plan where to cut, run images through two nodes."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.split_driver import MODES, SplitSession, classify_adaptively, measure_link
from edgeweave.splitting.bottleneck import load_teacher
from edgeweave.splitting.datasets import DATASETS, load_dataset
from edgeweave.splitting.split_artifacts import (
    DEMO_SETTINGS,
    TrainSettings,
    build_artifacts,
    cached_artifacts,
    load_manifest,
)
from edgeweave.splitting.split_planner import Link, Plan, Replanner, candidates_from_flops, format_table, plan
from edgeweave.splitting.split_points import split_points
from edgeweave.splitting.vision_models import ARCHITECTURES

console = Console()


@contextlib.contextmanager
def node_pair(device_peer: str | None, server_peer: str | None, timeout: float = 30.0) -> Iterator[tuple[NodeClient, NodeClient]]:
    """Clients for the given peers, or for a 2-node LocalCluster started here when none are given."""
    if bool(device_peer) != bool(server_peer):
        raise typer.BadParameter("give both --device-peer and --server-peer, or neither (a local 2-node cluster)")
    if device_peer and server_peer:
        with NodeClient(device_peer, timeout=timeout) as device, NodeClient(server_peer, timeout=timeout) as server:
            yield device, server
        return
    from edgeweave.coordinator.local_cluster import LocalCluster

    with LocalCluster(2, advertise=False) as cluster:
        console.print(f"[dim]started a local 2-node cluster: device {cluster.addresses[0]}, server {cluster.addresses[1]}[/]")
        with NodeClient(cluster.addresses[0], timeout=timeout) as device, NodeClient(cluster.addresses[1], timeout=timeout) as server:
            yield device, server


def _artifacts(path: Path | None) -> Path:
    return path if path is not None else cached_artifacts(DEMO_SETTINGS, progress=True)


def plan_table(result: Plan) -> Table:
    table = Table(title=f"split plan at {result.link.bandwidth_bps / 1e6:.2f} Mbit/s, RTT {result.link.rtt_s * 1e3:.2f} ms")
    for column in ("candidate", "kind", "device ms", "bytes up", "server ms", "predicted ms", ""):
        table.add_column(column)
    for row in format_table(result):
        table.add_row(*row)
    return table


def plan_json(result: Plan) -> dict[str, Any]:
    return {
        "link": {"bandwidth_bps": result.link.bandwidth_bps, "rtt_s": result.link.rtt_s},
        "choice": result.choice.name,
        "kind": result.choice.kind,
        "table": [{"name": c.name, "kind": c.kind, "device_s": c.device_s, "server_s": c.server_s,
                   "bytes_up": c.bytes_up, "predicted_s": s} for c, s in result.table],
    }


def make_plan(session: SplitSession, server: NodeClient, bandwidth_mbit: float | None) -> Plan:
    example = torch.zeros(session.manifest["input_shape"])
    link = measure_link(server)
    if bandwidth_mbit:
        link = Link(bandwidth_mbit * 1e6, link.rtt_s)
    return plan(session.time_candidates(example), link)


def estimate_plan(artifacts: Path, device: NodeClient, server: NodeClient, bandwidth_mbit: float | None) -> Plan:
    """Neurosurgeon over every cut of the teacher, from FLOPs and the nodes' Profile GFLOP/s (nothing deployed)."""
    teacher, _ = load_teacher(artifacts)
    manifest = load_manifest(artifacts)
    points = split_points(teacher, torch.zeros(manifest["input_shape"]))
    device_gflops, server_gflops = device.profile().matmul_gflops, server.profile().matmul_gflops
    link = measure_link(server)
    if bandwidth_mbit:
        link = Link(bandwidth_mbit * 1e6, link.rtt_s)
    input_bytes = int(torch.Size(manifest["input_shape"][1:]).numel())  # the image as uint8 pixels
    return plan(candidates_from_flops(points, device_gflops, server_gflops, input_bytes=input_bytes), link)


def register(app: typer.Typer) -> None:
    split = typer.Typer(help="Split computing (BottleFit): head on a device node, tail on a server node.",
                        no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(split, name="split")

    @split.command("train")
    def train(
        model: str = typer.Option("resnet", "--model", help=f"Architecture: {', '.join(ARCHITECTURES)}."),
        dataset: str = typer.Option("mnist5k", help=f"Data set: {', '.join(DATASETS)}."),
        bottleneck_channels: int = typer.Option(8, help="Channels of the bottleneck sent over the link."),
        epochs: int = typer.Option(3, help="Teacher epochs; each bottleneck stage gets epochs - 1 (at least 1)."),
        lr: float = typer.Option(3e-3, help="Learning rate (Adam, cosine schedule)."),
        limit: int = typer.Option(0, help="Use only the first N train/test images (0 = all)."),
        out: Path = typer.Option(Path("split-artifacts"), help="Directory for weights, ONNX graphs and manifest."),
    ) -> None:
        """Train a teacher, inject and train the bottleneck, export head/tail/full ONNX graphs."""
        if model not in ARCHITECTURES:
            raise typer.BadParameter(f"unknown model {model!r}; choose {', '.join(ARCHITECTURES)}")
        stage_epochs = max(1, epochs - 1)
        settings = TrainSettings(arch=model, dataset=dataset, bottleneck_channels=bottleneck_channels,
                                 teacher_epochs=epochs, distill_epochs=stage_epochs, finetune_epochs=stage_epochs,
                                 lr=lr, limit=limit or None)
        manifest = build_artifacts(settings, out)
        acc = manifest["accuracy"]
        console.print(
            f"teacher accuracy {acc['teacher']:.4f}, split with bottleneck {acc['student']:.4f}; "
            f"bottleneck {manifest['bottleneck_shape']} = {manifest['bottleneck_bytes']} B uint8 per image vs "
            f"{manifest['input_bytes_float32']} B float32 input; artifacts in {out}"
        )

    @split.command("plan")
    def plan_cmd(
        device_peer: str = typer.Option(None, help="host:port of the device node (runs the head)."),
        server_peer: str = typer.Option(None, help="host:port of the server node (runs the tail)."),
        artifacts: Path = typer.Option(None, help="Output of `split train` (default: the cached demo model)."),
        bandwidth_mbit: float = typer.Option(None, help="Plan for this bandwidth instead of the measured one."),
        estimate: bool = typer.Option(False, help="Every cut of the unsplit model, estimated from FLOPs and each "
                                                  "node's profiled GFLOP/s (uint8 activations), instead of timing."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Time every candidate on the real nodes, measure the link, print the table and the choice."""
        art = _artifacts(artifacts)
        with node_pair(device_peer, server_peer) as (device, server):
            if estimate:
                result = estimate_plan(art, device, server, bandwidth_mbit)
            else:
                with SplitSession(art, device, server) as session:
                    result = make_plan(session, server, bandwidth_mbit)
        if as_json:
            print(json.dumps(plan_json(result)))
            return
        console.print(plan_table(result))
        console.print(f"choice: [bold]{result.choice.name}[/] ({result.choice.kind})")

    @split.command("run")
    def run_cmd(
        device_peer: str = typer.Option(None, help="host:port of the device node (runs the head)."),
        server_peer: str = typer.Option(None, help="host:port of the server node (runs the tail)."),
        artifacts: Path = typer.Option(None, help="Output of `split train` (default: the cached demo model)."),
        images: int = typer.Option(16, help="How many test images to classify, one at a time."),
        mode: str = typer.Option("auto", help="auto (the planner's choice), all, or one of local/offload/split."),
        replan_every: int = typer.Option(
            0, help="With --mode auto: re-measure the link every N images and re-plan when its bandwidth moved "
            "by more than 25% (0 = plan once)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON (predictions, logits, latencies)."),
    ) -> None:
        """Classify test images through the two nodes and report accuracy, latency and bytes sent."""
        if mode not in ("auto", "all", *MODES):
            raise typer.BadParameter(f"--mode must be auto, all, {', '.join(MODES)}; got {mode!r}")
        art = _artifacts(artifacts)
        manifest = load_manifest(art)
        _, test = load_dataset(manifest["settings"]["dataset"], limit=images)
        batch = torch.stack([test[i][0] for i in range(len(test))])
        labels = torch.stack([test[i][1] for i in range(len(test))])
        report: dict[str, Any] = {"images": len(labels), "modes": {}}
        with node_pair(device_peer, server_peer) as (device, server), SplitSession(art, device, server) as session:
            replanner = Replanner(session.time_candidates(torch.zeros(session.manifest["input_shape"])),
                                  measure_link(server))
            result = replanner.current
            report["plan"] = plan_json(result)
            if mode == "auto" and replan_every > 0:
                start = time.perf_counter()
                logits, used, replans = classify_adaptively(session, server, replanner, batch, replan_every)
                predictions = logits.argmax(dim=1)
                report["adaptive"] = {"accuracy": float((predictions == labels).float().mean()), "modes_used": used,
                                      "replans": replans, "wall_s": time.perf_counter() - start,
                                      "predictions": predictions.tolist()}
            else:
                for m in MODES if mode == "all" else [result.choice.kind if mode == "auto" else mode]:
                    report["modes"][m] = run_images(session, batch, labels, m)
        if as_json:
            print(json.dumps(report))
            return
        console.print(plan_table(result))
        table = Table(title=f"{len(labels)} images, one at a time")
        for column in ("mode", "accuracy", "median ms / image", "bytes up / image"):
            table.add_column(column)
        for m, r in report["modes"].items():
            table.add_row(m, f"{r['accuracy']:.3f}", f"{r['latency_ms_median']:.3f}", str(r["bytes_up"]))
        if report["modes"]:
            console.print(table)
        if "adaptive" in report:
            adaptive = report["adaptive"]
            console.print(f"adaptive run: accuracy {adaptive['accuracy']:.3f}, {len(adaptive['replans'])} re-plan(s)")
            for r in adaptive["replans"]:
                console.print(f"  at image {r['image']}: link {r['bandwidth_mbit']:.1f} Mbit/s, RTT {r['rtt_ms']:.2f} ms "
                              f"-> {r['mode']} ({r['cut']})")


def run_images(session: SplitSession, batch: torch.Tensor, labels: torch.Tensor, mode: str) -> dict[str, Any]:
    """Classify each image on its own (as a camera would send them); predictions, logits, median latency."""
    logits, times = [], []
    session.classify(batch[:1], mode)  # warm-up
    for i in range(len(batch)):
        start = time.perf_counter()
        logits.append(session.classify(batch[i : i + 1], mode))
        times.append(time.perf_counter() - start)
    out = torch.cat(logits)
    predictions = out.argmax(dim=1)
    return {
        "accuracy": float((predictions == labels).float().mean()),
        "latency_ms_median": statistics.median(times) * 1e3,
        "bytes_up": session.bytes_up(mode),
        "predictions": predictions.tolist(),
        "logits": out.tolist(),
    }
