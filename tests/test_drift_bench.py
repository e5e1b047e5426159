"""`bench --drift`: one student, three cache layouts (rolling / + reference sink / + sink + RAPR).

The bench only means something if the three settings really are the same stream up to the layout: the
first chunk (whose cache is the reference alone in every layout) must be bit-identical, and the baseline
must part from the sink settings once its rolling window has evicted the reference.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flows.cli import main as cli_main
from tasks.config import ConfigError, load_config
from tasks.evaluation.drift_bench import (
    BASELINE,
    METRICS,
    SETTINGS,
    SINK,
    SINK_RAPR,
    drift_inputs,
    drift_layouts,
    format_report,
    run_drift_bench,
)
from tests.conftest import REPO

FRAMES, WINDOW_S = 60, 0.5


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run on the demo profile, random student, in an empty root (no data/latents: a fallback source)."""
    root = tmp_path_factory.mktemp("drift")
    cfg = load_config(sets=["tracking.enabled=false"], root=REPO)
    streams: dict[str, torch.Tensor] = {}
    report = run_drift_bench(cfg, root, frames=FRAMES, checkpoint="random", window_s=WINDOW_S, progress=False,
                             streams_out=streams)  # fmt: skip
    return cfg, report, streams


def test_report_has_three_finite_series_per_setting(bench):
    cfg, report, _ = bench
    json.loads(json.dumps(report))  # plain JSON
    keys = ("frames", "window_s", "windows", "window_edges_s", "checkpoint", "reference_source", "audio_source",
            "hardware", "settings", "wall_s", "interpretation", "feature_space", "flat_grey_frame")
    for key in keys:
        assert key in report, key
    names = ("baseline rolling cache", "+ reference sink", "+ sink + RAPR")
    assert tuple(report["settings"]) == SETTINGS == names
    windows = math.ceil(FRAMES / (WINDOW_S * cfg.video.fps))
    assert report["windows"] == windows == len(report["window_edges_s"])
    assert "random" in report["checkpoint"] and report["trained_student"] is False
    assert "data/latents" not in report["reference_source"]  # the tmp root has none: a fixture or synthetic
    for name, row in report["settings"].items():
        assert row["seconds"] > 0, name
        for metric in METRICS:
            m = row["metrics"][metric]
            assert len(m["series"]) == windows, (name, metric)
            values = [*m["series"], m["first"], m["last"], m["slope_per_min"], m["last_over_first"]]
            assert all(math.isfinite(v) for v in values), (name, metric, m)
            assert m["first"] == m["series"][0] and m["last"] == m["series"][-1]
    assert "RANDOMLY INITIALISED" in report["interpretation"]
    text = format_report(report)
    assert all(name in text for name in SETTINGS)


def test_settings_differ_only_after_the_reference_leaves_the_window(bench):
    cfg, report, streams = bench
    chunk = 4 * cfg.student.chunk_frames
    assert {k: v.shape for k, v in streams.items()} == {k: (FRAMES, 3, cfg.video.height, cfg.video.width)
                                                        for k in SETTINGS}  # fmt: skip
    # chunk 1 attends to the reference only, at the same RoPE index, in every layout: bit-identical
    for name in (SINK, SINK_RAPR):
        assert torch.equal(streams[BASELINE][:chunk], streams[name][:chunk]), name
    # the baseline's rolling window drops frame 0 (at chunk 3 in the demo profile); the sink keeps it
    layouts, c = drift_layouts(cfg), cfg.student.chunk_frames
    evicted = next(k for k in range(1, 20) if 0 not in layouts[BASELINE].visible(1 + k * c, 1 + (k + 1) * c))
    assert report["settings"][SINK]["first_chunk_differing_from_baseline"] == evicted + 1
    after = slice(evicted * chunk, None)
    assert (streams[BASELINE][after] - streams[SINK][after]).abs().max() > 1e-4
    # RAPR re-encodes from the chunk whose end passes D + 1 latent frames; before that the two sinks agree
    rapr_from = next(k for k in range(20) if layouts[SINK_RAPR].shift(1 + (k + 1) * c) > 0)
    assert rapr_from * chunk < FRAMES
    assert torch.equal(streams[SINK][: rapr_from * chunk], streams[SINK_RAPR][: rapr_from * chunk])
    assert (streams[SINK][rapr_from * chunk :] - streams[SINK_RAPR][rapr_from * chunk :]).abs().max() > 1e-4


def test_without_latents_or_fixtures_the_inputs_are_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMAVATAR_SHARED", str(tmp_path / "no-shared"))
    cfg = load_config(sets=["tracking.enabled=false"], root=REPO)
    inputs = drift_inputs(cfg, tmp_path, samples=48_000)
    assert inputs.reference.shape == (3, cfg.video.height, cfg.video.width)
    assert inputs.reference.abs().max() <= 1 and inputs.reference.std() > 0
    assert inputs.avatar.shape == inputs.other.shape == (48_000,)
    assert inputs.avatar.abs().sum() > 0 and inputs.other.abs().sum() > 0  # both talking and listening turns
    assert "synthetic" in inputs.reference_source and "synthetic" in inputs.audio_source


def test_missing_checkpoint_is_refused_with_the_way_out(tmp_path, monkeypatch, capsys):
    cfg = load_config(sets=["tracking.enabled=false"], root=REPO)
    with pytest.raises(ConfigError, match="make demo"):
        run_drift_bench(cfg, tmp_path, frames=12, progress=False)
    monkeypatch.setenv("STREAMAVATAR_ROOT", str(tmp_path))
    assert cli_main(["bench", "--drift", "--frames", "12"]) == 2
    assert "make demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--drift", "--model-only"])  # one benchmark at a time
