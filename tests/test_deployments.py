"""The pipeline as its users run it for real, in a temporary clone: `streamavatar serve` (what `make serve` runs)
starts a Prefect server, a process worker and an MLflow server on 127.0.0.1 and deploys prefect.yaml; runs are
triggered with the `prefect` CLI; MLflow's client (through the server) and DVC check what they left; and
`streamavatar stop` stops every process that was started.

One test, in the order a user meets things: a first run of everything; the nightly re-evaluation making the
registered student champion; a parameter change whose run then fails in a later stage (finished stages stay
recorded, the run resumes); the same parameter-change story through `dvc repro --dry` and the deployment; two
runs of one deployment at once (the second waits); a second re-evaluation comparing candidate and champion."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import BIN, shared_path, tool_env
from tests.test_pipeline import STAGES, TINY, TINY_TRAINING

MODEL = "streamavatar-student"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edit_params(root: Path, **changes) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


class Served:
    """The services of one clone and the commands a user would type next to them."""

    def __init__(self, root: Path):
        self.root = root
        self.prefect_port, self.mlflow_port = _free_port(), _free_port()
        self.env = tool_env(root)
        self.env.update(PREFECT_API_URL=f"http://127.0.0.1:{self.prefect_port}/api",
                        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{self.mlflow_port}",
                        STREAMAVATAR_TRACKING_URI=f"http://127.0.0.1:{self.mlflow_port}",
                        # no 03:00 UTC nightly run sneaking into the test: runs here are triggered by hand
                        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
                        # a run that finds the deployment's one slot taken retries in 3 s, not Prefect's 30 s
                        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="3")
        self.api = self.env["PREFECT_API_URL"]

    def cli(self, *args, timeout=900, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if check:
            assert proc.returncode == 0, f"{args}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc

    def trigger(self, deployment: str, watch: bool = True, params: dict | None = None) -> str:
        """`prefect deployment run <flow>/<deployment>`; returns the flow run id."""
        args = [str(BIN / "prefect"), "deployment", "run", deployment]
        if params:
            args += ["--params", json.dumps(params)]
        if watch:
            args += ["--watch", "--watch-interval", "2", "--watch-timeout", "900"]
        proc = self.cli(*args, check=False)
        found = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
        assert found, proc.stdout + proc.stderr
        return found.group(1)

    def flow_run(self, run_id: str) -> dict:
        return httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30).json()

    def states(self, run_id: str) -> list[str]:
        hist = httpx.get(f"{self.api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=30).json()
        return [h["name"] for h in sorted(hist, key=lambda h: h["timestamp"])]

    def wait(self, run_id: str, timeout_s: float = 900) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} did not finish in {timeout_s} s")

    def dvc(self, *args) -> str:
        return self.cli(sys.executable, "-m", "dvc", *args, timeout=300).stdout


def _running(pid: int, grace_s: float = 5.0) -> bool:
    """The process still runs (an exited one that its new parent has not reaped yet, a zombie, does not)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def _flow_run_of(proc) -> str | None:
    """The Prefect flow run a process runs (the worker starts each with PREFECT__FLOW_RUN_ID set)."""
    try:
        return proc.environ().get("PREFECT__FLOW_RUN_ID")
    except Exception:  # noqa: BLE001 -- gone, or not ours to read
        return None


def _stage_runs(client, pipeline_run) -> dict[str, list]:
    exp = pipeline_run.info.experiment_id
    kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{pipeline_run.info.run_id}'",
                              order_by=["attributes.start_time ASC"])  # fmt: skip
    out: dict[str, list] = {}
    for r in kids:
        out.setdefault(r.data.tags["streamavatar.stage"], []).append(r)
    return out


def _pipeline_run(client, flow_run_id: str):
    exp = client.get_experiment_by_name("streamavatar")
    found = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(found) == 1, f"no MLflow pipeline run for flow run {flow_run_id}"
    return found[0]


def _ran(stage_runs: dict[str, list]) -> set[str]:
    return {s for s, rs in stage_runs.items() if rs[-1].data.tags.get("streamavatar.status") == "ran"}


def _dry_run_stages(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", out))


@pytest.mark.slow
def test_served_deployments_end_to_end(clone):
    from mlflow import MlflowClient

    shared_path("models", "light-asd", "finetuning_TalkSet.model")  # the curate stage's detector
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["corpus"].update(TINY)
    for section, values in TINY_TRAINING.items():
        params[section].update(values)
    params["orchestration"]["retry_delay_s"] = 1.0
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (clone / "dvc.lock").unlink(missing_ok=True)
    s = Served(clone)
    started = s.cli(str(BIN / "streamavatar"), "serve", "--prefect-port", str(s.prefect_port),
                    "--mlflow-port", str(s.mlflow_port), timeout=300, check=False)  # fmt: skip
    records = {p.stem: json.loads(p.read_text()) for p in (clone / ".serve").glob("*.json") if p.stem != "endpoints"}
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert set(records) == {"prefect-server", "prefect-worker", "mlflow-server"}
        assert "prefect deployment run full-pipeline/demo" in started.stdout
        client = MlflowClient(tracking_uri=s.env["MLFLOW_TRACKING_URI"])

        # prefect.yaml's deployments, on the process pool, the nightly one on a cron schedule
        deps = {d["name"]: d for d in httpx.post(f"{s.api}/deployments/filter", json={}, timeout=30).json()}
        assert set(deps) == {"demo", "paper", "nightly"}
        assert all(d["work_pool_name"] == "streamavatar" for d in deps.values())
        pool = httpx.get(f"{s.api}/work_pools/streamavatar", timeout=30).json()
        assert pool["type"] == "process"
        assert deps["paper"]["parameters"] == {"configs": ["configs/paper.yaml"]}
        assert [sc["schedule"]["cron"] for sc in deps["nightly"]["schedules"]] == ["0 3 * * *"]

        # 1. the first run: every stage, nested MLflow runs with metrics and the sample videos, DVC clean
        first = s.trigger("full-pipeline/demo")
        assert s.flow_run(first)["state"]["type"] == "COMPLETED", s.states(first)
        parent = _pipeline_run(client, first)
        assert parent.info.status == "FINISHED" and parent.data.tags["prefect.deployment"] == "full-pipeline/demo"
        # the worker's runs logged through the MLflow server, not straight into mlflow.db
        assert parent.data.tags["streamavatar.tracking_uri"] == s.env["MLFLOW_TRACKING_URI"]
        stages = _stage_runs(client, parent)
        assert list(stages) == STAGES and _ran(stages) == set(STAGES)
        assert stages["curate"][0].data.metrics["clips_ok"] == 2
        assert {"dit_rtf", "vae_rtf", "pipelined_rtf"} <= set(stages["benchmark"][0].data.metrics)
        assert {"student_flicker", "ground_truth_identity_dist"} <= set(stages["evaluate"][0].data.metrics)
        video = [a.path for a in client.list_artifacts(stages["refine"][0].info.run_id, "refine")]
        assert "refine/sample.mp4" in video
        local = Path(client.download_artifacts(stages["refine"][0].info.run_id, "refine/sample.mp4",
                                               str(clone / "downloaded")))  # fmt: skip
        assert local.stat().st_size > 2000 and local.read_bytes()[4:8] == b"ftyp"
        assert client.get_experiment_by_name("streamavatar").artifact_location == (clone / "mlruns").as_uri()
        assert "up to date" in s.dvc("status")
        v1 = client.get_model_version_by_alias(MODEL, "candidate")
        assert str(v1.version) == "1" and v1.run_id == stages["refine"][0].info.run_id

        # 2. the nightly re-evaluation: no champion yet, so the candidate becomes champion, with the reason
        nightly = s.trigger("re-evaluate/nightly")
        assert s.flow_run(nightly)["state"]["type"] == "COMPLETED", s.states(nightly)
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert str(champion.version) == "1" and "no champion yet" in champion.tags["streamavatar.decision_reason"]

        # 3. one parameter changes, and a later stage then fails: finished stages stay done and recorded
        _edit_params(clone, refine__iterations=3)
        # what DVC sees changed now; the stages after it re-run once its outputs have changed (below)
        assert _dry_run_stages(s.dvc("repro", "--dry")) == {"refine"}
        report = clone / "data" / "reports" / "benchmark.json"
        report.unlink()
        report.mkdir()  # the benchmark cannot write its report: it fails, is retried once, fails again
        checkpoints = sorted(p.name for p in (clone / "data/checkpoints/distill").iterdir())
        failed = s.trigger("full-pipeline/demo")
        assert s.flow_run(failed)["state"]["type"] == "FAILED", s.states(failed)
        parent = _pipeline_run(client, failed)
        stages = _stage_runs(client, parent)
        assert parent.info.status == "FAILED"
        assert _ran(stages) == {"refine"} and "evaluate" not in stages
        assert [r.info.status for r in stages["benchmark"]] == ["FAILED", "FAILED"]  # retries: 1
        assert all(stages[st][0].data.tags["streamavatar.status"] == "up-to-date" for st in STAGES[: STAGES.index("refine")])
        assert sorted(p.name for p in (clone / "data/checkpoints/distill").iterdir()) == checkpoints
        assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "2"
        assert "refine" not in json.loads(s.dvc("status", "--json"))  # refine's new outputs are in dvc.lock
        # the first run's MLflow records are untouched
        assert client.get_run(_pipeline_run(client, first).info.run_id).info.status == "FINISHED"

        # ... fixed, the next run resumes: exactly what dvc repro would run, and DVC ends clean
        report.rmdir()
        todo = _dry_run_stages(s.dvc("repro", "--dry"))
        assert todo == {"benchmark", "evaluate"}
        resumed = s.trigger("full-pipeline/demo")
        assert s.flow_run(resumed)["state"]["type"] == "COMPLETED", s.states(resumed)
        assert _ran(_stage_runs(client, _pipeline_run(client, resumed))) == todo
        assert "up to date" in s.dvc("status")

        # 4. an evaluation-only parameter: both entry points re-run the evaluate stage alone. Two runs of the
        #    deployment triggered together: the second waits for the first (concurrency limit 1), then finds
        #    everything up to date
        _edit_params(clone, evaluate__identity_window_s=0.4)
        assert _dry_run_stages(s.dvc("repro", "--dry")) == {"evaluate"}
        both = [s.trigger("full-pipeline/demo", watch=False), s.trigger("full-pipeline/demo", watch=False)]
        done = sorted((s.wait(r) for r in both), key=lambda r: r["start_time"])
        assert [r["state"]["type"] for r in done] == ["COMPLETED", "COMPLETED"]
        assert "AwaitingConcurrencySlot" in s.states(done[1]["id"]) and done[1]["start_time"] >= done[0]["end_time"]
        assert _ran(_stage_runs(client, _pipeline_run(client, done[0]["id"]))) == {"evaluate"}
        assert _ran(_stage_runs(client, _pipeline_run(client, done[1]["id"]))) == set()
        assert "up to date" in s.dvc("status")

        # 5. the next nightly compares candidate v2 with champion v1 on the fixed set and records why
        nightly = s.trigger("re-evaluate/nightly")
        assert s.flow_run(nightly)["state"]["type"] == "COMPLETED", s.states(nightly)
        v2 = client.get_model_version(MODEL, "2")
        assert v2.tags["streamavatar.compared_to"] == "v1" and v2.tags["streamavatar.decision_reason"]
        promoted = v2.tags["streamavatar.decision"] == "promoted"
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == ("2" if promoted else "1")
        exp = client.get_experiment_by_name("streamavatar").experiment_id
        reeval = client.search_runs([exp], "tags.`streamavatar.kind` = 'reevaluation'",
                                    order_by=["attributes.start_time DESC"])[0]  # fmt: skip
        assert reeval.data.tags["streamavatar.decision_reason"] == v2.tags["streamavatar.decision_reason"]
        assert {"champion/flicker", "candidate/flicker"} <= set(reeval.data.metrics)

        # 6. Prefect's own cancellation of a deployment run, mid-stage: the worker stops the flow run's process;
        # it and every process under it are gone within a minute, the run is CANCELLED and the data/ lock free
        import psutil

        from tasks.common import locking

        long = s.trigger("full-pipeline/demo", watch=False, params={"sets": ["teacher.iterations=100000"],
                                                                    "stages": ["teacher"]})  # fmt: skip
        deadline, procs = time.monotonic() + 300, []
        while time.monotonic() < deadline and not procs:  # the flow run's process, once its teacher steps
            time.sleep(2)
            if s.flow_run(long)["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            exp = client.get_experiment_by_name("streamavatar").experiment_id
            if client.search_runs([exp], "tags.`streamavatar.stage` = 'teacher' and attributes.status = 'RUNNING'"):
                procs = [p for p in psutil.process_iter() if _flow_run_of(p) == long]
        assert procs, (s.flow_run(long)["state"], s.states(long))
        time.sleep(5)  # inside the training loop
        tree = {q.pid for p in procs for q in [p, *p.children(recursive=True)]}
        cancelled_at = time.monotonic()
        httpx.post(f"{s.api}/flow_runs/{long}/set_state", timeout=30,
                   json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}).raise_for_status()
        final = s.wait(long, timeout_s=180)
        assert final["state"]["type"] == "CANCELLED", s.states(long)
        left = [pid for pid in tree if _running(pid, grace_s=60 - (time.monotonic() - cancelled_at))]
        assert not left, f"processes of the cancelled flow run still run: {left}"
        with locking.hold(clone, "test: after the cancellation", timeout_s=10):
            pass  # the cancelled run let go of data/
    finally:
        stopped = s.cli(str(BIN / "streamavatar"), "stop", check=False, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    for name, rec in records.items():  # every process `serve` started is gone, and its ports are free
        alive = _running(rec["pid"])
        if alive:
            os.killpg(rec["pid"], signal.SIGKILL)
        assert not alive, f"{name} (pid {rec['pid']}) still runs after `streamavatar stop`"
    assert not list((clone / ".serve").glob("*.json"))
    for port in (s.prefect_port, s.mlflow_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
