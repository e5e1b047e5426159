"""`streamavatar serve` / `streamavatar stop` (what `make serve` / `make stop` run): the pipeline as its users run
it for real. On 127.0.0.1: a Prefect server (API + UI, SQLite under $PREFECT_HOME), an MLflow server (the
project's mlflow.db, artifacts under mlruns/), the process work pool `streamavatar` with prefect.yaml's
deployments, and a worker that runs their flow runs in this checkout.

Everything started is recorded under .serve/ (one JSON file per process: pid, command, log file), and `stop`
stops those processes (and their process groups) and nothing else: it checks each pid still runs the command
it started before signalling it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST = "127.0.0.1"
POOL = "streamavatar"
STATE_DIR = ".serve"
ORDER = ("prefect-server", "mlflow-server", "prefect-worker")  # start order; stop runs it backwards


_CHILDREN: dict[int, subprocess.Popen] = {}  # what this process started: waited on while starting


class ServeError(RuntimeError):
    """Something `serve` could not do; the message says what and where to look."""


@dataclass
class Ports:
    prefect: int = 4200
    mlflow: int = 5000

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://{HOST}:{self.prefect}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow}"


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def service_env(root: Path, ports: Ports) -> dict[str, str]:
    """The environment of every process `serve` starts, and of the commands a user types next to them."""
    env = dict(os.environ)
    env.update({
        "STREAMAVATAR_ROOT": str(root),
        "PREFECT_HOME": env.get("PREFECT_HOME") or str(root / ".prefect"),
        "PREFECT_API_URL": ports.prefect_api,
        "MLFLOW_TRACKING_URI": ports.mlflow_uri,  # the mlflow CLI and MlflowClient() of a user's shell
        "STREAMAVATAR_TRACKING_URI": ports.mlflow_uri,  # the pipeline's runs (tasks/common/tracking.py)
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })  # fmt: skip
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")  # how soon a triggered run is picked up
    return env


# ------------------------------------------------------------------------------------------ process records
def _state(root: Path) -> Path:
    return root / STATE_DIR


def _record_path(root: Path, name: str) -> Path:
    return _state(root) / f"{name}.json"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def _alive(record: dict) -> bool:
    """The recorded process still runs, and is still the command we started (pids get reused)."""
    pid = record.get("pid")
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not Path("/proc/self").exists():  # no /proc (not Linux): trust the pid
        return True
    # a zombie or a process that is not ours has another (or an empty) command line
    return record.get("marker", "") in " ".join(_cmdline(pid))


def records(root: Path) -> dict[str, dict]:
    out = {}
    for name in ORDER:
        path = _record_path(root, name)
        if path.is_file():
            try:
                out[name] = json.loads(path.read_text())
            except ValueError:
                continue
    return out


def _spawn(root: Path, name: str, cmd: list[str], env: dict[str, str], marker: str) -> dict:
    log = _state(root) / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        # a session of its own: `stop` signals the whole group (the servers' own worker processes included),
        # and a Ctrl-C in the terminal that ran `make serve` does not reach it
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    record = {"name": name, "pid": proc.pid, "cmd": cmd, "marker": marker, "log": str(log),
              "started": time.time()}  # fmt: skip
    _record_path(root, name).write_text(json.dumps(record, indent=2))
    _CHILDREN[proc.pid] = proc
    return record


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers bind: a port whose last connections linger in TIME_WAIT is free for them
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(what: str, check, record: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    proc = _CHILDREN[record["pid"]]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"{what} exited while starting; its log ({record['log']}) ends with:\n"
                             f"{_tail(record['log'])}")  # fmt: skip
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if check():
                return
        time.sleep(0.5)
    raise ServeError(f"{what} did not become ready in {timeout_s:g} s; see {record['log']}:\n{_tail(record['log'])}")


def _run(cmd: list[str], root: Path, env: dict[str, str], what: str, timeout_s: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise ServeError(f"{what} failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


# ----------------------------------------------------------------------------------------------- start/stop
def start(root: Path, ports: Ports, *, deploy: bool = True, timeout_s: float = 180, echo=print) -> dict:
    """Start whatever of the three services is not running, create the pool, deploy prefect.yaml."""
    root = Path(root).resolve()
    if not (root / "prefect.yaml").is_file():
        raise ServeError(f"{root}/prefect.yaml not found: run from the project checkout (or set STREAMAVATAR_ROOT)")
    _state(root).mkdir(exist_ok=True)
    env = service_env(root, ports)
    running = {n: r for n, r in records(root).items() if _alive(r)}
    for name, rec in running.items():
        echo(f"{name}: already running (pid {rec['pid']})")
    wanted = {"prefect-server": ports.prefect, "mlflow-server": ports.mlflow}
    for name, port in wanted.items():
        if name not in running and not _port_free(port):
            raise ServeError(f"port {port} on {HOST} is in use by another program, so {name} cannot start there; "
                             f"stop that program or pick another port (make serve PREFECT_PORT=... "
                             f"MLFLOW_PORT=...)")  # fmt: skip
    started: list[str] = []
    try:
        # both servers start at once (each takes seconds: migrations, imports), then each is waited for
        spawned = {}
        if "prefect-server" not in running:
            spawned["prefect-server"] = _spawn(root, "prefect-server", [
                _bin("prefect"), "server", "start", "--host", HOST, "--port", str(ports.prefect)], env,
                marker="server start")  # fmt: skip
            started.append("prefect-server")
        if "mlflow-server" not in running:
            artifacts = root / "mlruns"
            artifacts.mkdir(exist_ok=True)
            spawned["mlflow-server"] = _spawn(root, "mlflow-server", [
                _bin("mlflow"), "server", "--host", HOST, "--port", str(ports.mlflow), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--default-artifact-root", artifacts.as_uri(), "--artifacts-destination", artifacts.as_uri(),
            ], env, marker="mlflow")  # fmt: skip
            started.append("mlflow-server")
        if "prefect-server" in spawned:
            rec = spawned["prefect-server"]
            _wait("the Prefect server", lambda: httpx.get(f"{ports.prefect_api}/health", timeout=5).json() is True,
                  rec, timeout_s)  # fmt: skip
            echo(f"prefect-server: {ports.prefect_ui} (pid {rec['pid']}, log {rec['log']})")
            if _claim_prefect_pid_file(env, rec["pid"]):
                rec["prefect_pid_file"] = str(_prefect_pid_file(env))  # released by `stop`
                _record_path(root, "prefect-server").write_text(json.dumps(rec, indent=2))
                echo("  Prefect's own `prefect server stop` stops it too (its pid is in $PREFECT_HOME/server.pid)")
        if "mlflow-server" in spawned:
            rec = spawned["mlflow-server"]
            _wait("the MLflow server", lambda: httpx.get(f"{ports.mlflow_uri}/health", timeout=5).status_code == 200,
                  rec, timeout_s)  # fmt: skip
            echo(f"mlflow-server: {ports.mlflow_uri} (pid {rec['pid']}, log {rec['log']})")
        if deploy:
            pools = httpx.post(f"{ports.prefect_api}/work_pools/filter", json={}, timeout=30).json()
            if POOL not in [p["name"] for p in pools]:
                _run([_bin("prefect"), "work-pool", "create", POOL, "--type", "process"], root, env,
                     f"creating the work pool {POOL}")  # fmt: skip
                echo(f"work pool {POOL!r} (process) created")
        worker = None
        if "prefect-worker" not in running:  # started before the deployments are made: it boots meanwhile
            worker = _spawn(root, "prefect-worker", [_bin("prefect"), "worker", "start", "--pool", POOL,
                                                     "--type", "process", "--name", f"{POOL}-{socket.gethostname()}"],
                            env, marker="worker start")  # fmt: skip
            started.append("prefect-worker")
        if deploy:
            _run([_bin("prefect"), "--no-prompt", "deploy", "--all"], root, env, "prefect deploy --all")
            names = [d["name"] for d in httpx.post(f"{ports.prefect_api}/deployments/filter", json={},
                                                   timeout=30).json()]  # fmt: skip
            echo(f"deployed from prefect.yaml: {', '.join(sorted(names))}")
        if worker is not None:

            def worker_online() -> bool:
                workers = httpx.post(f"{ports.prefect_api}/work_pools/{POOL}/workers/filter", json={}, timeout=10)
                if workers.status_code != 200:  # the pool does not exist yet (deploy=False): the worker makes it
                    return False
                return any(w.get("status") == "ONLINE" for w in workers.json())

            _wait("the Prefect worker", worker_online, worker, timeout_s)
            echo(f"prefect-worker: polling pool {POOL!r} (pid {worker['pid']}, log {worker['log']})")
    except BaseException:
        stop(root, only=started, echo=echo)  # leave nothing half-started behind
        raise
    info = {"prefect_ui": ports.prefect_ui, "prefect_api": ports.prefect_api, "mlflow": ports.mlflow_uri,
            "root": str(root)}  # fmt: skip
    (_state(root) / "endpoints.json").write_text(json.dumps(info, indent=2))
    return info


def _prefect_pid_file(env: dict[str, str]) -> Path:
    """Where Prefect's `prefect server start --background` / `prefect server stop` keep the server's pid."""
    from prefect.cli._server_utils import SERVER_PID_FILE_NAME

    return Path(env["PREFECT_HOME"]) / SERVER_PID_FILE_NAME


def _claim_prefect_pid_file(env: dict[str, str], pid: int) -> bool:
    """Write our server's pid where Prefect's own commands look for a background server, so that `prefect
    server stop` stops it and `prefect server start --background` does not start a second one. (We do not
    start it with `--background` because Prefect then sends the server's output to a pipe nobody reads: no log
    to look at when it fails.) A pid file of another server that still runs is left alone."""
    path = _prefect_pid_file(env)
    with contextlib.suppress(ValueError, OSError):
        other = int(path.read_text().strip())
        os.kill(other, 0)
        if other != pid:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(pid))
    return True


def _release_prefect_pid_file(record: dict) -> None:
    """Remove the pid file `start` wrote for this server, if it still names it."""
    if not record.get("prefect_pid_file"):
        return
    path = Path(record["prefect_pid_file"])
    with contextlib.suppress(ValueError, OSError):
        if int(path.read_text().strip()) == record["pid"]:
            path.unlink()


def _signal_group(pid: int, sig: int) -> None:
    try:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(pid, sig)  # the process started its own session: its group id is its pid
    except PermissionError:
        os.kill(pid, sig)


def stop(root: Path, only: list[str] | None = None, timeout_s: float = 30, echo=print) -> list[str]:
    """Stop the processes `start` recorded (worker first), each with its process group; returns their names."""
    root = Path(root).resolve()
    stopped = []
    recs = records(root)
    for name in reversed(ORDER):
        if only is not None and name not in only:
            continue
        rec = recs.get(name)
        if rec is None:
            continue
        if _alive(rec):
            _signal_group(rec["pid"], signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(rec) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(rec):
                _signal_group(rec["pid"], signal.SIGKILL)
                time.sleep(0.5)
            # the leader is gone; children of its group it left behind still carry its group id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec["pid"], signal.SIGKILL)
            echo(f"{name}: stopped (pid {rec['pid']})")
            stopped.append(name)
        else:  # its pid may belong to another program by now (or `prefect server stop` stopped it): leave it alone
            echo(f"{name}: was not running (pid {rec['pid']} gone)")
        if name == "prefect-server":
            _release_prefect_pid_file(rec)
        _record_path(root, name).unlink(missing_ok=True)
    if not records(root):
        (_state(root) / "endpoints.json").unlink(missing_ok=True)
    if not stopped and not recs:
        echo("nothing to stop: no service started by `make serve` is recorded in .serve/")
    return stopped


def status(root: Path, echo=print) -> dict[str, bool]:
    root = Path(root).resolve()
    out = {}
    for name in ORDER:
        rec = records(root).get(name)
        alive = bool(rec) and _alive(rec)
        out[name] = alive
        echo(f"{name:15s} {'running, pid ' + str(rec['pid']) if alive else 'not running'}")
    endpoints = _state(root) / "endpoints.json"
    if endpoints.is_file() and any(out.values()):
        for k, v in json.loads(endpoints.read_text()).items():
            echo(f"{k:15s} {v}")
    return out


HOWTO = """\
Day to day (in another terminal; `source .serve/env` first so the prefect CLI talks to this server):
  prefect deployment run full-pipeline/demo        trigger the demo pipeline (add --watch to wait for it)
  prefect deployment run re-evaluate/nightly       re-evaluate now (the schedule runs it at 03:00 UTC)
  {prefect_ui:<40s}   the Prefect UI: flow runs, their stages, logs
  {mlflow:<40s}   the MLflow UI: runs, nested stage runs, metrics, videos, models
  dvc status / dvc repro                           what changed since the last run / re-run it without Prefect
  make stop                                        stop these services
"""


def write_env_file(root: Path, ports: Ports) -> Path:
    """.serve/env: `source` it to point the prefect / mlflow CLIs of a shell at the running services."""
    env = service_env(root, ports)
    keys = ("STREAMAVATAR_ROOT", "PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "STREAMAVATAR_TRACKING_URI",
            "PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS")  # fmt: skip
    path = _state(root) / "env"
    path.write_text("".join(f"export {k}={env[k]}\n" for k in keys)
                    + f"export PATH={Path(sys.executable).parent}:$PATH\n")  # fmt: skip
    return path
