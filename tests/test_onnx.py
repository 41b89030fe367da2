"""The ONNX Runtime engine (serving.onnx_runner): parity with torch, the export cache, its rebuilds, errors.

    pytest tests/test_onnx.py -q      # ~1 min: the tiny model is exported twice (once cached, once rebuilt)

Tolerances, max abs diff of softmax probabilities against torch fp32: fp32 1e-4 (the contract's; ~1e-7
measured). int8 2e-2 on the tiny model: its layers are 32 wide, so one per-tensor scale per weight and
per activation rounds each dot product over 32 terms only, and the error does not average out as in
the 768-wide model (0.009 measured here; the stand-in measures 0.004 over the corpus in harness/engines.py,
inside the contract's 1e-2).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from serving import onnx_runner
from serving.onnx_runner import cache_paths, load_onnx_runner, require_onnxruntime

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CPU = torch.device("cpu")
KEY = "tiny-test-model"
TEXTS = ["ok", "I loved it", "Terrible. Just terrible.", "word " * 600, "a fine, ordinary film " * 5]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def batch(tiny_model_dir: str) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return dict(tok(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt"))


@pytest.fixture(scope="module")
def built(tiny: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the tiny model in fp32 and int8, exported once for the whole module."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    for dtype in ("fp32", "int8"):
        assert load_onnx_runner(tiny, KEY, dtype, CPU, cache).built
    return cache


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built cache, for tests that damage it."""
    return Path(shutil.copytree(built, tmp_path / "cache"))


def torch_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-4), ("int8", 2e-2)])
def test_parity_with_torch_fp32(tiny, batch, built: Path, dtype: str, tolerance: float) -> None:
    runner = load_onnx_runner(tiny, KEY, dtype, CPU, built)
    logits = runner(batch["input_ids"], batch["attention_mask"])
    assert logits.dtype == torch.float32 and logits.shape == (len(TEXTS), 2) and logits.device == CPU
    diff = (logits.softmax(-1) - torch_probs(tiny, batch)).abs().max().item()
    assert diff <= tolerance
    if dtype == "int8":
        assert diff > 1e-6  # it really is quantized
        import onnx

        ops = {node.op_type for node in onnx.load(str(runner.path)).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops


def test_dynamic_batch_and_sequence_axes(tiny, built: Path) -> None:
    runner = load_onnx_runner(tiny, KEY, "fp32", CPU, built)
    for n, length in ((1, 1), (3, 17), (2, 512)):
        ids = torch.randint(1000, 30000, (n, length))
        mask = torch.ones_like(ids)
        mask[0, length // 2 + 1 :] = 0  # padding in the first row
        want = torch_probs(tiny, {"input_ids": ids, "attention_mask": mask})
        assert (runner(ids, mask).softmax(-1) - want).abs().max().item() <= 1e-4


def test_second_load_does_not_export(tiny, built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, meta = cache_paths(built, KEY, "fp32")
    before = (path.stat().st_mtime_ns, meta.stat().st_mtime_ns)

    def no_export(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runner, "export_fp32", no_export)
    monkeypatch.setattr(onnx_runner, "quantize_int8", no_export)
    for dtype in ("fp32", "int8"):
        runner = load_onnx_runner(tiny, KEY, dtype, CPU, built)
        assert not runner.built
    assert (path.stat().st_mtime_ns, meta.stat().st_mtime_ns) == before
    info = runner.describe()
    assert info["backend"] == "onnx" and info["providers"] == ["CPUExecutionProvider"]
    assert info["onnxruntime"] and info["cache_file"] == str(cache_paths(built, KEY, "int8")[0])


def test_corrupt_file_is_rebuilt(tiny, batch, cache: Path) -> None:
    path, _ = cache_paths(cache, KEY, "fp32")
    path.write_bytes(b"not an onnx model" * 100)
    runner = load_onnx_runner(tiny, KEY, "fp32", CPU, cache)
    assert runner.built
    assert (
        runner(batch["input_ids"], batch["attention_mask"]).softmax(-1) - torch_probs(tiny, batch)
    ).abs().max() < 1e-4
    assert not load_onnx_runner(tiny, KEY, "fp32", CPU, cache).built  # and cached again


def test_file_onnxruntime_cannot_open_is_rebuilt(tiny, batch, cache: Path) -> None:
    """Garbage whose recorded hash matches: only session creation can tell, and it must not crash."""
    path, meta_path = cache_paths(cache, KEY, "int8")
    path.write_bytes(b"\x08\x07garbage" * 50)
    meta = json.loads(meta_path.read_text())
    meta.update(size=path.stat().st_size, sha256=onnx_runner._sha256(path))
    meta_path.write_text(json.dumps(meta))
    runner = load_onnx_runner(tiny, KEY, "int8", CPU, cache)
    assert runner.built
    assert runner(batch["input_ids"], batch["attention_mask"]).shape == (len(TEXTS), 2)


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: {**meta, "onnxruntime": "0.0.1"},  # another onnxruntime built it
        lambda meta: {**meta, "torch": "1.0"},
        lambda meta: {**meta, "cache_key": "another model"},
        lambda meta: "{ truncated",
        None,  # sidecar missing
    ],
    ids=["onnxruntime-version", "torch-version", "cache-key", "unreadable", "missing"],
)
def test_stale_or_missing_metadata_is_rebuilt(tiny, cache: Path, damage) -> None:
    path, meta_path = cache_paths(cache, KEY, "int8")
    if damage is None:
        meta_path.unlink()
    else:
        changed = damage(json.loads(meta_path.read_text()))
        meta_path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    assert load_onnx_runner(tiny, KEY, "int8", CPU, cache).built
    assert json.loads(meta_path.read_text()) == {
        **onnx_runner.build_metadata(KEY, "int8"),
        "size": path.stat().st_size,
        "sha256": onnx_runner._sha256(path),
    }


def test_missing_onnxruntime_fails_naming_the_package(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(RuntimeError, match="pip install onnxruntime"):
        require_onnxruntime()
    with pytest.raises(RuntimeError, match="onnxruntime package"):
        load_onnx_runner(tiny, KEY, "fp32", CPU, tmp_path)
    assert not any(tmp_path.iterdir())  # failed before exporting anything


def test_unsupported_combinations_fail_clearly(tiny, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        load_onnx_runner(tiny, KEY, "fp16", CPU, tmp_path)
    with pytest.raises(ValueError, match="not 'bf16'"):
        load_onnx_runner(tiny, KEY, "bf16", CPU, tmp_path)
    with pytest.raises(ValueError, match="int8 is CPU"):
        load_onnx_runner(tiny, KEY, "int8", torch.device("cuda"), tmp_path)
    if "CUDAExecutionProvider" not in require_onnxruntime().get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            load_onnx_runner(tiny, KEY, "fp32", torch.device("cuda"), tmp_path)


def test_fp16_conversion_keeps_float32_inputs_and_outputs(tiny, batch, tmp_path: Path) -> None:
    """fp16 serves on CUDA only; its conversion is checked here, on the CPU provider's fp16 kernels."""
    import onnxruntime

    onnx_runner.export_fp32(tiny, tmp_path / "fp32.onnx")
    onnx_runner.convert_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)"] * 2
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    feeds = {name: batch[name].numpy() for name in ("input_ids", "attention_mask")}
    probs = torch.from_numpy(session.run(None, feeds)[0]).softmax(-1)
    assert (probs - torch_probs(tiny, batch)).abs().max().item() <= 1e-2


def test_export_needs_the_fp32_model(tiny_model_dir: str, tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval().bfloat16()
    with pytest.raises(ValueError, match="fp32"):
        load_onnx_runner(model, "bf16-model", "fp32", CPU, tmp_path)
    assert not list(tmp_path.glob("*.onnx"))  # no half-written file left under the real name
