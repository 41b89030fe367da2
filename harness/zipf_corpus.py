"""A duplicate-heavy corpus for the bench: a corpus's texts drawn again and again, Zipf-distributed.

    python -m harness.zipf_corpus --out data/zipf.txt          # data/reviews.txt (mixed), s=1.1, 1000 draws, seed 0
    python -m harness.zipf_corpus --source data/short.txt --s 0.8 --draws 5000 --seed 3 --out /tmp/zipf.txt
    CACHE_BYTES=67108864 python -m harness.bench --corpus data/zipf.txt ...   # what the answer cache saves

The source's texts (one a line, as harness.references.read_corpus reads them) are shuffled with the
seed into a popularity order; each draw is the text of rank k (1 .. n) with probability proportional to
1 / k^s, a finite Zipf law: s = 0 is uniform, larger s puts more of the draws on the first few texts.
The output holds one draw a line, in draw order. Beside it, `<out>.json` records the source, s, draws,
seed, how many distinct texts were drawn and the duplicate share, 1 - unique / draws: the fraction of
lines a cache that kept everything would answer without computing (also printed). Deterministic: the
same source, s, draws and seed give the same file (Python's Mersenne Twister is stable across versions).
Locust picks lines uniformly at random, so requests then repeat texts as the file does: Zipf-skewed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.references import read_corpus

DEFAULT_SOURCE = "data/reviews.txt"


@dataclass(frozen=True)
class ZipfCorpus:
    source: str
    s: float
    draws: int
    seed: int
    texts: tuple[str, ...]

    @property
    def unique(self) -> int:
        return len(set(self.texts))

    @property
    def duplicate_share(self) -> float:
        """1 - unique / draws: the share of lines that repeat an earlier one."""
        return 1 - self.unique / self.draws if self.draws else 0.0

    def describe(self) -> dict[str, object]:
        info = {k: v for k, v in asdict(self).items() if k != "texts"}
        return {**info, "unique": self.unique, "duplicate_share": round(self.duplicate_share, 4)}


def zipf_draws(texts: list[str], s: float, draws: int, seed: int) -> list[str]:
    """`draws` texts, the rank-k text (after a seeded shuffle) with probability proportional to 1/k^s."""
    if not texts:
        raise ValueError("the source corpus is empty")
    if s < 0 or draws < 0:
        raise ValueError(f"s and draws must be >= 0, got s={s}, draws={draws}")
    rng = random.Random(seed)
    ranked = sorted(set(texts))  # a repeated line in the source must not count twice in the law
    rng.shuffle(ranked)
    cumulative = list(itertools.accumulate(1 / k**s for k in range(1, len(ranked) + 1)))
    return rng.choices(ranked, cum_weights=cumulative, k=draws)


def build(source: str, s: float, draws: int, seed: int) -> ZipfCorpus:
    return ZipfCorpus(source, s, draws, seed, tuple(zipf_draws(read_corpus(source), s, draws, seed)))


def write(corpus: ZipfCorpus, out: Path) -> Path:
    """The corpus at `out` and its description at `out` with .json; returns the latter."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{t}\n" for t in corpus.texts), encoding="utf-8")
    meta = out.with_suffix(".json")
    meta.write_text(json.dumps(corpus.describe(), indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="one text a line (default %(default)s)")
    ap.add_argument("--s", type=float, default=1.1, help="the Zipf exponent: 0 uniform (default %(default)s)")
    ap.add_argument("--draws", type=int, default=1000, help="lines to write (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="the corpus to write; its description goes beside")
    a = ap.parse_args(argv)
    try:
        corpus = build(a.source, a.s, a.draws, a.seed)
    except ValueError as exc:
        ap.error(str(exc))
    meta = write(corpus, a.out)
    d = corpus.describe()
    print(
        f"{a.out}: {corpus.draws} draws of {len(set(read_corpus(a.source)))} texts from {a.source} (s={a.s}, "
        f"seed {a.seed}): {d['unique']} unique, duplicate share {d['duplicate_share']:.3f} ({meta})"
    )


if __name__ == "__main__":
    main()
