"""Tokenizer for a checkpoint: HF tokenizer.json, or rebuilt from a GGUF file's vocabulary.

A GGUF carries its vocabulary, merges, token types and special ids as metadata. We rebuild the
byte-level BPE tokenizer they describe with the `tokenizers` library the way transformers does
(same vocabulary respelling, control tokens as special tokens, the pre-tokenizer split the model
was trained with), so our ids equal transformers' for the same file. Chat templates are rendered
with jinja2 in a sandbox, like transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from edgeweave.splitting.checkpoints import Checkpoint

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: `tokenizer.ggml.pre` -> the regex its merges were learned with; others use GPT-2's ByteLevel regex.
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class TokenizerError(ValueError):
    """A checkpoint whose tokenizer we cannot build; the text says why."""


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def byte_level_from_gguf(metadata: Any) -> FastTokenizer:
    """A byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`), as transformers builds it."""
    model = metadata("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(
            f"GGUF tokenizer type {model!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use the model's Hugging Face folder with tokenizer.json instead"
        )
    tokens: list[str] = list(metadata("tokenizer.ggml.tokens"))
    token_types: list[int] = list(metadata("tokenizer.ggml.token_type") or [])
    merges = [tuple(m.split(" ")) for m in metadata("tokenizer.ggml.merges") or []]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    tokenizer = FastTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _PRE_TOKENIZER_SPLITS.get(metadata("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types, strict=False) if kind == _CONTROL and set(t) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, token_types, strict=False) if kind == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template and stop tokens."""

    def __init__(
        self,
        backend: FastTokenizer,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Tokenizer:
        source = checkpoint.tokenizer_source
        cfg = checkpoint.config
        if source.suffix == ".gguf":
            metadata = checkpoint.metadata  # type: ignore[attr-defined]
            return cls(
                byte_level_from_gguf(metadata),
                checkpoint.chat_template,
                cfg.bos_token_id,
                cfg.eos_token_ids,
                add_bos=bool(metadata("tokenizer.ggml.add_bos_token", False)),
            )
        if not source.exists():
            raise TokenizerError(f"{source} is missing: the checkpoint folder needs a tokenizer.json")
        backend = FastTokenizer.from_file(str(source))
        eos_ids = list(cfg.eos_token_ids)
        settings = _tokenizer_config(source.parent)
        eos_token = _token_text(settings.get("eos_token"))
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos_ids.append(backend.token_to_id(eos_token))
        return cls(
            backend,
            checkpoint.chat_template,
            cfg.bos_token_id,
            tuple(dict.fromkeys(eos_ids)),
            add_bos=bool(settings.get("add_bos_token", False)),
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (special-token strings inside it are recognised, as HF does).

        A tokenizer.json's post-processor adds what the model expects (e.g. Llama 3's BOS); a
        GGUF-built tokenizer has none and adds BOS only when the file asks for it."""
        ids = self.backend.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of `messages`."""
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat template; run without --chat")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._text_of(self.bos_token_id),
            eos_token=self._text_of(self.eos_token_ids[0] if self.eos_token_ids else None),
        )

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template writes its own special tokens; no BOS added)."""
        return self.backend.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 sequences.

    Decoding a window of recent tokens (not each token alone) keeps merges across token
    boundaries right; a delta is released only when it no longer ends in a replacement char.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def feed(self, token_id: int) -> str:
        """The new complete text after adding one token ('' while a character is still incomplete)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end of the stream (possibly with replacement characters)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        text = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


def _raise(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
