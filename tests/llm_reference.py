"""SmolLM2 references shared by the LLM tests, computed once per pytest process.

Loading transformers and the checkpoint dominates these tests' runtime, so each is cached here
(module-level lru_cache: one load however many test files ask).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.splitting.checkpoints import Checkpoint, default_model_path, open_checkpoint

CHAT = [{"role": "user", "content": "Tell me about the history of Paris in a few sentences."}]
N_TOKENS = 32
#: co-located nodes share 2 cores: one torch thread each (separate devices would each have their own)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread: on the 2 shared CI cores, intra-op threads only wait on each other
    (small decode ops get 5-10x slower), and the node processes need the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """A test module that imports this fixture runs its in-process torch work on one thread."""
    with single_torch_thread():
        yield


def local_cluster_fixture(n_nodes: int):
    """A module-scoped fixture: `n_nodes` real node processes on loopback, one thread each."""

    @pytest.fixture(scope="module")
    def cluster() -> Iterator[LocalCluster]:
        with LocalCluster(n_nodes, advertise=False, env=ONE_THREAD) as nodes:
            yield nodes

    return cluster


@lru_cache(maxsize=1)
def smollm() -> Checkpoint:
    return open_checkpoint()


@lru_cache(maxsize=1)
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@lru_cache(maxsize=1)
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@dataclass(frozen=True)
class Reference:
    prompt_ids: list[int]
    tokens: list[int]  # HF greedy continuation
    logits: torch.Tensor  # HF logits [len(prompt) + len(tokens), vocab] of the whole sequence (teacher forced)


@lru_cache(maxsize=1)
def hf_reference() -> Reference:
    """HF transformers' greedy 32 tokens for the chat prompt, and its logits over the whole sequence."""
    tok, model = hf_tokenizer(), hf_model()
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
        tokens = out[0, len(prompt_ids) :].tolist()
        logits = model(out).logits[0].float()
    return Reference(prompt_ids, tokens, logits)


class MemoryCheckpoint(Checkpoint):
    """A checkpoint whose dequantized tensors stay in memory, so several shard writes dequantize once."""

    def __init__(self, inner: Checkpoint) -> None:
        self.inner, self.path, self.config = inner, inner.path, inner.config
        self._cache: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return self.inner.names()

    def _read(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self.inner.tensor(name)
        return self._cache[name]

    def files(self):
        return self.inner.files()

    def source_type(self, name: str) -> str:
        return "F32"  # the tensors are held dequantized: to the shard writer this is a float32 checkpoint

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    @property
    def tokenizer_source(self):
        return self.inner.tokenizer_source

    @property
    def chat_template(self):
        return self.inner.chat_template


@lru_cache(maxsize=1)
def smollm_in_memory() -> MemoryCheckpoint:
    return MemoryCheckpoint(smollm())
