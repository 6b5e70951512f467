"""What one peer may cost a node: message size, data-plane connections, how long a frame may take.

Why (issue #15): a data-plane peer that sent a 4-byte header announcing 1 GiB made the node
allocate and zero 1 GiB before any payload arrived, and a peer that stopped mid-frame held its
thread and buffer forever. These bounds come from [node] in config.toml (edgeweave/config.py
NodeSettings holds the same defaults; tests/test_dataplane_limits.py checks they agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the smallest allowed max_frame_bytes: a shard upload chunk (runtime/shard_files.py CHUNK_BYTES,
#: 1 MiB) plus its message fields must always fit a gRPC PutShard message
MIN_FRAME_BYTES = 2 << 20
#: gRPC's message caps are 32-bit signed ints; the data plane's 4-byte header could say more
MAX_FRAME_BYTES = (1 << 31) - 1


@dataclass(frozen=True)
class Limits:
    """Per-node bounds on what data-plane connections and gRPC messages may hold.

    max_frame_bytes: the largest data-plane frame and the largest gRPC message the node receives.
      256 MiB holds one float32 Forward of ~8000 prompt tokens at hidden 8192 (Llama-70B class;
      64 MiB per 2048 tokens), which `edgeweave run` sends when it prefills a whole prompt in one
      step; `serve` chunks prefill at 128 tokens (4 MiB at hidden 8192).
    max_data_connections: open data-plane connections (TLS handshakes included); a coordinator
      uses one per driver, so 16 leaves room for several coordinators, benchmarks and reconnects.
    data_idle_timeout_s: a connection waiting this long for its next frame is closed (the
      coordinator reconnects on its next send); frees the thread of a silent or vanished peer.
    data_frame_timeout_s: a frame must arrive whole within this of its first byte: a max-size
      frame at 2.2 MB/s, the slowest link coordinator/client.py put_shard's deadline allows for.
    """

    max_frame_bytes: int = 256 << 20
    max_data_connections: int = 16
    data_idle_timeout_s: float = 300.0
    data_frame_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not MIN_FRAME_BYTES <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be between {MIN_FRAME_BYTES} (2 MiB, a shard chunk) and "
                             f"{MAX_FRAME_BYTES} (2 GiB - 1, gRPC's limit), not {self.max_frame_bytes}")
        if self.max_data_connections < 1:
            raise ValueError(f"max_data_connections must be at least 1, not {self.max_data_connections}")
        for name in ("data_idle_timeout_s", "data_frame_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.removesuffix('_s')} must be a positive number of seconds, not {value}")
