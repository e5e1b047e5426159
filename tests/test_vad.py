"""The live talk/listen mask (model/vad.py): Silero VAD and the energy gate, streamed chunk by chunk, with
hangover and the both-streams leak rule; measured against the corpus's ground truth (bench --vad)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.audio import AudioConditioner, AudioStream, LogMelFeatures, speaking_mask
from model.vad import VoiceActivity, both_streams, clip_mask, silero_model
from tasks.config import Config

SPF = 640  # 16 kHz at 25 fps


@pytest.fixture(scope="module")
def conversation():
    """One conversation as `streamavatar corpus` synthesises it (espeak-ng), with its ground-truth masks."""
    from tasks.corpus.script import plan_conversation
    from tasks.corpus.script import speaking_mask as truth_mask

    cfg = Config().corpus
    conv = plan_conversation(0, cfg, np.random.default_rng([cfg.seed, 0]))
    n = conv.side_audio.shape[1] // SPF
    return conv, [truth_mask(conv, s, 25, n) for s in (0, 1)]


@pytest.fixture(scope="module")
def model():
    return silero_model()


def f1(pred, truth) -> float:
    tp = np.sum((pred == 1) & (truth == 1))
    return 2 * tp / max(1, np.sum(pred == 1) + np.sum(truth == 1))


@pytest.mark.parametrize("kind", ["silero", "energy"])
def test_chunked_stream_gets_the_mask_of_the_whole_clip(conversation, model, kind):
    """Causal: pieces of any size (partial frames and partial Silero windows included) give exactly the mask
    of one push of the whole clip."""
    conv, _ = conversation
    wave = conv.side_audio[0][: 120 * SPF]
    whole = VoiceActivity(kind, model=model, hangover_frames=2).push(wave)
    det = VoiceActivity(kind, model=model, hangover_frames=2)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(wave)), 30, replace=False))
    parts = [det.push(p) for p in np.split(wave, cuts)]
    assert len(whole) == 120 and whole.sum() > 20
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(clip_mask(wave, det, 120), whole)  # reset() starts over


def test_silero_finds_the_corpus_speech_and_survives_noise_where_the_gate_does_not(conversation, model):
    """F1 of "this side talks" against the ground truth: clean, Silero >= 0.9; in white noise at 10 dB SNR the
    energy gate calls every frame speech (F1 = the talking share's), Silero stays >= 0.85."""
    conv, truth = conversation
    own = conv.side_audio[0]
    n = len(truth[0])
    noisy = own + np.random.default_rng(1).normal(0, 0.1 * np.sqrt(np.mean(own[np.abs(own) > 1e-4] ** 2)),
                                                  own.shape).astype(np.float32)  # fmt: skip
    silero = [f1(clip_mask(x, VoiceActivity("silero", model=model, hangover_frames=0), n), truth[0]) for x in (own, noisy)]
    gate = [f1(clip_mask(x, VoiceActivity("energy", hangover_frames=0), n), truth[0]) for x in (own, noisy)]
    assert silero[0] >= 0.9 and silero[1] >= 0.85, silero
    assert gate[1] < 0.75 and gate[1] < silero[1] - 0.15, (gate, silero)


def test_energy_gate_without_hangover_is_the_old_gate_and_hangover_holds_speech():
    rng = np.random.default_rng(0)
    wave = np.zeros(40 * SPF, np.float32)
    wave[5 * SPF : 12 * SPF] = rng.normal(0, 0.1, 7 * SPF)  # frames 5..11 loud
    wave[14 * SPF : 15 * SPF] = rng.normal(0, 0.1, SPF)  # frame 14 loud
    old = speaking_mask(torch.from_numpy(wave)[None], None, SPF, 40)[0].numpy()
    np.testing.assert_array_equal(VoiceActivity("energy", hangover_frames=0).push(wave), old)
    held = VoiceActivity("energy", hangover_frames=3).push(wave)
    expect = np.zeros(40, np.uint8)
    expect[5:18] = 1  # 5..11, the gap 12..13 bridged, 14, then 3 frames of hangover 15..17
    np.testing.assert_array_equal(held, expect)


def test_both_streams_rule_drops_the_quieter_leak_and_keeps_overlapping_speech():
    rng = np.random.default_rng(0)
    voice = rng.normal(0, 0.1, 10 * SPF).astype(np.float32)
    other = rng.normal(0, 0.1, 10 * SPF).astype(np.float32)

    def run(avatar, partner, leak_db):
        return both_streams(VoiceActivity("energy", hangover_frames=0), VoiceActivity("energy", hangover_frames=0),
                            avatar, partner, leak_db)  # fmt: skip

    a, p = run(voice * 0.1, voice, 12.0)  # the avatar's stream only hears the partner, 20 dB down
    assert a.sum() == 0 and p.sum() == 10
    a, p = run(voice, voice * 0.1, 12.0)  # the partner's microphone hears the avatar
    assert a.sum() == 10 and p.sum() == 0
    a, p = run(voice, other * 0.7, 12.0)  # both speak, 3 dB apart: overlapping speech
    assert a.sum() == 10 and p.sum() == 10
    a, p = run(voice * 0.1, voice, 0.0)  # the rule off: the leak counts as the avatar's speech
    assert a.sum() == 10


def test_audio_stream_uses_the_detectors_on_both_streams(conversation, model):
    """AudioStream with a detector factory: the mask is the both-streams rule on its streamed detectors, the
    other person's activity is kept beside it, and talk/listen split the features by that mask."""
    conv, truth = conversation
    cond = AudioConditioner(LogMelFeatures(), window=2, frames_per_latent=4)
    stream = AudioStream(cond, 50, vad=lambda: VoiceActivity("silero", model=model, hangover_frames=0))
    ref_a = VoiceActivity("silero", model=model, hangover_frames=0)
    ref_o = VoiceActivity("silero", model=model, hangover_frames=0)
    a, o = torch.from_numpy(conv.side_audio[0]), torch.from_numpy(conv.side_audio[1])
    masks, partners = [], []
    for i in range(0, 120 * SPF, 12 * SPF):
        talk, listen, mask = stream.push(a[None, i : i + 12 * SPF], o[None, i : i + 12 * SPF])
        ea, eo = both_streams(ref_a, ref_o, a[i : i + 12 * SPF], o[i : i + 12 * SPF], 0.0)
        np.testing.assert_array_equal(mask[0].numpy(), ea)
        np.testing.assert_array_equal(stream.partner_mask[0].numpy(), eo)
        assert talk.shape == (1, 3, 20, cond.token_dim)
        masks.append(mask[0].numpy())
        partners.append(stream.partner_mask[0].numpy())
    assert f1(np.concatenate(masks), truth[0][:120]) > 0.85 and f1(np.concatenate(partners), truth[1][:120]) > 0.85


def test_vad_bench_reports_every_detector_and_condition():
    from tasks.evaluation.vad_bench import CONDITIONS, format_report, run_vad_bench

    report = run_vad_bench(Config(), conversations=1, progress=False)
    rows = {(r["detector"], r["condition"]): r for r in report["rows"]}
    assert len(rows) == 4 * len(CONDITIONS)
    assert rows[("silero+both", "noise_10db")]["f1"] > rows[("energy gate", "noise_10db")]["f1"] + 0.15
    assert rows[("silero+both", "partner_leak_-20db")]["f1"] > rows[("silero", "partner_leak_-20db")]["f1"] + 0.15
    assert "silero+both" in format_report(report) and report["ms_per_audio_second"]["silero"] > 0


def test_the_generators_detectors_load_silero_once_and_keep_their_own_state(conversation, monkeypatch):
    """tasks.common.models.vad_factory (what every StreamingGenerator's start() calls, two detectors per stream
    and batch row): the model file is loaded once, each detector has its own copy of it, and two detectors fed
    in turn (one each stream's voice, chunk by chunk) give the masks that freshly loaded detectors give alone."""
    import model.vad as vad
    from tasks.common.models import vad_factory

    conv, _ = conversation
    loads = []
    real = vad.silero_model
    monkeypatch.setattr(vad, "silero_model", lambda path=None: loads.append(path) or real(path))
    cfg = Config()
    assert cfg.audio.vad == "silero"
    make = vad_factory(cfg)
    a, b = make(), make()
    assert len(loads) == 1 and a.model is not b.model
    waves = [conv.side_audio[s][: 120 * SPF] for s in (0, 1)]
    alone = [clip_mask(w, vad.build_vad(cfg.audio), 120) for w in waves]
    assert len(loads) == 3  # (the reference detectors above each loaded the file)
    chunk = 12 * SPF
    turns: list[list[np.ndarray]] = [[], []]
    for k in range(0, 120 * SPF, chunk):  # a chunk of one stream, then of the other, as a stream's step does
        for i, d in enumerate((a, b)):
            turns[i].append(d.push(waves[i][k : k + chunk]))
    interleaved = [np.concatenate(t) for t in turns]
    assert alone[0].sum() > 10 and alone[1].sum() > 10 and not np.array_equal(alone[0], alone[1])
    for got, want in zip(interleaved, alone, strict=True):
        np.testing.assert_array_equal(got, want)
