"""The tokenizer every process uses (serving/text.py) and a front end that never imports torch.

pytest -q tests/test_text.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from transformers import AutoTokenizer

from serving.source import Source, standin_tokenizer_dir
from serving.text import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EDGES = ["", " ", "Café naïve résumé", "😀 great!!", "非常好", "[CLS] [SEP] [PAD]", "LOUD and quiet", "x " * 2000]


def _texts() -> list[str]:
    lines = [t for f in ("reviews.txt", "short.txt", "long.txt") for t in (ROOT / "data" / f).read_text().splitlines()]
    return lines + EDGES


def _reference(path: str, texts: list[str]) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(path)
    ids: list[list[int]] = tok(texts, truncation=True, max_length=512, padding=False)["input_ids"]
    return ids


def test_the_tokenizer_cuts_every_text_as_transformers_does(tiny_model_dir: str) -> None:
    texts = _texts()
    ours = load_tokenizer(Source(tiny_model_dir, "local"))
    assert ours.max_length == 512
    assert ours(texts) == _reference(tiny_model_dir, texts)
    assert max(len(ids) for ids in ours(texts)) == 512  # the long texts were cut, with [SEP] kept last
    assert all(ids[0] == 101 and ids[-1] == 102 for ids in ours(texts))


def test_a_model_without_tokenizer_json_is_converted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    shutil.copytree(standin_tokenizer_dir(), model, ignore=shutil.ignore_patterns("tokenizer.json", "*.safetensors"))
    monkeypatch.setenv("SENTIMENTALYZER_CACHE", str(tmp_path / "cache"))
    texts = _texts()
    first = load_tokenizer(Source(str(model), "local"))
    assert first(texts) == _reference(standin_tokenizer_dir(), texts)
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1

    def no_second_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_second_conversion)
    assert load_tokenizer(Source(str(model), "local"))(texts) == first(texts)
    (model / "vocab.txt").write_text((model / "vocab.txt").read_text())  # the model changed: convert again
    with pytest.raises(AssertionError, match="converted again"):
        load_tokenizer(Source(str(model), "local"))


def test_a_front_end_imports_no_torch(tiny_model_dir: str) -> None:
    """The batched server's front ends tokenize and talk to the engine; the model is the engine's."""
    code = (
        "import sys, batched_server\n"
        "from serving.settings import Settings\n"
        "from serving.source import resolve_source\n"
        "from serving.text import load_tokenizer\n"
        f"source = resolve_source(Settings(model_id={tiny_model_dir!r}))\n"
        "assert load_tokenizer(source)(['fine'])[0][0] == 101\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'openvino') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
