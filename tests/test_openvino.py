"""The OpenVINO engine (serving.openvino_runner): parity with torch fp32, its cache, rebuilds and refusals.

    pytest tests/test_openvino.py -q      # ~30 s: the tiny model is converted at fp32 and int8 once

Tolerances, max abs diff of softmax probabilities against torch fp32: fp32 1e-4 (the contract's), bf16
and int8 2e-2 on the tiny model (32 wide: rounding does not average out as in the 768-wide model, whose
figures harness.engines reports against the contract's 1e-2).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from serving import openvino_runner
from serving.model import cpu_flags, pick_dtype
from serving.openvino_runner import cache_paths, load_openvino_runner

pytest.importorskip("openvino")
pytest.importorskip("nncf")

KEY = "tiny-test-model"
TEXTS = ["ok", "I loved it", "Terrible. Just terrible.", "word " * 600, "a fine, ordinary film " * 5]
NO_BF16 = frozenset({"avx2"})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tok(tiny_model_dir: str):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def batch(tok) -> dict[str, torch.Tensor]:
    return dict(tok(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt"))


@pytest.fixture(scope="module")
def built(tiny, tok, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding the tiny model's ONNX export and its IR at fp32 and int8, built once."""
    cache = tmp_path_factory.mktemp("ov-cache")
    for dtype in ("fp32", "int8"):
        assert load_openvino_runner(tiny, KEY, dtype, tok, cache, NO_BF16).built
    return cache


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "cache"))


def probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits.softmax(-1)


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-4), ("int8", 2e-2)])
def test_parity_with_torch_fp32(tiny, tok, batch, built: Path, dtype: str, tolerance: float) -> None:
    runner = load_openvino_runner(tiny, KEY, dtype, tok, built, NO_BF16)
    assert not runner.built and runner.precision == "f32"  # the module's cache served it
    logits = runner(batch["input_ids"], batch["attention_mask"])
    assert logits.dtype == torch.float32 and logits.shape == (len(TEXTS), 2)
    assert (logits.softmax(-1) - probs(tiny, batch)).abs().max().item() < tolerance


def test_bf16_is_refused_on_a_cpu_without_bf16_instructions(tiny, tok, built: Path) -> None:
    with pytest.raises(ValueError, match="AVX-512 BF16 or AMX"):
        load_openvino_runner(tiny, KEY, "bf16", tok, built, NO_BF16)


@pytest.mark.skipif(not cpu_flags() & openvino_runner.BF16_FLAGS, reason="this CPU has no bf16 instructions")
def test_bf16_and_int8_run_at_bf16_precision_where_the_cpu_has_it(tiny, tok, batch, built: Path) -> None:
    for dtype in ("bf16", "int8"):
        runner = load_openvino_runner(tiny, KEY, dtype, tok, built, cpu_flags())
        assert runner.precision == "bf16"
        logits = runner(batch["input_ids"], batch["attention_mask"])
        assert (logits.softmax(-1) - probs(tiny, batch)).abs().max().item() < 2e-2, dtype


def test_threads_and_precision_are_described(tiny, tok, built: Path) -> None:
    runner = load_openvino_runner(tiny, KEY, "int8", tok, built, NO_BF16, threads=1)
    info = runner.describe()
    assert info["backend"] == "openvino" and info["openvino_threads"] == 1 and info["inference_precision"] == "f32"
    assert info["cache_file"] == str(cache_paths(built / "openvino", KEY, "int8")[0])
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1


@pytest.mark.parametrize("damage", ["weights", "graph", "stale", "unreadable"])
def test_a_damaged_or_stale_cache_is_rebuilt(tiny, tok, batch, cache: Path, damage: str) -> None:
    xml, bin_, meta = cache_paths(cache / "openvino", KEY, "fp32")
    if damage == "weights":
        bin_.write_bytes(b"\0" * bin_.stat().st_size)
    elif damage == "graph":
        xml.write_text("<net>not an IR</net>")
    elif damage == "stale":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "openvino": "0.0.1"}))
    else:
        meta.write_text("{")
    runner = load_openvino_runner(tiny, KEY, "fp32", tok, cache, NO_BF16)
    assert runner.built
    logits = runner(batch["input_ids"], batch["attention_mask"])
    assert (logits.softmax(-1) - probs(tiny, batch)).abs().max().item() < 1e-4
    assert not load_openvino_runner(tiny, KEY, "fp32", tok, cache, NO_BF16).built  # cached again


def test_an_ir_that_passes_its_hash_but_does_not_compile_is_rebuilt(tiny, tok, cache: Path) -> None:
    xml, bin_, meta = cache_paths(cache / "openvino", KEY, "fp32")
    xml.write_text("<net>not an IR</net>")
    record = json.loads(meta.read_text())
    record.update(size=xml.stat().st_size, sha256=openvino_runner.onnx_runner._sha256(xml))
    meta.write_text(json.dumps(record))
    assert load_openvino_runner(tiny, KEY, "fp32", tok, cache, NO_BF16).built


def test_missing_packages_are_named(tiny, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(RuntimeError, match="nncf package"):
        load_openvino_runner(tiny, KEY, "int8", tok, tmp_path, NO_BF16)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeError, match="openvino package: pip install openvino"):
        load_openvino_runner(tiny, KEY, "fp32", tok, tmp_path, NO_BF16)


def test_dtypes_are_checked_per_backend() -> None:
    cpu = torch.device("cpu")
    assert pick_dtype("int8", cpu, "openvino") == "int8"
    with pytest.raises(RuntimeError, match="BACKEND=onnx or BACKEND=openvino"):
        pick_dtype("int8", cpu, "torch")
    with pytest.raises(RuntimeError, match="DEVICE=cpu"):
        pick_dtype("fp32", torch.device("cuda"), "openvino")
    with pytest.raises(RuntimeError, match="supports DTYPE"):
        pick_dtype("fp16", cpu, "openvino")
