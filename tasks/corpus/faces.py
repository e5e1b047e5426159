"""Real face photos that ship inside installed packages, and identity variants made from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.common.facemesh import FACE_OVAL, FaceMesh


class FaceError(ValueError):
    """A face photo is unusable; the message names the file."""


@dataclass(frozen=True)
class Photo:
    name: str
    source: str  # where the file came from (package and licence note), for the corpus report
    image: np.ndarray  # RGB uint8


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
BUNDLED = ("astronaut", "grace_hopper")


def bundled_photos(extra: list[str] | None = None) -> list[Photo]:
    """scikit-image's astronaut (NASA, public domain) and matplotlib's Grace Hopper (public domain), plus any
    user-supplied photos."""
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    photos = [
        Photo("astronaut", "scikit-image data.astronaut (Eileen Collins, NASA, public domain)", data.astronaut()),
    ]
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.array(Image.open(fh).convert("RGB"))
    photos.append(Photo("grace_hopper", "matplotlib sample_data grace_hopper.jpg (US Navy, public domain)", hopper))
    for path in extra or []:
        photos.append(load_photo(path))
    return photos


def bundled_photo(name: str) -> Photo:
    for photo in bundled_photos():
        if photo.name == name:
            return photo
    raise FaceError(f"no bundled photo named {name!r}; bundled: {', '.join(BUNDLED)}")


def folder_photos(folder: Path) -> list[Path]:
    """Every image file directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_photo(path: str | Path) -> Photo:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FaceError(f"corpus.extra_faces: {path} does not exist")
    try:
        image = np.array(Image.open(path).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise FaceError(f"corpus.extra_faces: {path} is not a readable image ({exc})") from None
    return Photo(path.stem, str(path), image)


@dataclass(frozen=True)
class Variant:
    """How an identity differs from its photo: crop, mirroring and colour."""

    mirror: bool
    face_frac: float  # face width / frame width
    offset_x: float  # horizontal shift of the face, fraction of the frame width
    eye_y: float  # height of the eye line, fraction of the frame height
    hue: float  # hue rotation in degrees
    saturation: float
    brightness: float

    @staticmethod
    def draw(rng: np.random.Generator) -> Variant:
        return Variant(
            mirror=bool(rng.random() < 0.5),
            face_frac=float(rng.uniform(0.30, 0.40)),
            offset_x=float(rng.uniform(-0.06, 0.06)),
            eye_y=float(rng.uniform(0.30, 0.37)),
            hue=float(rng.uniform(-14, 14)),
            saturation=float(rng.uniform(0.75, 1.25)),
            brightness=float(rng.uniform(0.85, 1.12)),
        )


@dataclass
class Identity:
    name: str
    photo: str
    variant: Variant
    image: np.ndarray  # RGB uint8, frame size
    landmarks: np.ndarray  # (468, 3) pixels in the frame

    def describe(self) -> dict:
        return {"name": self.name, "photo": self.photo, **asdict(self.variant)}


def make_identity(photo: Photo, variant: Variant, width: int, height: int, mesh: FaceMesh, name: str) -> Identity:
    """Crop, scale, mirror and recolour a photo into a frame and find its landmarks there."""
    lm = mesh(photo.image)
    if lm is None:
        raise FaceError(f"no face found in photo {photo.source}")
    oval = lm[FACE_OVAL, :2]
    face_w = float(oval[:, 0].max() - oval[:, 0].min())
    eyes = lm[[33, 263], :2].mean(axis=0)
    s = variant.face_frac * width / face_w
    tx = width * (0.5 + variant.offset_x) - s * eyes[0]
    ty = height * variant.eye_y - s * eyes[1]
    m = np.array([[s, 0, tx], [0, s, ty]], np.float64)
    frame = cv2.warpAffine(photo.image, m, (width, height), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT101)
    if variant.mirror:
        frame = frame[:, ::-1]
    frame = _recolour(frame, variant)
    landmarks = mesh(frame)
    if landmarks is None:
        raise FaceError(f"no face found in the {width}x{height} crop of {photo.source}")
    return Identity(name=name, photo=photo.name, variant=variant, image=frame, landmarks=landmarks)


def _recolour(rgb: np.ndarray, v: Variant) -> np.ndarray:
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + v.hue / 2.0) % 180.0  # OpenCV hue is 0..180
    hsv[..., 1] = np.clip(hsv[..., 1] * v.saturation, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * v.brightness, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
