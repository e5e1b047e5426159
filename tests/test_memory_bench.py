"""`bench --memory` ([10]): the stream is shown a marked clip until the mark has been on screen for a whole chunk,
then generates; the share of generated frames that keep the mark, per window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.config import ConfigError, load_config
from tasks.evaluation.memory import mark_shown
from tasks.evaluation.memory_bench import MarkedClip, marked_clips, memory_stream, shares_by_window
from tests.conftest import REPO

GREEN = (40, 255, 40)


def _clip(mark: bool) -> MarkedClip:
    """61 frames of a smooth seeded image; from frame 30 a green disc (radius 7 px at 64x64) when ``mark``."""
    g = np.random.default_rng(0)
    base = np.kron(g.integers(60, 150, size=(8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    frames = np.repeat(base[None], 61, axis=0)
    if mark:
        yy, xx = np.mgrid[:64, :64]
        frames[30:, (yy - 36) ** 2 + (xx - 22) ** 2 <= 49] = GREEN
    spf = 640
    t = np.arange(61 * spf) / 16000
    wave = (0.2 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 4 * t) > 0)).astype(np.float32)
    return MarkedClip("synthetic", frames, wave, np.ones(61, np.float32), GREEN, 30 if mark else 0)


@pytest.fixture(scope="module")
def gen():
    from tasks.common.student import build_stream

    cfg = load_config([], ["vae.pretrained_path=weights/demo_vae.pt", "tracking.enabled=false"], root=REPO)
    return build_stream(cfg, REPO, "random")[0]


def test_memory_stream_observes_until_a_whole_chunk_shows_the_mark_then_generates(gen):
    clip = _clip(True)
    assert mark_shown(clip.frames, GREEN)[29:31].tolist() == [False, True]
    s = memory_stream(gen, clip, seconds=1.0, fps=25)
    # chunks hold frames 1-12, 13-24, 25-36, 37-48: the mark (from 30) fills a whole chunk in the fourth
    assert s["observed_chunks"] == 4
    assert s["frames"].shape == (36, 64, 64, 3) and s["frames"].dtype == np.uint8  # 1 s -> 3 chunks of 12
    assert s["left_window_frame"] == 12  # window_frames 3 = one chunk: the observed frames leave after it
    # what was observed is in the cache: the same stream after the unmarked clip generates other frames, and
    # the same inputs give the same frames (seeded)
    again = memory_stream(gen, clip, seconds=1.0, fps=25)["frames"]
    assert np.array_equal(again, s["frames"])
    plain = _clip(False)
    plain.first_shown = 30
    other = memory_stream(gen, plain, seconds=1.0, fps=25)["frames"]
    assert not np.array_equal(other[:12], s["frames"][:12])
    late = _clip(True)
    late.first_shown = 55  # no whole chunk with the mark left in 61 frames
    with pytest.raises(ConfigError, match="too late"):
        memory_stream(gen, late, seconds=1.0, fps=25)


def test_shares_by_window_and_a_clear_error_without_marked_clips(tmp_path):
    assert shares_by_window(np.array([1, 1, 0, 0, 1], bool), fps=2, window_s=1.0) == [1.0, 0.0, 1.0]
    cfg = load_config([], [f"corpus.out_dir={tmp_path / 'corpus'}", f"curate.out_dir={tmp_path / 'curated'}"],
                      root=tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match="mark_prob"):
        marked_clips(cfg, tmp_path, 2)
    torch.manual_seed(0)


def test_a_checkpoint_with_memory_slots_into_a_model_without_them_is_a_config_error():
    from tasks.common.models import build_audio, build_dit
    from tasks.training.common import dit_from_state

    with_memory = load_config([], ["model.memory_slots=4", "train.window_chunks=3"], root=REPO)
    audio = build_audio(with_memory)
    state = build_dit(with_memory, audio.token_dim, pretrained=False).state_dict()
    with pytest.raises(ConfigError, match="memory_slots.*long_memory"):
        dit_from_state(load_config([], [], root=REPO), audio, state, torch.device("cpu"))


def test_mark_contrast_grades_the_mark_at_its_place():
    """1 where the frame has the mark's colour at its place, 0 the reference's, in between for a faded mark,
    about 0 for a drift of the whole frame; the place is where most of the first marked frames show it."""
    from tasks.evaluation.memory import mark_contrast, mark_region

    clip = _clip(True)
    region = mark_region(clip.frames[30:42], GREEN)
    assert region.sum() == int(((np.mgrid[:64, :64][0] - 36) ** 2 + (np.mgrid[:64, :64][1] - 22) ** 2 <= 49).sum())
    ref = clip.frames[0]
    c = mark_contrast(clip.frames, ref, region, GREEN)
    assert np.allclose(c[:30], 0.0) and np.allclose(c[30:], 1.0)
    faded = (0.75 * ref.astype(np.float32) + 0.25 * clip.frames[40].astype(np.float32)).round().astype(np.uint8)
    assert abs(float(mark_contrast(faded[None], ref, region, GREEN)[0]) - 0.25) < 0.01
    # the whole frame drifting towards the mark's colour is not a mark
    drift = (0.6 * ref.astype(np.float32) + 0.4 * np.array(GREEN, np.float32)).round().astype(np.uint8)
    assert abs(float(mark_contrast(drift[None], ref, region, GREEN)[0])) < 0.01
    with pytest.raises(ValueError, match="region is empty"):
        mark_contrast(clip.frames, ref, mark_region(clip.frames[:30], GREEN), GREEN)
