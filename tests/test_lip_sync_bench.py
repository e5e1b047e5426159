"""`streamavatar bench --lip-sync`: the pooled lip-sync measure of generated videos tells a mouth that follows
its voice from one that does not, and the bench streams every portrait with every seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.common.media import read_audio, read_frames, write_video, write_wav
from tasks.config import ConfigError, load_config
from tests.conftest import shared_path


def _stand_in(clip: Path, reverse: bool):
    """In place of `generate`: a real talking clip (its mouth follows its own voice), 64x64, written where the
    bench expects the generated video -- time-reversed when ``reverse`` (the same mouth, out of step)."""

    def fake(cfg, root, image, voice, out, checkpoint=None, seconds=None, progress=True):
        frames = read_frames(clip, width=64, height=64)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_video(out, frames[::-1] if reverse else frames, 25)
        return {"checkpoint": "stand-in"}

    return fake


@pytest.mark.parametrize("reverse", [False, True])
def test_the_pooled_measure_tells_a_synced_mouth_from_one_out_of_step(tmp_path, monkeypatch, reverse):
    """A real talking clip (PC-AVS__00086: r 0.50 at lag 0 on its own at 64x64) as the "generated" video, its
    own voice as the voice: pooled over two seeds the mouth follows the voice (r >= 0.3 within +-3 frames, well
    above the reversed-voice chance level); the same frames played backwards do not (r < 0.15). The bench's figures are the pooled figures of its videos."""
    from tasks.evaluation import lip_sync_bench

    clip = shared_path("fixtures", "talking", "PC-AVS__00086.mp4")
    voice = tmp_path / "voice.wav"
    write_wav(voice, read_audio(clip, 16000), 16000)
    monkeypatch.setattr(lip_sync_bench, "generate", _stand_in(clip, reverse))
    cfg = load_config(sets=["tracking.enabled=false"], root=tmp_path)
    r = lip_sync_bench.run_lip_sync_bench(cfg, tmp_path, [(Path("portrait.jpg"), voice)], seeds=2, progress=False)
    assert [v["seed"] for v in r["videos"]] == [cfg.project.seed, cfg.project.seed + 1]
    assert all(Path(v["video"]).is_file() and v["face_rate"] > 0.9 for v in r["videos"])
    p = r["pooled"]
    if reverse:
        assert p["r"] < 0.15, p
    else:
        assert p["r"] >= 0.3 and abs(p["lag"]) <= 3 and p["r"] > p["chance"] + 0.2, p
        assert "target r >= 0.2: reached" in lip_sync_bench.format_report(r)
    assert r["by_portrait"]["portrait"]["r"] == pytest.approx(p["r"])  # one portrait: its pool is the pool
    assert p["frames"] > 2 * 120  # both videos' frames in one pool


def test_the_bench_streams_each_portrait_with_each_seed(tmp_path):
    """The real `generate` (the seeded untrained student, a random autoencoder): one video per portrait and seed,
    each seed another stream; noise has no face, so the figures are absent and the report says so."""
    from tasks.evaluation.lip_sync_bench import format_report, run_lip_sync_bench

    avatars = shared_path("fixtures", "avatars")
    cfg = load_config(sets=["tracking.enabled=false", "vae.pretrained_path=null"], root=tmp_path)
    voice = tmp_path / "voice.wav"
    write_wav(voice, read_audio(avatars / "fashion_blogger.wav", 16000)[:16000], 16000)  # 1 s
    r = run_lip_sync_bench(cfg, tmp_path, [(avatars / "fashion_blogger.jpg", voice)], seeds=2, checkpoint="random",
                           progress=False)  # fmt: skip
    assert len(r["videos"]) == 2 and "random" in r["checkpoint"]
    a, b = (read_frames(v["video"]).astype(np.int16) for v in r["videos"])
    assert a.shape == b.shape and np.abs(a - b).mean() > 1  # another seed, another noise
    assert all(v["face_rate"] is None or v["face_rate"] < 0.5 for v in r["videos"])  # noise, not a face
    assert "lip sync of generated videos: 2 videos" in format_report(r)
    with pytest.raises(ConfigError, match="--seeds"):
        run_lip_sync_bench(cfg, tmp_path, [(avatars / "fashion_blogger.jpg", voice)], seeds=0)


def test_bad_paths_are_named_before_the_bench_runs(tmp_path, monkeypatch, capsys):
    """`bench --lip-sync` with a missing portrait or voice, an unreadable portrait, or an --out that cannot be
    written: exit 2 with the path named and no traceback. The project here has no student, so a check made after
    the bench started would fail on that instead; --out is checked before any bench."""
    from flows.cli import main as cli_main

    monkeypatch.setenv("STREAMAVATAR_ROOT", str(tmp_path))
    voice = tmp_path / "voice.wav"
    write_wav(voice, np.zeros(16000, np.float32), 16000)
    not_image = tmp_path / "portrait.png"
    not_image.write_text("not an image\n")
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder would go\n")
    missing = tmp_path / "nobody.jpg"
    cases = [
        (["--lip-sync", "--reference", str(missing), "--voice", str(voice)], f"--reference {missing}: file not found"),
        (["--lip-sync", "--reference", str(not_image), "--voice", str(tmp_path / "x.wav")], "--voice"),
        (["--lip-sync", "--reference", str(not_image), "--voice", str(voice)], f"{not_image}: not an image"),
        (["--lip-sync", "--out", str(blocker / "r.json")], "--out"),
        (["--drift", "--out", str(blocker / "r.json")], "--out"),
    ]
    for args, said in cases:
        assert cli_main(["bench", *args]) == 2, args
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (args, err)
