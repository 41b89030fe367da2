"""Settings for both servers, read from the environment (names and defaults: ../shared/SPEC.md).

    from serving.settings import Settings
    s = Settings.from_env()                  # os.environ, validated
    s = Settings(max_batch_size=8)           # tests build their own

One frozen dataclass, validated on creation, so a bad value fails at start with a message that
names the variable instead of surfacing as a strange error under load.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL_ID = "distilbert-base-uncased-finetuned-sst-2-english"
NAIVE_MODES = ("threadpool", "blocking", "on-demand")
DTYPES = ("auto", "fp32", "fp16", "bf16", "int8")
BACKENDS = ("torch", "onnx", "openvino", "auto")
PACKINGS = ("auto", "off")
BATCH_POLICIES = ("cost", "tokens", "pad")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNIT_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    model_id: str = DEFAULT_MODEL_ID
    model_fallback: bool = True
    device: str = "auto"
    backend: str = "torch"
    dtype: str = "auto"
    max_text_chars: int = 10_000
    max_batch_items: int = 64
    naive_mode: str = "threadpool"
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 2048
    request_timeout_ms: float = 10_000.0
    # Not in the spec (README "Configuration"): how a taken batch becomes forward passes. PACKING=auto
    # runs PyTorch DistilBERT padding-free; padded engines split a batch by BATCH_POLICY.
    packing: str = "auto"
    batch_policy: str = "cost"
    max_batch_tokens: int = 0  # tokens a pass may hold; 0 = calibrated at warm-up (8192 for BATCH_POLICY=tokens)
    max_queue_tokens: int = 262_144  # queued tokens beyond this are refused with 503, like MAX_QUEUE items
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    rate_limit: str | None = None
    redis_url: str | None = field(default=None, repr=False)
    log_format: str = "text"
    grpc_port: int = 0  # unset (0): no gRPC; set, the Open Inference Protocol over gRPC on this port too
    cache_bytes: int = 0  # batched server: the answer cache's LRU bound; 0 = off
    cache_ttl_s: float = 3600.0  # with REDIS_URL: how long answers are shared through Redis
    # The batched server's engine process (README "Configuration"; not in the spec's table).
    engine_socket: str = ""  # its IPC socket path; "" = one per server (all its workers share it)
    engine_threads: int = 0  # the model's intra-op threads; 0 = chosen per engine from the core count
    engine_cpus: str = ""  # the cores it runs on, e.g. "1-3" or "0,2"; "" = chosen with the threads
    engine_stall_s: float = 120.0  # a pass computing longer than this is a stalled engine: restarted
    engine_factory: str = ""  # "module:function(settings, source) -> Engine"; "" = serving.model.load_engine
    torch_compile: bool = False  # BACKEND=torch, packed: each layer through torch.compile (~30 s more warm-up)

    def __post_init__(self) -> None:
        _check(bool(self.model_id.strip()), "MODEL_ID", "must not be empty")
        _check(
            self.device == "auto" or self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
            "DEVICE",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _check(self.dtype in DTYPES, "DTYPE", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.backend in BACKENDS, "BACKEND", f"must be one of {BACKENDS}, got {self.backend!r}")
        _check(self.packing in PACKINGS, "PACKING", f"must be one of {PACKINGS}, got {self.packing!r}")
        _check(self.naive_mode in NAIVE_MODES, "NAIVE_MODE", f"must be one of {NAIVE_MODES}, got {self.naive_mode!r}")
        _check(
            self.batch_policy in BATCH_POLICIES,
            "BATCH_POLICY",
            f"must be one of {BATCH_POLICIES}, got {self.batch_policy!r}",
        )
        _check(self.log_format in ("text", "json"), "LOG_FORMAT", f"must be text or json, got {self.log_format!r}")
        for name, value in (
            ("MAX_TEXT_CHARS", self.max_text_chars),
            ("MAX_BATCH_ITEMS", self.max_batch_items),
            ("MAX_BATCH_SIZE", self.max_batch_size),
            ("MAX_QUEUE", self.max_queue),
            ("MAX_QUEUE_TOKENS", self.max_queue_tokens),
        ):
            _check(value >= 1, name, f"must be >= 1, got {value}")
        _check(
            self.max_batch_tokens >= 0, "MAX_BATCH_TOKENS", f"must be >= 0 (0: calibrated), got {self.max_batch_tokens}"
        )
        _check(self.engine_threads >= 0, "ENGINE_THREADS", f"must be >= 0 (0: auto), got {self.engine_threads}")
        _check(self.engine_stall_s > 0, "ENGINE_STALL_S", f"must be > 0, got {self.engine_stall_s}")
        _check(
            not self.engine_factory or re.fullmatch(r"[\w.]+:\w+", self.engine_factory) is not None,
            "ENGINE_FACTORY",
            f"must look like package.module:function, got {self.engine_factory!r}",
        )
        _check(
            not self.torch_compile or (self.backend == "torch" and self.packing != "off"),
            "TORCH_COMPILE",
            f"compiles the packed PyTorch pass: needs BACKEND=torch, PACKING=auto; got {self.backend}, {self.packing}",
        )
        try:
            parse_cpus(self.engine_cpus)
        except ValueError as exc:
            raise SettingsError(f"ENGINE_CPUS: {exc}") from None
        _check(0 <= self.grpc_port <= 65535, "GRPC_PORT", f"must be a port (1-65535), got {self.grpc_port}")
        _check(self.cache_bytes >= 0, "CACHE_BYTES", f"must be >= 0 (0: off), got {self.cache_bytes}")
        _check(self.cache_ttl_s > 0, "CACHE_TTL_S", f"must be > 0, got {self.cache_ttl_s}")
        _check(self.max_wait_ms >= 0, "MAX_WAIT_MS", f"must be >= 0, got {self.max_wait_ms}")
        _check(self.request_timeout_ms > 0, "REQUEST_TIMEOUT_MS", f"must be > 0, got {self.request_timeout_ms}")
        _check(all(k.strip() for k in self.api_keys), "API_KEYS", "must not contain empty keys")
        if self.rate_limit is not None:
            _check(
                _RATE.match(self.rate_limit) is not None,
                "RATE_LIMIT",
                f"must look like 50/s or 600/minute, got {self.rate_limit!r}",
            )

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def request_timeout_s(self) -> float:
        return self.request_timeout_ms / 1000.0

    @property
    def rate_limit_per_window(self) -> tuple[int, int] | None:
        """RATE_LIMIT as (requests, window_s), or None when unset."""
        if self.rate_limit is None:
            return None
        m = _RATE.match(self.rate_limit)
        assert m is not None  # validated in __post_init__
        return int(m.group(1)), _RATE_UNIT_S[m.group(2)]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            kwargs[f.name] = _parse(f.name.upper(), f.type, raw.strip())
        return cls(**kwargs)  # type: ignore[arg-type]


def parse_cpus(spec: str) -> tuple[int, ...]:
    """A CPU list as Linux writes it ("0-2,5") as sorted core numbers; "" is ()."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or int(last or first) < int(first):
            raise ValueError(f"cannot read {part!r} as a core or a range of cores like 1-3")
        cpus.update(range(int(first), int(last or first) + 1))
    return tuple(sorted(cpus))


def _parse(name: str, type_: object, raw: str) -> object:
    t = str(type_)
    try:
        if t == "bool":
            if raw.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t.startswith("tuple"):
            return tuple(k.strip() for k in raw.split(",") if k.strip())
    except ValueError:
        raise SettingsError(f"{name}: cannot read {raw!r} as {t}") from None
    return raw


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SettingsError(f"{name}: {message}")
