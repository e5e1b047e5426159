"""Failure behaviour of the orchestration: the data/ lock refuses a second writer and names the first, a stage
that fails transiently is retried as orchestration.retries says, and one that keeps failing fails its run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.common import locking
from tasks.common.stage import StageResult
from tasks.config import ConfigError
from tests.conftest import tool_env


@pytest.fixture
def holder(tmp_path):
    """Another process holding the project's data/ lock, as a running pipeline would."""
    script = textwrap.dedent(f"""
        import sys, time
        from tasks.common import locking
        with locking.hold({str(tmp_path)!r}, "flow run brave-otter (deployment full-pipeline/demo)"):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_reevaluation_waits_for_a_running_pipeline(tmp_path, holder):
    """The nightly re-evaluation reads what a pipeline writes: it takes the pipeline's lock, so while one runs it
    is refused (or waits, orchestration.lock_timeout_s), naming the run, before reading anything."""
    from tasks.config import Config
    from tasks.evaluation.reevaluate import run_reevaluation

    cfg = Config()
    cfg.tracking.enabled = False
    with pytest.raises(locking.Busy, match="flow run brave-otter"):
        run_reevaluation(cfg, tmp_path, progress=False)
    assert not (tmp_path / cfg.evaluate.history_dir).exists()


def test_second_writer_is_refused_with_the_holders_name(tmp_path, holder):
    from tasks.config import Config
    from tasks.runner import run_stage

    cfg = Config()
    cfg.tracking.enabled = False
    with pytest.raises(locking.Busy) as err:
        run_stage("corpus", cfg, tmp_path)
    msg = str(err.value)
    assert "flow run brave-otter (deployment full-pipeline/demo)" in msg and f"pid {holder.pid}" in msg
    assert "nothing was changed" in msg
    assert not (tmp_path / "data" / "raw").exists()  # the stage never started
    # the CLI (what dvc repro runs) says the same and exits 2
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "corpus"], cwd=tmp_path, env=tool_env(tmp_path),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "brave-otter" in proc.stderr, proc.stderr
    # once the holder is gone (even killed: the kernel drops the lock), the next run gets it
    holder.kill()
    holder.wait()
    with locking.hold(tmp_path, "test") as path:
        assert locking.holder(path)["pid"] == os.getpid()


def test_lock_waits_when_told_and_is_reentrant(tmp_path, holder):
    t0 = time.monotonic()
    with pytest.raises(locking.Busy, match="after waiting 1 s"):
        with locking.hold(tmp_path, "waiter", timeout_s=1.0):
            raise AssertionError("the lock was taken while another process holds it")
    assert time.monotonic() - t0 >= 0.9
    holder.kill()
    holder.wait()
    with locking.hold(tmp_path, "outer"):
        with locking.hold(tmp_path, "inner") as path:  # a flow holds it and its stages take it again
            assert locking.holder(path)["what"] == "outer"  # the outermost holder is who others see
        assert locking.holder(locking.lock_path(tmp_path))["what"] == "outer"


def _flaky(fail_times: int, calls: list):
    def run(cfg, root, **_):
        calls.append(time.monotonic())
        if len(calls) <= fail_times:
            raise OSError(f"transient: attempt {len(calls)} could not reach the file system")
        return StageResult("corpus", metrics={"attempts": float(len(calls))}, summary="ok")

    return run


def test_transient_failure_is_retried_and_a_persistent_one_fails_the_run(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.corpus import corpus_flow
    from tasks import registry

    calls: list = []
    monkeypatch.setitem(registry.STAGES, "corpus", registry.Stage("corpus", _flaky(1, calls), "flaky"))
    sets = ["tracking.enabled=false", "orchestration.retries=2", "orchestration.retry_delay_s=0.5"]
    with prefect_test_harness(server_startup_timeout=120):
        out = corpus_flow(sets=sets, root=str(tmp_path), parent_run_id=None, force=False)
        assert out["status"] == "ran" and out["metrics"]["attempts"] == 2.0 and len(calls) == 2
        assert calls[1] - calls[0] >= 0.5  # the configured delay
        calls.clear()
        monkeypatch.setitem(registry.STAGES, "corpus", registry.Stage("corpus", _flaky(10, calls), "flaky"))
        with pytest.raises(OSError, match="attempt 3"):
            corpus_flow(sets=sets, root=str(tmp_path), parent_run_id=None, force=False)
        assert len(calls) == 3  # the first attempt and two retries, then the run fails
        calls.clear()
        with pytest.raises(OSError, match="attempt 1"):  # retries 0: no second attempt
            corpus_flow(sets=[*sets, "orchestration.retries=0"], root=str(tmp_path), parent_run_id=None, force=False)
        assert len(calls) == 1
        # a ConfigError (bad setting, missing input, data/ locked) is not retried: it would fail again
        calls.clear()

        def bad_config(cfg, root, **_):
            calls.append(1)
            raise ConfigError("corpus.faces_dir: no such folder")

        monkeypatch.setitem(registry.STAGES, "corpus", registry.Stage("corpus", bad_config, "bad"))
        with pytest.raises(ConfigError, match="no such folder"):
            corpus_flow(sets=sets, root=str(tmp_path), parent_run_id=None, force=False)
        assert len(calls) == 1
    # the failed attempts let go of the data/ lock
    with locking.hold(tmp_path, "after") as path:
        assert locking.holder(path)["what"] == "after"


# ------------------------------------------------------------------------------ `streamavatar serve` / stop
def test_serve_refuses_a_taken_port_and_stop_leaves_other_processes_alone(tmp_path):
    import json
    import socket

    from flows import serve

    (tmp_path / "prefect.yaml").write_text("deployments: []\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(serve.ServeError, match=f"port {port} on 127.0.0.1 is in use by another program"):
            serve.start(tmp_path, serve.Ports(prefect=port, mlflow=port + 1 if port < 65535 else port - 1))
    assert not list((tmp_path / ".serve").glob("*.json"))  # nothing was started, nothing recorded
    messages: list[str] = []
    assert serve.stop(tmp_path, echo=messages.append) == [] and "nothing to stop" in messages[-1]
    # a recorded pid that now belongs to another program (pids get reused) is not signalled
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    while not serve._cmdline(other.pid):  # until it has exec'd
        time.sleep(0.05)
    try:
        record = {"name": "prefect-server", "pid": other.pid, "cmd": ["prefect", "server", "start"],
                  "marker": "server start", "log": str(tmp_path / "x.log"), "started": 0}  # fmt: skip
        (tmp_path / ".serve" / "prefect-server.json").write_text(json.dumps(record))
        messages.clear()
        assert serve.stop(tmp_path, echo=messages.append) == []
        time.sleep(0.5)
        assert "was not running" in messages[0] and other.poll() is None  # still alive
        assert not (tmp_path / ".serve" / "prefect-server.json").exists()
    finally:
        other.kill()
        other.wait()


def test_each_project_logs_to_its_own_store_and_the_served_uri_wins(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI: a second project in the same process must still
    get its own store; $STREAMAVATAR_TRACKING_URI (what `make serve` gives its worker) overrides the config."""
    import mlflow

    from tasks.common import tracking
    from tasks.config import Config

    cfg = Config()
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        tracking.setup(cfg, root)
        assert mlflow.get_tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("STREAMAVATAR_TRACKING_URI", f"sqlite:///{tmp_path / 'served.db'}")
    assert tracking.tracking_uri(cfg, a) == f"sqlite:///{tmp_path / 'served.db'}"


def test_prefects_own_server_commands_see_the_served_server(tmp_path):
    """`prefect server start --background` refuses a second server and `prefect server stop` stops the one
    `serve` started (its pid is where Prefect keeps a background server's); `stop` then stops the rest."""
    import socket

    from flows import serve

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    (tmp_path / "prefect.yaml").write_text("deployments: []\n")
    ports = serve.Ports(prefect=free(), mlflow=free())
    env = serve.service_env(tmp_path, ports)
    pid_file = Path(env["PREFECT_HOME"]) / "server.pid"
    try:
        serve.start(tmp_path, ports, deploy=False, echo=lambda *_: None)
        rec = serve.records(tmp_path)["prefect-server"]
        assert pid_file.read_text().strip() == str(rec["pid"])
        prefect = [str(serve._bin("prefect")), "server"]
        second = subprocess.run([*prefect, "start", "--background", "--port", str(free())], env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode != 0 and "already running in the background" in second.stdout + second.stderr
        stopped = subprocess.run([*prefect, "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and "Server stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        deadline = time.monotonic() + 60
        while serve._alive(rec) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not serve._alive(rec) and not pid_file.exists()
        status = serve.status(tmp_path, echo=lambda *_: None)
        assert status == {"prefect-server": False, "mlflow-server": True, "prefect-worker": True}
    finally:
        messages: list[str] = []
        serve.stop(tmp_path, echo=messages.append)
    assert any("prefect-server: was not running" in m for m in messages), messages
    assert {"mlflow-server: stopped", "prefect-worker: stopped"} <= {m.split(" (")[0] for m in messages}
    assert not list((tmp_path / ".serve").glob("*.json"))
