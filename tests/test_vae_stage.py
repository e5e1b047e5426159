"""The demo's causal streaming autoencoder and the stages that train it (`pretrain`, `vae`), on tiny real data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from model.causal_ae import CausalAEStreamState, CausalVideoAE
from model.vae import VideoVAE
from tasks.common.models import build_vae
from tasks.config import ConfigError, load_config
from tasks.training.pretrain import run_pretrain
from tasks.training.vae import bicubic, psnr_ssim, run_vae
from tests.conftest import shared_path

CLIPS = ["PC-AVS__00086.mp4", "PC-AVS__620900105.mp4", "PC-AVS__517600055.mp4"]  # 224x224, 4-5 s each


@pytest.mark.parametrize("decoder_blocks", [0, 2])
def test_causal_ae_shapes_and_streaming_equals_whole_decode(decoder_blocks):
    torch.manual_seed(0)
    ae = CausalVideoAE(z_dim=8, widths=(16, 32), temporal=4, patch=2, decoder_blocks=decoder_blocks).eval()
    for name, p in ae.named_parameters():  # the extra blocks start as the identity: make them do something
        if name.startswith("dec_up_res.") and name.endswith("conv2.weight"):
            p.data.normal_(0.0, 0.05)
    video = torch.rand(2, 3, 1 + 4 * 6, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ae.encode(video)
        assert z.shape == (2, 8, 7, 8, 8)
        whole = ae.decode(z)
        assert whole.shape == video.shape
        state = CausalAEStreamState()
        parts = [ae.decode(z[:, :, :1], state)] + [ae.decode(z[:, :, i : i + 3], state) for i in (1, 4)]
    assert [p.shape[2] for p in parts] == [1, 12, 12]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5)
    # causal: changing the last latent frame changes only its own four frames
    z2 = z.clone()
    z2[:, :, -1] += 1.0
    with torch.no_grad():
        other = ae.decode(z2)
    assert torch.equal(other[:, :, :-4], whole[:, :, :-4])
    assert not torch.allclose(other[:, :, -4:], whole[:, :, -4:])
    # the encoder is causal too: latent frame 0 sees the reference image only
    v2 = video.clone()
    v2[:, :, 1:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(v2)[:, :, :1], z[:, :, :1])


def test_decoder_blocks_grow_a_trained_autoencoder_exactly(tmp_path):
    """vae.decoder_blocks > 0 continues weights saved without them: same output until the new blocks train;
    anything else that does not fit is refused with the field named."""
    from tasks.common.models import causal_ae_spec
    from tasks.training.vae import load_init

    torch.manual_seed(0)
    small = CausalVideoAE(z_dim=8, widths=(16, 32), decoder_blocks=0).eval()
    cfg = load_config(sets=["vae.z_dim=8", "vae.widths=[16, 32]", "vae.decoder_blocks=0"], use_params=False)
    path = tmp_path / "ae.pt"
    torch.save({"model": small.state_dict(), "spec": causal_ae_spec(cfg)}, path)
    grown_cfg = load_config(sets=["vae.z_dim=8", "vae.widths=[16, 32]", "vae.decoder_blocks=2"], use_params=False)
    init = load_init(grown_cfg, str(path), "vae_train.init_from", tmp_path)
    big = CausalVideoAE(z_dim=8, widths=(16, 32), decoder_blocks=2).eval()
    missing = big.load_grown(init["model"])
    assert missing and all(k.startswith("dec_up_res.") for k in missing)
    z = torch.randn(1, 8, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(big.decode(z), small.decode(z), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):  # fewer blocks than the weights have: refused
        small.load_grown(big.state_dict())
    for sets in (["vae.widths=[16, 16]"], ["vae.z_dim=4"]):
        bad = load_config(sets=["vae.z_dim=8", "vae.widths=[16, 32]", "vae.decoder_blocks=2", *sets], use_params=False)
        with pytest.raises(ConfigError, match="vae_train.init_from"):
            load_init(bad, str(path), "vae_train.init_from", tmp_path)


def test_video_vae_streaming_decoder_with_latent_statistics():
    torch.manual_seed(1)
    vae = VideoVAE(CausalVideoAE(4, (8, 16)), latents_mean=[0.5, -1.0, 2.0, 0.0], latents_std=[2.0, 1.0, 0.5, 1.0])
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(video)
        raw = vae.vae.encode(video)
        torch.testing.assert_close(lat * vae.std + vae.mean, raw)
        full = vae.decode(lat).clamp(-1, 1)
        dec = vae.stream_decoder()
        streamed = torch.cat([dec.decode(lat[:, :, :1]), dec.decode(lat[:, :, 1:])], dim=2)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    assert dec.frames_decoded == 9


def test_bicubic_baseline_and_psnr_known_values():
    x = torch.zeros(3, 2, 8, 8)
    assert psnr_ssim(x, x)[0] == 100.0
    y = x + 2 * 16 / 255  # a uniform error of 16 grey levels
    assert psnr_ssim(y, x)[0] == pytest.approx(10 * np.log10(255**2 / 16**2), abs=0.1)
    flat = torch.full((3, 1, 8, 8), 0.3)
    torch.testing.assert_close(bicubic(flat, 4), flat)  # a flat image survives down- and up-scaling


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A project root with three real talking clips (one held out) and a tiny causal autoencoder config."""
    root = tmp_path_factory.mktemp("vae_root")
    clips = root / "clips"
    clips.mkdir()
    for name in CLIPS:
        shutil.copy(shared_path("fixtures", "talking", name), clips / name)
    return root


def tiny_cfg(root, *sets):
    return load_config([], [
        "video.width=32", "video.height=32", "vae.z_dim=8", "vae.widths=[16, 32]", "vae.patch=2",
        "vae.spatial_compression=4", "vae.decoder_blocks=0", f"pretrain.dirs=[{root / 'clips'}]",
        "pretrain.holdout=[PC-AVS__00086]",
        "pretrain.max_seconds_per_clip=2.0", "pretrain.iterations=40", "pretrain.lr=0.002",
        f"pretrain.out_dir={root / 'pretrain'}", "vae_train.batch_size=4", "vae_train.eval_windows=3",
        "vae_train.warmup=5", "train.checkpoint_every=20", "tracking.enabled=false", "model.num_layers=2",
        "model.num_heads=2", "model.head_dim=16", "model.ffn_dim=64", "train.window_chunks=1",
        "pretrain.dit_iterations=40", "pretrain.dit_batch_size=4", "pretrain.dit_lr=0.002", *sets,
    ], root=root)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tiny_root):
    """`streamavatar pretrain --export weights` on the tiny root: the weights the vae stage starts from."""
    return run_pretrain(tiny_cfg(tiny_root), tiny_root, progress=False, export="weights")


def test_pretrain_learns_on_held_out_faces_and_exports_weights_with_provenance(tiny_root, pretrained):
    cfg = tiny_cfg(tiny_root)
    m = pretrained.metrics
    assert m["heldout_clips"] == 1 and m["train_clips"] == 2
    # 40 steps on two clips: the held-out clip's reconstruction gains over 2.5 dB (measured: 10.1 -> 13.6 dB)
    # and SSIM more than doubles (0.08 -> 0.37) against the untrained network
    assert m["psnr"] > m["psnr_before"] + 2.5, m
    assert m["ssim"] > 2 * m["ssim_before"], m
    weights = tiny_root / "weights" / "demo_vae.pt"
    info = json.loads((tiny_root / "weights" / "demo_vae.json").read_text())
    assert info["heldout_clips"] == ["PC-AVS__00086"] and info["size_bytes"] == weights.stat().st_size
    assert info["metrics"]["psnr"] == pytest.approx(m["psnr"])
    assert (tiny_root / "pretrain" / "reconstructions.png").stat().st_size > 0
    # every later stage loads it through vae.pretrained_path, latent statistics included
    vae = build_vae(tiny_cfg(tiny_root, f"vae.pretrained_path={weights}"), root=tiny_root)
    assert vae.causal_ae and not torch.equal(vae.std, torch.ones_like(vae.std))
    with pytest.raises(ConfigError, match="causal autoencoder"):
        build_vae(tiny_cfg(tiny_root, f"vae.pretrained_path={weights}", "vae.z_dim=4"), root=tiny_root)
    # the base DiT (no audio) learns the held-out clip's motion: its flow-matching loss at fixed noise falls
    # (measured, 40 steps: 2.27 -> 1.65); the untrained network is worse than the per-channel Gaussian denoiser
    assert m["dit_fm_loss"] < 0.8 * m["dit_before_fm_loss"], m
    assert m["dit_before_fm_loss"] > m["dit_gaussian_fm_loss"]
    dit = torch.load(tiny_root / "weights" / "demo_dit.pt", weights_only=True)
    assert dit["spec"]["num_layers"] == 2 and "blocks.0.audio_attn.to_q.weight" in dit["model"]
    assert json.loads((tiny_root / "weights" / "demo_dit.json").read_text())["metrics"]["dit_fm_loss"] == m["dit_fm_loss"]
    assert (tiny_root / "pretrain" / "dit_samples.png").stat().st_size > 0
    # a re-run resumes from the last step checkpoints: nothing left to train, same result
    again = run_pretrain(cfg, tiny_root, progress=False)
    assert again.metrics["psnr"] == pytest.approx(m["psnr"], abs=1e-6)
    assert again.metrics["dit_fm_loss"] == pytest.approx(m["dit_fm_loss"], abs=1e-6)


def test_pretrain_continues_from_exported_weights_decoder_only_and_overlapping_windows(tiny_root, pretrained):
    first = pretrained.metrics
    cfg = tiny_cfg(tiny_root, f"pretrain.out_dir={tiny_root / 'pretrain2'}", "pretrain.iterations=10",
                   "pretrain.dit_iterations=10", "pretrain.vae_init_from=weights/demo_vae.pt",
                   "pretrain.vae_decoder_only=true", "pretrain.dit_init_from=weights/demo_dit.pt",
                   "pretrain.dit_window_stride=4")  # fmt: skip
    m = run_pretrain(cfg, tiny_root, progress=False, export="weights2").metrics
    # both halves start where the exported run ended, measured on the same held-out windows
    assert m["psnr_before"] == pytest.approx(first["psnr"], abs=1e-4) and m["decoder_only"] == 1.0
    # the encoder is frozen, so the latents and the DiT's held-out loss on them are exactly the earlier ones
    assert m["dit_before_fm_loss"] == pytest.approx(first["dit_fm_loss"], rel=1e-4)
    assert m["dit_continued"] == 1.0
    assert m["dit_train_windows"] > 2 * first["dit_train_windows"]  # a window every 4 frames, not back to back
    old = torch.load(tiny_root / "weights" / "demo_vae.pt", weights_only=True)["model"]
    new = torch.load(tiny_root / "weights2" / "demo_vae.pt", weights_only=True)["model"]
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("enc_"))
    assert not all(torch.equal(old[k], new[k]) for k in old if k.startswith("dec_"))
    info = json.loads((tiny_root / "weights2" / "demo_dit.json").read_text())
    assert info["continued_from"]["dit_init_from"]["metrics"]["dit_fm_loss"] == first["dit_fm_loss"]
    with pytest.raises(ConfigError, match="dit_init_from"):
        run_pretrain(tiny_cfg(tiny_root, "pretrain.dit_init_from=weights/demo_dit.pt", "model.num_layers=3"),
                     tiny_root, progress=False, what="dit")  # fmt: skip


def test_vae_stage_finetunes_from_the_pretrained_weights_on_curated_clips(tiny_root, pretrained):
    assert (tiny_root / "weights" / "demo_vae.pt").is_file()
    rows = []
    for i, name in enumerate(CLIPS):
        rows.append({"clip_id": f"c{i}", "video_path": f"clips/{name}", "mask_path": "m.npy", "status": "ok",
                     "selected": True, "split": "val" if i == 0 else "train"})  # fmt: skip
    (tiny_root / "data" / "manifests").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(tiny_root / "data" / "manifests" / "curated.parquet")
    cfg = tiny_cfg(tiny_root, "vae_train.init_from=weights/demo_vae.pt", "vae_train.iterations=6")
    result = run_vae(cfg, tiny_root, progress=False)
    m = result.metrics
    assert m["init_from_pretrained"] == 1.0 and m["heldout_clips"] == 1
    # it starts from the pretrained weights, which already reconstruct (13.7 dB measured; a random network ~10 dB)
    assert m["psnr_before"] > 12.0, m
    assert (tiny_root / "data" / "checkpoints" / "vae" / "final.pt").is_file()
    assert (tiny_root / "data" / "reports" / "vae" / "reconstructions.png").is_file()
    # only the decoder trained (the default): the encoder AND the latent statistics are the pretrained ones, so
    # the normalised latents the base DiT was trained on are exactly what the teacher gets
    start = torch.load(tiny_root / "weights" / "demo_vae.pt", weights_only=True)
    tuned = torch.load(tiny_root / "data" / "checkpoints" / "vae" / "final.pt", weights_only=True)
    assert tuned["latents_mean"] == start["latents_mean"] and tuned["latents_std"] == start["latents_std"]
    assert all(torch.equal(start["model"][k], tuned["model"][k]) for k in start["model"] if k.startswith("enc_"))
    # training the encoder too measures them afresh on the curated clips
    cfg = tiny_cfg(tiny_root, "vae_train.init_from=weights/demo_vae.pt", "vae_train.iterations=2",
                   "vae_train.decoder_only=false", "vae_train.out=data/checkpoints/vae_all/final.pt")  # fmt: skip
    run_vae(cfg, tiny_root, progress=False)
    whole = torch.load(tiny_root / "data" / "checkpoints" / "vae_all" / "final.pt", weights_only=True)
    assert whole["latents_std"] != start["latents_std"]
    with pytest.raises(ConfigError, match="init_from"):
        run_vae(tiny_cfg(tiny_root, "vae_train.init_from=weights/missing.pt"), tiny_root, progress=False)


def test_pretrain_audio_windows_are_the_teachers_and_the_dit_learns_its_audio_path(tiny_root, pretrained):
    from model.audio import group_latent, split_talk_listen, streamed_features, with_reference_slot
    from model.vad import build_vad
    from tasks.common.media import read_audio
    from tasks.common.models import build_audio
    from tasks.training.pretrain import clip_window_audio

    cfg = tiny_cfg(tiny_root, "pretrain.dit_audio=true", "pretrain.dit_lip_windows=2")
    cond = build_audio(cfg)
    wave = read_audio(tiny_root / "clips" / CLIPS[1], 16000, duration=2.0)
    spf, frames, total = 640, 13, 50  # train.window_chunks 1: 1 + 4 * 3 video frames
    out = clip_window_audio(cfg, cond, wave, total, range(0, total - frames + 1, 4), frames)
    assert out["talk"].shape[:2] == (10, 4) and out["wave"].shape == (10, frames * spf)
    # windows on the chunk grid (12 frames) hear exactly what the teacher's windows hear: the features a stream
    # started at frame 0 computes, split by the live mask, grouped per latent frame behind a silent reference slot
    w = torch.from_numpy(wave[: total * spf]).float()[None]
    feats = streamed_features(cond, w, 12, cfg.audio.history_frames).float()
    vad = build_vad(cfg.audio)  # the live mask (audio.vad): a stream's detector fed chunk by chunk
    mask = torch.from_numpy(np.concatenate([vad.push(w[0, a : a + 12 * spf]) for a in range(0, total * spf, 12 * spf)])
                            .astype(np.float32))[None]  # fmt: skip
    for i, s in [(0, 0), (3, 12), (6, 24)]:
        talk, listen = split_talk_listen(feats[:, s + 1 : s + frames], mask[:, s + 1 : s + frames])
        assert torch.equal(out["talk"][i], with_reference_slot(group_latent(talk, 4))[0])
        assert torch.equal(out["listen"][i], with_reference_slot(group_latent(listen, 4))[0])
        assert torch.equal(out["mask"][i], mask[0, s : s + frames])
    assert 0.3 < float(mask.mean()) <= 1.0  # a talking clip: mostly speech

    first = torch.load(tiny_root / "weights" / "demo_dit.pt", weights_only=True)["model"]
    (tiny_root / "pretrain_audio").mkdir(exist_ok=True)  # --what dit trains on the autoencoder already pretrained
    shutil.copy(tiny_root / "pretrain" / "demo_vae.pt", tiny_root / "pretrain_audio" / "demo_vae.pt")
    m = run_pretrain(tiny_cfg(tiny_root, f"pretrain.out_dir={tiny_root / 'pretrain_audio'}", "pretrain.dit_audio=true",
                              "pretrain.dit_init_from=weights/demo_dit.pt", "pretrain.dit_iterations=30",
                              "pretrain.dit_lip_windows=2"),
                     tiny_root, progress=False, what="dit", export="weights_audio").metrics  # fmt: skip
    # it hears the audio now: the held-out loss changes when the audio is silenced, the mouth box's loss when
    # another window's audio is played (exactly 0 for a model that ignores the audio)
    assert m["dit_fm_loss_no_audio"] != pytest.approx(m["dit_fm_loss"], rel=1e-6)
    assert abs(m["dit_mouth_audio_gain"]) > 1e-6
    for k in ("dit_lip_corr", "dit_before_lip_corr", "dit_gt_lip_corr"):  # NaN where FaceMesh finds no face (32 px)
        assert np.isnan(m[k]) or -1.0 <= m[k] <= 1.0, m
        assert 0.0 <= m[k.replace("lip_corr", "face_rate")] <= 1.0
    assert 0.3 < m["dit_talking_share"] <= 1.0
    new = torch.load(tiny_root / "weights_audio" / "demo_dit.pt", weights_only=True)["model"]
    audio = [k for k in new if k.startswith("audio_embedder.") or ".audio_attn." in k]
    assert audio and not all(torch.equal(first[k], new[k]) for k in audio)


def test_pretrain_holdout_takes_names_and_patterns():
    from tasks.training.vae import held_out_names

    names = ["head_4", "sy04ab_256x320_full_video_001_A_00", "sy04ab_256x320_full_video_001_B_01",
             "sy1c00_256x320_full_video_001_A_00", "head_40"]  # fmt: skip
    assert held_out_names(names, ["head_4", "sy0*"]) == {"head_4", "sy04ab_256x320_full_video_001_A_00",
                                                         "sy04ab_256x320_full_video_001_B_01"}  # fmt: skip
    assert held_out_names(names, []) == set()


def test_pretrain_pack_carries_the_dits_clips_to_a_machine_without_them(tiny_root, pretrained):
    """`pretrain --what pack` -> one file with the crops (H.264, decoded as the reader will), 16-bit voices and
    speaking masks; `pretrain --what dit` on it trains where the clips, ffmpeg and the VAD are not (a GPU
    machine) on exactly the pixels packed, and hears what the clips' files say to within 16-bit quantisation."""
    from tasks.training.pretrain import clip_speaking, clip_voices, read_pack, write_pack
    from tasks.training.vae import fixture_clips

    cfg = tiny_cfg(tiny_root, "pretrain.dit_audio=true", "pretrain.dit_lip_windows=0")
    train, held, _ = fixture_clips(cfg, tiny_root, progress=False)
    pack = tiny_root / "pack" / "dit_pack.npz"
    meta, dtrain, dheld = write_pack(cfg, tiny_root, train, held, pack, progress=False)
    ptrain, pheld, voices, back = read_pack(cfg, pack)
    assert sorted(ptrain) == sorted(train) and sorted(pheld) == sorted(held) == ["PC-AVS__00086"]
    assert back["data_digest"] == meta["data_digest"]
    for name, c in {**train, **held}.items():
        got = {**ptrain, **pheld}[name]
        assert np.array_equal(got, {**dtrain, **dheld}[name])  # the packed pixels, exactly
        err = np.mean((got.astype(float) - c.astype(float)) ** 2)
        assert 10 * np.log10(255**2 / err) > 35.0  # and close to the crops (crf 14: ~40 dB)
    files = clip_voices(cfg, tiny_root, {**train, **held})
    for name, (wave, speaking) in files.items():
        pw, pmask = voices[name]
        assert pw.shape == wave.shape and np.abs(pw - wave).max() <= 1 / 32768 + 1e-7
        assert np.array_equal(pmask, clip_speaking(cfg, wave, len({**train, **held}[name]), speaking))
        assert 0.3 < pmask.mean() <= 1.0  # talking clips: the live mask hears speech
    # the machine without the clips: pretrain.dirs names a folder that is not there; nothing is read from it
    away = tiny_cfg(tiny_root, "pretrain.dit_audio=true", "pretrain.dit_lip_windows=0", f"pretrain.dit_pack={pack}",
                    f"pretrain.out_dir={tiny_root / 'from_pack'}", f"pretrain.dirs=[{tiny_root / 'gone'}]",
                    "pretrain.dit_init_from=weights/demo_dit.pt", "pretrain.dit_iterations=30")  # fmt: skip
    (tiny_root / "from_pack").mkdir(exist_ok=True)
    shutil.copy(tiny_root / "pretrain" / "demo_vae.pt", tiny_root / "from_pack" / "demo_vae.pt")
    res = run_pretrain(away, tiny_root, progress=False, what="dit", export="weights_pack")
    m = res.metrics
    assert m["dit_fm_loss"] < m["dit_before_fm_loss"], m  # it learns on the packed windows
    assert m["dit_fm_loss_no_audio"] != pytest.approx(m["dit_fm_loss"], rel=1e-6)  # and hears their voices
    prov = json.loads((tiny_root / "weights_pack" / "demo_dit.json").read_text())
    assert prov["pack"]["data_digest"] == meta["data_digest"] == prov["data_digest"]
    # errors name the field: no pack, a pack for another size
    with pytest.raises(ConfigError, match="pretrain.dit_pack.*does not exist"):
        run_pretrain(tiny_cfg(tiny_root, f"pretrain.dit_pack={tiny_root / 'none.npz'}"), tiny_root, progress=False,
                     what="dit")  # fmt: skip
    with pytest.raises(ConfigError, match="pretrain.dit_pack.*packed for video"):
        read_pack(tiny_cfg(tiny_root, "video.width=48", "video.height=48"), pack)
    # the autoencoder half learns on the pack too (a GPU machine pretrains both), on the packed crops
    vae_away = tiny_cfg(tiny_root, f"pretrain.dit_pack={pack}", f"pretrain.out_dir={tiny_root / 'vae_from_pack'}",
                        f"pretrain.dirs=[{tiny_root / 'gone'}]")  # fmt: skip
    vm = run_pretrain(vae_away, tiny_root, progress=False, what="vae").metrics
    assert vm["psnr"] > vm["psnr_before"] + 2.5 and vm["train_clips"] == len(train), vm
    assert (tiny_root / "vae_from_pack" / "demo_vae.pt").is_file()
    with pytest.raises(ConfigError, match="pretrain.dit_pack.*does not read a pack"):
        run_pretrain(away, tiny_root, progress=False, what="pack")


def test_pretrain_dit_fits_its_steps_to_a_time_budget(tiny_root, pretrained):
    """pretrain.dit_max_seconds / vae_max_seconds: 30 timed steps, then the steps that fit (never more than
    dit_iterations / iterations)."""
    (tiny_root / "budget").mkdir(exist_ok=True)
    shutil.copy(tiny_root / "pretrain" / "demo_vae.pt", tiny_root / "budget" / "demo_vae.pt")
    cfg = tiny_cfg(tiny_root, f"pretrain.out_dir={tiny_root / 'budget'}", "pretrain.dit_iterations=100000",
                   "pretrain.dit_max_seconds=4")  # fmt: skip
    m = run_pretrain(cfg, tiny_root, progress=False, what="dit").metrics
    assert 30 < m["dit_steps"] < 100000
    assert m["dit_train_seconds"] < 4 * 3  # the budget, give or take the probe's estimate
    # the autoencoder's half the same way (pretrain.vae_max_seconds), and it still learns in its budget
    cfg = tiny_cfg(tiny_root, f"pretrain.out_dir={tiny_root / 'budget_vae'}", "pretrain.iterations=100000",
                   "pretrain.vae_max_seconds=4")  # fmt: skip
    m = run_pretrain(cfg, tiny_root, progress=False, what="vae").metrics
    assert 30 < m["steps"] < 100000 and m["train_seconds"] < 4 * 3, m
    assert m["psnr"] > m["psnr_before"] + 2.5, m


@pytest.mark.slow
def test_make_gpu_pack_script_packs_real_clips_and_a_corpus_without_the_unseen_person(clone):
    """scripts/make_gpu_pack.sh in a temporary clone: a 7-conversation corpus (seed 1, 3 s each) of the shared
    portraits less the unseen identity (curate.unseen_identities: fashion_blogger), and two real clips, one named
    in pretrain.holdout, packed into one file that `read_pack` reads: held out are that clip and both sides of
    the corpus conversation whose id starts with sy0 (conversation 6 at seed 1), nothing else."""
    import subprocess
    import sys

    from tasks.training.pretrain import read_pack
    from tests.conftest import BIN, tool_env

    shared_path("fixtures", "avatars", "fashion_blogger.jpg")
    (clone / "real").mkdir()
    for name in CLIPS[:2]:
        shutil.copy(shared_path("fixtures", "talking", name), clone / "real" / name)
    held_real = CLIPS[0].removesuffix(".mp4")
    env = {**tool_env(clone), "STREAMAVATAR": str(BIN / "streamavatar"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/make_gpu_pack.sh", "data/pk", "7", "--set", "corpus.duration_s=3.0",
                           "--set", "pretrain.dirs=[real]", "--set", f"pretrain.holdout=[{held_real}]",
                           "--set", "pretrain.max_seconds_per_clip=2.0"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "left out: fashion_blogger" in proc.stderr
    # the corpus's faces: every shared portrait and avatar with a face but the unseen person's
    used = {f["name"] for f in json.loads((clone / "data/pk/corpus_report/faces.json").read_text())["used"]}
    assert "fashion_blogger" not in used and {"boy", "kitchen_grandmother", "hallo__3"} <= used, sorted(used)
    corpus = pd.read_parquet(clone / "data/pk/corpus/corpus.parquet")
    assert len(corpus) == 14 and (corpus["status"] == "ok").all()
    sy0 = set(corpus.loc[corpus["clip_id"].str.startswith("sy0"), "clip_id"])
    assert set(corpus.loc[corpus["conversation"] == 6, "clip_id"]) == sy0 and len(sy0) == 2
    train, held, voices, meta = read_pack(load_config(root=clone), clone / "data/pk/dit_pack.npz")
    assert set(held) == sy0 | {held_real}
    assert set(train) == (set(corpus["clip_id"]) - sy0) | {CLIPS[1].removesuffix(".mp4")}
    assert set(voices) == set(train) | set(held)
