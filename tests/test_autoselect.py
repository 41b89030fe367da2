"""BACKEND=auto (serving.autoselect): the fastest agreeing engine per pass shape, cached, and the real thing.

    pytest tests/test_autoselect.py -q      # ~30 s: the last test loads the tiny model at every engine

The choice itself is tested with stub engines whose figures are set by the test (no timing assertions);
the last tests load the tiny model through serving.model.load_engine with BACKEND=auto, as both servers do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import naive_server
from serving import autoselect
from serving.autoselect import AGREEMENT, Machine, candidates, choose
from serving.calibration import CALIBRATION_TEXTS
from serving.model import cpu_flags, load_engine
from serving.settings import Settings, SettingsError
from tests.conftest import serving

AVX2 = frozenset({"avx2", "fma"})
REFERENCE = torch.tensor([[0.3, 0.7]]).repeat(len(CALIBRATION_TEXTS), 1)
# (one_ms, texts/s, max |dP|) per candidate, set by the tests: the stub's "measurements"
FIGURES = {
    ("torch", "fp32"): (10.0, 100.0, 0.0),
    ("onnx", "fp32"): (8.0, 110.0, 1e-6),
    ("onnx", "int8"): (4.0, 300.0, 0.002),
    ("openvino", "fp32"): (3.0, 50.0, 0.02),  # fastest batch of one, but disagrees: dropped
    ("openvino", "int8"): (5.0, 500.0, 0.003),
    ("openvino", "bf16"): (6.0, 700.0, 0.004),
    ("torch", "bf16"): (9.0, 400.0, 0.003),
}


class StubEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings, self.key = settings, (settings.backend, settings.dtype)

    def warmup(self, calibrate: bool = True) -> None:
        pass

    def tokenize(self, texts: object) -> list[list[int]]:
        return [[101, 102] for _ in CALIBRATION_TEXTS]


class Loads:
    """A loader that records which engines it loaded, and fails for the ones it is told to."""

    def __init__(self, failing: tuple[tuple[str, str], ...] = ()) -> None:
        self.loaded: list[tuple[str, str]] = []
        self.failing = failing

    def __call__(self, settings: Settings) -> StubEngine:
        key = (settings.backend, settings.dtype)
        self.loaded.append(key)
        if key in self.failing:
            raise RuntimeError(f"cannot load {key}")
        return StubEngine(settings)


def stub_measure(engine: StubEngine, ids: object) -> tuple[float, float, torch.Tensor]:
    one_ms, texts_s, dp = FIGURES[engine.key]
    return one_ms, texts_s, REFERENCE + torch.tensor([[-dp, dp]])


def machine(tmp_path: Path, flags: frozenset[str] = AVX2, weights: str = "w1") -> Machine:
    return Machine("cpu", flags, weights, tmp_path / "auto")


@pytest.fixture(autouse=True)
def engines_installed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "real" not in request.fixturenames:  # the stub needs none of the packages
        monkeypatch.setattr(autoselect, "_installed", lambda package: True)


def test_candidates_follow_the_cpu_and_dtype() -> None:
    avx2 = candidates(Machine("cpu", AVX2, "w", Path()), "auto")
    assert avx2 == [("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
    amx = candidates(Machine("cpu", AVX2 | {"amx_bf16"}, "w", Path()), "auto")
    assert set(amx) - set(avx2) == {("torch", "bf16"), ("openvino", "bf16")}
    assert candidates(Machine("cpu", AVX2, "w", Path()), "int8") == [("onnx", "int8"), ("openvino", "int8")]
    assert candidates(Machine("cpu", AVX2, "w", Path()), "bf16") == []


def test_the_fastest_agreeing_engine_per_pass_shape(tmp_path: Path) -> None:
    loads = Loads()
    full = choose(Settings(backend="auto"), "pass", loads, machine(tmp_path), stub_measure)
    assert (full.backend, full.dtype, full.cached) == ("openvino", "int8", False)
    one = choose(Settings(backend="auto"), "one", loads, machine(tmp_path), stub_measure)
    # openvino fp32 answers one text fastest, but its 0.02 is outside the agreement: onnx int8
    assert (one.backend, one.dtype, one.cached) == ("onnx", "int8", True)
    dropped = {(t["backend"], t["dtype"]): t["error"] for t in one.describe()["candidates"]}  # type: ignore[union-attr]
    assert dropped[("openvino", "fp32")] == f"max |dP| 0.02 > {AGREEMENT:g} against torch fp32"
    assert sorted(loads.loaded) == sorted(candidates(machine(tmp_path), "auto"))  # each measured once


def test_a_restart_reuses_the_cached_choice_until_the_machine_or_weights_change(tmp_path: Path) -> None:
    first = Loads()
    choose(Settings(backend="auto"), "pass", first, machine(tmp_path), stub_measure)
    again = Loads()
    assert choose(Settings(backend="auto"), "pass", again, machine(tmp_path), stub_measure).cached
    assert again.loaded == []  # no second calibration
    for changed in (machine(tmp_path, AVX2 | {"amx_bf16"}), machine(tmp_path, weights="w2")):
        loads = Loads()
        choice = choose(Settings(backend="auto"), "pass", loads, changed, stub_measure)
        assert not choice.cached and loads.loaded
    amx = choose(Settings(backend="auto"), "pass", Loads(), machine(tmp_path, AVX2 | {"amx_bf16"}), stub_measure)
    assert (amx.backend, amx.dtype) == ("openvino", "bf16")


def test_a_damaged_cache_is_measured_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    choose(Settings(backend="auto"), "pass", Loads(), machine(tmp_path), stub_measure)
    (cached,) = (tmp_path / "auto").glob("*.json")
    cached.write_text(cached.read_text()[:40])
    loads = Loads()
    with caplog.at_level(logging.WARNING, "sentimentalyzer.auto"):
        choice = choose(Settings(backend="auto"), "pass", loads, machine(tmp_path), stub_measure)
    assert not choice.cached and loads.loaded and "unusable" in caplog.text
    assert json.loads(cached.read_text())["timings"]  # rewritten whole


def test_a_fixed_dtype_restricts_the_candidates_and_torch_fp32_is_still_the_reference(tmp_path: Path) -> None:
    loads = Loads()
    choice = choose(Settings(backend="auto", dtype="int8"), "one", loads, machine(tmp_path), stub_measure)
    assert loads.loaded[0] == ("torch", "fp32")  # measured for agreement only
    assert [(t.backend, t.dtype) for t in choice.timings] == [("onnx", "int8"), ("openvino", "int8")]
    assert (choice.backend, choice.dtype) == ("onnx", "int8")


def test_a_candidate_that_fails_to_load_is_reported_not_fatal(tmp_path: Path) -> None:
    loads = Loads(failing=(("openvino", "int8"),))
    choice = choose(Settings(backend="auto"), "pass", loads, machine(tmp_path), stub_measure)
    assert (choice.backend, choice.dtype) == ("onnx", "int8")
    failed = [t for t in choice.timings if (t.backend, t.dtype) == ("openvino", "int8")]
    assert failed[0].error == "RuntimeError: cannot load ('openvino', 'int8')"


def test_nothing_that_agrees_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FIGURES, ("onnx", "int8"), (4.0, 300.0, 0.5))
    monkeypatch.setitem(FIGURES, ("openvino", "int8"), (5.0, 500.0, 0.5))
    with pytest.raises(RuntimeError, match="no candidate can serve"):
        choose(Settings(backend="auto", dtype="int8"), "pass", Loads(), machine(tmp_path), stub_measure)
    assert Settings.from_env({"BACKEND": "auto"}).backend == "auto"
    with pytest.raises(SettingsError, match="BACKEND"):
        Settings.from_env({"BACKEND": "fastest"})


# ------------------------------------------------------------------- the real engines, the tiny model


@pytest.fixture
def real(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SENTIMENTALYZER_CACHE", str(tmp_path))
    return tmp_path


def test_load_engine_measures_once_then_reuses(settings: Settings, real: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = load_engine(settings.replace(backend="auto", dtype="auto"))
    auto = engine.describe()["auto"]
    assert isinstance(auto, dict) and not auto["cached"]
    assert auto["chosen"] == f"{engine.info['backend']} {engine.info['dtype']}"
    measured = {(c["backend"], c["dtype"]) for c in auto["candidates"]}
    assert measured == set(candidates(Machine("cpu", cpu_flags(), "", Path()), "auto"))
    chosen = next(c for c in auto["candidates"] if f"{c['backend']} {c['dtype']}" == auto["chosen"])
    assert chosen["error"] is None and chosen["max_dp"] <= AGREEMENT
    engine.warmup()
    assert [p.label for p in engine.predict(["I loved it", "awful"])]  # it serves

    monkeypatch.setattr(autoselect, "calibrate", lambda *a: pytest.fail("measured again"))
    again = load_engine(settings.replace(backend="auto", dtype="auto")).describe()["auto"]
    assert isinstance(again, dict) and again["cached"] and again["chosen"] == auto["chosen"]


@pytest.mark.anyio
async def test_the_naive_server_names_the_concrete_engine_and_why(settings: Settings, real: Path) -> None:
    async with serving(naive_server.create_app(settings.replace(backend="auto", dtype="fp32"))) as client:
        ready = (await client.get("/ready")).json()
        assert (await client.post("/predict", json={"text": "fine"})).status_code == 200
    assert ready["backend"] in ("torch", "onnx", "openvino") and ready["dtype"] == "fp32"
    assert ready["auto"]["for"] == "a batch of one" and ready["auto"]["chosen"] == f"{ready['backend']} fp32"
