"""Every stage is wired the same way: registry (CLI), Prefect flow, dvc.yaml stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from flows.cli import build_parser
from flows.full_pipeline import STAGE_FLOWS, full_pipeline
from tasks.registry import ORDER, STAGES
from tasks.runner import stage_params

REPO = Path(__file__).resolve().parents[1]


def test_each_stage_has_cli_flow_and_dvc_stage():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = build_parser()._subparsers._group_actions[0].choices
    assert full_pipeline.name == "full-pipeline"
    for name in ORDER:
        assert name in commands
        assert STAGE_FLOWS[name].name == name
        assert dvc[name]["cmd"] == f"streamavatar {name}"
        assert dvc[name].get("outs") or dvc[name].get("metrics"), name  # every stage leaves a file
    assert list(dvc) == ORDER == list(STAGES)
    assert stage_params(REPO, "corpus") == ["corpus"]


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    env_bin = Path(sys.executable).parent
    proc = subprocess.run([str(env_bin / "streamavatar"), "config", "--set", "corpus.num_convs=3"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'corpus.num_convs'" in proc.stderr and "num_conversations" in proc.stderr
    ok = subprocess.run([str(env_bin / "streamavatar"), "config", "--config", "configs/paper.yaml",
                         "--set", "corpus.seed=3"], cwd=REPO / "tasks", capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    cfg = yaml.safe_load(ok.stdout)
    assert cfg["corpus"]["seed"] == 3 and cfg["video"]["width"] == 928  # found the project from a subfolder


def test_a_cli_stage_prints_its_summary_once(tmp_path):
    """The runner logs a stage's summary for the run's logs (Prefect's UI: tests/test_pipeline.py) and the CLI
    prints it: on the console it appears once, on stdout."""
    from tests.conftest import tool_env

    proc = subprocess.run([sys.executable, "-m", "flows.cli", "corpus", "--set", "corpus.num_conversations=1",
                           "--set", "corpus.duration_s=2", "--set", "corpus.extra_faces_dirs=[]",
                           "--set", "tracking.enabled=false"],
                          cwd=tmp_path, env=tool_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("corpus: 2 clips ok")]
    assert len(lines) == 1 and lines[0] in proc.stdout.splitlines(), proc.stdout + proc.stderr


def test_unknown_stages_and_bad_ports_are_refused_before_anything_starts(monkeypatch, capsys):
    """`pipeline --stages` with a name that is no stage: exit 2 naming it and the stages, before a Prefect flow
    run starts (the flow itself would fail in its own run, with a traceback); a port out of range for `serve`:
    argparse's usage error (exit 2) naming the flag, before any server starts."""
    import pytest

    import flows.full_pipeline
    from flows.cli import main as cli_main

    def no_flow(**kwargs):
        raise AssertionError(f"the flow started: {kwargs}")

    monkeypatch.setattr(flows.full_pipeline, "full_pipeline", no_flow)
    assert cli_main(["pipeline", "--stages", "teacher,nope,evaluate"]) == 2
    err = capsys.readouterr().err
    assert "--stages: unknown stage(s) nope" in err and ",".join(ORDER) in err
    for flag, value, said in (("--prefect-port", "99999", "99999 is not a port number"),
                              ("--mlflow-port", "x", "'x' is not a port number")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            cli_main(["serve", flag, value])
        assert exit_.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err


def test_a_missing_input_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A stage whose inputs are missing (curate with a local folder that does not exist) exits 2 with the
    stage's own message naming the setting, not a FileNotFoundError traceback."""
    from flows.cli import main as cli_main

    monkeypatch.setenv("STREAMAVATAR_ROOT", str(tmp_path))
    missing = tmp_path / "nothere"
    args = ["curate", "--set", "curate.sources=[local]", "--set", f"curate.local_dirs=[{missing}]",
            "--set", "tracking.enabled=false"]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"error: curate: no clips in curate.sources ['local'] (local_dirs: ['{missing}'])" in err, err
    assert "Traceback" not in err
