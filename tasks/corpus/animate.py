"""Landmark-driven animation of one identity: motion tracks from the conversation, then per-frame warps.

Every frame moves the identity's 3D FaceMesh landmarks (mouth opens with the side's own speech envelope,
eyelids close for blinks, the head rotates about the neck: talking motion, listening nods, and occasional
turns past 45 degrees of yaw), projects them orthographically, and warps the photo with a thin-plate spline
that maps each output pixel back to the photo. A hand/arm region of the body moves with speech energy. The
ground truth (pose, mouth, speaking) is read off the moved landmarks with the same functions a measurement
would use.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.interaction import ACTIONS  # per-frame label = index there
from tasks.common.facemesh import (
    BROWS,
    EYE_CORNERS,
    EYELID_PAIRS,
    FACE_OVAL,
    LIPS_INNER_LOWER,
    LIPS_INNER_UPPER,
    LIPS_OUTER_LOWER,
    LIPS_OUTER_UPPER,
    NOSE,
)
from tasks.common.pose import angles_from_rotation, head_frame, rotation_from_angles
from tasks.corpus.faces import Identity


# --------------------------------------------------------------------------------------------- motion tracks
@dataclass
class Tracks:
    """Per-frame drivers of one side, all (num_frames,) except gesture (num_frames, 2)."""

    mouth: np.ndarray  # 0..1
    blink: np.ndarray  # 0..1
    yaw: np.ndarray  # degrees added to the photo's pose
    pitch: np.ndarray
    roll: np.ndarray
    gesture: np.ndarray  # arm displacement as a fraction of the frame width
    energy: np.ndarray  # smoothed own-speech energy 0..1
    smile: np.ndarray | None = None  # 0..1: lip corners out and up (the "smile" action)
    wave: np.ndarray | None = None  # 0..1: a hand raised beside the face (the "wave" action)
    wave_angle: np.ndarray | None = None  # degrees the raised hand is tilted about its wrist (it waves)


def _smooth(x: np.ndarray, frames: float) -> np.ndarray:
    if frames <= 0:
        return x
    r = int(np.ceil(3 * frames))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / frames) ** 2)
    return np.convolve(np.pad(x, r, mode="edge"), k / k.sum(), mode="valid")


def _wander(rng: np.random.Generator, t: np.ndarray, amp: float, freqs=(0.11, 0.23, 0.41)) -> np.ndarray:
    out = np.zeros_like(t)
    for f in freqs:
        out += np.sin(2 * np.pi * f * rng.uniform(0.7, 1.3) * t + rng.uniform(0, 2 * np.pi))
    return amp * out / len(freqs)


def make_tracks(
    env_self: np.ndarray, speak_self: np.ndarray, speak_other: np.ndarray, fps: int,
    rng: np.random.Generator, big_turn_prob: float, big_turn_yaw: tuple[float, float],
) -> Tracks:
    n = env_self.size
    t = np.arange(n) / fps
    # mouth: own envelope, gated by own speech, normalised by a high percentile of its speaking frames
    ref = np.percentile(env_self[speak_self > 0], 90) if speak_self.any() else 1.0
    mouth = np.clip(env_self / max(ref, 1e-6), 0.0, 1.0) ** 0.8 * (speak_self > 0)
    energy = _smooth(mouth, 0.25 * fps)
    listening = _smooth(((speak_other > 0) & (speak_self == 0)).astype(np.float64), 0.15 * fps)

    yaw = _wander(rng, t, 4.0) + 3.0 * energy * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6.28))
    pitch = _wander(rng, t, 2.0) + 3.0 * energy
    roll = _wander(rng, t, 2.5)
    # listening: rhythmic nods (down then back) plus a slight tilt
    nod_rate = rng.uniform(1.0, 1.6)
    pitch = pitch + listening * 7.0 * np.sin(np.pi * nod_rate * t) ** 2
    roll = roll + listening * rng.choice([-1.0, 1.0]) * 3.0

    # an occasional turn past 45 degrees: ramp, hold, ramp back
    if rng.random() < big_turn_prob and n > 3 * fps:
        target = rng.choice([-1.0, 1.0]) * rng.uniform(*big_turn_yaw)
        ramp, hold = int(0.5 * fps), int(rng.uniform(0.7, 1.2) * fps)
        start = int(rng.integers(0, max(1, n - 2 * ramp - hold)))
        shape = np.zeros(n)
        up = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
        shape[start : start + ramp] = up[: n - start]
        shape[start + ramp : start + ramp + hold] = 1.0
        end = start + ramp + hold
        shape[end : end + ramp] = up[::-1][: max(0, n - end)]
        yaw = yaw * (1 - shape) + target * shape

    # blinks every 2-5 s, 5 frames each, a little more often while listening
    blink = np.zeros(n)
    i = int(rng.uniform(0.5, 2.5) * fps)
    profile = np.array([0.4, 0.9, 1.0, 0.8, 0.3])
    while i < n:
        blink[i : i + 5] = profile[: n - i]
        gap = rng.uniform(2.0, 5.0) * (0.7 if listening[i] > 0.5 else 1.0)
        i += int(gap * fps)

    # the arm moves with speech energy: a gesture stroke in two directions
    phase = rng.uniform(0, 2 * np.pi, size=2)
    gesture = np.stack([np.sin(2 * np.pi * 1.6 * t + phase[0]), 0.6 * np.sin(2 * np.pi * 1.1 * t + phase[1])], 1)
    gesture = 0.06 * gesture * energy[:, None]  # up to 6% of the frame width
    return Tracks(mouth=mouth, blink=blink, yaw=yaw, pitch=pitch, roll=roll, gesture=gesture, energy=energy)


# ------------------------------------------------------------------------------------------------- actions
NOD_DEG, SHAKE_DEG, TURN_DEG = 9.0, 14.0, 28.0
WAVE_DEG, WAVE_HZ = 25.0, 2.0  # the hand swings +-25 degrees about its wrist twice a second


@dataclass(frozen=True)
class Action:
    name: str
    start: int  # first frame
    end: int  # one past the last frame


def schedule_actions(n: int, fps: int, rng: np.random.Generator, names: list[str], rate_per_min: float,
                     duration_s: tuple[float, float]) -> list[Action]:  # fmt: skip
    """Requested actions over ``n`` frames: gaps drawn with mean 60 / rate_per_min s (at least 0.5 s), each
    action ``duration_s`` long, its name drawn from ``names``; none overlap or run past the end."""
    out: list[Action] = []
    if not names or rate_per_min <= 0:
        return out
    i = int(max(0.5, rng.exponential(60.0 / rate_per_min)) * fps)
    while True:
        length = int(round(rng.uniform(*duration_s) * fps))
        if i + length > n:
            return out
        out.append(Action(str(rng.choice(names)), i, i + length))
        i += length + int(max(0.5, rng.exponential(60.0 / rate_per_min)) * fps)


def apply_actions(tracks: Tracks, actions: list[Action], fps: int) -> tuple[Tracks, np.ndarray]:
    """The tracks with each action's motion added (a nod: two down-nods per second in pitch; a shake: yaw
    back and forth; a turn: yaw to one side and back; a smile: lip corners out and up; a wave: a hand raised
    beside the face, swinging about its wrist), each faded in and out over its span, and the per-frame action
    label (index into ``ACTIONS``, 0 idle)."""
    n = tracks.yaw.size
    yaw, pitch = tracks.yaw.copy(), tracks.pitch.copy()
    smile = np.zeros(n) if tracks.smile is None else tracks.smile.copy()
    wave = np.zeros(n) if tracks.wave is None else tracks.wave.copy()
    wave_angle = np.zeros(n) if tracks.wave_angle is None else tracks.wave_angle.copy()
    labels = np.zeros(n, dtype=np.int64)
    for a in actions:
        length = a.end - a.start
        tau = np.arange(length) / fps
        fade = min(length // 2, int(0.2 * fps))
        env = np.ones(length)
        if fade:
            ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))
            env[:fade], env[-fade:] = ramp, ramp[::-1]
        span = slice(a.start, a.end)
        if a.name == "nod":
            pitch[span] += NOD_DEG * np.sin(2 * np.pi * tau) ** 2 * env
        elif a.name == "shake":
            yaw[span] += SHAKE_DEG * np.sin(2 * np.pi * 2.5 * tau) * env
        elif a.name in ("turn_left", "turn_right"):
            yaw[span] += (-TURN_DEG if a.name == "turn_left" else TURN_DEG) * env
        elif a.name == "smile":
            smile[span] = np.maximum(smile[span], env)
        elif a.name == "wave":  # raised over the fade-in, swinging once up, lowered over the fade-out
            wave[span] = np.maximum(wave[span], env)
            wave_angle[span] = WAVE_DEG * np.sin(2 * np.pi * WAVE_HZ * tau)
        else:
            raise ValueError(f"unknown action {a.name!r}; the vocabulary is {', '.join(ACTIONS[1:])}")
        labels[span] = ACTIONS.index(a.name)
    from dataclasses import replace

    return replace(tracks, yaw=yaw, pitch=pitch, smile=smile, wave=wave, wave_angle=wave_angle), labels


# --------------------------------------------------------------------------------------------- the renderer
_CONTROL = sorted(set(FACE_OVAL + LIPS_OUTER_UPPER + LIPS_OUTER_LOWER + LIPS_INNER_UPPER + LIPS_INNER_LOWER
                      + [i for pair in EYELID_PAIRS for i in pair] + EYE_CORNERS + BROWS + NOSE))
_INNER_MOUTH = LIPS_INNER_UPPER + LIPS_INNER_LOWER[::-1]


def _tps_kernel(d2: np.ndarray) -> np.ndarray:
    return d2 * np.log(np.maximum(d2, 1e-12))  # r^2 log r^2, 0 at r = 0


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] squared distances of 2-D points (two broadcasts: far cheaper than a sum over a last
    axis of size 2)."""
    return (a[:, 0:1] - b[None, :, 0]) ** 2 + (a[:, 1:2] - b[None, :, 1]) ** 2


@dataclass(frozen=True)
class Mark:
    """A coloured disc on the skin (the memory test's persistent content)."""

    landmark: int  # FaceMesh index it sits on (a cheek)
    color: tuple[int, int, int]  # RGB
    radius_rel: float  # radius / face width


MARK_CHEEKS = (50, 280)  # FaceMesh: left and right cheek
MARK_COLORS = ((0, 230, 255), (255, 0, 220), (40, 255, 40))  # saturated: nothing in a face is near them


class Animator:
    """Renders frames of one identity from per-frame pose, mouth, blink and gesture values."""

    def __init__(self, identity: Identity, arm_side: int, grid_step: int = 8) -> None:
        self.img = identity.image
        self.h, self.w = self.img.shape[:2]
        lm = identity.landmarks.copy()
        self.base = lm
        self.base_frame = head_frame(lm)
        oval = lm[FACE_OVAL]
        self.centre = oval.mean(axis=0)
        self.face_w = float(np.ptp(oval[:, 0]))
        self.face_h = float(np.linalg.norm(lm[152, :2] - lm[10, :2]))
        # neck pivot: below the face centre and behind it
        self.pivot = np.array([self.centre[0], lm[152, 1] + 0.05 * self.face_h, oval[:, 2].mean() + 0.5 * self.face_w])
        # a halo around the face (hair, ears) moves with the head; it is the oval pushed outward
        rel = oval[:, :2] - self.centre[:2]
        scale = np.where(rel[:, 1] < 0, 1.5, 1.2)[:, None]
        self.halo = np.concatenate([self.centre[:2] + rel * scale, oval[:, 2:3]], axis=1)
        # mouth drop weights: lower lip and jaw go down, weaker toward the cheeks
        mouth_y = lm[LIPS_INNER_UPPER, 1].mean()
        below = lm[:, 1] > mouth_y + 0.01 * self.face_h
        falloff = np.clip(1.0 - np.abs(lm[:, 0] - self.centre[0]) / (0.6 * self.face_w), 0.0, 1.0) ** 0.5
        self.drop_w = np.where(below, falloff, 0.0)
        self.drop_w[LIPS_INNER_LOWER + LIPS_OUTER_LOWER] = 1.0
        self.raise_w = np.zeros(len(lm))
        self.raise_w[LIPS_INNER_UPPER[2:-2]] = 0.15
        self.drop_px = 0.08 * self.face_h
        # smile: the lip corners (61, 291) pulled out and up, their neighbourhood with them
        mouth_c = lm[[61, 291], :2].mean(axis=0)
        self.smile_shift = np.zeros((len(lm), 2))
        for corner in (61, 291):
            near = np.exp(-np.sum((lm[:, :2] - lm[corner, :2]) ** 2, axis=1) / (2 * (0.07 * self.face_w) ** 2))
            out = np.sign(lm[corner, 0] - mouth_c[0])
            self.smile_shift += near[:, None] * np.array([out * 0.05 * self.face_w, -0.035 * self.face_h])
        # fixed anchors: the frame border and a row across the shoulders, away from the arm region
        b = np.linspace(0, 1, 7)
        border = np.concatenate([
            np.stack([b * (self.w - 1), np.zeros(7)], 1), np.stack([b * (self.w - 1), np.full(7, self.h - 1.0)], 1),
            np.stack([np.zeros(7), b * (self.h - 1)], 1), np.stack([np.full(7, self.w - 1.0), b * (self.h - 1)], 1),
        ])
        shoulder_y = min(self.h - 2.0, lm[152, 1] + 0.55 * self.face_h)
        shoulders = np.stack([b * (self.w - 1), np.full(7, shoulder_y)], 1)
        self.arm = np.array([(0.2 if arm_side == 0 else 0.8) * self.w, 0.86 * self.h])
        self.arm_side = arm_side
        inside = np.zeros((self.h, self.w), np.uint8)  # the skin's colour: the median inside the face oval
        cv2.fillPoly(inside, [oval[:, :2].round().astype(np.int32)], 1)
        self.skin = np.median(self.img[inside > 0], axis=0) if inside.any() else np.array([190.0, 150.0, 125.0])
        anchors = np.unique(np.concatenate([border, shoulders]).round(1), axis=0)
        anchors = anchors[np.linalg.norm(anchors - self.arm, axis=1) > 0.22 * self.w]
        self.anchors = anchors
        ang = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        self.arm_pts = np.concatenate([self.arm[None], self.arm + 0.06 * self.w * np.stack([np.cos(ang), np.sin(ang)], 1)])
        # output grid the spline is evaluated on, then upsampled to every pixel
        # grid point g stands for pixel (g + 0.5) * step - 0.5, so cv2.resize by `step` lands exactly on pixels
        gx = (np.arange(-(-self.w // grid_step)) + 0.5) * grid_step - 0.5
        gy = (np.arange(-(-self.h // grid_step)) + 0.5) * grid_step - 0.5
        self.grid = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        self.grid_shape = (len(gy), len(gx))
        self.grid_step = grid_step

    def landmarks(self, pitch: float, roll: float, mouth: float, blink: float, smile: float = 0.0) -> np.ndarray:
        """The moved 3D landmarks before the yaw turn (pitch, roll, mouth, smile and eyelids applied)."""
        lm = self.base.copy()
        lm[:, 1] += mouth * self.drop_px * self.drop_w - mouth * self.drop_px * self.raise_w
        if smile:
            lm[:, :2] += smile * self.smile_shift
        for up, low in EYELID_PAIRS:
            lm[up, :2] += 0.75 * blink * (self.base[low, :2] - self.base[up, :2])
        return self._rotate(lm, pitch, roll)

    def _rotate(self, pts: np.ndarray, pitch: float, roll: float) -> np.ndarray:
        r = rotation_from_angles(0.0, pitch, roll)
        return (pts - self.pivot) @ r.T + self.pivot

    def pose(self, yaw: float, pitch: float, roll: float) -> tuple[float, float, float]:
        """Ground-truth head pose: the photo's own pose (from its landmarks) turned rigidly by the applied
        rotation, R = Ry(-yaw) Rx(pitch) Rz(roll) R_photo. The jaw and eyelids do not change it."""
        return angles_from_rotation(rotation_from_angles(yaw, 0.0, 0.0)
                                    @ rotation_from_angles(0.0, pitch, roll) @ self.base_frame)

    def render(self, yaw: float, pitch: float, roll: float, mouth: float, blink: float, gesture: np.ndarray,
               mark: Mark | None = None, smile: float = 0.0, wave: float = 0.0, wave_angle: float = 0.0,
               ) -> tuple[np.ndarray, tuple[float, float, float]]:  # fmt: skip
        """(frame RGB uint8, ground-truth head pose (yaw, pitch, roll) in degrees).

        Pitch, roll, mouth, eyelids and the arm move landmarks and drive a thin-plate-spline warp; yaw then
        turns the head as a cylinder about its vertical axis: a fold-free warp whose silhouette stays put
        (landmark-driven warps fold once the far cheek is hidden, past ~30 degrees). ``mark``: a coloured disc
        drawn on the skin at a landmark, so it moves and turns with the head.
        """
        moved = self.landmarks(pitch, roll, mouth, blink, smile)
        halo = self._rotate(self.halo, pitch, roll)
        src = np.concatenate([self.base[_CONTROL, :2], self.halo[:, :2], self.anchors, self.arm_pts])
        dst = np.concatenate([moved[_CONTROL, :2], halo[:, :2], self.anchors, self.arm_pts + gesture * self.w])
        mx, my = self._tps_map(src, dst)
        frame = cv2.remap(self.img, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        if mouth > 0.05:  # the open mouth's inside is dark
            poly = moved[_INNER_MOUTH, :2].round().astype(np.int32)
            overlay = frame.copy()
            cv2.fillPoly(overlay, [poly], (52, 18, 24), lineType=cv2.LINE_AA)
            alpha = min(1.0, (mouth - 0.05) * 4.0)
            frame = cv2.addWeighted(overlay, alpha, frame, 1 - alpha, 0)
        if mark is not None:
            centre = tuple(int(round(v)) for v in moved[mark.landmark, :2])
            cv2.circle(frame, centre, max(1, int(round(mark.radius_rel * self.face_w))), mark.color, -1,
                       lineType=cv2.LINE_AA)  # fmt: skip
        if abs(yaw) > 1e-3:
            cx = float(moved[FACE_OVAL, 0].mean())
            frame = cv2.remap(frame, *self._yaw_map(yaw, cx, moved), interpolation=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT101)
        if wave > 0.02:
            frame = self.draw_hand(frame, wave, wave_angle)
        return frame, self.pose(yaw, pitch, roll)

    def draw_hand(self, frame: np.ndarray, raised: float, angle: float) -> np.ndarray:
        """A hand with its forearm beside the face on the arm's side, palm out, fingers up, in the face's skin
        colour: ``raised`` 0..1 brings it up from below the chin to the cheek, ``angle`` (degrees) tilts it
        about the wrist. Drawn over the head (it does not turn with it)."""
        fw, fh = self.face_w, self.face_h
        side = -1.0 if self.arm_side == 0 else 1.0
        wrist = np.array([self.centre[0] + side * 0.78 * fw, self.centre[1] + 0.3 * fh + (1 - raised) * 1.3 * fh])
        t = np.deg2rad(angle * side)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])

        def at(dx: float, dy: float) -> tuple[int, int]:  # a point in the hand's frame (fw, fh units) -> pixels
            x, y = rot @ np.array([dx * fw, dy * fh]) + wrist
            return int(round(x)), int(round(y))

        mask = np.zeros(frame.shape[:2], np.uint8)
        cv2.line(mask, at(0.0, 0.0), at(-0.08 * side, 1.6), 255, max(1, int(0.26 * fw)))  # forearm
        palm = np.array([at(-0.2, -0.02), at(0.2, -0.02), at(0.22, -0.3), at(-0.22, -0.3)], np.int32)
        cv2.fillConvexPoly(mask, palm, 255, lineType=cv2.LINE_AA)
        cv2.ellipse(mask, at(0.0, -0.16), (int(0.2 * fw), int(0.16 * fh)), float(np.rad2deg(t)), 0, 360, 255, -1)
        width = max(1, int(0.085 * fw))
        for dx, length in ((-0.15, 0.2), (-0.05, 0.25), (0.05, 0.24), (0.15, 0.19)):  # four fingers, spread
            cv2.line(mask, at(dx, -0.28), at(dx * 1.3, -0.28 - length), 255, width, lineType=cv2.LINE_AA)
        cv2.line(mask, at(-0.2 * side, -0.08), at(-0.36 * side, -0.22), 255, width, lineType=cv2.LINE_AA)  # thumb
        shade = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), max(0.5, 0.03 * fw))
        alpha = (mask.astype(np.float32) / 255)[..., None]
        colour = self.skin[None, None, :] * (0.8 + 0.2 * shade[..., None])
        return (frame * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)

    def _yaw_map(self, yaw: float, cx: float, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the output pixel at cylinder angle t shows the source at t - yaw; the back of the head (not in the
        # photo) is clamped to the limb
        radius = 0.62 * self.face_w
        xs = np.arange(self.w, dtype=np.float64)
        u = np.clip((xs - cx) / radius, -1.0, 1.0)
        t_src = np.clip(np.arcsin(u) - np.radians(yaw), -np.pi / 2, np.pi / 2)
        x_cyl = cx + radius * np.sin(t_src)
        wx = np.clip((1.0 - np.abs(u)) / 0.12, 0.0, 1.0)  # fade out at the silhouette
        top = moved[FACE_OVAL, 1].min() - 0.6 * self.face_h
        chin = moved[152, 1] + 0.05 * self.face_h
        ys = np.arange(self.h, dtype=np.float64)
        wy = np.clip(1.0 - (ys - chin) / (0.35 * self.face_h), 0.0, 1.0) * (ys > top)
        w = wy[:, None] * wx[None, :]
        mx = (xs[None, :] + w * (x_cyl - xs)[None, :]).astype(np.float32)
        my = np.broadcast_to(ys[:, None], (self.h, self.w)).astype(np.float32)
        return mx, my

    def _tps_map(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # thin-plate spline f with f(dst_i) = src_i, evaluated on the output grid: a backward map
        n = len(dst)
        d2 = _sq_dist(dst, dst)
        k = _tps_kernel(d2) + 1e-3 * np.eye(n)
        p = np.concatenate([np.ones((n, 1)), dst], 1)
        a = np.zeros((n + 3, n + 3))
        a[:n, :n], a[:n, n:], a[n:, :n] = k, p, p.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n] = src
        coef = np.linalg.solve(a, rhs)
        g2 = _sq_dist(self.grid, dst)
        mapped = _tps_kernel(g2) @ coef[:n] + np.concatenate([np.ones((len(self.grid), 1)), self.grid], 1) @ coef[n:]
        mx = mapped[:, 0].reshape(self.grid_shape).astype(np.float32)
        my = mapped[:, 1].reshape(self.grid_shape).astype(np.float32)
        full = (self.grid_shape[1] * self.grid_step, self.grid_shape[0] * self.grid_step)
        mx = cv2.resize(mx, full, interpolation=cv2.INTER_LINEAR)[: self.h, : self.w]
        my = cv2.resize(my, full, interpolation=cv2.INTER_LINEAR)[: self.h, : self.w]
        return mx, my
