"""Block-quantized projections on ONNX Runtime's `MatMulNBits` (MLAS kernels: AVX2/AVX-512 on x86,
NEON on aarch64), chosen over torch's int4/int8 kernels by `benchmarks/quantized.py`.

Each `LayerMatmuls` group (qkv, out, mlp) is one small ONNX graph with the weights as constant
initializers, so ORT prepacks them once and a call is one `session.run`. `accuracy_level=4`
quantizes the activations to int8 per block inside the kernel (as llama.cpp does with its Q8
activations); the weights stay exactly as stored. The offset term of `runtime.quantized`
(GGUF's "d * q + m" formats) is the block sums of the input times the offsets: a ReduceSum and a
matmul 1/block the size of the main one, in the same graph.

Where the tensors came from a shard file (`safetensors_read.FileTensors`, written in
`safetensors_write.data_order`, so q|k|v and gate|up are contiguous ranges), the packed weights
and scales are ONNX external data: ORT reads them from the file itself, prepacks, and keeps no
copy from the graph (zero points and offsets, small, are re-centred first: see `centered`).
Measured on a 2048x5632 4-bit weight: 1.6x its bytes per session this way, 2.8x with the weights
copied into the graph (`benchmarks/quantized.py` has the whole-node figure). Tensors from memory (the in-process reference, a requantized hub tensor) are copied into
the graph. Either way the buffer they came from can be reused at once: this is what lets the
sliding window hand its slot to the next layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeweave.runtime.layer_compute import projection_rows, shard_dimensions
from edgeweave.runtime.ort_sessions import session_options
from edgeweave.runtime.quantized import PackedWeight, is_quantized, packed_weight
from edgeweave.runtime.safetensors_read import FileTensors

_ONNX_DTYPES = {torch.uint8: TensorProto.UINT8, torch.float32: TensorProto.FLOAT}

#: MatMulNBits' accuracy level 4: int8 activations, int32 accumulation (the fast MLAS path)
ACCURACY_LEVEL = 4
_OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, nb] -> MatMulNBits' zero_points: one byte per block (8 bits) or two per byte, per row."""
    if bits == 8:
        return np.ascontiguousarray(zero, dtype=np.uint8).reshape(-1)
    if zero.shape[1] % 2:
        zero = np.concatenate([zero, np.zeros((zero.shape[0], 1), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(zero[:, 0::2] | (zero[:, 1::2] << 4), dtype=np.uint8).reshape(-1)


def centered(zero: np.ndarray, scale: np.ndarray, offset: np.ndarray | None,
             bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Zero points and offsets for the kernel: the same weights, with the integer part centred.

    GGUF's "d * q + m" formats (Q4_1, Q4_K, Q5_K) store zero 0 and the block minimum as the offset,
    so the integer part d * q is all positive and the offset cancels most of it. The kernel rounds
    the activations to int8, an error proportional to the integer part's size, which that
    cancellation then magnifies: 1.4% relative error on a SmolLM2 qkv against 0.5% for Q4_0-like
    blocks. Moving the zero point to the value nearest -offset / scale leaves each weight
    unchanged (scale * (q - z') + offset + scale * (z' - z), exact up to float32 rounding of the
    new offset) and the offset at most half a step."""
    if offset is None:
        return zero, None
    scale, offset = scale.astype(np.float64), offset.astype(np.float64)
    safe = np.where(scale == 0, 1.0, scale)
    moved = np.where(scale == 0, zero, np.clip(np.rint(zero - offset / safe), 0, (1 << bits) - 1)).astype(np.uint8)
    return moved, (offset + scale * (moved.astype(np.float64) - zero)).astype(np.float32)


class _Graph:
    """A tiny ONNX graph builder: one float input `x` [T, K], named outputs. `source` is the file the
    tensors were read from, if any: weights that lie in it as one range become external data."""

    def __init__(self, in_features: int, source: Mapping[str, torch.Tensor] | None = None) -> None:
        self.in_features = in_features
        self.source = source if isinstance(source, FileTensors) else None
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.external_bytes = 0
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def constant(self, array: np.ndarray, stem: str) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def from_file(self, names: list[str], dims: tuple[int, ...], stem: str) -> str | None:
        """An initializer of shape `dims` read by ORT from the source file, when the tensors `names`
        lie there back to back, in this order, with one dtype; else None (copy the data instead)."""
        if self.source is None or any(n not in self.source.ranges for n in names):
            return None
        ranges = [self.source.ranges[n] for n in names]
        contiguous = all(b.offset == a.offset + a.nbytes for a, b in zip(ranges, ranges[1:], strict=False))
        if not contiguous or len({r.dtype for r in ranges}) != 1 or ranges[0].dtype not in _ONNX_DTYPES:
            return None
        tensor = TensorProto(name=self.name(stem), data_type=_ONNX_DTYPES[ranges[0].dtype], dims=list(dims),
                             data_location=TensorProto.EXTERNAL)
        nbytes = sum(r.nbytes for r in ranges)
        for key, value in (("location", self.source.path.name), ("offset", ranges[0].offset), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)
        self.external_bytes += nbytes
        return tensor.name

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain, **attrs))
        return out

    def linear(self, x: str, tensors: Mapping[str, torch.Tensor], name: str, bias: str | None = None) -> str:
        """y = x @ W^T (+ bias) for a quantized or float weight `name` of the shard."""
        if is_quantized(tensors, name):
            y = self._quantized(x, [packed_weight(tensors, name)], [name])
        else:
            y = self.node("MatMul", [x, self.constant(tensors[name].float().numpy().T, name)])
        if bias is not None and bias in tensors:
            y = self.node("Add", [y, self.constant(tensors[bias].float().numpy(), bias)])
        return y

    def fused_linear(self, x: str, tensors: Mapping[str, torch.Tensor], names: list[str],
                     biases: list[str]) -> str:
        """[x @ W1^T | x @ W2^T | ...] as ONE output: weights of one block layout are stacked into a
        single MatMulNBits (one kernel launch for q, k and v, or for gate and up)."""
        layouts = {(w.bits, w.block, w.offset is not None) for w in
                   (packed_weight(tensors, n) for n in names if is_quantized(tensors, n))}
        if len(layouts) == 1 and all(is_quantized(tensors, n) for n in names):
            y = self._quantized(x, [packed_weight(tensors, n) for n in names], names)
        else:
            y = self.node("Concat", [self.linear(x, tensors, n) for n in names], axis=-1)
        if any(b in tensors for b in biases):
            bias = np.concatenate([tensors[b].float().numpy() if b in tensors else
                                   np.zeros(projection_rows(tensors, n), np.float32) for n, b in zip(names, biases, strict=True)])
            y = self.node("Add", [y, self.constant(bias, "bias")])
        return y

    def _quantized(self, x: str, parts: list[PackedWeight], names: list[str]) -> str:
        """ONE MatMulNBits over the shard's projections `names` (`parts`, of one layout) stacked by rows;
        the packed weights are only copied and stacked here when ORT cannot read them from the file."""
        w = parts[0]
        n, nb = sum(p.out_features for p in parts), w.in_features // w.block

        def stacked(attr: str) -> np.ndarray:
            return torch.cat([getattr(p, attr) for p in parts]).numpy() if len(parts) > 1 else getattr(w, attr).numpy()

        q = self.from_file([f"{p}.q" for p in names], (n, *w.q.shape[1:]), "qweight")
        scale = self.from_file([f"{p}.scale" for p in names], (n * nb,), "scale")
        scales = stacked("scale")
        zero, offset = centered(stacked("zero"), scales, stacked("offset") if w.offset is not None else None, w.bits)
        inputs = [x, q or self.constant(stacked("q"), "qweight"), scale or self.constant(scales.reshape(-1), "scale"),
                  self.constant(_pack_zero_points(zero, w.bits), "zero")]
        y = self.node("MatMulNBits", inputs, domain="com.microsoft", K=w.in_features, N=n, bits=w.bits,
                      block_size=w.block, accuracy_level=ACCURACY_LEVEL)
        if offset is not None:  # + (block sums of x) @ offset^T
            shape = self.constant(np.array([-1, nb, w.block], dtype=np.int64), "shape")
            sums = self.node("ReduceSum", [self.node("Reshape", [x, shape]),
                                           self.constant(np.array([-1], dtype=np.int64), "axis")], keepdims=0)
            y = self.node("Add", [y, self.node("Gemm", [sums, self.constant(offset, "offset")], transB=1)])
        return y

    def session(self, outputs: list[str], threads: int, inputs: list[onnx.ValueInfoProto] = (),
                direct: list[str] = ()) -> ort.InferenceSession:
        """The graph as a session: input `x` and `inputs`; `outputs` become out0, out1, ... and the
        node outputs named in `direct` are graph outputs under their own names (no Identity copy:
        what an output bound to a caller's buffer, e.g. a KV cache, needs)."""
        names = [f"out{i}" for i in range(len(outputs))]
        nodes = self.nodes + [helper.make_node("Identity", [o], [n]) for o, n in zip(outputs, names, strict=True)]
        graph = helper.make_graph(
            nodes, "edgeweave",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", self.in_features]), *inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in [*names, *direct]],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=_OPSETS)
        options = session_options(threads)
        if self.external_bytes:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(self.source.path.parent))
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.initializers.clear()  # the session holds its own (prepacked) copy
        return session


def _run(session: ort.InferenceSession, x: torch.Tensor) -> list[torch.Tensor]:
    arrays = session.run(None, {"x": x.detach().to(torch.float32).contiguous().numpy()})
    return [torch.from_numpy(a) for a in arrays]


#: calls of up to this many rows (a decode step: 1, or 2 for batch-invariant kernels) reuse a bound call
_BOUND_ROWS = 2


class _BoundCall:
    """A session's input `x` and first output bound once to buffers of a fixed row count (other
    inputs are a subclass's: `runtime.ort_attention`): `session.run` converts and allocates per call
    (~15 us of a quarter-shard MLP's ~215 us on this VM); this copies x in, runs, and returns a copy
    of the output (the buffer is reused). Not thread-safe: the executor serialises its calls."""

    def __init__(self, session: ort.InferenceSession, rows: int, in_features: int, out_features: int) -> None:
        with torch.inference_mode(False):  # plain tensors: written in place in and out of inference mode
            self.x, self.out = torch.empty(rows, in_features), torch.empty(rows, out_features)
        self.session, self.io = session, session.io_binding()
        self.io.bind_input("x", "cpu", 0, np.float32, [rows, in_features], self.x.data_ptr())
        self.io.bind_output(session.get_outputs()[0].name, "cpu", 0, np.float32, [rows, out_features],
                            self.out.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.session.run_with_iobinding(self.io)
        return self.out.clone()


class OrtQuantizedMatmuls:
    """`LayerMatmuls` on MatMulNBits: three sessions per layer shard (qkv, out, mlp)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], threads: int = 1, fused_head_dim: int | None = None) -> None:
        """`fused_head_dim`: run the attention as one call (`runtime.ort_attention.FusedAttention`,
        in place of the qkv and out sessions: `fused_attention`) where the shard allows it."""
        self.n_q_rows, self.n_kv_rows, self.n_columns, self.in_features = shard_dimensions(tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.external_bytes = 0  # weight bytes ORT read from the shard file (no copy through the graph)
        g = _Graph(self.in_features, tensors)
        self._qkv = None
        self.fused_attention = self._fused(tensors, fused_head_dim, threads) if fused_head_dim else None
        if self.fused_attention is not None:
            self.external_bytes += self.fused_attention.external_bytes
        elif self.n_kv_rows:
            self._qkv = g.session([g.fused_linear("x", tensors, ["wq", "wk", "wv"], ["bq", "bk", "bv"])], threads)
            self.external_bytes += g.external_bytes
            g = _Graph(self.n_q_rows, tensors)
            self._out = g.session([g.linear("x", tensors, "wo")], threads)
            self.external_bytes += g.external_bytes
        self._mlp = None
        self._mlp_bound: dict[int, _BoundCall] = {}
        if self.n_columns:
            g = _Graph(self.in_features, tensors)
            gate_up = g.fused_linear("x", tensors, ["w_gate", "w_up"], [])
            split = self.n_columns
            gate, up = g.name("gate"), g.name("up")
            g.nodes.append(helper.make_node("Split", [gate_up, g.constant(np.array([split, split], np.int64), "sizes")],
                                            [gate, up], axis=-1))
            hidden = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
            self._mlp = g.session([g.linear(hidden, tensors, "w_down")], threads)
            self.external_bytes += g.external_bytes

    @staticmethod
    def _fused(tensors: Mapping[str, torch.Tensor], head_dim: int, threads: int):
        """The shard's `FusedAttention`, or None where the shard cannot run it."""
        from edgeweave.runtime.ort_attention import FusedAttention, shard_allows_fusion

        return FusedAttention(tensors, head_dim, threads) if shard_allows_fusion(tensors) else None

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self._qkv is None:
            raise RuntimeError("this shard's attention runs fused (fused_attention): it has no separate qkv call")
        return _run(self._qkv, x)[0]

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        if self._qkv is None:
            raise RuntimeError("this shard's attention runs fused (fused_attention): it has no separate out call")
        return _run(self._out, attn)[0]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self._mlp is None:
            return torch.zeros_like(x)
        if x.shape[0] > _BOUND_ROWS:
            return _run(self._mlp, x)[0]
        bound = self._mlp_bound.get(x.shape[0])
        if bound is None:
            bound = self._mlp_bound[x.shape[0]] = _BoundCall(self._mlp, x.shape[0], self.in_features, self.in_features)
        return bound(x)


class OrtLinear:
    """One quantized (or float) weight as a callable y = x @ W^T: the hub's LM head."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str, threads: int = 1) -> None:
        w = packed_weight(tensors, name) if is_quantized(tensors, name) else None
        self.in_features = w.in_features if w else int(tensors[name].shape[1])
        self.out_features = w.out_features if w else int(tensors[name].shape[0])
        g = _Graph(self.in_features, tensors)
        self._session = g.session([g.linear("x", tensors, name)], threads)
        self.external_bytes = g.external_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self._session, x)[0]
