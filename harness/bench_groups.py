"""The bench's protocol and cache groups: their configurations, and the columns only they need.

    python -m harness.bench --protocols --only protocol --corpus data/short.txt --out results/cpu-avx2-protocols
    python -m harness.bench --protocols --only protocol --tiny-model --out /tmp/protocols-tiny  # the transport shows
    python -m harness.bench --cache --only cache --out results/cpu-avx2-cache   # the HTTP ceiling comes along
    python -m harness.bench --cache --only cache --cache-corpus /tmp/dup.txt --cache-bytes 16000000

--protocols: one batched server (the run's engine), started with GRPC_PORT on a free port, three rows on
it at 1 and the top user count: proto-json (POST /predict, SentimentUser), proto-v2-http (POST
/v2/models/sentiment/infer, KServeUser) and proto-grpc (ModelInfer, harness/grpc_user.py, raw stubs). wrk
posts the json and v2 bodies beside Locust at --wrk-users; gRPC has no wrk row (wrk speaks HTTP/1.1 only).

--cache: the batched server with CACHE_BYTES=0 against CACHE_BYTES=--cache-bytes, on a duplicate-heavy
corpus (--cache-corpus, default data/zipf.txt: `python -m harness.zipf_corpus --out data/zipf.txt`), drawn
at random as every row is, and on a corpus of distinct texts (--cache-unique-corpus, default
data/reviews.txt) with every request's text numbered (locustfile's --unique-texts; wrk's likewise), so
that nothing repeats however often its few hundred lines come round. Each row has a fresh server of its
own: no row reads answers another cached. Every row records its corpus and the corpus's duplicate share
(1 - distinct lines / lines); cache rows also the shares of texts the server's counters
(sentimentalyzer_cache_{hits,misses,coalesced}_total) say were hits and coalesced, over the measured run
alone, for Locust and for wrk. A server without those counters exposes none: its shares stay blank and
the report reads them as 0. harness/groups_report.py writes both groups' summary.md sections.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.launch import ROOT
from harness.references import read_corpus

if TYPE_CHECKING:
    from harness.bench import Config, Profile

PROTOCOL_ROWS = (  # row name, Locust's arguments for it
    ("proto-json", ()),
    ("proto-v2-http", ("--protocol", "kserve")),
    ("proto-grpc", ("--protocol", "grpc", "--grpc-client", "raw")),
)
CACHE_HITS, CACHE_MISSES, CACHE_COALESCED = (
    f"sentimentalyzer_cache_{kind}_total" for kind in ("hits", "misses", "coalesced")
)
COLUMNS = (  # summary.csv columns these groups add (corpus and its share on every row)
    "corpus",
    "corpus_duplicate_share",
    "unique_texts",
    "cache_bytes",
    "cache_hit_share",
    "cache_coalesced_share",
    "wrk_cache_hit_share",
)


@dataclass(frozen=True)
class CacheRun:
    """--cache's settings: the two corpora and the bound of the cache that is on."""

    dup_corpus: str = "data/zipf.txt"
    unique_corpus: str = "data/reviews.txt"
    cache_bytes: int = 64_000_000


def protocol_configs(p: Profile) -> list[Config]:
    """One server with GRPC_PORT, its three protocol rows at 1 user and at the top user count."""
    from harness.bench import Config  # the bench imports this module: import it back only when called

    users = tuple(sorted({1, max(p.users)}))
    rows = tuple(
        Config(name, "protocol", "batched_server:app", users, p.duration_s, locust_args=args, grpc=True)
        for name, args in PROTOCOL_ROWS
    )
    return [Config("batched-protocols", "protocol", "batched_server:app", users, p.duration_s, grpc=True, rows=rows)]


def cache_configs(p: Profile, run: CacheRun) -> list[Config]:
    """Off then on, per corpus, each its own server at the top user count."""
    from harness.bench import Config

    top = (max(p.users),)
    cfgs = []
    for kind, corpus, args in (("dup", run.dup_corpus, ()), ("unique", run.unique_corpus, ("--unique-texts",))):
        for state, size in (("off", 0), ("on", run.cache_bytes)):
            env = {"CACHE_BYTES": str(size)}
            name = f"batched-cache-{state}-{kind}"
            cfgs.append(
                Config(name, "cache", "batched_server:app", top, p.duration_s, env, corpus=corpus, locust_args=args)
            )
    return cfgs


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The bench's --protocols and --cache, and the cache rows' settings."""
    ap.add_argument(
        "--protocols",
        action="store_true",
        help="add the protocol rows: one batched server with GRPC_PORT, POST /predict, the v2 protocol over "
        "HTTP and over gRPC, at 1 and the top user count",
    )
    ap.add_argument(
        "--cache",
        action="store_true",
        help="add the cache rows: CACHE_BYTES=0 against --cache-bytes on --cache-corpus and on "
        "--cache-unique-corpus (every text numbered), each its own server (--only cache brings the HTTP ceiling)",
    )
    defaults = CacheRun()
    ap.add_argument("--cache-corpus", default=defaults.dup_corpus, help="duplicate-heavy corpus (default %(default)s)")
    ap.add_argument(
        "--cache-unique-corpus", default=defaults.unique_corpus, help="distinct texts (default %(default)s)"
    )
    ap.add_argument(
        "--cache-bytes", type=int, default=defaults.cache_bytes, help="CACHE_BYTES when on (default %(default)s)"
    )


@cache
def corpus_stats(path: str) -> dict[str, Any]:
    """Lines (as Locust and wrk read them: stripped, blanks dropped), distinct lines, duplicate share."""
    texts = read_corpus(str(ROOT / path))
    unique = len(set(texts))
    return {"lines": len(texts), "unique": unique, "duplicate_share": 1 - unique / len(texts) if texts else None}


def cache_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Hits and coalesced answers over every text the cache saw between two scrapes; blank without counters."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (CACHE_HITS, CACHE_MISSES, CACHE_COALESCED)}
    seen = sum(delta.values())
    if seen <= 0 or min(delta.values()) < 0:  # no counters (cache off, or not in this server), or a restart
        return {"cache_hit_share": None, "cache_coalesced_share": None}
    return {"cache_hit_share": delta[CACHE_HITS] / seen, "cache_coalesced_share": delta[CACHE_COALESCED] / seen}


def row_columns(cfg: Config, corpus: str) -> dict[str, Any]:
    """The row's corpus, its duplicate share, and the settings that tell a cache row from another."""
    return {
        "corpus": corpus,
        "corpus_duplicate_share": corpus_stats(corpus)["duplicate_share"],
        "unique_texts": "--unique-texts" in cfg.locust_args,
        "cache_bytes": int(cfg.env["CACHE_BYTES"]) if "CACHE_BYTES" in cfg.env else None,
    }


def protocol(cfg: Config) -> str:
    """The Locust --protocol a configuration's rows use (json unless it says otherwise)."""
    args = list(cfg.locust_args)
    return args[args.index("--protocol") + 1] if "--protocol" in args else "json"


def wrk_protocol(cfg: Config) -> str | None:
    """The body wrk posts beside a row ("json" or "v2"), or None where wrk can not send Locust's load."""
    return {"json": "json", "kserve": "v2"}.get(protocol(cfg))


def describe(cfgs: list[Config], run_corpus: str) -> dict[str, Any]:
    """environment.json's record of every configuration and row: server settings, load, corpus."""
    out: dict[str, Any] = {}
    for c in cfgs:
        for r in (c, *c.rows):
            out[r.name] = {
                "group": r.group,
                "target": r.target,
                "env": dict(r.env),
                "grpc_port": "free port" if r.grpc else None,
                "locust_args": list(r.locust_args),
                "corpus": r.corpus or run_corpus,
                "users": list(r.users),
                **({"rows": [x.name for x in c.rows]} if r is c and c.rows else {}),
            }
    return out


def corpora(cfgs: list[Config], run_corpus: str) -> dict[str, Any]:
    """Every corpus the run reads, with its lines, distinct lines and duplicate share."""
    paths = dict.fromkeys([run_corpus, *(r.corpus for c in cfgs for r in (c, *c.rows) if r.corpus)])
    return {path: corpus_stats(path) for path in paths if path and Path(ROOT / path).is_file()}
