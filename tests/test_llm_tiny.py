"""Tiny random HF-format checkpoints (written here) against transformers with the same weights.

Covers what SmolLM2 does not: q/k/v (and o) biases, llama3 and linear RoPE scaling, untied
embeddings, sharded safetensors with an index, and more nodes than KV heads.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from edgeweave.runtime.batch import Row
from edgeweave.runtime.executor import ExecutorInputError, ExecutorStateError
from edgeweave.runtime.llama import LlamaModel
from edgeweave.runtime.tp_executor import TensorParallelExecutor
from edgeweave.runtime.tp_hub import TensorParallelHub
from edgeweave.splitting.checkpoints import CheckpointError, open_checkpoint
from edgeweave.splitting.tensor_parallel import plan_shards, write_shards

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _write(tmp_path_factory, name, model_cls, config, shard_size=None):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases and norms, so a mistake in any of them shows
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            elif param.ndim == 1:
                param.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, max_shard_size=shard_size) if shard_size else model.save_pretrained(folder)
    return model, folder


def _llama(tmp_path_factory):
    config = transformers.LlamaConfig(**COMMON, attention_bias=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    return _write(tmp_path_factory, "llama", transformers.LlamaForCausalLM, config, shard_size="60KB")


def _qwen2(tmp_path_factory):
    config = transformers.Qwen2Config(**COMMON, rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    return _write(tmp_path_factory, "qwen2", transformers.Qwen2ForCausalLM, config)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return (_llama if request.param == "llama" else _qwen2)(tmp_path_factory)


IDS = [5, 17, 3, 88, 42, 9, 61, 2, 30, 77, 14, 50, 23, 8, 91, 36, 4, 70, 19, 55]


def test_reader_and_reference_model_match_transformers(tiny):
    model, folder = tiny
    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    assert cfg.attention_bias and not cfg.tie_word_embeddings and cfg.rope_scaling is not None
    state = model.state_dict()
    assert set(ckpt.names()) == set(state)
    for name in ckpt.names():
        assert torch.equal(ckpt.tensor(name), state[name]), name
    ours = LlamaModel(cfg, ckpt.tensor, set(ckpt.names()))
    with torch.inference_mode():
        theirs = model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours.forward(IDS, ours.new_cache(), 0), theirs, rtol=0, atol=1e-4)
    # decode path (KV cache) agrees with the prefill
    cache = ours.new_cache()
    ours.forward(IDS[:12], cache, 0)
    steps = torch.cat([ours.forward(IDS[i : i + 1], cache, i) for i in range(12, len(IDS))])
    torch.testing.assert_close(steps, theirs[12:], rtol=0, atol=1e-4)
    with torch.inference_mode():
        generated = model.generate(torch.tensor([IDS[:6]]), max_new_tokens=8, do_sample=False)[0, 6:].tolist()
    assert [t for t, _ in ours.generate(IDS[:6], 8, lambda logits: int(logits.argmax()))] == generated


@pytest.mark.parametrize("weights", [[2.0, 1.0], [1.0, 1.0, 1.0]])
def test_sharded_tiny_equals_transformers(tiny, tmp_path, weights):
    """[1, 1, 1] over 2 KV heads leaves one node with MLP columns only."""
    model, folder = tiny
    ckpt = open_checkpoint(folder)
    plan = plan_shards(ckpt.config, weights)
    manifest = write_shards(ckpt, plan, tmp_path)
    config = {"model": manifest.data["config"], "n_layers": ckpt.config.num_layers}
    executors = [TensorParallelExecutor({**config, "rank": r}, manifest.node_files(r)) for r in range(len(weights))]
    hub = TensorParallelHub.from_file(ckpt.config, manifest.coordinator_file)

    def reduce(op, layer, x, position):
        return sum(e.forward(op, layer, position, "s", [x])[0] for e in executors)

    got = torch.cat([hub.forward(IDS[:9], 0, reduce), hub.forward(IDS[9:], 9, reduce)])
    with torch.inference_mode():
        theirs = model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(got, theirs, rtol=0, atol=1e-4)
    if len(weights) == 3:
        assert [e.n_kv_heads for e in executors] == [1, 1, 0]


def _one_rank_executor(tiny, tmp_path) -> TensorParallelExecutor:
    """The whole tiny model as one tensor-parallel rank (attention and MLP ops only, no norms)."""
    _, folder = tiny
    ckpt = open_checkpoint(folder)
    manifest = write_shards(ckpt, plan_shards(ckpt.config, [1.0]), tmp_path)
    return TensorParallelExecutor({"model": manifest.data["config"], "n_layers": 2}, manifest.node_files(0))


def test_executor_rejects_bad_requests(tiny, tmp_path):
    ex = _one_rank_executor(tiny, tmp_path)
    x = torch.randn(3, 64)
    with pytest.raises(ExecutorInputError, match="out of range"):
        ex.forward("attn", 2, 0, "s", [x])
    with pytest.raises(ExecutorInputError, match=r"shape \[tokens, 64\]"):
        ex.forward("attn", 0, 0, "s", [torch.randn(3, 63)])
    with pytest.raises(ExecutorInputError, match="floating-point"):
        ex.forward("mlp", 0, 0, "s", [torch.ones(3, 64, dtype=torch.int64)])
    with pytest.raises(ExecutorInputError, match="not 'dance'"):
        ex.forward("dance", 0, 0, "s", [x])
    ex.forward("attn", 0, 0, "s", [x])
    with pytest.raises(ExecutorStateError, match="3 tokens cached"):
        ex.forward("attn", 0, 5, "s", [x[:1]])
    # truncate rolls the cache back: recomputing the same tokens gives the same output
    ex.forward("truncate", 0, 1, "s", [])
    again = ex.forward("attn", 0, 1, "s", [x[1:]])[0]
    ex.forward("reset", 0, 0, "s", [])
    fresh = ex.forward("attn", 0, 0, "s", [x])[0]
    torch.testing.assert_close(again, fresh[1:], rtol=0, atol=1e-6)
    assert ex.stats()["sessions"] == {"s": 3}


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' is not supported"):
        open_checkpoint(tmp_path)


def test_index_sharded_checkpoint_is_read_lazily(tmp_path_factory):
    _, folder = _llama(tmp_path_factory)
    assert (folder / "model.safetensors.index.json").exists()
    ckpt = open_checkpoint(folder)
    assert len(ckpt.files()) > 1
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(str(ckpt._where[name]), framework="pt") as f:
        assert torch.equal(f.get_tensor(name), ckpt.tensor(name))


def test_whole_model_node_runs_all_layers_with_its_norms(tiny, tmp_path):
    """A 1-node plan ships the norms; op "layers" (norms, biases, residuals on the node) equals
    transformers, prefill then decode, and a partial shard cannot take the norms."""
    model, folder = tiny
    ckpt = open_checkpoint(folder)
    manifest = write_shards(ckpt, plan_shards(ckpt.config, [1.0]), tmp_path / "one")
    files = {name: manifest.path(rel) for name, rel in manifest.shard_files(0).items()}
    assert "norms" in files
    ex = TensorParallelExecutor({"model": manifest.data["config"]}, files)
    assert "layers" in ex.details()["ops"]
    hub = TensorParallelHub.from_file(ckpt.config, manifest.coordinator_file)

    def stack(x, position):
        return ex.forward("layers", 0, position, "s", [x])[0]

    got = torch.cat([hub.forward(IDS[:9], 0, stack=stack), hub.forward(IDS[9:10], 9, stack=stack),
                     hub.forward(IDS[10:], 10, stack=stack)])
    with torch.inference_mode():
        theirs = model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(got, theirs, rtol=0, atol=1e-4)
    torch.testing.assert_close(hub.forward(IDS[:5], 0, stack=lambda x, p: ex.forward("layers", 0, p, "t", [x])[0],
                                           last_only=True), theirs[4:5], rtol=0, atol=1e-4)

    two = write_shards(ckpt, plan_shards(ckpt.config, [1.0, 1.0]), tmp_path / "two")
    assert not any("norms" in rel for rel in two.data["files"])
    partial = {**{n: two.path(r) for n, r in two.shard_files(0).items()}, "norms": files["norms"]}
    with pytest.raises(ExecutorInputError, match="all heads and MLP columns"):
        TensorParallelExecutor({"model": two.data["config"]}, partial)
    without = TensorParallelExecutor({"model": two.data["config"]}, two.node_files(0))
    with pytest.raises(ExecutorInputError, match="all heads and columns of its layers"):
        without.forward("layers", 0, 0, "s", [torch.randn(2, 64)])


def test_pipeline_stages_run_their_layers_and_chain_to_transformers(tiny, tmp_path):
    """A 2-stage pipeline plan: each stage's files are only its layers (plus their norms), its
    executor numbers them from 0, and stage after stage equals transformers, prefill then decode."""
    from edgeweave.splitting import layouts

    model, folder = tiny
    ckpt = open_checkpoint(folder)
    n = ckpt.config.num_layers
    plan = plan_shards(ckpt.config, [1.0, 1.0], partition=layouts.pipeline([1, n - 1]))
    assert plan.plan_id != plan_shards(ckpt.config, [1.0, 1.0]).plan_id
    manifest = write_shards(ckpt, plan, tmp_path)
    assert list(manifest.layers(1)) == list(range(1, n)) and "layer.000" not in manifest.shard_files(1)
    stages = []
    for rank in range(2):
        files = {name: manifest.path(rel) for name, rel in manifest.shard_files(rank).items()}
        held = manifest.layers(rank)
        stages.append(TensorParallelExecutor({"model": manifest.data["config"], "n_layers": len(held),
                                              "first_layer": held.start}, files))
    hub = TensorParallelHub.from_file(ckpt.config, manifest.coordinator_file)

    def stack(x, position):
        for stage in stages:
            x = stage.forward("layers", 0, position, "s", [x])[0]
        return x

    got = torch.cat([hub.forward(IDS[:9], 0, stack=stack), hub.forward(IDS[9:10], 9, stack=stack)])
    with torch.inference_mode():
        theirs = model(torch.tensor([IDS[:10]])).logits[0]
    torch.testing.assert_close(got, theirs, rtol=0, atol=1e-4)
    with pytest.raises(ExecutorInputError, match="first_layer"):
        TensorParallelExecutor({"model": manifest.data["config"], "n_layers": n - 1, "first_layer": 2},
                               manifest.node_files(1))


def test_coordinator_share_drives_like_a_node_and_reports_errors_as_nodes_do(tiny, tmp_path):
    """LocalMember + LocalStream (the coordinator's own share) give the in-process reference's
    logits, and refuse bad requests with the statuses a node would send."""
    import grpc

    from edgeweave.coordinator.client import NodeError
    from edgeweave.coordinator.local_member import LocalMember

    model, folder = tiny
    ckpt = open_checkpoint(folder)
    manifest = write_shards(ckpt, plan_shards(ckpt.config, [1.0, 1.0]), tmp_path)
    config = {"model": manifest.data["config"], "n_layers": ckpt.config.num_layers}
    members = [LocalMember(), LocalMember()]
    digests = [{n: manifest.sha256(rel) for n, rel in manifest.shard_files(r).items()} for r in range(2)]
    with pytest.raises(NodeError) as missing:
        members[0].load("job", "tp_llm", {**config, "rank": 0}, digests[0])
    assert missing.value.code is grpc.StatusCode.FAILED_PRECONDITION
    for member in members:
        member.offer_files({meta["sha256"]: manifest.path(rel) for rel, meta in manifest.data["files"].items()})
    for rank, member in enumerate(members):
        member.load("job", "tp_llm", {**config, "rank": rank}, digests[rank])
    streams = [m.open_stream() for m in members]
    hub = TensorParallelHub.from_file(ckpt.config, manifest.coordinator_file)

    def reduce(op, layer, x, position):
        for s in streams:
            s.send("job", op, [x], layer=layer, position=position, session="s")
        return sum(s.recv()[0][0] for s in streams)

    with torch.inference_mode():
        theirs = model(torch.tensor([IDS[:7]])).logits[0]
    torch.testing.assert_close(hub.forward(IDS[:7], 0, reduce), theirs, rtol=0, atol=1e-4)
    for call, code in ((lambda: streams[0].call("job", "dance", [torch.randn(1, 64)]), grpc.StatusCode.INVALID_ARGUMENT),
                       (lambda: streams[0].call("job", "attn", [torch.randn(1, 64)], position=3, session="s"),
                        grpc.StatusCode.FAILED_PRECONDITION),
                       (lambda: streams[0].call("nope", "attn", [torch.randn(1, 64)]), grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(NodeError) as err:
            call()
        assert err.value.code is code
    assert members[0].job_stats("job")["tokens_computed"] == 7
    for member in members:
        member.close()
        assert member.info().jobs == []


# -- batched steps (continuous batching): rows of several sequences in one hidden state ------------
#: three sequences fed in three steps: a prompt read in two chunks, prompts read whole, decode rows
SEQUENCES = {"a": IDS[:9] + IDS[15:17], "b": IDS[3:14] + IDS[17:19], "c": IDS[5:7] + IDS[10:12]}
STEPS = [{"a": (0, 5), "b": (0, 11), "c": (0, 2)}, {"a": (5, 9), "b": (11, 12), "c": (2, 3)},
         {"a": (9, 10), "b": (12, 13), "c": (3, 4)}, {"a": (10, 11)}]


def _alone(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Every position's logits of each sequence, computed alone in one pass."""
    return {name: model.forward(ids, model.new_cache(), 0) for name, ids in SEQUENCES.items()}


def _batched(run_step) -> list[dict[str, torch.Tensor]]:
    """Run STEPS through `run_step(ids, rows) -> [rows, vocab]`; each step's last-token logits by sequence."""
    out = []
    for step in STEPS:
        rows = [Row(name, start, end - start) for name, (start, end) in step.items()]
        ids = [t for name, (start, end) in step.items() for t in SEQUENCES[name][start:end]]
        logits = run_step(ids, rows)
        out.append({row.session: logits[i] for i, row in enumerate(rows)})
    return out


def _check_batched_equal_alone(batched, alone) -> None:
    for step, got in zip(STEPS, batched, strict=True):
        for name, (_, end) in step.items():
            torch.testing.assert_close(got[name], alone[name][end - 1], rtol=0, atol=1e-4)


def test_batched_rows_equal_each_sequence_alone(tiny, tmp_path):
    """Prefill chunks and decode rows of three sequences in one step give each sequence's own
    logits: in one process, over two tensor-parallel shards, and on a node holding every layer."""
    _, folder = tiny
    ckpt = open_checkpoint(folder)
    model = LlamaModel(ckpt.config, ckpt.tensor, set(ckpt.names()))
    alone = _alone(model)
    caches = {name: model.new_cache() for name in SEQUENCES}
    _check_batched_equal_alone(_batched(lambda ids, rows: model.forward_rows(
        ids, [caches[r.session] for r in rows], [r.position for r in rows], [r.length for r in rows])), alone)

    config = {"model": None, "n_layers": ckpt.config.num_layers}
    for weights in ([2.0, 1.0], [1.0]):
        manifest = write_shards(ckpt, plan_shards(ckpt.config, weights), tmp_path / str(len(weights)))
        config["model"] = manifest.data["config"]
        executors = [TensorParallelExecutor({**config, "rank": r}, {n: manifest.path(rel) for n, rel in
                                                                    manifest.shard_files(r).items()})
                     for r in range(len(weights))]
        hub = TensorParallelHub.from_file(ckpt.config, manifest.coordinator_file)
        if len(weights) == 1:  # the fused path: one message runs every layer for every row
            def step(ids, rows, ex=executors[0], hub=hub):
                return hub.forward_rows(ids, rows, stack=lambda x, rows: ex.forward("layers", 0, 0, "", [x], rows)[0])
        else:
            def step(ids, rows, exs=executors, hub=hub):
                return hub.forward_rows(ids, rows, lambda op, layer, x, rows: sum(
                    e.forward(op, layer, 0, "", [x], rows)[0] for e in exs))
        _check_batched_equal_alone(_batched(step), alone)
        assert executors[0].stats()["sessions"] == {"a": 11, "b": 13, "c": 4}
        executors[0].forward("reset", 0, 0, "", [], [Row("a", 0, 1), Row("c", 0, 1)])
        assert executors[0].stats()["sessions"] == {"b": 13}


def test_executor_refuses_rows_that_do_not_fit(tiny, tmp_path):
    ex = _one_rank_executor(tiny, tmp_path)
    x = torch.randn(3, 64)
    with pytest.raises(ExecutorInputError, match="cover 2 tokens but the hidden state has 3"):
        ex.forward("attn", 0, 0, "", [x], [Row("a", 0, 1), Row("b", 0, 1)])
    with pytest.raises(ExecutorInputError, match="more than one row"):
        ex.forward("attn", 0, 0, "", [x], [Row("a", 0, 1), Row("a", 1, 2)])
    with pytest.raises(ExecutorInputError, match="length >= 1"):
        ex.forward("mlp", 0, 0, "", [x], [Row("a", 0, 3), Row("b", 0, 0)])
    ex.forward("attn", 0, 0, "", [x], [Row("a", 0, 2), Row("b", 0, 1)])
    with pytest.raises(ExecutorStateError, match="session 'b' layer 0 at position 0, but this node has 1"):
        ex.forward("attn", 0, 0, "", [x[:2]], [Row("a", 2, 1), Row("b", 0, 1)])
