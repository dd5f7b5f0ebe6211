"""Flower's side of ``scripts/bench_rounds.py``: flwr 1.42.0 in its own venv, deployment mode on loopback.

:func:`ensure_flower` installs ``flwr==1.42.0`` into ``<cache>/flwr-1.42.0`` (never into the project's
environment). flwr 1.42.0 pins a ``certifi`` newer than the package index serves, so its declared
requirements are installed with that pin dropped, then the flwr wheel with ``--no-deps``.

:func:`run` starts ``flower-superlink --insecure`` and N ``flower-supernode --insecure`` processes (their
default transport in 1.42: HTTP with protobuf bodies; each SuperNode polls the SuperLink), submits
``benchmarks/flower_app`` with ``flwr run`` through a SuperLink connection written to a private
``FLWR_HOME``, and waits for the ServerApp's JSON of per-round seconds. Server memory is the summed RSS
of the SuperLink and everything it starts (the SuperExec and the ServerApp), sampled every 10 ms.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from rss import RssSampler, descendants

FLWR_VERSION = "1.42.0"
APP_DIR = Path(__file__).resolve().parent / "flower_app"


def _run(cmd: list[str], **kwargs) -> str:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def ensure_flower(cache: Path, log=print) -> Path:
    """The ``bin`` folder of a venv holding flwr 1.42.0 (created on first use)."""
    venv = cache / f"flwr-{FLWR_VERSION}"
    bin_dir = venv / "bin"
    marker = venv / ".installed"
    if marker.exists():
        return bin_dir
    log(f"installing flwr=={FLWR_VERSION} into {venv} (once)")
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    pip = [str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = venv / "wheels"
    _run([*pip, "download", "--no-deps", "-d", str(wheels), f"flwr=={FLWR_VERSION}"])
    wheel = next(wheels.glob(f"flwr-{FLWR_VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"flwr-{FLWR_VERSION}.dist-info/METADATA").decode()
    requirements = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            requirement = line.split(":", 1)[1].strip()
            requirements.append("certifi" if requirement.startswith("certifi") else requirement)
    _run([*pip, "install", *requirements])
    _run([*pip, "install", "--no-deps", str(wheel)])
    version = _run([str(bin_dir / "flwr"), "--version"]).strip()
    if FLWR_VERSION not in version:
        raise RuntimeError(f"installed flwr reports {version!r}, expected {FLWR_VERSION}")
    marker.write_text(version)
    return bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _stop_trees(roots: list[subprocess.Popen]) -> None:
    """SIGTERM every process of these trees (SuperExecs are started detached), then SIGKILL what is left."""
    pids = [pid for proc in roots for pid in descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in roots:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(params: int, nodes: int, rounds: int, workdir: Path, bin_dir: Path, timeout: float = 3600.0):
    """One Flower run; returns a :class:`fedstream_rounds.Measurement`."""
    from fedstream_rounds import Measurement

    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = workdir / "flower-result.json"
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        handle = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed below
        logs.append(handle)
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        superlink = start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                        "--port", str(port), "--disable-runtime-dependency-installation"])
        _wait_port(port, 60)
        for i in range(nodes):
            start(f"supernode{i}", [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{port}", "--port", str(_free_port()),
                                    "--node-config", f"partition-id={i}"])
        sampler = RssSampler([superlink.pid]).start()
        time.sleep(8)  # SuperNodes register and the processes settle
        idle = sampler.reset()
        config = f"num-params={params} num-nodes={nodes} num-rounds={rounds} out-file='{out}'"
        _run([str(bin_dir / "flwr"), "run", str(APP_DIR), "bench", "--run-config", config], env=env, cwd=workdir)
        deadline = time.monotonic() + timeout
        while not out.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flower run did not finish in {timeout} s; see {workdir}/*.log")
            if superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {superlink.returncode}; see {workdir}")
            time.sleep(0.2)
        time.sleep(0.3)  # the file is written in one call; let it be complete
        peak = sampler.stop()
        result = json.loads(out.read_text())
    finally:
        _stop_trees(procs)
        for handle in logs:
            handle.close()
    # command lines are "<venv>/bin/python <venv>/bin/<program> ...": keep the program names
    names = sorted({Path(words[1]).name for words in (name.split() for name in sampler.names.values())
                    if len(words) > 1})
    return Measurement("flower", params, nodes, result["round_seconds"], idle, peak,
                       notes={"server_processes": names, "rss_samples": sampler.samples})
