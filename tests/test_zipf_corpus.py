"""The duplicate-heavy corpus generator (harness/zipf_corpus.py): deterministic, Zipf-skewed, honest share.

.venv/bin/python -m pytest tests/test_zipf_corpus.py -q     # a second: no servers, no model
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from harness import zipf_corpus
from harness.references import read_corpus

ROOT = Path(__file__).resolve().parent.parent


def test_the_same_parameters_give_the_same_draws_and_another_seed_others() -> None:
    texts = [f"text {i}" for i in range(50)]
    first = zipf_corpus.zipf_draws(texts, 1.1, 500, seed=7)
    assert first == zipf_corpus.zipf_draws(list(reversed(texts)), 1.1, 500, seed=7)  # source order aside
    assert first != zipf_corpus.zipf_draws(texts, 1.1, 500, seed=8)
    assert len(first) == 500 and set(first) <= set(texts)


def test_the_exponent_skews_the_draws() -> None:
    texts = [f"text {i}" for i in range(100)]
    top_share = {}
    for s in (0.0, 1.0, 2.0):
        counts = Counter(zipf_corpus.zipf_draws(texts, s, 20_000, seed=1))
        top_share[s] = counts.most_common(1)[0][1] / 20_000
    # the rank-1 text's share is 1 / H(100, s): ~0.01 uniform, 1/5.19 at s=1, 1/1.63 at s=2
    assert top_share[0.0] == pytest.approx(0.01, abs=0.005)
    assert top_share[1.0] == pytest.approx(1 / 5.187, abs=0.015)
    assert top_share[2.0] == pytest.approx(1 / 1.635, abs=0.015)


def test_the_duplicate_share_is_one_minus_unique_over_draws(tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("a\nb\nb\nc\n\n", encoding="utf-8")  # a repeated line is one text of the law
    corpus = zipf_corpus.build(str(source), 0.0, 0, seed=0)
    assert corpus.duplicate_share == 0.0 and corpus.texts == ()
    corpus = zipf_corpus.build(str(source), 1.0, 40, seed=0)
    assert corpus.unique == 3 and corpus.duplicate_share == pytest.approx(1 - 3 / 40)
    manual = zipf_corpus.ZipfCorpus("x", 1.0, 4, 0, ("a", "b", "a", "a"))
    assert (manual.unique, manual.duplicate_share) == (2, 0.5)
    with pytest.raises(ValueError):
        zipf_corpus.zipf_draws([], 1.0, 10, 0)


def test_the_command_writes_the_corpus_and_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "z" / "zipf.txt"
    zipf_corpus.main(["--source", str(ROOT / "data" / "short.txt"), "--s", "1.2", "--draws", "300", "--out", str(out)])
    lines = read_corpus(str(out))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert len(lines) == 300 and meta["draws"] == 300 and meta["s"] == 1.2 and meta["seed"] == 0
    assert meta["unique"] == len(set(lines)) and meta["duplicate_share"] == round(1 - len(set(lines)) / 300, 4)
    assert f"duplicate share {meta['duplicate_share']:.3f}" in capsys.readouterr().out


def test_the_committed_corpus_is_what_its_description_regenerates() -> None:
    meta = json.loads((ROOT / "data" / "zipf.json").read_text())
    again = zipf_corpus.build(str(ROOT / meta["source"]), meta["s"], meta["draws"], meta["seed"])
    assert tuple(read_corpus(str(ROOT / "data" / "zipf.txt"))) == again.texts
    assert again.describe() == {**meta, "source": str(ROOT / meta["source"])}
    assert 0.5 < meta["duplicate_share"] < 0.95
