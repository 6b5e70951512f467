"""What a node runs for a job: the executor interface and the registry of built-in kinds.

A node never runs code it was sent; it picks one of these classes by name and feeds it
shard files (safetensors / ONNX) and tensors.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import torch

from edgeweave.runtime.batch import Row
from edgeweave.runtime.codec import Quantized
from edgeweave.runtime.cpu_dilation import DeviceClock

TensorLike = torch.Tensor | Quantized


class ExecutorInputError(ValueError):
    """The request is wrong (bad op, layer, shape, session): the node answers INVALID_ARGUMENT."""


class ExecutorStateError(RuntimeError):
    """The request is valid but not now (e.g. out of order): the node answers FAILED_PRECONDITION."""


class Executor:
    """Base class of node-side executors. Subclasses set `kind` and implement `forward`."""

    kind: ClassVar[str] = ""

    def __init__(self, config: dict[str, Any], shards: dict[str, Path], memory_budget: int,
                 file_checks: dict[str, int | None] | None = None) -> None:
        self.config = config
        self.shards = shards
        self.memory_budget = memory_budget
        #: shard name -> crc32 of its bytes as verified at Load; executors that read a file again
        #: later (a sliding window) check each read against it
        self.file_checks = file_checks or {}

    def details(self) -> dict[str, Any]:
        """What the executor decided at load time (reported in LoadReply)."""
        return {}

    def forward(
        self, op: str, layer: int, position: int, session: str, tensors: list[TensorLike],
        rows: list[Row] | None = None,
    ) -> list[TensorLike]:
        """One Forward message. `rows` (runtime.batch): the sessions of a batched hidden state, for
        executors that keep per-session state; the others refuse them."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Counters for JobStats/Unload (peak RSS, bytes read, stall time, ...)."""
        return {}

    def session_count(self) -> int:
        """Per-session states held (KV caches); 0 for executors without sessions."""
        return 0

    def drop_sessions(self, sessions: set[str]) -> int:
        """Forget these sessions' state (their coordinator's lease expired); returns how many were held."""
        return 0

    def close(self) -> None:
        """Release memory and files; called on Unload and node shutdown."""


#: the longest a "work" echo may keep a node busy (a probe's op is milliseconds)
MAX_WORK_S = 1.0


class EchoExecutor(Executor):
    """Returns what it receives: lets the demo and tests round-trip tensors through any node.

    Op "work" (tensors: [x, seconds]) first keeps this thread busy for `seconds` of the device's
    time, then returns [x]: a stand-in for a tensor-parallel rank's compute, so that the layout
    planner can time a whole reduction, every rank busy at once, without shipping any weights
    (`coordinator.layout_choice.measure_reductions`). Device time is `cpu_dilation.DeviceClock`'s: the
    wall time, or the CPU time over the emulated fraction, so a slow or co-located device spends it
    as its real compute would."""

    kind = "echo"

    def forward(self, op, layer, position, session, tensors, rows=None):
        if rows:
            raise ExecutorInputError("the echo executor takes no batch rows")
        if op == "work":
            if len(tensors) != 2 or not isinstance(tensors[1], torch.Tensor) or tensors[1].numel() != 1:
                raise ExecutorInputError("op 'work' takes two tensors: the payload and the seconds to work")
            seconds = float(tensors[1])
            if not 0 <= seconds <= MAX_WORK_S:  # NaN fails too
                raise ExecutorInputError(f"op 'work' takes 0 to {MAX_WORK_S} s of work, not {seconds}")
            busy(seconds)
            return [tensors[0]]
        if op != "echo":
            raise ExecutorInputError(f"the echo executor only knows ops 'echo' and 'work', not {op!r}")
        return list(tensors)


def busy(seconds: float) -> None:
    """Spin on this thread until `seconds` of device time have passed (cpu_dilation.DeviceClock)."""
    clock = DeviceClock()
    while clock.elapsed() < seconds:
        pass


#: kind -> "module:Class"; imported lazily so a node only loads what its jobs use.
EXECUTOR_KINDS: dict[str, str] = {
    "echo": "edgeweave.runtime.executor:EchoExecutor",
    "tp_llm": "edgeweave.runtime.tp_executor:TensorParallelExecutor",
    "onnx": "edgeweave.runtime.onnx_executor:OnnxExecutor",
}


def executor_class(kind: str) -> type[Executor]:
    """The executor class for a job kind; ExecutorInputError for an unknown kind."""
    target = EXECUTOR_KINDS.get(kind)
    if target is None:
        raise ExecutorInputError(f"unknown job kind {kind!r}; this node runs {', '.join(sorted(EXECUTOR_KINDS))}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
