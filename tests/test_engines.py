"""Which engine a setting picks, and what each refuses: BACKEND x DTYPE on the tiny model.

    pytest tests/test_engines.py -q

Speed is the benchmark's business (harness/engines.py, harness/bench.py); here: the DTYPE=auto rule
from the CPU's flags, clear errors for combinations no engine runs, /ready naming the engine, the
length ladder and packed passes bounding the shapes a pass can have.
"""

from __future__ import annotations

import pytest
import torch

import batched_server
from serving import model as model_module
from serving.engine import LENGTH_LADDER, ladder_length, pack_chunks, pack_size, pick_pass_tokens
from serving.model import load_engine, pick_dtype
from serving.settings import Settings, SettingsError
from tests.conftest import serving

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "flags, backend, expected",
    [
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}, "torch", "bf16"),  # Sapphire Rapids and later
        ({"avx512f", "avx512_bf16", "avx512_vnni"}, "torch", "fp32"),  # AVX-512 bf16 but no AMX: fp32
        ({"avx2"}, "torch", "fp32"),
        ({"amx_bf16"}, "onnx", "fp32"),  # ONNX Runtime's CPU provider has no bf16 engine
    ],
)
def test_dtype_auto_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], backend: str, expected: str
) -> None:
    monkeypatch.setattr(model_module, "cpu_flags", lambda: frozenset(flags))
    assert pick_dtype("auto", CPU, backend) == expected


def test_dtype_auto_is_fp16_on_cuda() -> None:
    assert pick_dtype("auto", CUDA, "torch") == "fp16"


@pytest.mark.parametrize(
    "dtype, device, backend, message",
    [
        ("int8", CPU, "torch", "BACKEND=onnx"),
        ("int8", CUDA, "onnx", "DEVICE=cpu"),
        ("fp16", CPU, "torch", "no fast CPU path"),
        ("bf16", CPU, "onnx", "BACKEND=torch"),
    ],
)
def test_combinations_no_engine_runs_fail_at_start(
    dtype: str, device: torch.device, backend: str, message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        pick_dtype(dtype, device, backend)


def test_backend_and_packing_are_validated() -> None:
    with pytest.raises(SettingsError, match="BACKEND"):
        Settings.from_env({"BACKEND": "tensorrt"})
    with pytest.raises(SettingsError, match="PACKING"):
        Settings.from_env({"PACKING": "always"})
    assert Settings.from_env({"BACKEND": "onnx", "DTYPE": "int8"}).backend == "onnx"
    for other in ({"BACKEND": "onnx"}, {"BACKEND": "auto"}, {"PACKING": "off"}):
        with pytest.raises(SettingsError, match="TORCH_COMPILE"):
            Settings.from_env({"TORCH_COMPILE": "1", **other})
    assert Settings.from_env({"TORCH_COMPILE": "1", "BACKEND": "torch"}).torch_compile


@pytest.mark.parametrize(
    "changes, packed",
    [
        ({}, True),
        ({"packing": "off"}, False),
        ({"backend": "onnx", "dtype": "int8"}, False),
        ({"backend": "torch", "torch_compile": True}, True),
    ],
)
def test_each_engine_loads_and_says_what_it_is(settings: Settings, changes: dict, packed: bool) -> None:
    engine = load_engine(settings.replace(**changes))
    info = engine.describe()
    assert info["backend"] == changes.get("backend", "torch") and info["packed"] is packed
    assert info["dtype"] == changes.get("dtype", "fp32")
    assert info.get("compiled") == ("inductor" if changes.get("torch_compile") else None)
    [p] = engine.predict(["I loved it"])
    assert p.label in ("POSITIVE", "NEGATIVE") and 0.5 <= p.score <= 1.0
    if changes.get("torch_compile"):  # the compiled pass answers as the eager one does
        [eager] = load_engine(settings.replace(backend="torch")).predict(["I loved it"])
        assert (p.label, p.score) == (eager.label, pytest.approx(eager.score, abs=1e-5))


@pytest.mark.anyio
async def test_ready_names_the_engine(settings: Settings) -> None:
    async with serving(batched_server.create_app(settings.replace(backend="onnx", dtype="int8"))) as c:
        body = (await c.get("/ready")).json()
    assert (body["backend"], body["dtype"], body["packed"]) == ("onnx", "int8", False)
    assert body["onnxruntime"] and body["batching"]["batch_policy"] == "cost"


def test_length_ladder_bounds_the_shapes() -> None:
    assert [ladder_length(n) for n in (1, 8, 9, 100, 511, 512)] == [8, 8, 16, 128, 512, 512]
    # every length a padded pass can have, times every row count, fits oneDNN's default cache (1024)
    assert len(LENGTH_LADDER) * 64 <= 1024 and LENGTH_LADDER[-1] == 512


def test_pack_sizes_are_few_and_waste_little() -> None:
    sizes = [pack_size(n) for n in range(1, 8193)]
    assert all(s >= n for n, s in enumerate(sizes, 1)) and len(set(sizes)) <= 64  # bounded shapes
    assert all(s - n < max(16, n / 8) for n, s in enumerate(sizes, 1))  # little filler
    assert [pack_size(n) for n in (1, 20, 64, 65, 300, 1100)] == [16, 32, 64, 80, 320, 1152]


def test_packed_passes_round_to_the_pack_size_and_count_it(settings: Settings) -> None:
    engine = load_engine(settings)
    ids = engine.tokenize(["I loved it", "dull and far too long, with a plot nobody could follow"])
    probs, computed = engine.forward(ids)
    real = sum(len(x) for x in ids)
    assert probs.shape == (2, 2) and computed == pack_size(real) > real
    unpacked = load_engine(settings.replace(packing="off"))
    assert torch.allclose(probs, unpacked.forward(ids)[0], atol=1e-5)  # the filler changes nothing


def test_pack_chunks_respect_the_token_budget() -> None:
    assert pack_chunks([3, 4, 5, 9, 1], 9) == [[0, 1], [2], [3], [4]]
    assert pack_chunks([20], 9) == [[0]]  # longer than the budget: alone
    assert pack_chunks([], 9) == []


def test_pass_budget_is_the_largest_efficient_pass_that_fits_the_deadline() -> None:
    # seconds per pass: a fixed 50 ms, then 1 ms a token; tokens/s saturates from ~512 on
    times = {t: 0.05 + t / 1000 for t in (64, 128, 256, 512, 1024, 2048, 4096)}
    assert pick_pass_tokens(times, max_pass_s=10.0) == 4096  # every candidate is quick enough
    assert pick_pass_tokens(times, max_pass_s=1.5) == 1024  # 2048 takes 2.1 s
    assert pick_pass_tokens(times, max_pass_s=0.2) == 128  # no efficient pass fits: the largest that does
    assert pick_pass_tokens(times, max_pass_s=0.01) == 64  # none fits: the smallest
