"""The backbone: Prefect flow, DVC stages and MLflow runs agree, in a temporary clone of the project."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import make_clone, shared_path, tool_env

TINY = {"num_conversations": 1, "duration_s": 3.0, "workers": 1}
# the training stages at a few steps each: the wiring, not the learning (tests/test_training.py has that)
# (and curation of the tiny corpus only: the demo's shared real clips are tests/test_curate.py's business)
TINY_TRAINING = {"curate": {"sources": ["synthetic"]}, "vae_train": {"iterations": 2, "eval_windows": 2},
                 "teacher": {"iterations": 3}, "teacher_sampler": {"steps": 8},
                 "ode_init": {"iterations": 2}, "distill": {"iterations": 2},
                 "refine": {"iterations": 2, "qformer_dim": 16}, "train": {"checkpoint_every": 2},
                 "benchmark": {"chunks": 2, "warmup_chunks": 0},
                 # one window, one draw, measured in-process: the chain rows, further draws and the
                 # measuring workers are tests/test_evaluate.py's business
                 "evaluate": {"max_clips": 1, "windows_per_clip": 1, "chain": False, "seeds": 1, "workers": 0},
                 "tracking": {"system_metrics_interval_s": 1.0}}  # fmt: skip
STAGES = ["corpus", "curate", "vae", "teacher", "ode_pairs", "distill", "refine", "benchmark", "evaluate"]


def set_params(root, **corpus):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["corpus"].update(corpus)
    for section, values in TINY_TRAINING.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(root, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=tool_env(root), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _leaves(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _leaves(v)
    else:
        yield d


def runs(root):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("streamavatar")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_full_pipeline_flow_records_mlflow_and_dvc_agrees_shares_and_reruns_only_on_change(clone, tmp_path):
    """One tiny pipeline run through the Prefect flow, then everything DVC is used for on its outputs: `dvc repro`
    finds nothing to do and records what the flow recorded, metrics and plots read, a remote restores every
    output in a fresh checkout, and a parameter change re-runs its stage alone (through dvc.yaml's cmd)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.full_pipeline import full_pipeline

    shared_path("models", "light-asd", "finetuning_TalkSet.model")  # the curate stage's detector
    set_params(clone, **TINY)
    with prefect_test_harness(server_startup_timeout=120):
        result = full_pipeline(root=str(clone))
        assert result["stages"]["corpus"]["status"] == "ran"
        assert result["stages"]["corpus"]["dvc"] == "recorded in dvc.lock"
        assert result["stages"]["curate"]["status"] == "ran"
        assert result["stages"]["curate"]["dvc"] == "recorded in dvc.lock"
        again = full_pipeline(root=str(clone), stages=["corpus"])  # every stage: tests/test_deployments.py step 4
        assert again["stages"]["corpus"]["status"] == "up-to-date"
        # an override that differs from params.yaml runs, but is not claimed in dvc.lock
        other = full_pipeline(root=str(clone), sets=["corpus.seed=4"], stages=["corpus"])
        assert other["stages"]["corpus"]["status"] == "ran"
        assert "not recorded in dvc.lock" in other["stages"]["corpus"]["dvc"]
        with pytest.raises(ValueError, match="unknown stage"):
            full_pipeline(root=str(clone), stages=["nope"])
        # seed 4 changed the outputs: back to params.yaml settings (the corpus is deterministic: the same
        # files as the first run) and DVC is clean again
        back = full_pipeline(root=str(clone), stages=["corpus"])
        assert back["stages"]["corpus"]["status"] == "ran"
        # Prefect artifacts: each stage's result, the evaluation table, the run's summary, training progress
        # at 100 %; and the stages' own loggers reached the run logs
        import logging

        from prefect.client.orchestration import get_client

        for handler in logging.getLogger("tasks").handlers:  # Prefect's API handler: send what it holds
            handler.flush()
        with get_client(sync_client=True) as pc:
            artifacts = pc.read_artifacts()
            logs, page = [], True
            while page:  # every log record, a page at a time
                page = pc.read_logs(limit=200, offset=len(logs))
                logs += page
        keys = {a.key for a in artifacts if a.key}
        assert {f"{s.replace('_', '-')}-result" for s in STAGES} | {"evaluation-table", "pipeline-summary"} <= keys
        table = next(a for a in artifacts if a.key == "evaluation-table")
        assert table.type == "markdown" and "ground_truth |" in table.data and "student |" in table.data
        progress = [a for a in artifacts if a.type == "progress"]
        assert len(progress) >= 4 and all(float(a.data) == 100.0 for a in progress), [a.data for a in progress]
        assert any(r.name == "streamavatar" and r.message.startswith("teacher: 3 steps") and r.flow_run_id
                   for r in logs), sorted({r.name for r in logs})  # fmt: skip
    assert "up to date" in dvc(clone, "status").stdout
    repro = dvc(clone, "repro")
    assert "Running stage" not in repro.stdout
    # what the Prefect path recorded is what `dvc repro` records for the same stage: command, deps, params and
    # outputs alike (the re-run resumes the finished corpus: the same videos; only its metrics file, which
    # counts what this run made, differs)
    recorded = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["corpus"]
    assert "Running stage 'corpus'" in dvc(clone, "repro", "--force", "corpus").stdout
    again = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["corpus"]
    assert {k: again[k] for k in ("cmd", "deps", "params")} == {k: recorded[k] for k in ("cmd", "deps", "params")}
    outs = lambda lock: {o["path"]: o["md5"] for o in lock["outs"] if not o["path"].endswith("metrics.json")}  # noqa: E731
    assert outs(again) == outs(recorded) and len(outs(recorded)) == 3
    client, found = runs(clone)
    parents = [r for r in found if r.data.tags.get("streamavatar.kind") == "pipeline"]
    children = [r for r in found if r.data.tags.get("streamavatar.kind") == "stage"]
    assert len(parents) == 4
    first_parent = parents[0].info.run_id
    nested = [r for r in children if r.data.tags.get("mlflow.parentRunId") == first_parent]
    assert [r.data.tags["streamavatar.stage"] for r in nested] == STAGES
    assert nested[0].data.metrics["clips_ok"] == 2 and nested[0].data.params["corpus.num_conversations"] == "1"
    arts = [a.path for a in client.list_artifacts(nested[0].info.run_id, "corpus")]
    assert {"corpus/contact_sheet.png", "corpus/metrics.json", "corpus/corpus.parquet"} <= set(arts)
    assert nested[1].data.metrics["clips_ok"] == 2 and nested[1].data.params["curate.sources"] == "['synthetic']"
    arts = [a.path for a in client.list_artifacts(nested[1].info.run_id, "curate")]
    assert {"curate/curated.parquet", "curate/histograms.png", "curate/asd_frames.png"} <= set(arts)
    # every training stage logged per-step metrics and a sample video with its audio
    by_stage = {r.data.tags["streamavatar.stage"]: r for r in nested}
    for stage, metric, steps in [("teacher", "teacher/loss", 3), ("distill", "sid/sid_loss", 2),
                                 ("distill", "ode_init/loss", 2), ("refine", "refine/g_loss", 2)]:  # fmt: skip
        assert len(client.get_metric_history(by_stage[stage].info.run_id, metric)) == steps, (stage, metric)
    for stage in ("teacher", "ode_pairs", "distill", "refine"):
        arts = [a.path for a in client.list_artifacts(by_stage[stage].info.run_id, stage)]
        assert f"{stage}/sample.mp4" in arts and f"{stage}/metrics.json" in arts, (stage, arts)
    # dataset lineage: curate read the corpus table, every later stage the curated manifest (one digest)
    inputs = {st: [(d.dataset.name, d.dataset.digest, [t.value for t in d.tags]) for d in r.inputs.dataset_inputs]
              for st, r in by_stage.items()}  # fmt: skip
    assert [(n, c) for n, _, c in inputs["curate"]] == [("corpus", ["curation"])] and not inputs["corpus"]
    manifest = {d for st in STAGES[2:] for _, d, _ in inputs[st]}
    assert len(manifest) == 1 and all([n for n, _, _ in inputs[st]] == ["curated-manifest"] for st in STAGES[2:])
    assert inputs["teacher"][0][2] == ["training"] and inputs["evaluate"][0][2] == ["evaluation"]
    # system metrics (sampled each second here) on the stage runs that last long enough
    assert "system/cpu_utilization_percentage" in by_stage["evaluate"].data.metrics
    assert "system/system_memory_usage_megabytes" in by_stage["teacher"].data.metrics
    # the benchmark and the evaluation table are in MLflow
    bench = client.get_run(by_stage["benchmark"].info.run_id).data.metrics
    assert {"dit_rtf", "vae_rtf", "sequential_rtf", "pipelined_rtf", "pipeline_speedup"} <= set(bench)
    arts = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "evaluate")]
    assert {"evaluate/metrics.json", "evaluate/table.csv", "evaluate/metrics_table.json"} <= set(arts), arts
    # the second run found the stage up to date and said so in its nested run
    skipped = [r for r in children if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    assert skipped[0].data.tags["streamavatar.status"] == "up-to-date"
    # the CLI run that `dvc repro --force corpus` made is tracked like any stage run, without a parent
    cli_run = [r for r in children if "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["streamavatar.stage"] for r in cli_run] == ["corpus"] and cli_run[0].data.metrics["clips_ok"] == 2
    # every stage's command in dvc.yaml is the CLI's own stage command (so `dvc repro` runs what the flow runs)
    dvc_stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    assert {name: spec["cmd"] for name, spec in dvc_stages.items()} == {s: f"streamavatar {s}" for s in STAGES}
    # metrics files hold numbers only (dvc metrics show / diff read them as a table); the plots load
    shown = json.loads(dvc(clone, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]  # one revision: the workspace
    assert len(files) == 9, sorted(files)
    for path, entry in files.items():
        values = list(_leaves(entry["data"]))
        assert values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), path
    plots = json.loads(dvc(clone, "plots", "show", "--json").stdout)
    drawn = {name for name, p in plots["data"].items() if p and p[0]["content"]["data"]["values"]}
    assert {"teacher flow-matching loss", "SiD losses", "GAN refinement losses",
            "benchmark per-chunk latency (ms)"} <= drawn, drawn  # fmt: skip
    assert [e["name"] for e in plots.get("errors", [])] == ["re-evaluation history"]  # the nightly flow's, not run
    # a DVC remote: push; a fresh checkout (the project's files and dvc.lock, no data, no cache) gets every stage
    # output back with `dvc pull` alone and DVC is clean there
    dvc(clone, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(clone, "push")
    fresh = make_clone(tmp_path / "fresh", source=clone)
    assert (fresh / "dvc.lock").is_file() and not (fresh / "data/checkpoints/refine").exists()
    dvc(fresh, "pull")
    assert "up to date" in dvc(fresh, "status").stdout
    for rel in ("data/checkpoints/refine/final.pt", "data/reports/evaluate_metrics.json", "data/manifests/curated.parquet"):
        assert (fresh / rel).read_bytes() == (clone / rel).read_bytes(), rel
    # one parameter changes: DVC sees it and re-runs the stage (and only it: `repro corpus` stops there; the
    # stages after it re-running on changed outputs is tests/test_deployments.py's step 3)
    set_params(clone, seed=3)
    status = dvc(clone, "status").stdout
    assert status.startswith("corpus:") and "changed deps" in status
    third = dvc(clone, "repro", "corpus").stdout
    assert "Running stage 'corpus'" in third and "Running stage 'curate'" not in third
