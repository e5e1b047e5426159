"""Typed, validated configuration.

The effective config is params.yaml (the demo profile), then every ``--config FILE`` merged in order, then every
``--set key.path=value``. Unknown keys and bad values stop with one error that names the key and what is allowed.
Model code never reads this module: stages pass plain values from here into constructors.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- sections
class ProjectConfig(_Section):
    name: str = "streamavatar"
    seed: int = Field(0, ge=0)
    data_dir: str = "data"  # every data/... path setting lives under this root (configs/paper.yaml: data/paper)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TrackingConfig(_Section):
    enabled: bool = True
    experiment: str = "streamavatar"
    # relative sqlite paths and artifact folders resolve against the project root; $STREAMAVATAR_TRACKING_URI,
    # when set, wins (`make serve` points its worker at the MLflow server that way)
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_dir: str = "mlruns"
    # each stage run samples CPU, memory, disk, network (and GPU with nvidia-ml-py installed) as system/* metrics
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)


class CorpusConfig(_Section):
    """The self-made demo corpus: two-person conversations written like a SpeakerVid-5M download."""

    out_dir: str = "data/raw/synthetic"
    report_dir: str = "data/reports/corpus"
    # more, shorter conversations than faces x 1: every usable face gets at least one side (slot 2i+s takes face
    # (2i+s) mod faces), the first faces a second one, so held-out conversations can show identities seen in training
    num_conversations: int = Field(16, ge=1, le=10_000)
    duration_s: float = Field(5.0, ge=1.0, le=600.0)
    fps: int = Field(25, ge=1, le=120)
    sample_rate: int = Field(16000, ge=8000, le=48000)
    width: int = Field(256, ge=64, le=4096, multiple_of=2)
    height: int = Field(320, ge=64, le=4096, multiple_of=2)
    seed: int = Field(0, ge=0)
    # espeak-ng voice names (language+variant); side A and side B of a conversation get different ones
    voices: list[str] = Field(
        default_factory=lambda: ["en-us+m3", "en+f2", "en-us+f4", "en+m1", "en-gb-x-rp+f3", "en-us+m7"],
        min_length=2,
    )
    speech_rate_wpm: tuple[int, int] = (150, 185)
    pause_s: tuple[float, float] = (0.25, 0.9)
    overlap_prob: float = Field(0.3, ge=0.0, le=1.0)
    overlap_s: tuple[float, float] = (0.2, 0.6)
    big_turn_prob: float = Field(0.5, ge=0.0, le=1.0)  # chance per side of one head turn past 45 degrees
    big_turn_yaw_deg: tuple[float, float] = (50.0, 62.0)
    # the memory test (issue [10]): this share of the clips gain a coloured mark on one cheek, appearing at a
    # time drawn in mark_after_s and staying to the end (content the reference never showed); ground truth in
    # gt/*.json ("mark", "mark_visible"). 0: none (the demo)
    mark_prob: float = Field(0.0, ge=0.0, le=1.0)
    mark_after_s: tuple[float, float] = (1.0, 2.0)
    # the disc's radius as a share of the face width; measured through curation's 64x64 head crop and the demo
    # VAE: 0.12 is found in 96-100 % of the frontal frames after it appears, 0.07 in 0-1 % (the VAE erases it)
    mark_radius_rel: float = Field(0.12, gt=0.0, le=0.3)
    # requested actions (issue [10]) rendered with per-frame labels (gt/*.json "action", "actions"): names from
    # nod, shake, turn_left, turn_right, smile; [] (the demo): none
    actions: list[str] = Field(default_factory=list)
    action_rate_per_min: float = Field(8.0, gt=0)  # mean number of actions per minute of a clip
    action_s: tuple[float, float] = (1.0, 1.6)  # how long one lasts
    # extra real face photos (paths) added to the images that ship inside installed packages; a missing or
    # unreadable one stops the stage before any work
    extra_faces: list[str] = Field(default_factory=list)
    # folders whose every image (.jpg .jpeg .png .webp) is an extra face; an absent folder is skipped with a logged
    # reason (a clone without ../shared still works), a photo with no face found is recorded and left out
    extra_faces_dirs: list[str] = Field(
        default_factory=lambda: ["../shared/fixtures/portraits", "../shared/fixtures/avatars"])
    workers: int = Field(2, ge=1, le=256)
    crf: int = Field(20, ge=0, le=51)

    @model_validator(mode="after")
    def _ranges(self) -> CorpusConfig:
        for key in ("speech_rate_wpm", "pause_s", "overlap_s", "big_turn_yaw_deg", "mark_after_s", "action_s"):
            lo, hi = getattr(self, key)
            if lo > hi:
                raise ValueError(f"corpus.{key}: low {lo} is above high {hi}; give [low, high]")
        if len(set(self.voices)) < 2:
            raise ValueError("corpus.voices: give at least two different voices")
        from model.interaction import ACTIONS

        known = ACTIONS[1:]
        unknown = [a for a in self.actions if a not in known]
        if unknown:
            raise ValueError(f"corpus.actions: unknown {unknown}; the vocabulary is {', '.join(known)}")
        return self


class VideoConfig(_Section):
    """Resolution and frame rate the models train and generate at (the profile's size)."""

    width: int = Field(64, ge=16, multiple_of=16)
    height: int = Field(64, ge=16, multiple_of=16)
    fps: int = Field(25, ge=1)


class SpeakerVidConfig(_Section):
    """curate.sources with speakervid: the SpeakerVid-5M lists and merged_anno archives from the Hugging Face Hub
    (huggingface_hub), the videos from YouTube (yt-dlp), cut and cropped per clip (ffmpeg)."""

    repo: str = "dorni/SpeakerVid-5M-Dataset"  # dataset repo id on the Hub
    # a local copy of that repo (huggingface-cli download <repo> --repo-type dataset --local-dir D): lists and
    # merged_anno read there, no Hub request
    repo_dir: str | None = None
    # raw videos already downloaded ({ytid}.mp4, or {ytid}_{W}x{H}.mp4 as SpeakerVid's cutting script names them):
    # cut from there, never downloaded nor deleted; a video not there is downloaded
    raw_video_dir: str | None = None
    revision: str = "main"
    endpoint: str | None = None  # Hub endpoint (a mirror); None: huggingface_hub's default
    list_file: str = "SFT_set.json"  # all_data_list.json | SFT_set.json | testset.json
    anno_prefix: str = "merged_anno/"  # annotation files (.json, .tar, .tar.gz) under this folder of the repo
    max_clips: int = Field(32, ge=0)  # first clips of the list to fetch; 0: the whole list
    video_url: str = "https://www.youtube.com/watch?v={ytid}"  # {ytid} is filled in; yt-dlp downloads it
    ytdlp_format: str = "bv*[height<=1080]+ba/b[height<=1080]/b"
    cookies_file: str | None = None  # a cookies.txt for yt-dlp, when YouTube asks for a login
    download_dir: str = "data/raw/speakervid"  # hub cache, raw videos, cut clips, shard status
    keep_raw_videos: bool = False  # delete a raw video once every clip cut from it is written
    shard_size: int = Field(16, ge=1)  # clips per shard; a shard whose status file exists is skipped
    # download only the time ranges the clips need (yt-dlp download ranges): each clip +- section_margin_s,
    # ranges less than section_gap_s apart in one download; false: each whole video once
    download_sections: bool = True
    section_margin_s: float = Field(1.0, ge=0)
    section_gap_s: float = Field(30.0, ge=0)
    retries: int = Field(3, ge=0, le=20)  # extra attempts per download, with exponential backoff
    # a clip whose download failed with a transient error is tried again by the next curate runs, until it has
    # failed in this many runs; permanent errors (404, private, removed ...) and failed cuts are not retried
    retry_runs: int = Field(3, ge=1)
    # the clip's time span in the raw video: track = start_new + duration_new, the frames the record describes
    # (else start_seconds + end_seconds, else start + duration); scene = org_start_seconds + video_total_duration,
    # the scene segment it was tracked in (what SpeakerVid's own cutting script cuts)
    span: Literal["track", "scene"] = "track"
    # the records' own quality fields as filters (None / false: off); a clip they reject is not downloaded and
    # gets a `rejected` row with the reason. sync: SyncNet confidence (a number, a list of numbers: their mean,
    # or the per-person map {person: [[conf, dist, offset], ...]}: the mean confidence of the clip's person);
    # conf: a number; clear: the clarity score (bit rate over frame size; the SpeakerVid paper drops its lowest
    # 5 %); dover: DOVER video quality (the paper drops < 0.25, its SFT set keeps > 0.6)
    min_sync: float | None = None
    min_conf: float | None = None
    min_clear: float | None = None
    min_dover: float | None = None
    require_clear: bool = False  # clear must be truthy (a record with clear 0 / false is rejected)
    backoff_s: float = Field(2.0, ge=0)  # first wait; doubles per attempt
    rate_limit_per_min: float = Field(20.0, gt=0)  # downloads started per minute, at most
    timeout_s: float = Field(60.0, gt=0)  # socket timeout per request


class CurateConfig(_Section):
    """Data curation (paper 4.1): active-speaker masks, balancing and filters."""

    # where clips come from, all curated in one run: synthetic (the demo corpus), local (the videos in
    # local_dirs), speakervid (download, curate.speakervid). The old single keys still work: `source: X` means
    # `sources: [X]` and `local_dir: D` means `local_dirs: [D]` (they win over the list forms when given)
    sources: list[Literal["synthetic", "local", "speakervid"]] = Field(
        default_factory=lambda: ["synthetic", "local"], min_length=1)
    # local: folders (every video inside, + optional merged_anno JSONs with the same stem) or single video files;
    # an absent one is skipped with a logged reason (a clone without ../shared still works)
    local_dirs: list[str] = Field(
        default_factory=lambda: ["../shared/fixtures/talking", "../shared/fixtures/speakervid"])
    # local clips of one conversation whose file names do not say so (clip id -> conversation group); without
    # an entry a local clip is its own conversation (SpeakerVid names: their YouTube id)
    local_groups: dict[str, str] = Field(default_factory=lambda: {
        "dialogue_case1_1": "dialogue_case1", "dialogue_case1_2": "dialogue_case1"})
    speakervid: SpeakerVidConfig = Field(default_factory=SpeakerVidConfig)
    # where the per-clip tasks run: local (a process pool of `workers`), dask (prefect-dask's DaskTaskRunner:
    # a local cluster of `workers` processes, or the scheduler at runner_address), ray (prefect-ray)
    runner: Literal["local", "dask", "ray"] = "local"
    runner_address: str | None = None  # e.g. tcp://10.0.0.5:8786 (dask) or ray://10.0.0.5:10001 (ray)
    out_dir: str = "data/curated"  # clips/ (normalised mp4) and masks/ (per-frame npy)
    manifest: str = "data/manifests/curated.parquet"
    report_dir: str = "data/reports/curate"
    workers: int = Field(2, ge=1, le=256)
    seed: int = Field(0, ge=0)
    min_duration_s: float = Field(2.0, gt=0)
    max_duration_s: float | None = Field(8.0, gt=0)  # longer source clips: their first max_duration_s only
    analysis_width: int = Field(480, ge=64)  # frames are analysed (ASD, pose, quality) at this width
    # head: a fixed crop around the clip's median mediapipe face box, head_scale times its size (the face fills
    # most of the frame); person: the merged_anno person box when the clip has one, else the centred frame
    crop: Literal["head", "person"] = "head"
    head_scale: float = Field(1.7, ge=1.0, le=6.0)
    luminance_range: tuple[float, float] = (20.0, 235.0)  # median frame luma must lie inside
    min_face_sharpness: float = Field(5.0, ge=0)  # variance of the Laplacian of the face crop
    speaking_max_listen: float = Field(0.3, ge=0, le=1)  # listen ratio <= this: a "speaking" clip
    listening_min_listen: float = Field(0.7, ge=0, le=1)  # listen ratio >= this: a "listening" clip
    proportions: dict[str, float] = Field(default_factory=lambda: {"speaking": 1.0, "listening": 1.0, "mixed": 1.0})
    # held-out data shares neither a conversation nor its audio with training: splits are by conversation
    # (group). `unseen`: every conversation with one of unseen_identities (more, chosen by hash, until
    # unseen_min_identities are held out); `val`: the conversations of val_clips (and of pretrain.holdout), a
    # val_fraction of the rest by hash, then more until each source has val_min_conversations (preferring
    # conversations whose people are also seen in training); training keeps a conversation of each source.
    # The demo's val is chosen, not drawn: the shared clips the pretrained autoencoder never saw + the minimum
    val_fraction: float = Field(0.0, ge=0, lt=1)
    val_min_conversations: int = Field(2, ge=0)
    val_clips: list[str] = Field(default_factory=list)  # clip ids held out (with their conversation) as val
    unseen_identities: list[str] = Field(default_factory=lambda: ["fashion_blogger"])
    unseen_min_identities: int = Field(1, ge=0)
    # balancing keeps at least this share of the ok training clips: strict proportions would throw away most
    # of a small corpus (the rarest category limits them all); the shortfall is filled from the categories
    # furthest below their target share. 0: strict proportions (a large corpus)
    balance_min_keep: float = Field(0.75, ge=0, le=1)
    # active speaker detector: light-asd (finetuning_TalkSet.model ships in ../shared) or talknet (TalkNet-ASD:
    # give its pretrain_TalkSet.model as asd_weights)
    asd: Literal["light-asd", "talknet"] = "light-asd"
    asd_weights: str = "../shared/models/light-asd/finetuning_TalkSet.model"  # local path, relative to the repo
    asd_device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")  # the detector's device; auto: a GPU if any
    # scoring windows (s); each one is a pass of the detector over the clip (the stage's largest cost). Frame F1
    # of the mask against the demo corpus's ground truth (28 clips): [2, 6] 0.892, [1, 2, 6] 0.924, [1, 2, 4, 6]
    # 0.903 (the clip is encoded once, so each window length costs only the GRUs); on real monologues (shared talking/speakervid clips) a 6 s window is
    # needed: [1, 2] (F1 0.926) calls 15-52 % of their frames listening (per-clip calibration splits its scores)
    asd_durations: list[float] = Field(default_factory=lambda: [2.0, 6.0])
    # per_clip: split a clip's scores between two well separated groups (else asd_threshold); fixed: asd_threshold;
    # auto: per_clip for the synthetic corpus (frame F1 0.889, fixed 0.70: the detector's zero point drifts on
    # renders), fixed for real clips (hand-checked seconds of three shared clips: F1 1.0, per_clip 0.974)
    asd_calibration: Literal["auto", "per_clip", "fixed"] = "auto"
    asd_threshold: float = 0.0  # the detector's own decision logit
    asd_min_gap: float = Field(2.0, ge=0)  # logits between the two groups' means for a per-clip split
    asd_min_share: float = Field(0.1, ge=0, le=0.5)  # smallest group's share of frames for a per-clip split
    # head-pose filter (mediapipe FaceMesh 3D landmarks): reject a clip whose head is beyond these limits
    # in more than max_pose_fraction of the frames with a face
    max_yaw_deg: float = Field(35.0, gt=0, le=90)
    max_pitch_deg: float = Field(30.0, gt=0, le=90)
    max_roll_deg: float = Field(30.0, gt=0, le=90)
    max_pose_fraction: float = Field(0.2, ge=0, le=1)
    min_face_fraction: float = Field(0.8, ge=0, le=1)  # clips with a face in fewer frames are rejected
    pose_stride: int = Field(2, ge=1)  # measure every n-th frame
    # face detection on every n-th frame for the clip's face track (ASD crops, the head crop, the sharpness
    # check), linked across frames and interpolated: mask F1 on the demo corpus 0.890 at 1, 2 and 5 (bench
    # --curation: detection 2.8 s -> 0.6 s per 30 s of video)
    face_stride: int = Field(5, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _single_source_keys(cls, data: Any) -> Any:
        # the single-source keys of earlier versions: `source: X` -> `sources: [X]`, `local_dir: D` -> `local_dirs: [D]`
        if isinstance(data, dict) and ("source" in data or "local_dir" in data):
            data = dict(data)
            if "source" in data:
                data["sources"] = [data.pop("source")]
            if "local_dir" in data:
                folder = data.pop("local_dir")
                data["local_dirs"] = [folder] if folder else []
        return data

    @model_validator(mode="after")
    def _checks(self) -> CurateConfig:
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"curate.sources: each source once, got {self.sources}")
        if "local" in self.sources and not self.local_dirs:
            raise ValueError("curate.local_dirs: give at least one folder or video when curate.sources has 'local'")
        if self.speaking_max_listen >= self.listening_min_listen:
            raise ValueError("curate.speaking_max_listen must be below curate.listening_min_listen")
        bad = set(self.proportions) - {"speaking", "listening", "mixed"}
        if bad or any(v < 0 for v in self.proportions.values()):
            raise ValueError("curate.proportions: weights >= 0 for speaking, listening, mixed")
        return self


class ModelConfig(_Section):
    backbone: Literal["tiny-wan", "wan2.2-ti2v-5b"] = "tiny-wan"
    pretrained_path: str | None = None  # local diffusers directory (paper profile); never a hub id
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=8)
    ffn_dim: int = Field(512, ge=8)
    text_dim: int = Field(32, ge=1)
    text_len: int = Field(8, ge=1)  # prompt tokens (umT5: 512)
    freq_dim: int = Field(256, ge=2, multiple_of=2)
    eps: float = Field(1e-6, gt=0)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    prompt: str = "a person is speaking and listening"  # fixed (paper 3.2): embedded once and cached
    # local umT5 (transformers) directory with its tokenizer; None: a fixed seeded embedding (the demo)
    text_encoder_path: str | None = None
    # the reference latent patch-embedded and added to every frame that sees it (model/dit.py DiTSpec), Wan
    # I2V's image condition as a sum; off by default (Wan2.2 TI2V has no such input; on the demo, 800 steps
    # of continuing the base DiT with it did not keep faces longer)
    reference_embedding: bool = False
    # a learned embedding per audio token slot of a latent frame (which video frame, which window offset):
    # without it the frame-local audio attention sees an unordered set of tokens (model/dit.py DiTSpec)
    audio_slots: bool = False
    # a learned null key in both audio attentions: each video token chooses how much audio it takes
    audio_null_key: bool = False
    # Long-Short Visual Memory (InteractiveAvatar; model/memory.py): learned memory tokens per layer summarising
    # the frames the rolling window evicted, read by every later chunk through a zero-initialised gate. 0: off
    memory_slots: int = Field(0, ge=0)
    # "global": each slot pools every evicted token (memory_slots tokens per layer); "spatial": each slot pools
    # the evicted frames at each token position (memory_slots x tokens-per-frame tokens, read at their places)
    memory_kind: Literal["global", "spatial"] = "global"
    # "gated": a separate read added through a zero-initialised gate; "joint": the memory tokens are more keys of
    # the self-attention softmax (a learned logit bias per head), read as the frames of the window are
    memory_read: Literal["gated", "joint"] = "gated"
    # the pooled prompt through a zero-initialised layer added to the time embedding (model/dit.py DiTSpec): a
    # global modulation by the prompt beside the cross-attention; with action prompts ([10]), which action
    prompt_modulation: bool = False

    @model_validator(mode="after")
    def _patch(self) -> ModelConfig:
        if self.patch_size[0] != 1:
            raise ValueError("model.patch_size: the temporal patch must be 1 (chunks are whole latent frames)")
        return self


class VaeConfig(_Section):
    # causal-ae: the demo's own causal streaming autoencoder (model/causal_ae.py), trained by the `vae` stage;
    # wan-tiny / wan2.2: diffusers' AutoencoderKLWan (the paper profile loads Wan2.2's weights and skips `vae`)
    kind: Literal["causal-ae", "wan-tiny", "wan2.2"] = "causal-ae"
    # wan*: a diffusers VAE folder; causal-ae: the checkpoint every later stage decodes with (the vae stage's
    # data/checkpoints/vae/final.pt); null: a random network (tests)
    pretrained_path: str | None = "data/checkpoints/vae/final.pt"
    z_dim: int = Field(16, ge=1)
    base_dim: int = Field(16, ge=8)  # wan-tiny only
    widths: list[int] = Field(default_factory=lambda: [32, 64])  # causal-ae: channels per resolution level
    patch: int = Field(2, ge=1)  # causal-ae: pixel (un)shuffle factor before the first conv
    # causal-ae: residual blocks after each decoder upsampling; weights with fewer (the same encoder) are grown
    # from, the new blocks starting as the identity (vae_train.init_from, pretrain.vae_init_from)
    decoder_blocks: int = Field(3, ge=0)
    temporal_compression: int = Field(4, ge=1)
    spatial_compression: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _causal_ae_shape(self) -> VaeConfig:
        if self.kind == "causal-ae":
            if not self.widths:
                raise ValueError("vae.widths: give at least one level")
            spatial = self.patch * 2 ** (len(self.widths) - 1)
            if spatial != self.spatial_compression:
                raise ValueError(f"vae.spatial_compression is {self.spatial_compression} but vae.patch x 2^(levels-1) "
                                 f"of vae.widths is {spatial}")  # fmt: skip
        return self


class VaeTrainConfig(_Section):
    """Stage `vae`: trains the causal autoencoder on frames of the curated training clips (kind causal-ae only)."""

    init_from: str | None = "weights/demo_vae.pt"  # start from these weights (the `pretrain` result); null: scratch
    out: str = "data/checkpoints/vae/final.pt"  # what vae.pretrained_path points at in the demo
    iterations: int = Field(300, ge=0)
    batch_size: int = Field(8, ge=1)  # clips per step, each clip_frames long
    clip_frames: int = Field(9, ge=1)  # 1 + 4k frames per training clip
    lr: float = Field(3e-4, gt=0)
    warmup: int = Field(20, ge=0)
    latent_noise: float = Field(0.1, ge=0)  # decoder trained on latents + this x their std of noise (diffusable)
    l1_weight: float = Field(0.5, ge=0)
    eval_windows: int = Field(24, ge=1)  # held-out windows (17 frames) for PSNR / SSIM
    threads: int = Field(0, ge=0)  # torch threads; 0: torch's default
    # train the decoder alone: the latents stay exactly the pretrained encoder's, the ones the base DiT
    # (teacher.init_from) was trained on
    decoder_only: bool = True


class PretrainConfig(_Section):
    """`streamavatar pretrain`: the demo's stand-in for a pretrained Wan2.2 VAE, trained from scratch on real
    talking-head clips (face-cropped) at a longer budget. Its result is committed as weights/demo_vae.pt."""

    dirs: list[str] = Field(default_factory=lambda: ["../shared/fixtures/talking", "../shared/fixtures/speakervid"])
    holdout: list[str] = Field(default_factory=lambda: [
        "PC-AVS__00015", "head_4", "LatentSync__demo3_video", "SadTalker__WDA_KatieHill_000"])  # fmt: skip
    max_seconds_per_clip: float = Field(20.0, gt=0)
    face_scale: float = Field(1.7, gt=0)  # crop side = this x the FaceMesh box's longer side
    iterations: int = Field(3000, ge=1)  # the autoencoder's steps (batch and loss: vae_train)
    lr: float = Field(1e-3, gt=0)
    dit_iterations: int = Field(2500, ge=1)  # the base DiT's steps (no audio; windows as train.window_chunks)
    dit_batch_size: int = Field(8, ge=1)
    dit_lr: float = Field(1e-3, gt=0)
    threads: int = Field(0, ge=0)  # torch threads for both halves; 0: torch's default (all cores)
    out_dir: str = "data/pretrain"
    # continuing an earlier result (its .json provenance is kept under "continued_from"); null: from scratch
    vae_init_from: str | None = None
    vae_decoder_only: bool = False  # train the decoder alone: the latents (and a DiT trained on them) stay valid
    dit_init_from: str | None = None
    dit_window_stride: int = Field(0, ge=0)  # video frames between training windows' starts; 0: the window length
    # true: the DiT hears each clip's own voice (talk = the live mask of audio.vad, or a corpus clip's truth;
    # dropped with dit_audio_dropout for CFG) and learns the audio path the teacher fine-tunes
    dit_audio: bool = False
    dit_audio_dropout: float = Field(0.1, ge=0, le=1)
    dit_mouth_weight: float = Field(1.0, gt=0)  # loss weight of teacher.mouth_box's latent pixels
    dit_lip_windows: int = Field(12, ge=0)  # held-out windows sampled to measure lip sync (0: not measured)
    # a pack written by `pretrain --what pack` (the clips' face crops, voices and speaking masks in one file): the
    # autoencoder and the DiT train on it instead of reading pretrain.dirs, so a machine without the clips, ffmpeg
    # or mediapipe (a rented GPU) can run `pretrain --what vae|dit|all`; null: read the clips
    dit_pack: str | None = None
    dit_max_seconds: float = Field(0.0, ge=0)  # > 0: the steps (at most dit_iterations) that fit this training time
    vae_max_seconds: float = Field(0.0, ge=0)  # > 0: the autoencoder's steps (at most iterations) that fit this time
    dit_encode_batch: int = Field(32, ge=1)  # windows the autoencoder encodes at once (memory vs speed)


class AudioConfig(_Section):
    features: Literal["logmel", "wav2vec2"] = "logmel"
    wav2vec2_path: str | None = None  # local path of a transformers Wav2Vec2 checkpoint
    window_frames: int = Field(2, ge=0)  # +-k video frames of audio context per frame
    n_mels: int = Field(40, ge=8)
    wav2vec2_layers: list[int] = Field(default_factory=lambda: [-4, -3, -2, -1])  # hidden states to stack
    sample_rate: Literal[16000] = 16000
    # the live talk/listen mask (model/vad.py), on the avatar's and the other person's stream: "silero" (Silero
    # VAD, the model inside the silero-vad wheel) or "energy" (the frame level above vad_threshold_db)
    vad: Literal["silero", "energy"] = "silero"
    vad_threshold: float = Field(0.5, gt=0, lt=1)  # silero: speech probability of an onset (offset 0.15 below)
    vad_threshold_db: float = Field(-45.0, le=0)  # energy: a frame is speech above this level
    # speech ends after this long below the offset threshold (bench --vad: 0 scores best on the corpus, whose
    # ground truth ends each utterance at its last word; Silero's hysteresis already bridges word gaps)
    vad_hangover_ms: float = Field(0.0, ge=0)
    vad_model_path: str | None = None  # a local silero_vad.jit (default: the one in the silero-vad wheel)
    # both streams speech: the one more than this many dB quieter is the other's voice leaking in (0: off)
    vad_leak_db: float = Field(12.0, ge=0)
    history_frames: int = Field(50, ge=0)  # past video frames of audio kept as context while streaming


class StudentConfig(_Section):
    steps: int = Field(3, ge=1)  # N
    chunk_frames: int = Field(3, ge=1)  # C, latent frames per chunk
    # the demo trains on windows of 2 chunks, so it streams with the context those windows showed: the
    # reference (sink 1) + the previous chunk (window 3) with RAPR D = 6 puts every chunk at the time indices of
    # a training window's second chunk (a sink of reference + first chunk and a 6-frame window, the paper's
    # 4 / 6 / D 10 in configs/paper.yaml, give contexts the demo never trained on: the stream falls apart
    # after chunk 2)
    sink_frames: int = Field(1, ge=0)  # Reference Sink: 1 the reference; 1 + kC also the first k chunks; 0 none
    window_frames: int = Field(3, ge=0)  # rolling KV window of latent frames
    rapr: bool = True  # Reference-Anchored Positional Re-encoding (False: vanilla absolute RoPE)
    rapr_max_distance: int = Field(6, ge=1)  # D
    # where the sink sits among RAPR's indices: "ordered" (below the window, never colliding; model/attention.py)
    # or "legacy" (the sink's first chunk at its absolute indices, colliding with the window: for comparison)
    rapr_rule: Literal["ordered", "legacy"] = "ordered"
    timestep_shift: float = Field(5.0, gt=0)
    context: Literal["noisy", "clean"] = "noisy"  # paper: condition next chunk on the last noisy prediction

    @model_validator(mode="after")
    def _sink(self) -> StudentConfig:
        if self.sink_frames > 1 and (self.sink_frames - 1) % self.chunk_frames:
            raise ValueError(
                f"student.sink_frames: {self.sink_frames} must be 0, 1 or 1 + a multiple of chunk_frames "
                f"({self.chunk_frames}): the reference frame plus whole chunks"
            )
        return self


class TrainConfig(_Section):
    """What every training stage shares: the data windows, checkpoints, logging, multi-process training."""

    latents_dir: str = "data/latents"  # VAE latents + audio tokens of the curated clips' training windows
    checkpoint_dir: str = "data/checkpoints"  # <stage>/step_*.pt (resume), <stage>/final.pt (next stage's input)
    window_chunks: int = Field(2, ge=1)  # generation chunks per training window: 1 + window_chunks*C latent frames
    window_stride_chunks: int = Field(0, ge=0)  # window start every this many chunks; 0: windows do not overlap
    checkpoint_every: int = Field(25, ge=1)  # steps between resumable checkpoints
    keep_checkpoints: int = Field(2, ge=1)  # step checkpoints kept per stage (the newest)
    log_every: int = Field(1, ge=1)  # steps between MLflow metric points
    grad_clip: float = Field(1.0, ge=0)  # max gradient norm; 0 disables
    weight_decay: float = Field(0.0, ge=0)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # multi-process (torchrun): replicate + all-reduce, or FSDP2 shards
    # every stage's batch_size is the GLOBAL batch (split over the processes); each process runs its share in
    # micro batches of this many samples and accumulates the gradients (0: its whole share at once)
    micro_batch_size: int = Field(0, ge=0)
    # recompute each transformer block in the backward pass instead of keeping its activations (less memory,
    # ~1/3 more compute; training forwards without a KV cache)
    activation_checkpointing: bool = False
    # under FSDP2: each process writes only its own shards of every step checkpoint (torch.distributed.checkpoint,
    # step_<n>.dcp/) instead of gathering whole model and optimiser states into one file on rank 0
    sharded_checkpoints: bool = False
    sample_video: bool = True  # each stage logs a sample mp4 (with its audio) of a validation window
    val_windows: int = Field(2, ge=1)  # validation windows used for evaluations and the sample
    # the share of each batch drawn from windows labelled with an action ([10]; evenly over the actions); 0:
    # every window equally likely (the demo: no labels)
    action_share: float = Field(0.0, ge=0, lt=1)
    # lr multiplier of the Long-Short Visual Memory ([10], model.memory_slots) in ODE init and SiD: its gate starts
    # at zero and AdamW moves a parameter by about lr per step, so at lr 1e-4 it cannot open past ~0.1 in 800 steps
    memory_lr_scale: float = Field(1.0, gt=0)
    # > 0: the trained network's (the teacher's, the student generator's) exponential moving average of its
    # weights, updated after every step, is what a stage saves and measures (tasks/training/engine.py EMA;
    # docs/training.md: neutral on the demo, the usual setting for long runs)
    ema_decay: float = Field(0.0, ge=0, lt=1)


class TeacherConfig(_Section):
    """Bidirectional teacher fine-tuning (paper: 20000 it, batch 32, lr 5e-6)."""

    # the demo's base DiT from `streamavatar pretrain` (the stand-in for Wan2.2's weights; model.pretrained_path
    # loads those); null: random init
    init_from: str | None = "weights/demo_dit.pt"
    iterations: int = Field(600, ge=0)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    audio_dropout: float = Field(0.1, ge=0, le=1)  # both audio streams zeroed together: the CFG "uncond" branch
    timestep_shift: float = Field(5.0, gt=0)  # training sigmas: shift(u), u ~ U(0, 1)
    # learning-rate multiplier of the audio modules (embedder, audio and interact attentions): they start at zero
    # output on a pretrained video model, so at the base lr they barely move in a short fine-tune
    audio_lr_scale: float = Field(1.0, gt=0)
    prompt_lr_scale: float = Field(1.0, gt=0)  # lr multiplier of the zero-initialised prompt modulation
    # the teacher's own share of action-labelled windows per batch (null: train.action_share, as every stage):
    # the teacher learns which action from the action samples it sees (docs/interactive.md, RRM), the later stages lose
    # quality when most of their windows are actions
    action_share: float | None = Field(None, ge=0, lt=1)
    # the flow-matching loss weighs latent pixels inside mouth_box (top, bottom, left, right, fractions of the
    # frame: where the mouth of a curated head crop lies) mouth_weight times: the mouth is the only part of the
    # frame that the audio predicts, a few latent pixels of 256, so at weight 1 its gradient is lost in the rest
    mouth_weight: float = Field(1.0, ge=1)
    mouth_box: tuple[float, float, float, float] = (0.62, 0.87, 0.37, 0.63)


class TeacherSamplerConfig(_Section):
    """How the teacher is sampled to be looked at: the teacher stage's sample.mp4 and evaluate's teacher row.

    ``eta`` 0 is the ODE (Euler, what ode_pairs integrates); 1 the stochastic sampler that re-noises each x0
    prediction with fresh noise (model/sampling.py ancestral_sample_sigmas). On the demo's held-out windows the
    16-step ODE with CFG 3 found a face in 54% of the teacher's frames, the 32-step stochastic sampler without
    CFG in 96% (CFG 3: 89%), lip-audio correlation 0.49 against 0.47 (docs/results.md)."""

    steps: int = Field(32, ge=1)
    shift: float = Field(5.0, gt=0)
    cfg_scale: float = Field(1.0, ge=1)  # audio classifier-free guidance (1: none)
    eta: float = Field(1.0, ge=0, le=1)


class OdePairsConfig(_Section):
    """Teacher ODE trajectories for the student's initialisation (Self-Forcing: 48 Euler steps, shift 8, CFG 6)."""

    out_dir: str = "data/ode_pairs"  # index.parquet + shards/*.pt
    steps: int = Field(32, ge=2)
    shift: float = Field(5.0, gt=0)
    cfg_scale: float = Field(1.0, ge=1)  # audio classifier-free guidance (1: none)
    # 0: the probability-flow ODE (CausVid, Self-Forcing); > 0: the teacher's stochastic sampler
    # (teacher_sampler.eta), its states at the student's levels re-noised with fresh noise like the student's own
    eta: float = Field(1.0, ge=0, le=1)
    max_pairs: int = Field(96, ge=0)  # 0: one pair per training window
    batch_size: int = Field(4, ge=1)  # windows per sampler call and per shard


class OdeInitConfig(_Section):
    """ODE-pair regression that initialises the causal student (paper: 5000 it, batch 8, lr 2e-6)."""

    iterations: int = Field(200, ge=0)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    # share of each batch's rows that regress onto the pair's own data window instead of the teacher's output,
    # every chunk noised at the same kept levels (fresh noise): the only rows whose context shows what the
    # reference does not (a mark that appears later) and whose target keeps it ([10]); 0: teacher pairs only
    gt_share: float = Field(0.0, ge=0, le=1)


class DistillConfig(_Section):
    """SiD distillation with student forcing (paper: 6000 it, batch 16, lr 3e-6)."""

    iterations: int = Field(60, ge=0)
    batch_size: int = Field(2, ge=1)
    # demo: at 1e-5 the 60 steps cost the unseen person's face (found in 48 % of frames after ODE init -> 5 %);
    # 2e-6 still brings the student's samples closer to the teacher's (latent FD 0.030 -> 0.024) and keeps 20 %
    lr: float = Field(2e-6, gt=0)
    # The fake score must track the student's distribution as it moves (SiD's f_psi; DMD2 gives it 5 updates per
    # generator step instead): at 1:1 updates it learns at 10x the generator's rate.
    fake_lr: float = Field(1e-4, gt=0)  # the fake-score network's learning rate
    sid_alpha: float = 1.2  # SiD's alpha (official default 1.2; Self-Forcing's port uses 1.0)
    # CFG scale of the teacher (real) score against the audio-dropped condition, as DMD / SiD-LSG guide it; > 1
    # also gives SiD its first gradient: at 1 the fake score (a copy of the teacher) equals the real one at step 0
    real_guidance: float = Field(3.0, ge=1)
    sigma_range: tuple[float, float] = (0.02, 0.98)  # noise levels at which the two scores are compared
    context: Literal["noisy", "clean"] = "noisy"  # student forcing context (paper: noisy, like student.context)

    @model_validator(mode="after")
    def _sigmas(self) -> DistillConfig:
        lo, hi = self.sigma_range
        if not 0 < lo < hi < 1:
            raise ValueError("distill.sigma_range: give [low, high] with 0 < low < high < 1")
        return self


class RefineConfig(_Section):
    """Adversarial refinement with the consistency-aware discriminator (paper: 1400 it, batch 32, lr 5e-6)."""

    iterations: int = Field(30, ge=0)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-5, gt=0)
    disc_lr: float = Field(1e-3, gt=0)  # at 1e-4 a fresh D stays flat (2 ln 2) for the demo's 30 steps
    num_qformers: int = Field(3, ge=1)  # N_Q, at evenly spaced intermediate layers of the backbone
    qformer_queries: int = Field(4, ge=1)  # learnable queries per frame
    qformer_layers: int = Field(1, ge=1)
    qformer_dim: int = Field(64, ge=8)  # Q-Former hidden size
    # Approximate R1 (real) / R2 (generated): w * mean (D(x + s eps) - D(x))^2 ~ w s^2 ||grad_x D||^2, i.e. an
    # exact-R1 gamma/2 of w s^2. The old s = 0.01, w = 1 (gamma/2 = 1e-4) measured 1e-10..7e-8 next to an
    # adversarial loss of 1.34: nothing. s = 0.1 (below the 0.3 noise D's inputs get) and w = 1000 (gamma/2 = 10)
    # keeps the tiny GAN of tests/test_training_overfit.py from running away (without them D wins in 30 steps
    # and the samples diverge) at a mean share of 7% of D's loss (up to 12%); on the tiny project's DiT with
    # disc_lr 1e-3 the share reaches 3% by step 10. A fresh D is flat, so the share starts near 0 and grows.
    r1_weight: float = Field(1000.0, ge=0)
    r2_weight: float = Field(1000.0, ge=0)
    penalty_sigma: float = Field(0.1, gt=0)  # finite-difference step s
    disc_sigma_range: tuple[float, float] = (0.0, 0.3)  # both real and generated latents are noised to this level

    @model_validator(mode="after")
    def _range(self) -> RefineConfig:
        lo, hi = self.disc_sigma_range
        if not 0 <= lo <= hi < 1:
            raise ValueError("refine.disc_sigma_range: give [low, high] with 0 <= low <= high < 1")
        return self
    global_weight: float = Field(1.0, ge=0)  # Global Consistency Branch weight next to the Local Realism Branch

class BenchmarkConfig(_Section):
    """Stage `benchmark` (`streamavatar bench`): real-time speed of the streaming student, module by module."""

    report: str = "data/reports/benchmark.json"  # the whole report: settings, hardware, every figure
    metrics: str = "data/reports/benchmark_metrics.json"  # its figures only, numbers (dvc metrics show/diff)
    latency: str = "data/reports/benchmark_latency.csv"  # per-chunk latency of each mode (dvc plots show)
    # "auto": data/checkpoints/refine/final.pt, else distill/final.pt, else the seeded random student (speed does
    # not depend on the weights' values); or a path; or "random"
    checkpoint: str = "auto"
    chunks: int = Field(40, ge=2)  # measured chunks per mode
    warmup_chunks: int = Field(2, ge=0)  # streamed (and discarded) before measuring: kernels, allocator
    # how the pipelined mode overlaps the VAE decode of chunk k with the DiT of chunk k+1: a worker thread
    # (torch releases the GIL in its kernels; on GPU the VAE runs on vae_device) or a worker process (CPU)
    pipeline: Literal["thread", "process"] = "thread"
    vae_device: str = ""  # e.g. "cuda:1" (the paper's second GPU); "" = project.device
    dit_threads: int = Field(0, ge=0)  # CPU intra-op threads of the DiT in the pipelined mode (0: torch's choice)
    vae_threads: int = Field(0, ge=0)  # same for the VAE worker process (pipeline: process)
    compile: bool = False  # torch.compile each DiT block's tensor-only parts (AudioDiT.compile_blocks; the GPU check: with and without)
    # torch.compile's backend: inductor (generated kernels: what the GPU check measures); aot_eager captures the
    # same graphs without generating code (the CPU run of scripts/gpu_check.sh checks the path in seconds)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"


class EvaluateConfig(_Section):
    """Stage `evaluate` and the re-evaluation flow: teacher, student and ground truth on held-out clips."""

    report: str = "data/reports/metrics.json"  # the whole report: the evaluation set, every item, definitions
    metrics: str = "data/reports/evaluate_metrics.json"  # each system's aggregate figures, numbers only (dvc metrics)
    out_dir: str = "data/reports/evaluate"  # table.csv, eval_set.json, the evaluation videos
    history_dir: str = "data/reports/reevaluate"  # the re-evaluation flow: history.parquet + history.png
    max_clips: int = Field(5, ge=1)  # held-out clips per split (val, unseen) in the fixed evaluation set
    windows_per_clip: int = Field(4, ge=1)
    # noise seeds per window for the generated systems' face figures (face rate, identity, lip sync): the first
    # measured in full, the others with FaceMesh alone (evaluate.face_metrics); on the demo's 28 windows one
    # seed's pooled lip r moved 0.02..0.17 from seed to seed (docs/evaluation.md)
    seeds: int = Field(3, ge=1)
    # processes measuring the frames (mediapipe) while the main process generates the next window (torch); 0: all
    # in the main process. The figures are the same either way (tested); with 2 on 2 cores, batched draws and
    # face-only chain rows, three draws take the 300 s one draw took measured in-process (docs/evaluation.md)
    workers: int = Field(2, ge=0)
    teacher: bool = True  # also sample the teacher (teacher_sampler.*) for the table
    # also stream the student of every training step (before distillation, after ODE init, after SiD) for the
    # chain table untrained student -> ODE init -> SiD -> GAN -> teacher -> ground truth
    chain: bool = True
    # the chain rows' body and hands too (Pose + Hands: ~9x FaceMesh's cost); false: their face figures, lip sync,
    # identity, listening face motion (LFKV) and flicker, with HKV / LBKV / LHKV and the body and hand rates n/a
    chain_body: bool = False
    keypoint_min_side: int = Field(256, ge=64)  # frames are upscaled to this shorter side before mediapipe
    keypoint_norm_height: int = Field(512, ge=64)  # keypoints are measured in a frame scaled to this height
    # audio-envelope vs mouth-opening correlation: lags searched (+-3 frames = +-120 ms at 25 fps, where real lip
    # sync lies; at +-10 the best of 21 lags of 24-frame windows is often a spurious one at the edge)
    max_lag_frames: int = Field(3, ge=1)
    sync_vshift: int = Field(15, ge=1)  # SyncNet offset search: +- frames
    identity_window_s: float = Field(0.5, gt=0)
    # local weight files; empty or missing: the metric is reported as "skipped: ...", never estimated
    syncnet_path: str = ""  # syncnet_v2.model (Chung & Zisserman), a state dict
    inception_path: str = ""  # TorchScript Inception-v3 for FID, e.g. NVlabs inception-2015-12-05.pt
    i3d_path: str = ""  # TorchScript I3D for FVD, e.g. StyleGAN-V i3d_torchscript.pt
    fvd_clip_frames: int = Field(16, ge=8)
    checkpoint: str = "auto"  # the student evaluated: as benchmark.checkpoint


class LiveConfig(_Section):
    """`streamavatar live`: the real-time session server (live/). Binding beyond loopback needs ``token``."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)  # 0: any free port (printed at start)
    # "auto": the registry's champion, else the last trained student (refine, else distill); "champion";
    # a checkpoint path; or "random" (the seeded untrained student, for tests)
    checkpoint: str = "auto"
    token: str = ""  # required from clients when set ($STREAMAVATAR_LIVE_TOKEN overrides); must be set off loopback
    max_sessions: int = Field(2, ge=1)  # admission control: one more gets a "busy" answer
    idle_timeout_s: float = Field(20.0, gt=0)  # a session that sends nothing this long is closed
    start_timeout_s: float = Field(10.0, gt=0)  # time to send "start" and the reference image
    max_image_bytes: int = Field(10_000_000, ge=1000)  # the reference image's encoded size
    max_image_pixels: int = Field(40_000_000, ge=10_000)  # its decoded size (checked before decoding)
    max_message_bytes: int = Field(16_000_000, ge=1000)  # anything larger closes the socket (code 1009)
    # per session, each way: audio waiting for generation (the socket is not read meanwhile), unsent video
    # (the oldest chunk is dropped)
    max_pending_chunks: int = Field(4, ge=1)
    lead_chunks: int = Field(2, ge=1)  # one voice this far ahead of the other: the other is taken as silence
    jpeg_quality: int = Field(90, ge=10, le=100)
    # the kernel's send buffer per connection (0: the OS's autotuned one, up to ~4 MB = ~45 s of demo video):
    # small, a client that reads too slowly starts losing the oldest frames within seconds instead of falling
    # ever further behind
    send_buffer_bytes: int = Field(65536, ge=0)
    torch_threads: int = Field(0, ge=0)  # intra-op threads of the server process (0: torch's choice)
    log_dir: str = "data/logs/live"  # one log file per session


class OrchestrationConfig(_Section):
    """How Prefect runs the stages (flows/): retries of a failing stage, and the lock that keeps two runs from
    writing data/ at once."""

    # a stage that raises is run again this many times (stages resume, so a retry continues the work)
    retries: int = Field(1, ge=0, le=10)
    retry_delay_s: float = Field(10.0, ge=0)
    # a run that finds data/ locked by another run waits this long for it, then refuses with the holder's
    # name; 0 = refuse at once
    lock_timeout_s: float = Field(0.0, ge=0)


class RegistryConfig(_Section):
    """The MLflow model registry: the refine stage registers the refined student as a new version with alias
    `candidate`; the re-evaluation flow promotes it to `champion` only when it beats the champion on the fixed
    evaluation set (evaluate.*)."""

    enabled: bool = True
    model_name: str = "streamavatar-student"
    # metric (a key of the evaluation's student aggregate, or fid / fvd) -> which way is better. The candidate
    # is promoted when it is better on at least one of these and worse on none (metrics either model lacks
    # are left out, and said so)
    compare: dict[str, Literal["max", "min"]] = Field(default_factory=lambda: {
        "lip_corr": "max", "sync_c": "max", "sync_d": "min", "identity_dist": "min", "flicker": "min",
        "fid": "min", "fvd": "min"})  # fmt: skip
    # a relative difference up to this counts as a tie (|a - b| <= tolerance * max(|a|, |b|))
    tolerance: float = Field(0.01, ge=0, le=1)

    @field_validator("compare")
    @classmethod
    def _known_metrics(cls, v: dict[str, str]) -> dict[str, str]:
        known = {"hkv", "lbkv", "lhkv", "lfkv", "lip_corr", "lip_lag", "lip_corr_null", "sync_c", "sync_d", "identity_dist",
                 "identity_last_over_first", "flicker", "mean_abs_diff", "face_rate", "body_rate", "hand_rate",
                 "fid", "fvd"}  # fmt: skip
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"registry.compare: unknown metric(s) {unknown}; metrics: {sorted(known)}")
        if not v:
            raise ValueError("registry.compare: give at least one metric to compare")
        return v


class Config(_Section):
    project: ProjectConfig = ProjectConfig()
    tracking: TrackingConfig = TrackingConfig()
    corpus: CorpusConfig = CorpusConfig()
    video: VideoConfig = VideoConfig()
    curate: CurateConfig = CurateConfig()
    model: ModelConfig = ModelConfig()
    vae: VaeConfig = VaeConfig()
    vae_train: VaeTrainConfig = VaeTrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    audio: AudioConfig = AudioConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig = TeacherConfig()
    teacher_sampler: TeacherSamplerConfig = TeacherSamplerConfig()
    ode_pairs: OdePairsConfig = OdePairsConfig()
    ode_init: OdeInitConfig = OdeInitConfig()
    distill: DistillConfig = DistillConfig()
    refine: RefineConfig = RefineConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    live: LiveConfig = LiveConfig()
    registry: RegistryConfig = RegistryConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _data_root(self) -> Config:
        """``project.data_dir`` other than ``data`` re-roots every path setting that starts with ``data/`` (each
        profile's outputs under its own root: configs/paper.yaml writes under data/paper, never into the demo's)."""
        top = self.project.data_dir.strip().rstrip("/")
        if not top or top == "data":
            return self

        def move(value: Any) -> Any:
            if isinstance(value, str) and value.startswith("data/"):
                return f"{top}/{value[len('data/'):]}"
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        def walk(section: BaseModel) -> None:
            for name in type(section).model_fields:
                value = getattr(section, name)
                if isinstance(value, BaseModel):
                    walk(value)
                elif move(value) != value:
                    object.__setattr__(section, name, move(value))  # already validated; only the prefix changes

        for name in type(self).model_fields:
            if name != "project":
                walk(getattr(self, name))
        return self

    @model_validator(mode="after")
    def _memory_trains(self) -> Config:
        """The Long-Short Visual Memory learns only from training windows long enough that frames leave the
        rolling window (measured: with 2-chunk windows its gate stays exactly 0 through distill)."""
        need = memory_min_chunks(self)
        if self.model.memory_slots and self.train.window_chunks < need:
            raise ValueError(
                f"model.memory_slots {self.model.memory_slots} needs train.window_chunks >= {need} "
                f"(student.window_frames {self.student.window_frames} // student.chunk_frames "
                f"{self.student.chunk_frames} + 2: the last chunk of a training window must see frames evicted "
                f"from the window), got {self.train.window_chunks}: with shorter windows the memory never holds "
                "anything in training and stays at its zero-gate start"
            )
        return self

    def section(self, dotted: str) -> Any:
        """The value at a dotted key, e.g. ``corpus`` or ``corpus.seed``."""
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


def memory_min_chunks(cfg: Config) -> int:
    """Training window length (chunks) from which the last chunk's queries see evicted frames."""
    return cfg.student.window_frames // cfg.student.chunk_frames + 2


# --------------------------------------------------------------------------------------------------- loading
def deep_merge(base: dict, over: dict) -> dict:
    """Merge ``over`` into a copy of ``base``: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(expr: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in expr:
        raise ConfigError(f"--set {expr!r}: expected key.path=value")
    key, raw = expr.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {expr!r}: empty key")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from exc
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


# libyaml's parser when PyYAML has it (its wheels do): the same safe loading, ~10x faster than the pure-Python one
# (params.yaml: 2 ms instead of 18 ms; a pipeline run reads it and dvc.yaml dozens of times)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_text(text: str):
    """``yaml.safe_load`` with libyaml's parser where available."""
    return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 -- a safe loader (SafeLoader or its C twin)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml_text(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at ``loc`` (the location of an unknown key)."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _format_error(exc: ValidationError, sources: list[str]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not isinstance(p, int)) or ("<root>",)
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            where = ".".join(str(p) for p in loc[:-1]) or "the top level"
            lines.append(f"unknown key '{key}'; allowed keys in {where}: {', '.join(allowed)}")
        else:
            got = err.get("input")
            msg = err["msg"]
            if err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            if isinstance(got, dict):  # a check across a section's keys: its message names them
                lines.append(msg)
            else:
                lines.append(f"bad value for '{key}' (got {got!r}): {msg}")
    src = ", ".join(sources)
    return f"invalid configuration (from {src}):\n  " + "\n  ".join(lines)


def load_config(
    configs: list[str | Path] | None = None,
    sets: list[str] | None = None,
    root: str | Path | None = None,
    use_params: bool = True,
) -> Config:
    """params.yaml (when present under root), then each config file in order, then each --set."""
    root = Path(root) if root is not None else project_root()
    merged: dict = {}
    sources: list[str] = []
    if use_params and (root / DEFAULT_PARAMS).is_file():
        merged = read_yaml(root / DEFAULT_PARAMS)
        sources.append(DEFAULT_PARAMS)
    for path in configs or []:
        path = Path(path)
        merged = deep_merge(merged, read_yaml(path if path.is_absolute() else _resolve(path, root)))
        sources.append(str(path))
    for expr in sets or []:
        merged = deep_merge(merged, parse_set(expr))
        sources.append(f"--set {expr}")
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, sources or ["defaults"])) from None


def _resolve(path: Path, root: Path) -> Path:
    # a relative --config is taken from the working directory first, then from the project root
    return path if path.exists() else root / path


def project_root() -> Path:
    """The project checkout the stages work in: $STREAMAVATAR_ROOT, else the nearest folder at or above the
    working directory that holds params.yaml and dvc.yaml, else the working directory."""
    if os.environ.get("STREAMAVATAR_ROOT"):
        return Path(os.environ["STREAMAVATAR_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / DEFAULT_PARAMS).is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return cwd


def data_path(cfg: Config, root: Path, *parts: str) -> Path:
    """A path under the profile's data root (``project.data_dir``), e.g. ``data_path(cfg, root, "reports", "x")``."""
    return Path(root) / cfg.project.data_dir / Path(*parts)


def resolve_path(path: str | Path, root: Path) -> Path:
    """A config path as a file: absolute as given; ``../shared/...`` under $STREAMAVATAR_SHARED when that is set
    (the shared fixtures and weights beside the checkout, wherever they live); else relative to ``root``."""
    p = Path(path)
    if p.is_absolute():
        return p
    parts = p.parts
    if len(parts) > 2 and parts[0] == ".." and parts[1] == "shared" and os.environ.get("STREAMAVATAR_SHARED"):
        return Path(os.environ["STREAMAVATAR_SHARED"]).joinpath(*parts[2:])
    return root / p


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
