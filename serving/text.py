"""Texts in, answers out: the tokenizer every process uses, and the Prediction each text gets.

    tokenize = load_tokenizer(source)        # serving/source.py; torch-free
    ids = tokenize(["I loved it", "dull"])   # [[101, 1045, 3866, 2009, 102], [101, 10634, 102]]

One implementation for the naive server, the batched server's front ends and its engine: the
model's own fast tokenizer (tokenizer.json, run by the `tokenizers` library, which transformers
wraps), truncated to what the model takes, special tokens added, no padding. A model that ships no
tokenizer.json has one converted by transformers once and kept in the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from serving.source import Source, cache_dir, model_file


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    score: float
    batch_size: int = 1  # items that shared the forward pass
    tokenize_ms: float = 0.0  # the tokenization of the call (or of the request, batched server)
    infer_ms: float = 0.0  # this item's forward pass
    queue_ms: float = 0.0  # time queued before its batch started (batched server)
    cache: str = ""  # batched server with CACHE_BYTES (serving/cache.py): miss, hit or coalesced; "" = no cache


class TextTokenizer:
    """Texts to token ids, truncated to what the model takes (512 for DistilBERT); thread-safe."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        tokenizer.enable_truncation(max_length)
        tokenizer.no_padding()
        # Rust tokenizers raise "Already borrowed" if two threads use one at the same moment.
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        with self._lock:
            return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]


def _json(path: Path | None) -> dict[str, object]:
    return json.loads(path.read_text()) if path is not None else {}


def _fingerprint(source: Source) -> str:
    """Names what the conversion was made from: the hub snapshot, or the directory's files as they are."""
    folder = (model_file(source, "config.json") or Path(source.path) / "config.json").parent
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _converted(source: Source) -> Path:
    target = cache_dir() / "tokenizers" / f"{_fingerprint(source)}.json"
    if not target.is_file():
        from transformers import AutoTokenizer  # imports torch: once, for a model without tokenizer.json

        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".building-")
        os.close(fd)
        AutoTokenizer.from_pretrained(source.path).backend_tokenizer.save(tmp)
        os.replace(tmp, target)  # atomic: front ends starting together may all convert, one wins
    return target


def load_tokenizer(source: Source) -> TextTokenizer:
    """The model's tokenizer, truncating at min(model_max_length, max_position_embeddings)."""
    path = model_file(source, "tokenizer.json") or _converted(source)
    limits = [
        _json(model_file(source, "tokenizer_config.json")).get("model_max_length"),
        _json(model_file(source, "config.json")).get("max_position_embeddings"),
    ]
    max_length = min((int(v) for v in limits if isinstance(v, int | float)), default=512)
    return TextTokenizer(Tokenizer.from_file(str(path)), max_length)
