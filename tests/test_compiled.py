"""harness/compiled.py's rows, verdicts and report, on the tests' tiny model with no compile at all.

    .venv/bin/python -m pytest tests/test_compiled.py -q     # a few seconds: torch.compile is never called

The "compiled" form here is the eager one (or a build that raises), so every figure the module derives
(dP 0, no graphs, the ratio of the medians, the error row) is known beforehand; the verdict and report
tests run on hand-made results.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

import serving.packed
from harness import compiled
from serving.model import load_engine
from serving.settings import Settings

ARGS = argparse.Namespace(
    short="data/short.txt", mixed="data/reviews.txt", size=3, passes=2, ones=2, rounds=2, budget_s=0.01
)


@pytest.fixture(scope="module")
def tiny_engine(tiny_settings: Settings) -> Any:
    engine = load_engine(tiny_settings)
    engine.warmup(calibrate=False)
    return engine


def test_workloads_have_the_sizes_asked(tiny_engine: Any) -> None:
    shapes = compiled.workloads(tiny_engine.tokenize, ARGS)
    assert list(shapes) == ["short x3", "mixed x3", "one (mixed)"]
    assert [[len(b) for b in bs] for bs in shapes.values()] == [[3, 3], [3, 3], [1, 1]]
    ones = [len(b[0]) for b in shapes["one (mixed)"]]
    assert ones == sorted(ones) and ones[0] < ones[1]  # stratified: shortest first, then a longer one


def test_swapped_restores_even_on_error() -> None:
    with pytest.raises(ValueError), compiled.swapped(serving.packed, "_layer", None):
        assert serving.packed._layer is None
        raise ValueError
    assert callable(serving.packed._layer)


def test_candidate_rows_with_the_eager_form_as_compiled(tiny_engine: Any) -> None:
    shapes = compiled.workloads(tiny_engine.tokenize, ARGS)
    layer = serving.packed._layer
    result = compiled.measure_candidate(tiny_engine, lambda: layer, compiled.packed_on, shapes, ARGS)
    assert set(result["rows"]) == set(shapes)
    for row in result["rows"].values():
        assert row["max_abs_dp"] == 0.0 and row["graphs"] == 0
        assert len(row["eager_rates"]) == len(row["compiled_rates"]) == ARGS.rounds
        assert row["ratio"] == pytest.approx(row["compiled_seq_s"] / row["eager_seq_s"])
        assert row["best_ratio"] == pytest.approx(max(row["compiled_rates"]) / max(row["eager_rates"]))
        assert row["compiled_first_pass_s"] <= row["compiled_passes_s"]
    assert result["compile_s"] == pytest.approx(sum(r["compiled_passes_s"] for r in result["rows"].values()))


def test_a_failed_compile_is_a_recorded_result(tiny_engine: Any) -> None:
    def build() -> Any:
        raise RuntimeError("inductor: no C++ compiler found\nmore lines")

    shapes = compiled.workloads(tiny_engine.tokenize, ARGS)
    result = compiled.measure_candidate(tiny_engine, build, compiled.packed_on, shapes, ARGS)
    assert result["error"].startswith("RuntimeError: inductor: no C++ compiler") and result["rows"] == {}
    assert compiled.verdict(result) == "not kept: the compile failed"


def row(ratio: float, first_s: float = 30.0) -> dict[str, Any]:
    return {
        "eager_seq_s": 40.0,
        "compiled_seq_s": 40.0 * ratio,
        "ratio": ratio,
        "compiled_first_pass_s": first_s,
        "graphs": 3,
        "max_abs_dp": 2.5e-7,
        "best_ratio": ratio + 0.01,
    }


@pytest.mark.parametrize(
    ("ratios", "compile_s", "expected"),
    [
        ((1.10, 0.90), 45.0, "keep: 1.10x eager at a, compiled in 45 s"),
        ((1.04, 0.90), 45.0, "not kept: best 1.04x eager (a)"),  # 5% is the bar, not met
        ((0.80, 1.20), 90.0, "not kept: best 1.20x eager (b), compile 90 s"),  # fast but slow to start
    ],
)
def test_verdict(ratios: tuple[float, float], compile_s: float, expected: str) -> None:
    result = {"compile_s": compile_s, "rows": {"a": row(ratios[0]), "b": row(ratios[1])}}
    assert compiled.verdict(result) == expected


def test_report_rows_and_verdict_lines() -> None:
    meta = {
        "command": "python -m harness.compiled --out x",
        "model_id": "stand-in",
        "torch_threads": 2,
        "versions": {"torch": "2.13.0+cpu"},
        "backend": "inductor",
        "freezing": True,
        "inductor_cache": "fresh",
        "rounds": 2,
        "budget_s": 1.5,
        "git_commit": "abc123",
        "git_dirty": False,
        "cpu": {"model_name": "AMD EPYC", "cores": 2, "flags": ["avx2", "fma"]},
        "cxx": "g++ 12.2.0",
    }
    result = {
        "meta": meta,
        "candidates": {
            "packed": {"compile_s": 81.25, "rows": {"short x16": row(0.5, 61.0)}},
            "padded": {"error": "BackendCompilerFailed: no g++\nstack", "rows": {}},
        },
    }
    md = compiled.report(result)
    assert "| packed | short x16 | 40.0 | 20.0 | 0.50x | 61.0 | 3 | 2.5e-07 | 0.51x |" in md
    assert "- packed: compile (first passes of every shape) 81.2 s; not kept: best 0.50x eager (short x16), " in md
    assert "- padded: not kept: the compile failed (BackendCompilerFailed: no g++)" in md
    assert "CPU: AMD EPYC, 2 cores, flags avx2 fma; C++ compiler: g++ 12.2.0." in md
    assert "| padded |" not in md  # a failed candidate has no figures to show
