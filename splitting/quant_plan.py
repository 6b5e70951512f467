"""Which layout each tensor of a checkpoint gets in the shards, and its size, before anything is read.

Rules (`--quantize`):
- default (None): keep the file's own precision class. A GGUF quantized tensor is mapped EXACTLY
  onto a `runtime.quantized` block layout (Q4_0/Q4_1/Q4_K -> 4-bit; Q8_0, Q5_0/Q5_1/Q5_K and
  Q6_K -> 8-bit holding the same integers); float tensors stay float.
- "q4" / "q8": every projection gets that many bits. A tensor whose exact layout already has them
  is kept exactly; the others are requantized from float, one tensor at a time. The embedding and
  LM head get 8 bits (they are few and sensitive).
- "none": float everywhere (the float32 reference path).
Norms and biases always stay float.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeweave.runtime.quantized import QUANTIZE_CHOICES, QuantizationError

#: GGML type -> (bits, block, has offset) of its exact block layout
EXACT_LAYOUTS: dict[str, tuple[int, int, bool]] = {
    "Q8_0": (8, 32, False),
    "Q4_0": (4, 32, False),
    "Q4_1": (4, 32, True),
    "Q5_0": (8, 32, False),
    "Q5_1": (8, 32, True),
    "Q4_K": (4, 32, True),
    "Q5_K": (8, 32, True),
    "Q6_K": (8, 16, False),
}
FLOAT_SOURCES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                 "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
REQUANTIZE_BLOCK = 32
#: tensor-parallel cuts of o_proj and down_proj inputs fall on multiples of this (>= every block size)
CUT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorLayout:
    """How one tensor is stored in the shards."""

    source: str  # the file's type: a GGML type name (Q4_K, F16, ...) or a torch dtype name
    bits: int | None  # None: float
    block: int | None = None
    offset: bool = False
    exact: bool = True  # the shard holds exactly the file's values (no requantization)
    float_dtype: str = "float32"

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def describe(self) -> str:
        if not self.quantized:
            return self.float_dtype
        how = "exact" if self.exact else "requantized"
        return f"{self.bits}-bit/{self.block}{' +offset' if self.offset else ''} ({how})"

    def nbytes(self, rows: int, columns: int) -> int:
        """Bytes of a [rows, columns] slice in this layout."""
        if not self.quantized:
            return rows * columns * {"float32": 4, "float16": 2, "bfloat16": 2}[self.float_dtype]
        blocks = rows * (columns // self.block)
        return rows * columns * self.bits // 8 + blocks * (5 + (4 if self.offset else 0))


def check_quantize(quantize: str | None) -> str | None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise QuantizationError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}")
    return quantize


def choose_layout(source: str, quantize: str | None, hub: bool = False, float_dtype: str = "float32") -> TensorLayout:
    """The layout of one projection (or, with `hub`, the embedding / LM head) stored as `source`."""
    check_quantize(quantize)
    exact = EXACT_LAYOUTS.get(source)
    if exact is None and source not in FLOAT_SOURCES:
        supported = ", ".join([*EXACT_LAYOUTS, "F32", "F16", "BF16"])
        raise QuantizationError(f"tensor type {source} is not supported; supported GGUF types: {supported}")
    if quantize == "none":
        return TensorLayout(source, None, float_dtype=float_dtype)
    if quantize is None:
        if exact is not None:
            return TensorLayout(source, *exact)
        keep = FLOAT_SOURCES[source] if source in ("F16", "BF16") else float_dtype
        return TensorLayout(source, None, float_dtype=keep)
    bits = 8 if hub or quantize == "q8" else 4
    if exact is not None and exact[0] == bits:
        return TensorLayout(source, *exact)
    return TensorLayout(source, bits, REQUANTIZE_BLOCK, offset=False, exact=False)


def layout_summary(layouts: dict[str, TensorLayout], shapes: dict[str, tuple[int, int]]) -> list[dict]:
    """Rows for the plan output: per tensor kind (e.g. mlp.down_proj) and layout, the count and bytes."""
    groups: dict[tuple[str, str, str], dict] = {}
    for name, layout in layouts.items():
        kind = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        key = (kind.removesuffix(".weight"), layout.source, layout.describe())
        row = groups.setdefault(key, {"tensor": key[0], "source": key[1], "layout": key[2], "count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += layout.nbytes(*shapes[name])
    return sorted(groups.values(), key=lambda r: r["tensor"])
