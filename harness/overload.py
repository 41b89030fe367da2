"""Flood and soak runs for the reliability figures (issue 5): push a server past capacity and watch it.

    python -m harness.overload --out results/overload                 # batched, then naive: 8x capacity for 60 s
    python -m harness.overload --seconds 15 --out results/_scratch/overload          # a short check
    python -m harness.overload --soak --seconds 600 --load 0.7 --out results/soak    # 70 % of capacity, 10 min
    MODEL_ID=stand-in python -m harness.overload --only batched --factor 4           # settings come from the env

Each server is `uvicorn <module>:app` on 127.0.0.1 (a free port) with the environment's settings, plus
MAX_QUEUE=64 and REQUEST_TIMEOUT_MS=2000 for the flood (server defaults for the soak). First the
batched server's capacity is measured closed-loop (MAX_BATCH_SIZE clients back to back); then an
open-loop generator (seeded Poisson arrivals, bounded by --seconds and --max-in-flight) sends
factor x capacity requests a second whatever the answers. It records every answer's status and
latency, the Retry-After of each 503, the server's RSS and queue depth every second, then how long
the queue takes to drain and the server to answer normally again, and from the server's metrics the
flood's forward passes and how far admission's predictions were off (answer time over prediction,
sentimentalyzer_admission_prediction_ratio). The naive server gets the same
flood, to document how it fails. The generator shares the machine's cores with the server: its
own CPU time is recorded. Writes summary.md, summary.json (figures + environment) and server logs.

After a flood the last request queued waits for everything ahead of it: recovery takes about
MAX_QUEUE / capacity + one batch, and so does the p99 of the 200s (REQUEST_TIMEOUT_MS bounds queue
time only). On 2 CPU cores with the stand-in, MAX_BATCH_SIZE=16 and --max-queue 16 meet every check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.launch import ROOT, Process, environ
from harness.references import command_line, cpu_info, git_state, read_corpus, versions

ALLOWED = {200, 503, 504}  # the batched server's whole vocabulary under overload


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    # nearest rank: the smallest value with at least q % of the values at or below it (q * n first,
    # in exact integer-valued arithmetic where q is whole: 0.29 * 100 is 28.999... in floating point)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s) / 100) - 1))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# ------------------------------------------------------------------------------------------- servers


def start_server(module: str, env: dict[str, str], out: Path) -> tuple[Process, dict[str, Any]]:
    """`uvicorn module:app` on a free 127.0.0.1 port, ready; its /ready body says what it serves."""
    # keys and rate limits would turn the flood into 401s and 429s
    proc = Process.uvicorn(
        f"{module}:app", out / f"{module}.log", environ(env, drop=("API_KEYS", "RATE_LIMIT", "REDIS_URL"))
    )
    try:
        return proc, proc.wait_ready(timeout_s=180)  # the stand-in is built on first use
    except RuntimeError as exc:
        proc.stop()
        raise SystemExit(f"{module}: {exc}; see {proc.log}") from None


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in ("sentimentalyzer_requests_total", "sentimentalyzer_dropped_total"):
                out[s.name.split("_")[1] + ":" + ",".join(f"{v}" for v in s.labels.values())] = s.value
            elif s.name in ("sentimentalyzer_compute_seconds_sum", "sentimentalyzer_compute_seconds_count"):
                out["passes:" + s.name.rsplit("_", 1)[1]] = s.value  # the forward passes, to size "one pass"
            elif s.name == "sentimentalyzer_admission_prediction_ratio_bucket":
                out[f"admission:{float(s.labels['le']):g}"] = s.value  # cumulative, by upper bound
    return out


# ------------------------------------------------------------------------------------------- traffic


class Connections:
    """Keep-alive HTTP/1.1 to one 127.0.0.1 port, as lean as asyncio allows: at 300 requests a second
    httpx took a whole core of the two, and its own lag showed up as the server's latency."""

    def __init__(self, port: int, timeout_s: float) -> None:
        self.port, self.timeout_s = port, timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body); a timeout or error closes the connection, as a client that gives up does."""
        while self.idle:
            # uvicorn closes connections idle for 5 s: on a reused one, an EOF before any byte, or a
            # reset (the close crossed our request), means just that; a pooled client retries it
            try:
                return await self._post(*self.idle.pop(), body)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
            except (ConnectionResetError, BrokenPipeError):
                continue
        return await self._post(*await asyncio.open_connection("127.0.0.1", self.port), body)

    async def _post(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
    ) -> tuple[int, str | None, bytes]:
        try:
            writer.write(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            async with asyncio.timeout(self.timeout_s):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
                answer = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection") == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(head[9:12]), headers.get("retry-after"), answer

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


Answer = tuple[float, float, int | str, str | None, float | None]


async def send(conns: Connections, body: bytes, t0: float) -> Answer:
    """(sent at, latency, status or error name, Retry-After, the server's own latency of a 200): the
    last, from the answer's latency_ms, splits a 200's time into the handler's and the rest (the
    event loops' lag on both sides, the sockets)."""
    sent = time.perf_counter()
    try:
        status, retry_after, answer = await conns.post(body)
    except Exception as exc:
        return sent - t0, time.perf_counter() - sent, type(exc).__name__, None, None
    latency = time.perf_counter() - sent
    server_s = json.loads(answer)["latency_ms"] / 1000 if status == 200 else None
    return sent - t0, latency, status, retry_after, server_s


def bodies(texts: list[str]) -> list[bytes]:
    return [json.dumps({"text": t}).encode() for t in texts]


async def closed_loop(port: int, texts: list[bytes], clients: int, seconds: float) -> float:
    """Answers a second with `clients` callers back to back: the capacity the flood is a multiple of."""
    conns, ok, stop = Connections(port, 60), 0, time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal ok
        while time.perf_counter() < stop:
            answer = await send(conns, texts[i % len(texts)], 0)
            ok += answer[2] == 200  # not `ok += await ...`: that reads ok before the await
            i += clients

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(clients)))
    conns.close()
    return ok / (time.perf_counter() - started)


async def open_loop(
    port: int,
    texts: list[bytes],
    rate: float,
    seconds: float,
    max_in_flight: int,
    seed: int,
    t0: float,
    has_queue: bool,
) -> dict[str, Any]:
    """Poisson arrivals at `rate` for `seconds`, never waiting on answers; over max_in_flight = not sent."""
    rng, results, not_sent, tasks = random.Random(seed), [], 0, set()
    conns, due = Connections(port, 30), 0.0
    while (due := due + rng.expovariate(rate)) < seconds:
        if (wait := due - (time.perf_counter() - t0)) > 0:
            await asyncio.sleep(wait)  # behind schedule: send at once, keeping the offered rate
        if len(tasks) >= max_in_flight:
            not_sent += 1
            continue
        task = asyncio.create_task(send(conns, rng.choice(texts), t0))
        tasks.add(task)
        task.add_done_callback(lambda t: (tasks.discard(t), results.append(t.result())))
    ended = time.perf_counter() - t0
    recovery = await recover(port, has_queue)
    await asyncio.gather(*tasks)
    conns.close()
    return {"results": results, "not_sent": not_sent, "ended_s": round(ended, 2), **recovery}


async def recover(port: int, has_queue: bool, limit_s: float = 120.0) -> dict[str, Any]:
    """From the flood's end: when the queue is empty, and when 3 probes in a row are 200 within 1 s."""
    started, conns = time.perf_counter(), Connections(port, 5)
    streak: list[float] = []
    probes: list[tuple[float, float, int | str]] = []
    drain = asyncio.create_task(drained_after(port, started)) if has_queue else None
    while time.perf_counter() - started < limit_s and len(streak) < 3:
        at, latency, status, _, _ = await send(conns, b'{"text": "Is it back to normal?"}', started)
        probes.append((round(at, 3), round(latency * 1000, 1), status))
        streak = streak + [at + latency] if status == 200 and latency < 1.0 else []
        await asyncio.sleep(0.02)
    conns.close()
    return {
        "drained_s": await drain if drain else None,
        "recovered_s": streak[0] if len(streak) == 3 else None,
        "probe_counts": dict(Counter(str(p[2]) for p in probes)),
        "probes": probes[:50],
    }


async def drained_after(port: int, started: float, limit_s: float = 120.0) -> float | None:
    """Seconds from `started` until /ready shows an empty queue (polled every 20 ms)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
        while time.perf_counter() - started < limit_s:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if (await c.get("/ready")).json().get("queue_depth") == 0:
                    return round(time.perf_counter() - started, 3)
            await asyncio.sleep(0.02)
    return None


async def watch(pid: int, url: str, t0: float, samples: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """Every second: server RSS (with children), its CPU, queue depth."""
    proc = psutil.Process(pid)
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while not stop.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                depth = (await c.get("/ready")).json().get("queue_depth")
            except (psutil.Error, httpx.HTTPError, ValueError):
                depth = None
            samples.append(
                {
                    "t": round(time.perf_counter() - t0, 1),
                    "queue_depth": depth,
                    "rss_mb": round(sum(p.memory_info().rss for p in procs) / 2**20, 1),
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


# ------------------------------------------------------------------------------------------ analysis


def admission_accuracy(served: dict[str, float]) -> dict[str, Any] | None:
    """How far admission's predictions were off, from the server's histogram of time to answer over
    the prediction (requests admitted behind a queue): the bucket bounds that hold the median and
    the 90th percentile, and the share answered later than predicted."""
    buckets = sorted((float(k.split(":", 1)[1]), v) for k, v in served.items() if k.startswith("admission:"))
    count = buckets[-1][1] if buckets else 0
    if not count:
        return None

    def at_most(q: float) -> float:  # the smallest bucket bound holding q of them (inf: above the last)
        return next(bound for bound, n in buckets if n >= q * count)

    on_time = max((n for bound, n in buckets if bound <= 1.0), default=0.0)  # cumulative: the last bound <= 1
    return {
        "admitted_behind_a_queue": int(count),
        "later_than_predicted_pct": round(100 * (1 - on_time / count), 1),
        "ratio_p50_at_most": at_most(0.5),
        "ratio_p90_at_most": at_most(0.9),
    }


def summarize(
    run: dict[str, Any], samples: list[dict[str, Any]], seconds: float, served: dict[str, float]
) -> dict[str, Any]:
    results = run.pop("results")
    statuses = Counter(str(r[2]) for r in results)
    lat = {k: [r[1] for r in results if str(r[2]) == k] for k in statuses}
    retry = [int(r[3]) for r in results if r[2] == 503 and r[3] and r[3].isdigit()]
    inside = [r[4] for r in results if r[2] == 200 and r[4] is not None]
    rss = [s["rss_mb"] for s in samples if s["t"] <= seconds]
    third = max(1, len(rss) // 3)
    # Loses nothing: every answer the server counted for /predict reached a client, flood or probe.
    client = statuses + Counter(run["probe_counts"])
    server = {k.rsplit(",", 1)[1]: int(v) for k, v in served.items() if k.startswith("requests:/predict,")}
    passes = int(served.get("passes:count", 0))
    return {
        "admission": admission_accuracy(served),
        "sent": len(results),
        "not_sent_client_cap": run.pop("not_sent"),
        "status_counts": dict(statuses),
        "only_200_503_504": set(statuses) <= {str(s) for s in ALLOWED},
        "ok_per_s": round(statuses.get("200", 0) / seconds, 1),
        "latency_ms": {k: {"p50": ms(pct(v, 50)), "p99": ms(pct(v, 99)), "max": ms(max(v))} for k, v in lat.items()},
        "server_latency_ms_200": {"p50": ms(pct(inside, 50)), "p99": ms(pct(inside, 99))} if inside else None,
        "passes": passes,
        "pass_ms_mean": ms(served["passes:sum"] / passes) if passes else None,
        "retry_after_counts": dict(sorted(Counter(retry).items())),
        "retry_after_median": pct(retry, 50),
        "answered_s": round(max((r[0] + r[1] for r in results), default=0) - run["ended_s"], 2),
        "server_minus_client": {k: server.get(k, 0) - client.get(k, 0) for k in set(server) | set(client)},
        "rss_mb": {
            "first_third_max": max(rss[:third], default=None),
            "last_third_max": max(rss[-third:], default=None),
            "peak": max(rss, default=None),
        },
        **run,
    }


def soak_windows(results: list[tuple], samples: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    width = 60.0 if seconds >= 180 else seconds / 6  # short runs still show a trend
    out = []
    for w in range(math.ceil(seconds / width - 1e-9)):  # the last window may be shorter, never dropped
        lo, hi = w * width, (w + 1) * width
        ok = [r[1] for r in results if lo <= r[0] < hi and r[2] == 200]
        bad = sum(1 for r in results if lo <= r[0] < hi and r[2] != 200)
        rss = [s["rss_mb"] for s in samples if lo <= s["t"] < hi]
        out.append(
            {
                "from_s": round(lo),
                "requests": len(ok) + bad,
                "failures": bad,
                "p50_ms": ms(pct(ok, 50)),
                "p99_ms": ms(pct(ok, 99)),
                "rss_mb": max(rss, default=None),
            }
        )
    return out


def environment(args: argparse.Namespace, servers: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "args": vars(args),
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "versions": versions("torch", "transformers", "fastapi", "uvicorn", "httpx", "psutil"),
        **git_state(),
        "servers": servers,
    }


# ---------------------------------------------------------------------------------------------- runs


async def flood(url: str, pid: int, has_queue: bool, texts: list[bytes], rate: float, a: argparse.Namespace) -> dict:
    samples: list[dict[str, Any]] = []
    stop, t0 = asyncio.Event(), time.perf_counter()
    watcher = asyncio.create_task(watch(pid, url, t0, samples, stop))
    before, cpu0 = scrape(url), psutil.Process().cpu_times()
    port = int(url.rsplit(":", 1)[1])
    run = await open_loop(port, texts, rate, a.seconds, a.max_in_flight, a.seed, t0, has_queue)
    cpu1 = psutil.Process().cpu_times()
    stop.set()
    await watcher
    after = scrape(url)
    results, served = run["results"], {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    out = (
        summarize(run, samples, a.seconds, served)
        if not a.soak
        else {
            "windows": soak_windows(results, samples, a.seconds),
            "sent": len(results),
            "failures": sum(r[2] != 200 for r in results),
            **{k: v for k, v in run.items() if k != "results"},
        }
    )
    out["server_counters_delta"] = served
    out["generator_cpu_s"] = round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 1)
    out["samples"] = samples
    return out


async def one_server(
    module: str, env: dict[str, str], texts: list[bytes], a: argparse.Namespace, out: Path, rate: float | None
) -> dict[str, Any]:
    proc, ready = start_server(module, env, out)
    url = proc.url
    try:
        clients = int(env.get("MAX_BATCH_SIZE", os.environ.get("MAX_BATCH_SIZE", "64")))
        port = int(url.rsplit(":", 1)[1])
        await closed_loop(port, texts, clients, 2)  # warm-up, unrecorded
        capacity = a.capacity or await closed_loop(port, texts, clients, a.capacity_seconds)
        target = rate if rate is not None else capacity * (a.load if a.soak else a.factor)
        print(f"{module}: capacity {capacity:.1f}/s, offering {target:.1f}/s for {a.seconds:.0f} s", flush=True)
        result = await flood(url, proc.popen.pid, "queue_depth" in ready, texts, target, a)
        return {
            "ready": ready,
            "settings": env,
            "capacity_per_s": round(capacity, 1),
            "target_per_s": round(target, 1),
            **result,
        }
    finally:
        proc.stop()


def verdicts(r: dict[str, Any], soak: bool, timeout_ms: float | None) -> dict[str, bool]:
    if soak:
        w = [x for x in r["windows"] if x["p99_ms"] is not None]
        p99s = sorted(x["p99_ms"] for x in w)
        return {
            "zero failures": r["failures"] == 0 and r["not_sent"] == 0,
            "p99 flat (every window <= 1.5x the median window)": bool(p99s) and p99s[-1] <= 1.5 * p99s[len(p99s) // 2],
            "memory flat (RSS of the last window within 2 % of the first)": bool(w)
            and w[0]["rss_mb"] is not None
            and w[-1]["rss_mb"] is not None
            and abs(w[-1]["rss_mb"] - w[0]["rss_mb"]) <= 0.02 * w[0]["rss_mb"],
        }
    lat, rss, retry = r["latency_ms"], r["rss_mb"], r["retry_after_median"]
    counts = r["status_counts"]
    answered = sum(counts.get(k, 0) for k in ("200", "503", "504"))
    return {
        "only 200, 503 and 504": r["only_200_503_504"],
        "at most 1 % of answers are 504 (refused at the door instead)": answered > 0
        and counts.get("504", 0) <= 0.01 * answered,
        "503s at once (median < 50 ms)": "503" in lat and lat["503"]["p50"] < 50,
        "every answer the server counted reached a client": not any(r["server_minus_client"].values()),
        "503s in milliseconds (p99 < 50 ms)": "503" in lat and lat["503"]["p99"] < 50,
        "Retry-After tracks the drain (median within 1 s of the last flood answer)": retry is not None
        and abs(retry - r["answered_s"]) <= 1,
        "p99 of 200s under REQUEST_TIMEOUT_MS": "200" in lat
        and timeout_ms is not None
        and lat["200"]["p99"] < timeout_ms,
        "p99 of 200s within REQUEST_TIMEOUT_MS + one pass (the flood's mean pass)": "200" in lat
        and timeout_ms is not None
        and r.get("pass_ms_mean") is not None
        and lat["200"]["p99"] <= timeout_ms + r["pass_ms_mean"],
        "normal answers within 1 s of the flood's end": r["recovered_s"] is not None and r["recovered_s"] <= 1.0,
        "memory flat (last third <= first third + 5 %)": rss["first_third_max"] is not None
        and rss["last_third_max"] <= 1.05 * rss["first_third_max"],
    }


def _accuracy(a: dict[str, Any] | None) -> str:
    if a is None:
        return "none predicted"
    return (
        f"p50 <= {a['ratio_p50_at_most']:g}, p90 <= {a['ratio_p90_at_most']:g} (histogram bounds); "
        f"{a['later_than_predicted_pct']}% of {a['admitted_behind_a_queue']} later than predicted"
    )


def _p50_p99(v: dict[str, float | None] | None) -> str:
    return "none" if v is None else f"p50 {v['p50']}, p99 {v['p99']}"


def markdown(summary: dict[str, Any]) -> str:
    env, lines = summary["environment"], []
    cpu = env["cpu"]
    lines += [
        f"# {'Soak' if summary['soak'] else 'Overload'} run, {env['date']}",
        "",
        f"`{env['command']}` at git {env['git_commit'][:10]}{' (dirty)' if env['git_dirty'] else ''}; "
        f"{cpu['model_name']} ({cpu['cores']} cores, {' '.join(cpu['flags'])}); Python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        "",
    ]
    for name, r in summary["servers"].items():
        ready = r["ready"]
        lines += [
            f"## {name}",
            "",
            f"Model {ready.get('model_id')} ({ready.get('model_source')}, "
            f"{ready.get('device')}, "
            f"{ready.get('dtype')}); settings {r['settings']}; batching {ready.get('batching')}.",
            "",
            f"Capacity (closed loop) {r['capacity_per_s']}/s; offered {r['target_per_s']}/s "
            f"for {summary['seconds']:.0f} s; the generator used {r['generator_cpu_s']} s of CPU.",
            "",
        ]
        if summary["soak"]:
            lines += ["| from (s) | requests | failures | p50 (ms) | p99 (ms) | RSS (MB) |", "|---" * 6 + "|"]
            lines += [
                "| "
                + " | ".join(str(w[k]) for k in ("from_s", "requests", "failures", "p50_ms", "p99_ms", "rss_mb"))
                + " |"
                for w in r["windows"]
            ]
        else:
            lines += [
                "| figure | value |",
                "|---|---|",
                f"| sent / not sent (client cap of {summary['args']['max_in_flight']} in flight) | "
                f"{r['sent']} / {r['not_sent_client_cap']} |",
                f"| answers by status | {r['status_counts']} |",
                f"| 200s per second | {r['ok_per_s']} |",
                *(
                    f"| latency of {k} (ms) | p50 {v['p50']}, p99 {v['p99']}, max {v['max']} |"
                    for k, v in sorted(r["latency_ms"].items())
                ),
                f"| of that, inside the server's handler, for 200 (ms) | {_p50_p99(r['server_latency_ms_200'])} |",
                f"| forward passes during the flood: count, mean (ms) | {r['passes']}, {r['pass_ms_mean']} |",
                f"| admitted behind a queue: answer time / admission's prediction | {_accuracy(r['admission'])} |",
                f"| Retry-After values (count) | {r['retry_after_counts']} |",
                f"| Retry-After median (s) | {r['retry_after_median']} |",
                f"| after the flood's end (s): queue empty, last flood answer | {r['drained_s']}, {r['answered_s']} |",
                f"| normal answers again after (s) | {r['recovered_s'] and round(r['recovered_s'], 2)} |",
                f"| RSS MB: first third max, last third max, peak | {r['rss_mb']['first_third_max']}, "
                f"{r['rss_mb']['last_third_max']}, {r['rss_mb']['peak']} |",
                f"| server counters (delta) | {r['server_counters_delta']} |",
                f"| /predict answers counted by the server but not received | {r['server_minus_client']} |",
            ]
        if "verdicts" in r:
            lines += ["", *(f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in r["verdicts"].items())]
        lines.append("")
    return "\n".join(lines)


def run(coro: Any) -> Any:
    """uvloop when installed (it is, with uvicorn[standard]): the generator's own overhead, halved."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="default results/_scratch/overload (or soak)")
    p.add_argument("--seconds", type=float, default=60.0, help="flood or soak duration")
    p.add_argument("--factor", type=float, default=8.0, help="flood rate as a multiple of capacity")
    p.add_argument("--soak", action="store_true", help="steady load at --load x capacity instead of a flood")
    p.add_argument("--load", type=float, default=0.7, help="soak rate as a fraction of capacity")
    p.add_argument("--only", default=None, help="batched,naive (flood default) or batched (soak default)")
    p.add_argument("--max-queue", type=int, default=None, help="flood default 64; soak: the server's default")
    p.add_argument("--timeout-ms", type=float, default=None, help="flood default 2000; soak: the server's default")
    p.add_argument("--capacity", type=float, default=None, help="requests/s; skips the closed-loop measurement")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--max-in-flight", type=int, default=1024, help="client-side bound on open requests")
    p.add_argument("--corpus", default=str(ROOT / "data" / "reviews.txt"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.out = a.out or ROOT / "results" / "_scratch" / ("soak" if a.soak else "overload")
    a.only = (a.only or ("batched" if a.soak else "batched,naive")).split(",")
    if not a.soak:
        a.max_queue, a.timeout_ms = a.max_queue or 64, a.timeout_ms or 2000.0
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    texts = bodies(read_corpus(a.corpus))
    env = {k: str(v) for k, v in (("MAX_QUEUE", a.max_queue), ("REQUEST_TIMEOUT_MS", a.timeout_ms)) if v is not None}
    servers: dict[str, Any] = {}
    if "batched" in a.only:
        servers["batched"] = run(one_server("batched_server", env, texts, a, a.out, None))
        timeout_ms = a.timeout_ms or servers["batched"]["ready"]["batching"]["request_timeout_ms"]
        servers["batched"]["verdicts"] = verdicts(servers["batched"], a.soak, timeout_ms)
    if "naive" in a.only:  # the same absolute flood: what the batched server was offered
        rate = servers["batched"]["target_per_s"] if servers else None
        servers["naive"] = run(one_server("naive_server", {"NAIVE_MODE": "threadpool"}, texts, a, a.out, rate))
    summary = {
        "soak": a.soak,
        "seconds": a.seconds,
        "args": {k: str(v) for k, v in vars(a).items()},
        "environment": environment(a, {k: v["ready"] for k, v in servers.items()}),
        "servers": servers,
    }
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (a.out / "summary.md").write_text(markdown(summary))
    print((a.out / "summary.md").read_text())
    return 0 if all(servers.get("batched", {}).get("verdicts", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
