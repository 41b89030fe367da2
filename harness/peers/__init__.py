"""The peer field: other serving frameworks run beside the project's servers, same model, corpus and load.

    python -m harness.peers.envs build                 # each peer's virtual environment, those missing
    python -m harness.bench --peers                    # builds what is missing, then every peer row
    python -m harness.bench --peers --only peer,batched --users 8 --duration 5 --out /tmp/peer-check

Each peer is a small module here, run as `<its venv>/bin/python -m harness.peers.<module> --port N`
from the repository root (so `serving` imports), in a virtual environment of its own under .peers/<name>/
built from requirements-<name>.txt (their pins clash with the project's and with each other's: numpy < 2
for PyTriton, Ray's and BentoML's own web stacks). This file is the registry the bench reads: what
each peer runs, where its Python is, how to tell it is ready, which Locust user class drives it, how
to stop it. Standard library only: the peers' own environments import this package too.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.bench import Config
    from harness.peers.process import PeerProcess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ENVS = ROOT / ".peers"


@dataclass(frozen=True)
class Peer:
    name: str  # the configuration name in summary.csv
    module: str  # python -m <module> --port N
    package: str  # the distribution whose version environment.json records
    ready_path: str  # GET answers 200 once the model is served
    settings: str  # its batching settings, as summary.md states them
    protocol: str = "json"  # locustfile.py --protocol: json (POST /predict), kserve (Triton) or bentoml
    stop_signal: int = signal.SIGINT  # what its own docs use to stop it: Ctrl+C
    stop_group: bool = True  # signal its whole process group (as Ctrl+C in a terminal) or its main process only
    grace_s: float = 30.0  # how long a clean shutdown may take before the session is killed

    @property
    def env_dir(self) -> Path:
        return ENVS / self.name

    @property
    def python(self) -> Path:
        return self.env_dir / "bin" / "python"

    @property
    def requirements_file(self) -> Path:
        return HERE / f"requirements-{self.name}.txt"

    @property
    def locust_args(self) -> tuple[str, ...]:
        return ("--protocol", self.protocol) if self.protocol != "json" else ()

    def probe(self) -> tuple[str, dict[str, Any]]:
        """One request of its protocol (path, JSON body): what the launcher warms it with and tests send."""
        text = "The battery lasts all day and the screen is lovely, but the speakers are thin."
        if self.protocol == "kserve":
            body = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
            return "/v2/models/sentiment/infer", body
        if self.protocol == "bentoml":
            return "/classify", {"texts": [text]}
        return "/predict", {"text": text}


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            "litserve",
            "harness.peers.litserve",
            "litserve",
            "/health",
            "max_batch_size 64, batch_timeout 10 ms, 1 worker",
        ),
        Peer(
            "triton",
            "harness.peers.triton",
            "nvidia-pytriton",
            "/v2/models/sentiment/ready",
            "dynamic batcher, max_batch_size 64, max_queue_delay 2 ms, 1 instance",
            protocol="kserve",
        ),
        Peer(
            "ray-serve",
            "harness.peers.ray_serve",
            "ray",
            "/health",
            "@serve.batch max_batch_size 64, batch_wait_timeout_s 0.01, max_ongoing_requests 64, 1 replica",
            # its main process shuts Serve and then Ray down; SIGINT to the group would kill Ray's
            # processes under it first
            stop_group=False,
        ),
        Peer(
            "bentoml",
            "harness.peers.bentoml_peer",
            "bentoml",
            "/readyz",
            "adaptive batching, max_batch_size 64, max_latency_ms 60000 (default), 1 worker",
            protocol="bentoml",  # its batchable API, called with a list of one text
            stop_group=False,  # its supervisor stops its worker, which runs in a session of its own
        ),
    )
}


def peer_configs(
    users: tuple[int, ...],
    duration_s: float,
    names: Iterable[str] | None = None,
    env: Mapping[str, str] | None = None,
    suffix: str = "",
) -> list[Config]:
    """The bench's configurations for the peers (all of them, or `names`), in registry order.

    env and suffix make rows at another engine, e.g. env={"DTYPE": "bf16"}, suffix="-torch-bf16": each
    peer loads the model through serving.model.load_engine, so DTYPE (and DEVICE) mean what they mean
    for the servers, and summary.md compares "triton-torch-bf16" with "batched-torch-bf16"."""
    from harness.bench import Config  # the bench imports this module: import it back only when called

    wanted = set(PEERS) if names is None else set(names)
    return [
        Config(
            p.name + suffix,
            "peer",
            p.module,
            users,
            duration_s,
            dict(env or {}),
            ready_path=p.ready_path,
            locust_args=p.locust_args,
        )
        for p in PEERS.values()
        if p.name in wanted
    ]


def peer_of(config_name: str) -> Peer:
    """The peer a configuration runs: its name, or its name and an engine suffix ("ray-serve-torch-bf16")."""
    for name in sorted(PEERS, key=len, reverse=True):
        if config_name == name or config_name.startswith(name + "-"):
            return PEERS[name]
    raise KeyError(f"no peer runs configuration {config_name!r}; peers: {', '.join(PEERS)}")


def reference_of(config_name: str) -> str:
    """The project's row a peer's row is compared with: the batched server on the same engine."""
    return "batched" + config_name[len(peer_of(config_name).name) :]


def site_packages(peer: Peer) -> Path | None:
    return next(iter(sorted(peer.env_dir.glob("lib/python*/site-packages"))), None)


def version(peer: Peer) -> str | None:
    """The installed version of the peer's package in its environment, read without starting it."""
    sp = site_packages(peer)
    if sp is None:
        return None
    dist = next(iter(metadata.distributions(name=peer.package, path=[str(sp)])), None)
    return dist.version if dist is not None else None


def describe(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """What environment.json records per peer: package and version, settings, environment state."""
    from harness.peers.envs import problem

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        peer = peer_of(name)
        out[name] = {
            "package": peer.package,
            "version": version(peer),
            "settings": peer.settings,
            "protocol": peer.protocol,
            "python": str(peer.python.relative_to(ROOT)),
            "environment_problem": problem(peer),
        }
    return out


def prepare(names: Iterable[str]) -> dict[str, str]:
    """Builds the missing or outdated environments of `names`; {name: why it could not be built}."""
    from harness.peers.envs import build_missing

    return build_missing(list({peer_of(n).name: peer_of(n) for n in names}.values()))


def launch(name: str, log: Path, env: Mapping[str, str]) -> PeerProcess:
    """Starts one peer on a free port (not yet ready). A peer whose environment is missing starts a
    process that prints why and exits, so the bench reports it like any peer that failed to start."""
    from harness.peers.process import PeerProcess

    return PeerProcess.launch(peer_of(name), log, env, name)
