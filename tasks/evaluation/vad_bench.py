"""``streamavatar bench --vad``: the live talk/listen mask against the corpus's ground truth.

Conversations are drawn exactly as ``streamavatar corpus`` draws them (corpus.* settings, the same seeds), so
each side's own speech and its ground-truth mask (a frame talks when its centre lies inside one of the side's
utterances, pauses between words included) are known. Every side is streamed as the avatar's stream, with the
other side as the interlocutor's, through each detector in chunks of the live chunk size, in four conditions:
clean, white noise at 20 and 10 dB SNR, and the partner's voice leaking into the avatar's stream at -20 dB
(a microphone that hears the room). Reported per detector and condition: frame accuracy, precision, recall
and F1 of "the avatar talks", and the same for the interlocutor's stream (the detector runs on both), plus
the detector's cost in milliseconds per second of audio.
"""

from __future__ import annotations

import time

import numpy as np

from model.vad import VoiceActivity, both_streams, silero_model
from tasks.config import Config

CONDITIONS = {"clean": None, "noise_20db": 20.0, "noise_10db": 10.0, "partner_leak_-20db": "leak"}


def _scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = float(np.sum((pred == 1) & (truth == 1)))
    fp = float(np.sum((pred == 1) & (truth == 0)))
    fn = float(np.sum((pred == 0) & (truth == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float(np.mean(pred == truth)), "precision": precision, "recall": recall, "f1": f1}


def _condition(own: np.ndarray, other: np.ndarray, kind, rng: np.random.Generator) -> np.ndarray:
    if kind is None:
        return own
    if kind == "leak":
        return own + other * 10 ** (-20 / 20)
    active = own[np.abs(own) > 1e-4]
    level = float(np.sqrt(np.mean(active.astype(np.float64) ** 2))) if active.size else 0.1
    return own + rng.normal(0.0, level * 10 ** (-kind / 20), own.shape).astype(np.float32)


def detectors(cfg: Config) -> dict[str, tuple]:
    """name -> (a maker of one stream's detector, the both-streams leak margin): the old gate, then each detector
    with audio.*'s hangover and leak rule (Silero also without the leak rule, to show what the rule does)."""
    a, fps = cfg.audio, cfg.video.fps
    hang = round(a.vad_hangover_ms * fps / 1000)
    model = silero_model(a.vad_model_path)

    def energy(h: int):
        return lambda: VoiceActivity("energy", a.sample_rate, fps, threshold_db=a.vad_threshold_db, hangover_frames=h)

    def silero():
        return lambda: VoiceActivity("silero", a.sample_rate, fps, threshold=a.vad_threshold, hangover_frames=hang,
                                     model=model)  # fmt: skip

    return {"energy gate": (energy(0), 0.0), "energy+both": (energy(hang), a.vad_leak_db),
            "silero": (silero(), 0.0), "silero+both": (silero(), a.vad_leak_db)}  # fmt: skip


def run_vad_bench(cfg: Config, conversations: int = 8, progress: bool = True) -> dict:
    from tqdm import tqdm

    from tasks.corpus.script import plan_conversation, speaking_mask

    c, fps = cfg.corpus, cfg.video.fps
    if c.sample_rate != cfg.audio.sample_rate:
        raise ValueError(f"corpus.sample_rate {c.sample_rate} != audio.sample_rate {cfg.audio.sample_rate}")
    spf = cfg.audio.sample_rate // fps
    chunk = cfg.student.chunk_frames * 4 * spf  # the live chunk (4C video frames; the demo VAE's 4x time)
    convs = [plan_conversation(i, c, np.random.default_rng([c.seed, i]))
             for i in tqdm(range(conversations), desc="conversations", disable=not progress)]  # fmt: skip
    makers = detectors(cfg)
    preds = {(d, k): ([], [], [], []) for d in makers for k in CONDITIONS}  # avatar pred/truth, partner pred/truth
    cost = {d: 0.0 for d in makers}
    seconds = 0.0
    for conv in tqdm(convs, desc="detectors", disable=not progress):
        n = conv.side_audio.shape[1] // spf
        truth = [speaking_mask(conv, s, fps, n) for s in (0, 1)]
        for s in (0, 1):
            for k, kind in CONDITIONS.items():
                rng = np.random.default_rng([c.seed, conv.index, s, len(k)])
                own = _condition(conv.side_audio[s], conv.side_audio[1 - s], kind, rng)
                other = _condition(conv.side_audio[1 - s], conv.side_audio[s], kind, rng)
                for d, (make, leak) in makers.items():
                    va, vo = make(), make()
                    t0 = time.perf_counter()
                    parts = [both_streams(va, vo, own[i : i + chunk], other[i : i + chunk], leak)
                             for i in range(0, n * spf, chunk)]  # fmt: skip
                    pa = np.concatenate([m for m, _ in parts])[:n]
                    po = np.concatenate([m for _, m in parts])[:n]
                    cost[d] += time.perf_counter() - t0
                    p = preds[(d, k)]
                    p[0].append(pa), p[1].append(truth[s]), p[2].append(po), p[3].append(truth[1 - s])
                seconds += 2 * n / fps
    rows = []
    for (d, k), (pa, ta, po, to) in preds.items():
        avatar = _scores(np.concatenate(pa), np.concatenate(ta))
        partner = _scores(np.concatenate(po), np.concatenate(to))
        rows.append({"detector": d, "condition": k, **avatar, "partner_f1": partner["f1"]})
    return {
        "conversations": conversations, "frames_per_condition": int(sum(len(t) for t in preds[next(iter(preds))][1])),
        "talking_share": float(np.mean(np.concatenate(preds[next(iter(preds))][1]))),
        "hangover_ms": cfg.audio.vad_hangover_ms, "leak_db": cfg.audio.vad_leak_db, "silero_threshold": cfg.audio.vad_threshold,
        "energy_threshold_db": cfg.audio.vad_threshold_db, "chunk_samples": chunk, "rows": rows,
        "ms_per_audio_second": {d: 1000 * cost[d] / seconds for d in cost},
    }  # fmt: skip


def format_report(r: dict) -> str:
    lines = [f"live mask vs the corpus's ground truth: {r['conversations']} conversations, "
             f"{r['frames_per_condition']} frames per condition ({100 * r['talking_share']:.0f}% talking), "
             f"hangover {r['hangover_ms']:.0f} ms, leak margin {r['leak_db']:.0f} dB, chunks of {r['chunk_samples']} samples",
             f"{'detector':<18}{'condition':<20}{'acc':>7}{'prec':>7}{'rec':>7}{'F1':>7}{'other F1':>10}"]  # fmt: skip
    for row in r["rows"]:
        lines.append(f"{row['detector']:<18}{row['condition']:<20}{row['accuracy']:7.3f}{row['precision']:7.3f}"
                     f"{row['recall']:7.3f}{row['f1']:7.3f}{row['partner_f1']:10.3f}")  # fmt: skip
    lines.append("cost: " + ", ".join(f"{d} {v:.1f} ms per second of audio" for d, v in r["ms_per_audio_second"].items()))
    return "\n".join(lines)
