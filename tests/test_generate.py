"""`streamavatar generate`: reference image + the avatar's voice (+ the other voice) -> an mp4 with sound.

Every run uses the seeded untrained student (--checkpoint random) and a random autoencoder
(vae.pretrained_path=null) of the default demo profile in an empty project root, so nothing needs `make demo`;
the real avatar fixtures in ../shared are the inputs.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from flows.cli import main as cli_main
from model.streaming import StreamingGenerator
from tasks.common.media import MediaError, ffmpeg_exe, probe, read_audio, read_frames, write_wav
from tasks.config import Config, ConfigError, load_config
from tasks.inference.generate import conversation, fit_reference, generate, mix
from tests.conftest import REPO

FIXTURES = REPO.parent / "shared" / "fixtures" / "avatars"
SR = 16000


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project root (no params.yaml, no checkpoints): the CLI runs on the default tiny profile."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("STREAMAVATAR_ROOT", str(project))
    return project


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every StreamingGenerator.step call's (avatar chunk, other chunk), the real step still running."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = StreamingGenerator.step

    def spy(self: StreamingGenerator, avatar: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        calls.append((avatar.clone(), other.clone()))
        return real(self, avatar, other)

    monkeypatch.setattr(StreamingGenerator, "step", spy)
    return calls


def config(root: Path) -> Config:
    return load_config(sets=["project.device=cpu", "vae.pretrained_path=null"], root=root)  # a random VAE too


def run_cli(root: Path, *args: str) -> int:
    return cli_main(["generate", "--checkpoint", "random", "--set", "project.device=cpu", "--set",
                     "vae.pretrained_path=null", *args])  # fmt: skip


def lavfi(path: Path, source: str, *out_args: str) -> Path:
    """An audio file made by ffmpeg from a lavfi source, e.g. ``sine=frequency=220:duration=1``."""
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source,
                    *out_args, str(path)], check=True)  # fmt: skip
    return path


def fixture_pair() -> tuple[Path, Path]:
    """The avatar fixture with the shortest voice (a real photo and a real recording)."""
    pairs = [(jpg, jpg.with_suffix(".wav")) for jpg in sorted(FIXTURES.glob("*.jpg")) if jpg.with_suffix(".wav").is_file()]
    if not pairs:
        pytest.skip(f"no avatar fixtures (jpg + wav) in {FIXTURES}")
    return min(pairs, key=lambda p: probe(p[1]).duration_s)


def test_fixture_end_to_end_through_the_cli(root, tmp_path, capsys):
    image, voice = fixture_pair()
    out = tmp_path / "videos" / "nested" / "out.mp4"  # the folder does not exist yet
    assert run_cli(root, "--reference", str(image), "--audio", str(voice), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    cfg = config(root)
    seconds = read_audio(voice, SR).size / SR
    frames = math.ceil(seconds * cfg.video.fps - 1e-9)
    assert out.is_file() and not list(out.parent.glob("*.partial*"))
    info = probe(out)
    assert (info.video_codec, info.width, info.height) == ("h264", cfg.video.width, cfg.video.height)
    assert info.fps == cfg.video.fps and info.audio_codec == "aac"
    assert len(read_frames(out)) == frames
    assert abs(info.duration_s - seconds) <= 1 / cfg.video.fps + 1e-6
    assert abs(read_audio(out, SR).size / SR - seconds) <= 1 / cfg.video.fps + 1e-6
    for needle in (f"{frames} frames", "real-time factor", "random", str(out)):
        assert needle in printed, needle


def test_the_video_follows_the_longer_voice_and_carries_both(root, tmp_path, steps):
    avatar = lavfi(tmp_path / "me.wav", "sine=frequency=220:duration=1.0", "-ar", "16000", "-af", "volume=0.5")
    other = lavfi(tmp_path / "you.wav", "sine=frequency=330:duration=2.0", "-ar", "22050", "-ac", "2",
                  "-af", "volume=0.5")  # fmt: skip
    out = tmp_path / "talk.mp4"
    cfg = config(root)
    s = generate(cfg, root, FIXTURES / "boy.jpg", avatar, out, listen_to=other, checkpoint="random", progress=False)
    fps, spf = cfg.video.fps, SR // cfg.video.fps
    assert s["frames"] == len(read_frames(out)) == 2 * fps and s["seconds"] == pytest.approx(2.0)
    assert s["listen_to"] == str(other) and s["rtf"] > 0
    # the generator talks on the avatar's voice and listens to the other one, chunk by chunk
    a, o = read_audio(avatar, SR), read_audio(other, SR)
    assert len(steps) == s["chunks"] == math.ceil(o.size / steps[0][0].numel())
    talk, listen = torch.cat([c[0] for c in steps]), torch.cat([c[1] for c in steps])
    assert torch.allclose(talk[: a.size], torch.from_numpy(a)) and talk[a.size :].abs().max() == 0
    assert torch.allclose(listen[: o.size], torch.from_numpy(o))
    # the sound track is the mix: only the other voice is heard after the avatar's 1 s
    heard = read_audio(out, SR)
    expected = mix(*conversation(a, o))
    n = min(heard.size, expected.size)
    assert n >= expected.size - spf
    assert np.corrcoef(heard[:n], expected[:n])[0, 1] > 0.9
    late = heard[int(1.2 * SR) : int(1.9 * SR)]
    assert np.sqrt(np.mean(late**2)) > 0.5 * np.sqrt(np.mean(o[int(1.2 * SR) : int(1.9 * SR)] ** 2))


def test_stereo_mp3_and_odd_sized_png_are_accepted(root, tmp_path, steps):
    mp3 = lavfi(tmp_path / "x.mp3", "sine=frequency=220:duration=1.5", "-ac", "2", "-ar", "44100")
    png = tmp_path / "odd.png"
    yy, xx = np.mgrid[0:177, 0:301]
    cv2.imwrite(str(png), np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))
    out = tmp_path / "mp3.mp4"
    assert run_cli(root, "--reference", str(png), "--audio", str(mp3), "--out", str(out)) == 0
    cfg = config(root)
    samples = read_audio(mp3, SR).size
    spc = steps[0][0].numel()
    assert spc == 4 * cfg.student.chunk_frames * SR // cfg.video.fps
    assert len(steps) == math.ceil(samples / spc)  # one streaming step per chunk, nothing else
    info = probe(out)
    assert (info.width, info.height, info.audio_codec) == (cfg.video.width, cfg.video.height, "aac")
    assert len(read_frames(out)) == math.ceil(samples / (SR // cfg.video.fps))


def test_seconds_cuts_the_audio(root, tmp_path):
    image, voice = fixture_pair()
    out = tmp_path / "cut.mp4"
    s = generate(config(root), root, image, voice, out, checkpoint="random", seconds=0.5, progress=False)
    assert s["frames"] == len(read_frames(out)) == math.ceil(0.5 * config(root).video.fps)


def test_the_reference_is_centre_cropped_not_stretched():
    img = np.zeros((177, 301, 3), np.uint8)
    img[:, :] = (0, 0, 255)  # blue sides...
    x0 = (301 - 177) // 2
    img[:, x0 : x0 + 177] = (255, 0, 0)  # ...around a red centre square: a square crop is all red
    ref = fit_reference(img, 64, 64)
    assert ref.shape == (3, 64, 64) and ref.min() >= -1 and ref.max() <= 1
    assert torch.allclose(ref[0], torch.ones(64, 64)) and torch.allclose(ref[2], -torch.ones(64, 64))
    tall = fit_reference(np.full((720, 400, 3), 128, np.uint8), 64, 32)
    assert tall.shape == (3, 32, 64)


def test_the_head_crop_frames_the_face_as_the_training_clips_do():
    """The default crop is curation's head crop: the face's larger side is 1 / curate.head_scale (0.59) of the
    crop, as in every training clip, where the wide "face" crop of a half-body photo leaves it small."""
    from tasks.inference.generate import _landmarks, read_reference

    def face_share(crop: str) -> float:
        ref = read_reference(FIXTURES / "fashion_blogger.jpg", 256, 256, crop=crop, head_scale=1.7)
        lm = _landmarks(((ref.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
        assert lm is not None, f"no face in the {crop} crop"
        return float(max(np.ptp(lm[:, 0]), np.ptp(lm[:, 1])) / 256)

    head, wide = face_share("head"), face_share("face")
    assert 0.45 < head < 0.72, head
    assert wide < 0.6 * head, (wide, head)


def test_the_crop_follows_the_face_on_a_real_portrait():
    """On the portrait fixtures (taller than square) a centre crop can cut the head off; the face crop keeps
    the face FaceMesh finds in the frame, centred across and FACE_HEADROOM down."""
    from tasks.common.media import read_frames
    from tasks.inference.generate import FACE_HEADROOM, face_centre, read_reference

    found = 0
    for image in sorted(FIXTURES.glob("*.jpg")):
        full = read_frames(image)[0]
        h, w = full.shape[:2]
        centre = face_centre(full)
        if centre is None or h <= w:
            continue
        found += 1
        keep = w  # a square crop of a portrait keeps the whole width
        y0 = int(np.clip(round(centre[1] - FACE_HEADROOM * keep), 0, h - keep))
        expected = fit_reference(full[y0 : y0 + keep], 64, 64)
        assert torch.equal(read_reference(image, 64, 64, crop="face"), expected)
        assert y0 <= centre[1] <= y0 + keep  # the face is inside the crop
        assert torch.equal(read_reference(image, 64, 64, crop="centre"), fit_reference(full, 64, 64))
    assert found >= 1, "FaceMesh found no face on any portrait fixture"


def test_bad_inputs_exit_2_naming_the_file(root, tmp_path, capsys):
    image, voice = fixture_pair()
    bad = tmp_path / "x.wav"
    bad.write_text("this is not audio\n")
    out = str(tmp_path / "o.mp4")
    assert run_cli(root, "--reference", str(image), "--audio", str(bad), "--out", out) == 2
    assert "error:" in (err := capsys.readouterr().err) and str(bad) in err
    missing = tmp_path / "nobody.jpg"
    assert run_cli(root, "--reference", str(missing), "--audio", str(voice), "--out", out) == 2
    assert str(missing) in capsys.readouterr().err
    assert run_cli(root, "--reference", str(image), "--audio", str(voice), "--out", str(tmp_path / "o.avi")) == 2
    assert ".mp4" in capsys.readouterr().err
    assert run_cli(root, "--reference", str(image), "--audio", str(voice), "--listen-to", str(bad), "--out", out) == 2
    assert str(bad) in capsys.readouterr().err
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.float32), SR)
    assert run_cli(root, "--reference", str(image), "--audio", str(empty), "--out", out) == 2
    assert str(empty) in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(MediaError, match="nobody.jpg"):
        generate(config(root), root, missing, voice, Path(out), checkpoint="random", progress=False)


def test_without_a_trained_student_the_way_out_is_named(root, tmp_path, capsys):
    image, voice = fixture_pair()
    out = tmp_path / "o.mp4"
    args = ["generate", "--reference", str(image), "--audio", str(voice), "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "make demo" in err and "--checkpoint random" in err
    with pytest.raises(ConfigError, match="make demo"):
        generate(config(root), root, image, voice, out, progress=False)
    assert not out.exists()


def test_an_output_that_cannot_be_written_fails_before_any_model_loads(root, tmp_path, capsys):
    """A folder given as --out, or a folder that cannot be made or written, is named before the student is
    looked for (this project has none: that error would come first otherwise) and before any frame is made."""
    image, voice = fixture_pair()
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder would go\n")
    folder = tmp_path / "video.mp4"
    folder.mkdir()
    for out, said in ((folder, "is a folder"), (blocker / "sub" / "o.mp4", "cannot create its folder")):
        with pytest.raises(MediaError, match=said):
            generate(config(root), root, image, voice, out, progress=False)
        assert cli_main(["generate", "--reference", str(image), "--audio", str(voice), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and "--out" in err and "make demo" not in err
    made = tmp_path / "new" / "deeper" / "o.mp4"  # a missing folder is made, as before
    with pytest.raises(ConfigError, match="make demo"):
        generate(config(root), root, image, voice, made, progress=False)
    assert made.parent.is_dir() and not made.exists() and not list(made.parent.iterdir())


class _Payload:  # an object a malicious checkpoint could carry: unpickling it would call __reduce__'s callable
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_a_checkpoint_that_holds_more_than_weights_is_refused(tmp_path):
    """Checkpoints load with torch.load(weights_only=True): one that pickles an arbitrary object (code would run
    while loading it) is refused with an error naming the file; a plain one loads."""
    from tasks.common.models import build_audio
    from tasks.common.student import load_student

    cfg = Config()
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "extra": _Payload()}, bad)
    with pytest.raises(ConfigError, match=r"bad\.pt: refused, it holds more than weights"):
        load_student(cfg, tmp_path, str(bad), build_audio(cfg), torch.device("cpu"))
    from tasks.common.models import build_dit

    good = tmp_path / "good.pt"
    audio = build_audio(cfg)
    torch.save({"model": build_dit(cfg, audio.token_dim, pretrained=False).state_dict(), "step": 3}, good)
    dit, info = load_student(cfg, tmp_path, str(good), audio, torch.device("cpu"))
    assert info["trained"] and not dit.training


def test_actions_switch_the_prompt_at_chunk_boundaries_and_run_their_length(root, tmp_path, monkeypatch, capsys):
    """--actions: each request starts at the next chunk boundary (State-Cycling), runs --action-seconds in whole
    chunks and the DiT sees that action's prompt (Cache-Switching) in exactly those chunks."""
    from model.text import action_embeddings
    from tasks.inference.generate import parse_actions

    voice = lavfi(tmp_path / "me.wav", "sine=frequency=220:duration=3.0", "-ar", "16000")
    cfg = config(root)
    seen: list[str] = []
    real = StreamingGenerator.denoise

    def spy(self, avatar, other):
        out = real(self, avatar, other)  # the switch happens inside, before the chunk is denoised
        name = next(n for n, c in self.contexts.items() if c is self.context)
        seen.append(name)
        return out

    monkeypatch.setattr(StreamingGenerator, "denoise", spy)
    out = tmp_path / "acted.mp4"
    s = generate(cfg, root, FIXTURES / "boy.jpg", voice, out, checkpoint="random", progress=False,
                 actions="0.5:nod, 1.5:turn_left", action_s=0.96)  # fmt: skip
    chunk_s = s["chunk_video_frames"] / cfg.video.fps  # 0.48 s
    assert s["action_chunks"] == 2 and chunk_s == pytest.approx(0.48)
    # nod requested at 0.5 s -> chunk 2 (0.96 s); turn_left at 1.5 s -> chunk 4 (1.92 s), after the nod's 2
    assert seen == ["idle", "idle", "nod", "nod", "turn_left", "turn_left", "idle"][: s["chunks"]]
    assert [r["action"] for r in s["action_log"]] == seen
    assert [r["state"] for r in s["action_log"]][2:6] == ["reacting"] * 4
    assert s["requests"] == [("nod", 24, 48), ("turn_left", 48, 72)]
    # the prompts are the action embeddings: distinct, sharing the base prompt's first half
    emb = action_embeddings(cfg.model.prompt, cfg.model.text_len, cfg.model.text_dim)
    half = cfg.model.text_len // 2
    assert torch.equal(emb["nod"][:, :half], emb["idle"][:, :half]) and not torch.equal(emb["nod"], emb["idle"])
    assert not torch.equal(emb["nod"], emb["turn_left"])
    assert parse_actions("5:smile,1.0:nod") == [(1.0, "nod"), (5.0, "smile")]
    for bad, why in (("2.0:dance", "unknown action 'dance'"), ("nod", "SECONDS:ACTION"), ("-1:nod", "SECONDS >= 0")):
        with pytest.raises(ConfigError, match=why):
            parse_actions(bad)
    assert run_cli(root, "--reference", str(FIXTURES / "boy.jpg"), "--audio", str(voice), "--out",
                   str(tmp_path / "bad.mp4"), "--actions", "1:dance") == 2  # fmt: skip
    assert "unknown action 'dance'" in capsys.readouterr().err
