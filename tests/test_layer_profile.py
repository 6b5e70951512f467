"""The per-layer timing a node runs for the layout planner, in process: the synthetic layer is the
plan's layer byte for byte in size, timings are positive and ordered, bad requests are refused
with a sentence, and the hub's and coordinator's own costs are measured through their code."""

from __future__ import annotations

import pytest

from edgeweave.coordinator.link_probe import message_cost_s
from edgeweave.runtime.hub_profile import profile_hub
from edgeweave.runtime.layer_profile import (
    LayerShape,
    LayerShapeError,
    ProjectionLayout,
    check_request,
    floor_shape,
    profile_layer,
    sustained_seconds,
    synthetic_layer,
)
from edgeweave.runtime.safetensors_write import save_safetensors
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.quant_plan import TensorLayout
from edgeweave.splitting.tensor_parallel import plan_shards

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SMALL = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=32)


def shape(layout: ProjectionLayout | None = None, **changes) -> LayerShape:
    projections = tuple((k, layout) for k in KINDS) if layout else ()
    fields = {"hidden": 128, "intermediate": 256, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": 32, **changes}
    return LayerShape(projections=projections, **fields)


@pytest.mark.parametrize("layout", [None, ProjectionLayout(4, 32, True), ProjectionLayout(8, 32, False)])
def test_the_synthetic_layer_has_the_plans_size(tmp_path, layout):
    path = tmp_path / "layer.safetensors"
    save_safetensors(synthetic_layer(shape(layout)), path)
    layouts = None if layout is None else {k: TensorLayout("Q4_1", layout.bits, layout.block, layout.offset) for k in KINDS}
    planned = plan_shards(SMALL, [1.0], layouts).layer_bytes(0)
    assert planned < path.stat().st_size < planned + 4096  # + the safetensors header


def test_a_layer_is_timed_through_the_executor_and_cleaned_up(tmp_path):
    # 0.6 s, not 0.2: each of the three prefill batches gets 60 ms, so a stall from a test running
    # beside this one (make test runs two workers on two cores) still leaves room for three runs
    timing = profile_layer(shape(ProjectionLayout(4, 32, True)), "ort", prompt_tokens=16, budget_s=0.6,
                           work_dir=tmp_path)
    assert timing.kernel == "ort" and (timing.prompt_tokens, timing.kv_tokens) == (16, 16)
    assert timing.decode_s > 0 and timing.prefill_s > 0 and timing.decode_runs >= 3 and timing.prefill_runs >= 3
    assert min(timing.attn_decode_s, timing.mlp_decode_s, timing.shard_attn_decode_s, timing.shard_mlp_decode_s) > 0
    assert timing.shard_mlp_columns == 32 and timing.held_bytes > timing.file_bytes  # ORT holds its own copy
    assert list(tmp_path.iterdir()) == []
    floats = profile_layer(shape(), "torch", prompt_tokens=4, kv_tokens=0, budget_s=0.1, work_dir=tmp_path)
    assert floats.kernel == "float" and floats.held_bytes == floats.file_bytes and floats.kv_tokens == 0


def test_the_smallest_shard_is_one_kv_group_and_one_block_of_columns():
    small = floor_shape(shape(ProjectionLayout(4, 32, False), n_q_heads=8))
    assert (small.n_kv_heads, small.n_q_heads, small.intermediate) == (1, 4, 32)


@pytest.mark.parametrize(("request_", "sentence"), [
    ((shape(n_kv_heads=3), "ort", 8, 8), "n_q_heads (4) must be a multiple of n_kv_heads (3)"),
    ((shape(float_dtype="float64"), "ort", 8, 8), "float_dtype must be one of float32, float16, bfloat16"),
    ((shape(ProjectionLayout(4, 48)), "ort", 8, 8), "block 48 must be a power of two >= 16"),
    ((shape(), "cuda", 8, 8), "matmul backend must be one of ort, torch, not 'cuda'"),
    ((shape(), "ort", 0, 8), "prompt_tokens must be between 1 and 8192, not 0"),
    ((shape(), "ort", 8, 40000), "kv_tokens must be between 0 and 32768, not 40000"),
])
def test_bad_requests_are_refused_with_a_sentence(request_, sentence):
    with pytest.raises(LayerShapeError, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        check_request(*request_)


def test_sustained_seconds_is_wall_time_per_call_over_whole_batches():
    calls = []
    seconds, n = sustained_seconds(lambda: calls.append(1), 0.03)
    assert n == len(calls) > 3 and 0 < seconds < 0.01


def test_the_hub_and_a_message_cost_something_measurable():
    quantized = profile_hub(128, 512, ProjectionLayout(8, 32, False), 16, budget_s=0.1)
    assert quantized.reduction_s > 0 and 0 < quantized.token_s <= quantized.prefill_s * 3 and quantized.head_rows == 512
    big = profile_hub(64, 1 << 20, None, 4, budget_s=0.1)  # 256 MiB as float32: timed on its first rows, scaled
    assert big.head_rows == (64 << 20) // (64 * 4) and big.token_s > 0
    assert 0 < message_cost_s(128, 1, 0.02, threads=1) < 0.05
