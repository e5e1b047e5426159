"""Action following (issue [10]): which of the vocabulary's actions a video performs, and when.

A detector on what mediapipe FaceMesh sees in the frames, nothing learned: per frame the head's yaw and pitch
(tasks/common/pose.py) and the mouth's width over the eyes' distance (both horizontal, so a turn changes them
alike). Over sliding windows of ``window_s`` (each frame's signal taken relative to the video's own median,
so a person's resting pose and mouth are the zero):

* turn_left / turn_right -- the window's mean yaw beyond ``turn_deg`` (negative: left);
* shake -- the yaw's oscillation: its spread around a ``detrend_s`` moving mean beyond ``shake_deg``, swinging
  across that mean ``min_crossings`` times or more (a turn's ramps swing once or twice);
* nod -- the same for the pitch beyond ``nod_deg``;
* smile -- the mouth's width above the median by ``smile_rel``;
* wave -- a hand beside the face: skin-coloured pixels (within ``skin_dist`` of the face's own median colour)
  in a band beside the face oval (0.6 face widths wide, forehead to chin, on each side), their area in units
  of that band above the video's own 20th percentile (ears, hair and background are the floor) by
  ``wave_area`` on one side, and moving: the window's frame-to-frame change of that area at least
  ``wave_motion`` on average (a hand held still is not a wave). At the head crop's 64 px a hand shows as a
  skin patch beside the cheek; mediapipe Hands finds no landmarks at that size.

A window takes the first label that holds in the order turn, wave, shake, nod, smile (a turn's ramps also move
the yaw fast, so the turn is tested first; a wave moves no landmark). Consecutive windows with one label are
one event. Scoring against a request schedule: a requested action counts as followed when an event of its
name starts within ``within_s`` of the request (or is under way then); events that overlap no request (with
``within_s`` of slack after it) are false actions, reported per minute of the video's idle time. The
thresholds are calibrated on the demo corpus's rendered actions (``bench --actions``): docs/interactive.md, "The
action detector".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from tasks.common.facemesh import FACE_OVAL, FaceMesh
from tasks.common.pose import LEFT_EYE_OUTER, RIGHT_EYE_OUTER, head_pose
from tasks.evaluation.metrics import upscale_for_landmarks

MOUTH_LEFT, MOUTH_RIGHT = 61, 291
DETECTED = ("nod", "shake", "turn_left", "turn_right", "smile", "wave")
FEATURES = ("yaw", "yaw_osc", "yaw_cross", "pitch_osc", "pitch_cross", "smile", "hand", "hand_motion")


@dataclass(frozen=True)
class DetectorSettings:
    window_s: float = 1.0
    detrend_s: float = 0.5
    turn_deg: float = 5.0  # FaceMesh reads the corpus's 28-degree turns as ~12 at 64x64
    shake_deg: float = 2.2
    nod_deg: float = 2.4  # the corpus's listeners nod on their own: below this they are not "a nod"
    smile_rel: float = 0.05
    min_crossings: int = 4  # an oscillation (shake, nod) swings back and forth at least this often a window
    min_face: float = 0.6  # share of a window's frames with a face for it to be judged at all
    skin_dist: float = 40.0  # RGB distance to the face's median colour that still counts as skin
    wave_area: float = 0.12  # a hand: skin beside the face above the video's floor, in units of the band
    wave_motion: float = 0.01  # mean frame-to-frame change of that area: the hand moves


@dataclass
class Signals:
    yaw: np.ndarray  # degrees, NaN without a face
    pitch: np.ndarray
    width: np.ndarray  # mouth width / eye distance
    hand: np.ndarray | None = None  # [n, 2] skin beside the face (left, right side of the image), NaN without a face

    def __len__(self) -> int:
        return len(self.yaw)


def lateral_skin(rgb: np.ndarray, lm: np.ndarray, max_dist: float = 40.0) -> tuple[float, float]:
    """Skin beside the face, (left, right) of the image: pixels within ``max_dist`` (RGB) of the face's median
    colour, outside the face oval grown by 6 % of its width, in a band 0.6 face widths wide from the oval's top
    to the chin on each side; counted in units of that band's full area (a band cut by the image's edge counts
    its missing part as no skin)."""
    oval = lm[FACE_OVAL, :2]
    h, w = rgb.shape[:2]
    face = np.zeros((h, w), np.uint8)
    cv2.fillPoly(face, [oval.round().astype(np.int32)], 1)
    if not face.any():
        return float("nan"), float("nan")
    skin = np.median(rgb[face > 0].astype(np.float64), axis=0)
    (x0, y0), (x1, y1) = oval.min(axis=0), oval.max(axis=0)
    fw, fh = x1 - x0, y1 - y0
    k = 2 * max(1, int(round(0.06 * fw))) + 1
    near = cv2.dilate(face, np.ones((k, k), np.uint8))
    r0, r1 = int(max(0, y0)), int(min(h, y1))
    out = []
    for a, b in ((x0 - 0.6 * fw, x0), (x1, x1 + 0.6 * fw)):
        a, b = int(max(0, a)), int(min(w, b))
        if b <= a or r1 <= r0:
            out.append(0.0)
            continue
        patch = rgb[r0:r1, a:b].astype(np.float64)
        like = (np.linalg.norm(patch - skin, axis=-1) < max_dist) & (near[r0:r1, a:b] == 0)
        out.append(float(like.sum()) / max(1.0, 0.6 * fw * fh))
    return out[0], out[1]


def action_signals(frames: np.ndarray, min_side: int = 192, skin_dist: float = DetectorSettings.skin_dist) -> Signals:
    """FaceMesh per frame (small frames enlarged to ``min_side`` first, as evaluate's landmarks), and the skin
    beside the face (:func:`lateral_skin`) on the same enlarged frame."""
    n = len(frames)
    yaw, pitch, width = (np.full(n, np.nan) for _ in range(3))
    hand = np.full((n, 2), np.nan)
    mesh = FaceMesh()
    try:
        for i, frame in enumerate(frames):
            up = upscale_for_landmarks(np.asarray(frame), min_side)
            lm = mesh(up)
            if lm is None:
                continue
            yaw[i], pitch[i], _ = head_pose(lm)
            eyes = np.linalg.norm(lm[LEFT_EYE_OUTER, :2] - lm[RIGHT_EYE_OUTER, :2])
            width[i] = np.linalg.norm(lm[MOUTH_LEFT, :2] - lm[MOUTH_RIGHT, :2]) / max(eyes, 1e-6)
            hand[i] = lateral_skin(up, lm, skin_dist)
    finally:
        mesh.close()
    return Signals(yaw, pitch, width, hand)


def _moving_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Centred moving mean of length ``k`` over the present values (NaN where none)."""
    ok = ~np.isnan(x)
    kernel = np.ones(k)
    num = np.convolve(np.where(ok, x, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


@dataclass(frozen=True)
class Event:
    name: str
    start: int  # first frame of the first window
    end: int  # one past the last frame of the last window


def _crossings(hp: np.ndarray, level: float) -> int:
    """Sign changes of a high-passed signal, counting only excursions beyond +-``level`` (jitter is ignored):
    an oscillation crosses often, a turn's ramp up and down once or twice."""
    signs = np.sign(hp[np.abs(hp) > level])
    return int((signs[1:] != signs[:-1]).sum())


def window_features(s: Signals, fps: float, settings: DetectorSettings = DetectorSettings()) -> dict[str, np.ndarray]:
    """Per window start (length ``window_s``): mean yaw, yaw and pitch oscillation, mouth width; NaN where
    the window has too few faces."""
    n, w = len(s), max(2, int(round(settings.window_s * fps)))
    k = max(3, int(round(settings.detrend_s * fps)) | 1)
    found = ~np.isnan(s.yaw)
    if not found.any():
        return {key: np.full(max(n - w + 1, 0), np.nan) for key in FEATURES}
    yaw = s.yaw - np.nanmedian(s.yaw)
    pitch = s.pitch - np.nanmedian(s.pitch)
    width = s.width / np.nanmedian(s.width) - 1.0
    yaw_hp, pitch_hp = yaw - _moving_mean(yaw, k), pitch - _moving_mean(pitch, k)
    if s.hand is not None and (~np.isnan(s.hand)).any():  # above each side's floor, the side that shows more
        excess = s.hand - np.nanpercentile(s.hand, 20, axis=0)
        side = np.nanargmax(np.nan_to_num(np.nanmean(excess, axis=0), nan=-np.inf))
        hand = np.where(np.isnan(excess).all(axis=1), np.nan, np.where(np.isnan(excess), -np.inf, excess).max(axis=1))
        change = np.abs(np.diff(s.hand[:, side], prepend=np.nan))
    else:
        hand = change = np.zeros(n)
    out = {key: np.full(max(n - w + 1, 0), np.nan) for key in FEATURES}
    for i in range(n - w + 1):
        sl = slice(i, i + w)
        if found[sl].mean() < settings.min_face:
            continue
        out["yaw"][i] = np.nanmean(yaw[sl])
        out["yaw_osc"][i] = np.nanstd(yaw_hp[sl])
        out["pitch_osc"][i] = np.nanstd(pitch_hp[sl])
        out["yaw_cross"][i] = _crossings(yaw_hp[sl], settings.shake_deg / 2)
        out["pitch_cross"][i] = _crossings(pitch_hp[sl], settings.nod_deg / 2)
        out["smile"][i] = np.nanmean(width[sl])
        out["hand"][i] = np.nanmean(hand[sl])
        out["hand_motion"][i] = np.nanmean(change[sl]) if (~np.isnan(change[sl])).any() else 0.0
    return out


def window_labels(features: dict[str, np.ndarray], settings: DetectorSettings = DetectorSettings()) -> list[str]:
    """The label of each window: the first of turn, wave, shake, nod, smile that holds, else idle ("" unjudged)."""
    labels = []
    for yaw, yo, yc, po, pc, sm, hd, hm in zip(*(features[k] for k in FEATURES), strict=True):
        if np.isnan(yaw):
            labels.append("")
        elif abs(yaw) > settings.turn_deg:
            labels.append("turn_right" if yaw > 0 else "turn_left")
        elif hd > settings.wave_area and hm >= settings.wave_motion:
            labels.append("wave")
        elif yo > settings.shake_deg and yc >= settings.min_crossings:
            labels.append("shake")
        elif po > settings.nod_deg and pc >= settings.min_crossings:
            labels.append("nod")
        elif sm > settings.smile_rel:
            labels.append("smile")
        else:
            labels.append("idle")
    return labels


def detect_actions(s: Signals, fps: float, settings: DetectorSettings = DetectorSettings()) -> list[Event]:
    """The actions performed: runs of windows with one label (idle and unjudged windows are no event)."""
    labels = window_labels(window_features(s, fps, settings), settings)
    w = max(2, int(round(settings.window_s * fps)))
    events: list[Event] = []
    i = 0
    while i < len(labels):
        j = i
        while j + 1 < len(labels) and labels[j + 1] == labels[i]:
            j += 1
        if labels[i] not in ("", "idle"):
            events.append(Event(labels[i], i, j + w))
        i = j + 1
    return events


@dataclass
class Following:
    requested: int
    followed: int
    per_action: dict[str, tuple[int, int]]  # name -> (followed, requested)
    latency_s: list[float]  # per followed request: first matching event's start - request (>= 0: later)
    false_events: int
    idle_minutes: float

    @property
    def rate(self) -> float | None:
        return self.followed / self.requested if self.requested else None

    @property
    def false_per_min(self) -> float | None:
        return self.false_events / self.idle_minutes if self.idle_minutes > 0 else None

    def as_dict(self) -> dict:
        return {**asdict(self), "rate": self.rate, "false_per_min": self.false_per_min,
                "median_latency_s": float(np.median(self.latency_s)) if self.latency_s else None}  # fmt: skip


def score_following(events: list[Event], requests: list[tuple[str, int, int]], n_frames: int, fps: float,
                    within_s: float = 1.0) -> Following:  # fmt: skip
    """``requests``: (name, start frame, end frame) of each requested action. Followed: an event of the same
    name that is under way at the request or starts within ``within_s`` after it. False: an event that
    overlaps no request's span stretched by ``within_s`` after its end."""
    slack = int(round(within_s * fps))
    per: dict[str, list[int]] = {}
    latency, followed = [], 0
    for name, start, _end in requests:
        hits = [e for e in events if e.name == name and e.start <= start + slack and e.end > start]
        per.setdefault(name, [0, 0])[1] += 1
        if hits:
            followed += 1
            per[name][0] += 1
            latency.append(max(0, min(e.start for e in hits) - start) / fps)
    busy = np.zeros(n_frames, dtype=bool)
    for _name, start, end in requests:
        busy[max(0, start) : min(n_frames, end + slack)] = True
    false = sum(1 for e in events if not busy[e.start : e.end].any())
    idle_min = float((~busy).sum()) / fps / 60.0
    return Following(len(requests), followed, {k: (v[0], v[1]) for k, v in per.items()}, latency, false, idle_min)


# Per action, the clip feature it moves and the sign it moves it by (yaw > 0 is a turn to the right, as above)
RESPONSE_FEATURE = {"turn_left": ("yaw", -1.0), "turn_right": ("yaw", 1.0), "shake": ("yaw_osc", 1.0),
                    "nod": ("pitch_osc", 1.0), "smile": ("width", 1.0), "wave": ("hand", 1.0)}  # fmt: skip


def clip_features(s: Signals, fps: float, settings: DetectorSettings = DetectorSettings()) -> dict[str, float]:
    """One short clip's features, in absolute terms (no median of its own: a clip of a turn is turned all through):
    mean yaw, the yaw's and pitch's spread around their ``detrend_s`` moving means, mean mouth width over eye
    distance, and the larger side's mean skin beside the face; NaN without a face in ``min_face`` of the frames."""
    found = ~np.isnan(s.yaw)
    if not len(s) or found.mean() < settings.min_face:
        return {k: float("nan") for k in ("yaw", "yaw_osc", "pitch_osc", "width", "hand")}
    k = max(3, int(round(settings.detrend_s * fps)) | 1)
    hand = float("nan") if s.hand is None else float(np.nanmax(np.nanmean(s.hand, axis=0)))
    return {"yaw": float(np.nanmean(s.yaw)), "yaw_osc": float(np.nanstd(s.yaw - _moving_mean(s.yaw, k))),
            "pitch_osc": float(np.nanstd(s.pitch - _moving_mean(s.pitch, k))), "width": float(np.nanmean(s.width)),
            "hand": hand}  # fmt: skip


def prompt_response(features: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """How each action's prompt moves the clips it is given, against the idle prompt on the same clips (same
    noise): ``features[name][i]`` are clip i's :func:`clip_features` under prompt ``name`` (``idle`` included).
    Per action: ``response_<name>``, the mean over clips of (its feature under the action - under idle), signed
    so that the action's own direction is positive (degrees for turns, shake and nod; ratios for smile and wave);
    ``right_way_<name>``, the share of clips where that difference is > 0. A model that ignores the prompt gives
    0 and 0 exactly; one that moves the head but not the requested way, a turn's response near 0 and right_way
    near 0.5."""
    idle = features["idle"]
    out: dict[str, float] = {}
    for name, clips in features.items():
        if name == "idle" or name not in RESPONSE_FEATURE:
            continue
        key, sign = RESPONSE_FEATURE[name]
        d = np.array([sign * (c[key] - i[key]) for c, i in zip(clips, idle, strict=True)], dtype=np.float64)
        d = d[~np.isnan(d)]
        out[f"response_{name}"] = float(d.mean()) if len(d) else float("nan")
        out[f"right_way_{name}"] = float((d > 0).mean()) if len(d) else float("nan")
    return out
