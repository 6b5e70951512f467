"""The hub of tensor-parallel inference: what the coordinator computes between the nodes' partials.

Per layer: RMSNorm, hand the normed state to every shard, sum their partial outputs (the star
allreduce), add the residual; the same for the MLP; then the final norm and the LM head. How the
partials are obtained is a callback, so the same code drives in-process executors (tests) and
nodes over the network (coordinator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from edgeweave.runtime.batch import Row, check_rows, last_token_indexes
from edgeweave.runtime.layer_compute import at_least_two_rows, in_row_blocks, torch_threads
from edgeweave.runtime.llama import LlamaShape, rms_norm
from edgeweave.runtime.ort_quantized import OrtLinear
from edgeweave.runtime.quantized import PackedWeight, dequantize_rows, is_quantized, packed_weight
from edgeweave.runtime.safetensors_read import read_safetensors

#: (op "attn"|"mlp", layer, normed hidden state [T, H], position) -> sum of all shards' partials [T, H]
AllReduce = Callable[[str, int, torch.Tensor, int], torch.Tensor]
#: (embedded hidden state [T, H], position) -> the last layer's output [T, H]: every layer run
#: elsewhere in one go (a node holding the whole model), instead of per-layer reductions here
LayerStack = Callable[[torch.Tensor, int], torch.Tensor]
#: the same two for a batched step: the rows (runtime.batch) replace the position
RowsReduce = Callable[[str, int, torch.Tensor, Sequence[Row]], torch.Tensor]
RowsStack = Callable[[torch.Tensor, Sequence[Row]], torch.Tensor]


class TensorParallelHub:
    """Embedding, norms and LM head of a model whose layers live on shards."""

    def __init__(self, config: LlamaShape, tensors: dict[str, torch.Tensor], threads: int = 1,
                 batch_invariant: bool = False) -> None:
        self.config = config
        #: the LM head never takes its one-row path (`layer_compute.at_least_two_rows`)
        self.batch_invariant = batch_invariant
        self._head: OrtLinear | None = None
        self._packed_embed: PackedWeight | None = None
        if is_quantized(tensors, "lm_head"):
            # block-quantized LM head (one MatMulNBits GEMV); embedding rows dequantized per lookup
            self._head = OrtLinear(tensors, "lm_head", threads)
            self.vocab_size = self._head.out_features
            tied = not is_quantized(tensors, "embed") and "model.embed_tokens.weight" not in tensors
            if tied or is_quantized(tensors, "embed"):
                self._packed_embed = packed_weight(tensors, "lm_head" if tied else "embed")
                self._embed = None
            else:
                self._embed = tensors["model.embed_tokens.weight"].float()
            self.lm_head_t = None
            self._norms(config, tensors)
            return
        # The LM head is kept as [hidden, vocab]: for one token, x @ W^T from that layout is about
        # twice as fast on CPU as F.linear over [vocab, hidden] (a tall, thin GEMV). With tied
        # embeddings the lookup reads the same matrix's columns, so nothing is held twice.
        # write_shards stores it so ("lm_head_t"); HF-named dicts are transposed here.
        if "lm_head_t" in tensors:
            self.lm_head_t = tensors["lm_head_t"].float()
            embed = tensors.get("model.embed_tokens.weight")
            self._embed = embed.float() if embed is not None else None
        else:
            embed = tensors["model.embed_tokens.weight"].float()
            self.lm_head_t = tensors.get("lm_head.weight", embed).float().t().contiguous()
            self._embed = None if "lm_head.weight" not in tensors else embed
        self.vocab_size = self.lm_head_t.shape[1]
        self._norms(config, tensors)

    def _norms(self, config: LlamaShape, tensors: dict[str, torch.Tensor]) -> None:
        self.final_norm = tensors["model.norm.weight"].float()
        layers = range(config.num_layers)
        self.input_norms = [tensors[f"model.layers.{i}.input_layernorm.weight"].float() for i in layers]
        self.post_norms = [tensors[f"model.layers.{i}.post_attention_layernorm.weight"].float() for i in layers]
        self.o_bias = [tensors.get(f"model.layers.{i}.self_attn.o_proj.bias") for i in layers]

    @classmethod
    def from_file(cls, config: LlamaShape, path: str | Path, threads: int = 1,
                  batch_invariant: bool = False) -> TensorParallelHub:
        """Load `coordinator.safetensors` written by `splitting.tensor_parallel.write_shards` (read
        whole, so a quantized LM head is read by ONNX Runtime from the file: no copy in its graph)."""
        tensors, _ = read_safetensors(path)
        return cls(config, tensors, threads, batch_invariant)

    def forward(
        self, token_ids: list[int] | torch.Tensor, position: int, reduce: AllReduce | None = None,
        stack: LayerStack | None = None, last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [T, vocab] for T tokens of one sequence placed at `position` ([1, vocab] with
        `last_only`: generation needs only the last position, and the LM head is the hub's biggest
        matmul). The layers run through `stack` when given, else through per-layer `reduce`."""
        row = Row("", position, len(token_ids))
        rows_reduce = None if reduce is None else (lambda op, layer, x, _rows: reduce(op, layer, x, position))
        rows_stack = None if stack is None else (lambda x, _rows: stack(x, position))
        return self.forward_rows(token_ids, [row], rows_reduce, rows_stack, last_only)

    @torch.inference_mode()
    def forward_rows(
        self, token_ids: list[int] | torch.Tensor, rows: Sequence[Row], reduce: RowsReduce | None = None,
        stack: RowsStack | None = None, last_only: bool = True,
    ) -> torch.Tensor:
        """A batched step: the tokens of every row stacked (runtime.batch) -> each row's next-token
        logits [rows, vocab] (every token's [T, vocab] without `last_only`)."""
        # a quantized head runs on ONNX Runtime's pool: torch only does the small ops (`torch_threads`)
        with torch_threads(1 if self._head is not None else torch.get_num_threads()):
            return self._forward(token_ids, rows, reduce, stack, last_only)

    def _forward(self, token_ids: list[int] | torch.Tensor, rows: Sequence[Row], reduce: RowsReduce | None,
                 stack: RowsStack | None, last_only: bool) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids.tolist()[:8]}")
        check_rows(rows, ids.numel())
        eps = self.config.rms_norm_eps
        x = self.embed(ids)
        if stack is not None:
            x = stack(x, rows)
        elif reduce is not None:
            x = self.reduce_layers(x, rows, reduce, range(self.config.num_layers))
        else:
            raise ValueError("TensorParallelHub.forward needs a reduce or a stack callback")
        if last_only:
            x = x[-1:] if len(rows) == 1 else x[last_token_indexes(rows)]
        x = rms_norm(x, self.final_norm, eps)
        if self._head is not None:
            return at_least_two_rows(self._head, x) if self.batch_invariant else self._head(x)
        return in_row_blocks(self._float_head, x) if self.batch_invariant else self._float_head(x)

    def _float_head(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.lm_head_t

    def reduce_layers(self, x: torch.Tensor, rows: Sequence[Row], reduce: RowsReduce, layers: range) -> torch.Tensor:
        """`layers` with their norms and residuals here and the projections summed from the shards
        (`reduce` gets the model's layer numbers): all layers in tensor parallelism, one stage's in a hybrid layout."""
        eps = self.config.rms_norm_eps
        for i in layers:
            x = x + reduce("attn", i, rms_norm(x, self.input_norms[i], eps), rows)
            if self.o_bias[i] is not None:
                x = x + self.o_bias[i]
            x = x + reduce("mlp", i, rms_norm(x, self.post_norms[i], eps), rows)
        return x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows [T, H] of `ids` (columns of the transposed LM head when they are tied)."""
        if self._packed_embed is not None:
            return dequantize_rows(self._packed_embed, ids)
        if self._embed is not None:
            return self._embed[ids]
        return self.lm_head_t.index_select(1, ids).t().contiguous()
