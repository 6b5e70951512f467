"""Block-quantized projections on torch's weight-only kernels: the alternative to ONNX Runtime.

4-bit weights run on `_weight_int4pack_mm_for_cpu` (bfloat16 activations, per-group bfloat16
scale and zero: W = (q - 8) * scale + zero, which our `scale * (q - zero) + offset` maps to
exactly up to bfloat16 rounding); 8-bit weights on `_weight_int8pack_mm`, which has one scale
per output row, so 8-bit blocks are requantized per row at load. Kept behind the same
`LayerMatmuls` interface so `benchmarks/quantized.py` can compare it inside a whole decode step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from edgeweave.runtime.layer_compute import shard_dimensions
from edgeweave.runtime.quantized import PackedWeight, is_quantized, packed_weight, unpack

_INNER_K_TILES = 2


class _Linear:
    """One weight on the torch kernel that fits its bit width (float weights on F.linear)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str, bias: str | None = None) -> None:
        self.bias = tensors[bias].float() if bias and bias in tensors else None
        if not is_quantized(tensors, name):
            self.kind, self.weight = "float", tensors[name].float()
            return
        w = packed_weight(tensors, name)
        if w.bits == 4 and w.block in (32, 64, 128, 256) and w.out_features % 16 == 0:
            self._int4(w)
        else:
            self._int8(w)

    def _int4(self, w: PackedWeight) -> None:
        q = torch.from_numpy(unpack(w.q.numpy(), 4)).to(torch.int32)
        self.kind, self.group = "int4", w.block
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES)
        zero = w.scale * (8 - w.zero.float())
        if w.offset is not None:
            zero = zero + w.offset
        # [K / group, N, 2] bfloat16: (scale, zero) per group and output row
        self.scales_and_zeros = torch.stack([w.scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def _int8(self, w: PackedWeight) -> None:
        dense = w.dequantize()
        scale = dense.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.kind = "int8"
        self.weight = torch.round(dense / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "float":
            y = F.linear(x, self.weight)
        elif self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, self.group,
                                                           self.scales_and_zeros).float()
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale).float()
        return y if self.bias is None else y + self.bias


class TorchQuantizedMatmuls:
    """`LayerMatmuls` on torch's int4/int8 weight-only kernels."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.n_q_rows, self.n_kv_rows, self.n_columns, self.in_features = shard_dimensions(tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._q, self._k, self._v = (_Linear(tensors, w, b) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
        self._o = _Linear(tensors, "wo")
        self._gate, self._up, self._down = (_Linear(tensors, w) for w in ("w_gate", "w_up", "w_down"))

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self._q(x), self._k(x), self._v(x)), dim=-1)

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        return self._o(attn)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_columns == 0:
            return torch.zeros_like(x)
        return self._down(F.silu(self._gate(x)) * self._up(x))
