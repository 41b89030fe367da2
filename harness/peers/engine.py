"""The model every peer serves and the batch function its user would write, shared so that they do the same work.

    from harness.peers.engine import load, classify
    engine = load()                                   # serving.model.load_engine(Settings.from_env())
    classify(engine, ["I loved it", "dull"])          # -> [("POSITIVE", 0.53), ("NEGATIVE", 0.51)]

Loaded the way the project's servers load it (MODEL_ID, DEVICE and DTYPE from the environment, the same
seeded stand-in and tokenizer), but without the project's length grouping: one forward pass per batch,
the tokenizer padding it to its longest text, as in every peer's own examples. Imported only inside a
peer's environment (torch and transformers), never by the bench.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from serving.model import Engine, load_engine
from serving.settings import Settings


def load() -> Engine:
    """The project's engine from the environment; prints what it loaded on one line, which the bench reads
    from the peer's log (harness/peers/process.py) as the project's servers report it on GET /ready."""
    settings = Settings.from_env()
    if settings.backend != "torch":  # the batch function below calls the PyTorch model itself
        raise RuntimeError(f"peers serve PyTorch engines only (BACKEND=torch), not BACKEND={settings.backend}")
    engine = load_engine(settings)
    keep = ("model_id", "model_source", "backend", "device", "dtype", "fallback_reason")
    info = {k: v for k, v in engine.describe().items() if k in keep}  # not the servers' packing: see classify
    info.update(padding="to the batch's longest", torch_threads=torch.get_num_threads())
    print("PEER_ENGINE " + json.dumps(info), flush=True)
    return engine


@torch.inference_mode()
def classify(engine: Engine, texts: Sequence[str]) -> list[tuple[str, float]]:
    """(label, probability of that label) per text, in order: one padded forward pass, texts over 512
    tokens truncated."""
    enc = engine.tokenizer(list(texts), padding=True, truncation=True, max_length=512, return_tensors="pt")
    logits = engine.model(
        input_ids=enc["input_ids"].to(engine.device), attention_mask=enc["attention_mask"].to(engine.device)
    ).logits
    probs = logits.float().softmax(-1).cpu()
    best = probs.argmax(-1).tolist()
    # one line a pass: items, real tokens, computed (padded) tokens; the bench reads them from the peer's
    # log as it reads the servers' batch counters from /metrics (harness/peers/process.py)
    mask = enc["attention_mask"]
    print(f"PEER_BATCH {mask.shape[0]} {int(mask.sum())} {mask.numel()}", flush=True)
    return [(engine.labels[b], float(probs[i, b])) for i, b in enumerate(best)]
