"""curate.source=speakervid against a local stand-in: a folder laid out like the Hub dataset repo, served with
the Hub's file API on 127.0.0.1, and real SpeakerVid fixture videos served in place of YouTube."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time

import pandas as pd
import pytest

from tasks.config import SpeakerVidConfig, load_config
from tasks.curation.speakervid import RateLimiter, RemoteClip, SourceError, invalid_id, make_shards, read_list
from tests.conftest import shared_path
from tests.hub_standin import HubStandIn

REPO_ID = "dorni/SpeakerVid-5M-Dataset"
HEAD = "hEAd4_xxxxx_512x512_full_video_{:03d}_None_00"
HALF = "HALF1-yyyyy_512x512_full_video_001_A_00"
GONE = "gone0000000_512x512_full_video_001_A_00"  # its video answers 404
NOANNO = "noanno00000_512x512_full_video_001_A_00"  # listed, but no merged_anno record
EVIL = "../../evil; rm -rf ~"


def _record(name: str, start: float, end: float, bbox: list[float], scene: tuple[float, float] = (0.0, 10.0),
            legacy: bool = False) -> dict:
    """A merged_anno record with the fields SpeakerVid-5M's own curation code writes: the clip [start, end) as
    start_new + duration_new inside its scene segment org_start_seconds + video_total_duration (``scene``: start,
    length; different on purpose, so a cut of the wrong span shows), SyncNet's per-person map as ``sync``.
    ``legacy``: the clip as start_seconds / end_seconds instead (older or re-packed records)."""
    times = ({"start_seconds": start, "end_seconds": end} if legacy
             else {"start_new": start, "duration_new": end - start})  # fmt: skip
    person = int(name.rsplit("_", 1)[-1]) if name[-2:].isdigit() else 0
    return {"video_name": name, "num_frames": int((end - start) * 25), "is_talking": 1, "clip_speaker_num": 1,
            "clear": 1, "org_start_seconds": scene[0], "video_total_duration": scene[1], **times,
            "bbox": bbox, "conf": 0.9, "sync": {str(person): [[5.0, 7.1, 0], [6.0, 6.9, 1]]},
            "speaker": ["SPEAKER_00"], "raw_video_height": 512, "raw_video_width": 512, "clip_video_height": 320,
            "clip_video_width": 256}  # fmt: skip


@pytest.fixture
def standin(tmp_path):
    repo, videos = tmp_path / "hubrepo", tmp_path / "videos"
    (repo / "merged_anno").mkdir(parents=True)
    videos.mkdir()
    shutil.copy(shared_path("fixtures", "speakervid", "head_4.mp4"), videos / "hEAd4_xxxxx.mp4")
    shutil.copy(shared_path("fixtures", "speakervid", "half_body_1.mp4"), videos / "HALF1-yyyyy.mp4")
    records = {HEAD.format(1): _record(HEAD.format(1), 0.5, 4.5, [0.1, 0.0, 0.9, 1.0]),
               HEAD.format(2): _record(HEAD.format(2), 5.0, 9.0, [0.0, 0.0, 1.0, 1.0], scene=(4.0, 5.5)),
               HALF: _record(HALF, 1.0, 5.0, [0.2, 0.1, 0.8, 0.9], scene=(0.5, 8.0), legacy=True),
               GONE: _record(GONE, 0.0, 3.0, [0, 0, 1, 1])}  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, rec in records.items():
            data = json.dumps(rec).encode()
            info = tarfile.TarInfo(f"merged_anno/batch0/{name}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo("../../outside.json")  # a hostile member path: must never be written
        evil.size = 2
        tar.addfile(evil, io.BytesIO(b"{}"))
    (repo / "merged_anno" / "batch_000.tar.gz").write_bytes(buf.getvalue())
    names = [HEAD.format(1), HEAD.format(2), HALF, GONE, EVIL, NOANNO]
    (repo / "SFT_set.json").write_text(json.dumps(names))
    with HubStandIn(REPO_ID, repo, videos) as hub:
        yield hub, tmp_path


def _sv_sets(hub, **extra) -> list[str]:
    values = {"endpoint": hub.url, "video_url": hub.url + "/videos/{ytid}.mp4", "backoff_s": 0.05,
              "rate_limit_per_min": 1200, "shard_size": 2, "download_sections": False, **extra}  # fmt: skip
    return [f"curate.speakervid.{k}={v}" for k, v in values.items()]


@pytest.mark.slow
def test_curate_from_the_hub_standin_end_to_end(standin):
    from tasks.curation.build import run_curate

    hub, root = standin
    hub.fail_first["/videos/HALF1-yyyyy.mp4"] = 1  # one transient outage: retried
    hub.fail_first[f"/api/datasets/{REPO_ID}/tree/main"] = 1  # the listing too
    weights = shared_path("models", "light-asd", "finetuning_TalkSet.model")
    sets = ["tracking.enabled=false", "curate.source=speakervid", f"curate.asd_weights={weights}",
            "curate.pose_stride=3", *_sv_sets(hub)]  # fmt: skip
    cfg = load_config(sets=sets, root=root)
    result = run_curate(cfg, root, progress=False)
    table = pd.read_parquet(root / cfg.curate.manifest).set_index("clip_id")

    assert list(table.index) == [HEAD.format(1), HEAD.format(2), HALF, GONE, invalid_id(EVIL), NOANNO]
    for name in (HEAD.format(1), HEAD.format(2), HALF):
        assert table.loc[name, "status"] in ("ok", "rejected"), table.loc[name, "reason"]
        assert table.loc[name, "group"] == name[:11]  # the YouTube id: partners share a split
        assert table.loc[name, "source_width"] == 256 and table.loc[name, "source_height"] == 320
        assert table.loc[name, "duration_s"] == pytest.approx(4.0, abs=0.1)
    assert table.loc[HEAD.format(1), "status"] == "ok"
    assert table.loc[GONE, "status"] == "failed" and "HTTP Error 404" in table.loc[GONE, "reason"]
    assert "not retried" in table.loc[GONE, "reason"]
    bad = table.loc[invalid_id(EVIL)]
    assert bad["status"] == "failed" and "not a SpeakerVid clip name" in bad["reason"]
    assert table.loc[NOANNO, "status"] == "failed" and "no merged_anno record" in table.loc[NOANNO, "reason"]
    assert set(result.failures) == {GONE, invalid_id(EVIL), NOANNO}

    # retries: the 503 once, then the extractor's two requests; the 404 once; one download per video
    assert hub.hits["/videos/HALF1-yyyyy.mp4"] == 3
    assert hub.hits["/videos/gone0000000.mp4"] == 1
    assert hub.hits["/videos/hEAd4_xxxxx.mp4"] == 2  # two clips, one download
    # nothing escaped the download folder; raw videos are deleted once cut
    assert not (root / "evil").exists() and not (root.parent / "outside.json").exists()
    assert not any(root.rglob("outside.json"))
    base = root / cfg.curate.speakervid.download_dir
    assert sorted(p.name for p in (base / "shards").iterdir()) == ["00000.parquet", "00001.parquet"]
    assert not list((base / "videos").iterdir())
    status = pd.concat(pd.read_parquet(p) for p in sorted((base / "shards").iterdir()))
    assert set(status["status"]) == {"ok", "failed"} and status.set_index("clip_id").loc[HALF, "attempts"] == 2

    # re-run: finished shards are skipped (no video request), finished clips are not curated again
    before = hub.hits.copy()
    again = run_curate(cfg, root, progress=False)
    assert sum(v for k, v in hub.hits.items() if k.startswith("/videos/")) == sum(
        v for k, v in before.items() if k.startswith("/videos/"))
    assert again.metrics["clips_processed"] == 3  # only the three failed rows are looked at again
    rerun = pd.read_parquet(root / cfg.curate.manifest)
    assert len(rerun) == 6 and rerun["clip_id"].is_unique


def test_missing_list_file_names_the_lists_there(standin, tmp_path):
    from tasks.curation.speakervid import speakervid_clips

    hub, root = standin
    cfg = SpeakerVidConfig(endpoint=hub.url, list_file="testset.json", download_dir=str(tmp_path / "dl"), retries=0)
    with pytest.raises(SourceError, match=r"testset.json.*SFT_set.json"):
        speakervid_clips(cfg, root, progress=False)


def test_unreachable_or_failing_hub_is_a_clear_error_after_the_configured_retries(standin, tmp_path):
    """Nothing listening, or a Hub that answers 503 every time: a clear error after ``retries`` + 1 requests
    of the listing, no more (huggingface_hub's own 5 retries per request are not stacked on top)."""
    from tasks.curation.speakervid import speakervid_clips

    cfg = SpeakerVidConfig(endpoint="http://127.0.0.1:9", download_dir=str(tmp_path), retries=1, backoff_s=0.01)
    with pytest.raises(SourceError, match="cannot list the files from dataset dorni/SpeakerVid-5M-Dataset"):
        speakervid_clips(cfg, tmp_path, progress=False)
    hub, root = standin
    tree = f"/api/datasets/{REPO_ID}/tree/main"
    hub.fail_first[tree] = 100
    cfg = SpeakerVidConfig(endpoint=hub.url, download_dir=str(tmp_path / "dl"), retries=2, backoff_s=0.01)
    with pytest.raises(SourceError, match=f"cannot list the files from dataset {REPO_ID} on {hub.url}.*503"):
        speakervid_clips(cfg, root, progress=False)
    assert hub.hits[tree] == 3


def test_list_formats(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps(["a", "b"]))
    assert read_list(path, "l") == ["a", "b"]
    path.write_text(json.dumps([{"video_name": "a"}, {"clip_name": "b"}]))
    assert read_list(path, "l") == ["a", "b"]
    path.write_text(json.dumps({HALF: {"bbox": [0, 0, 1, 1]}, GONE: {}}))
    assert read_list(path, "l") == [HALF, GONE]
    # all_data_list.json: {video: [the clips' annotation files]}: the clips, never the keys
    path.write_text(json.dumps({"hEAd4_xxxxx": [f"{HEAD.format(1)}.json", f"{HEAD.format(2)}.json"],
                                "HALF1-yyyyy": [f"{HALF}.json"]}))  # fmt: skip
    assert read_list(path, "l") == [HEAD.format(1), HEAD.format(2), HALF]
    path.write_text(json.dumps({"talking": [HALF], "listening": [GONE]}))  # categories: their clips, not the keys
    assert read_list(path, "l") == [HALF, GONE]
    path.write_text(json.dumps({"talking": 3, "listening": [GONE]}))  # neither shape
    with pytest.raises(SourceError, match=r"keys are not SpeakerVid clip names \(talking, listening\)"):
        read_list(path, "l")
    path.write_text(json.dumps([f"{HALF}.json", {"video_name": GONE}]))
    assert read_list(path, "l") == [HALF, GONE]
    path.write_text("a\nb.json\n")
    assert read_list(path, "l") == ["a", "b"]
    path.write_text(json.dumps([{"x": 1}]))
    with pytest.raises(SourceError, match="entry 0 has none of video_name"):
        read_list(path, "l")


def test_time_fields_of_a_speakervid_record():
    """The record as SpeakerVid-5M's own curation code writes it (no start / duration / start_seconds /
    end_seconds) validates; the clip's span is start_new + duration_new (span "track") or org_start_seconds +
    video_total_duration (span "scene"), older field pairs are the fallback, and a record without any is refused
    naming the fields."""
    from tasks.corpus.speakervid import MergedAnno
    from tasks.curation.speakervid import remote_clip

    authors = {"num_frames": 100, "is_talking": 1, "clip_speaker_num": 2, "clear": 0.62, "video_name": HALF,
               "video_total_duration": 7.2, "start_new": 12.4, "org_start_seconds": 11.0, "duration_new": 4.0,
               "bbox": [0.2, 0.1, 0.6, 0.9], "conf": 7.5, "sync": {"0": [[7.5, 6.1, 0], [6.0, 6.8, 1]]},
               "speaker": ["SPEAKER_00", "SPEAKER_01"], "raw_video_height": 1080, "raw_video_width": 1920,
               "clip_video_height": 864, "clip_video_width": 768}  # fmt: skip
    rec = MergedAnno.model_validate(authors)
    assert rec.span() == (12.4, 16.4, "start_new + duration_new")
    assert rec.span("scene")[:2] == pytest.approx((11.0, 18.2))
    assert rec.span("scene")[2] == "org_start_seconds + video_total_duration"
    clip = remote_clip(HALF, authors)
    assert (clip.start_s, clip.end_s, clip.width, clip.height) == (12.4, 16.4, 768, 864)
    assert remote_clip(HALF, authors, "scene").start_s == 11.0
    fallback = {k: v for k, v in authors.items() if k not in ("start_new", "duration_new")}
    assert MergedAnno.model_validate({**fallback, "start_seconds": 3.0, "end_seconds": 5.5}).span()[:2] == (3.0, 5.5)
    assert MergedAnno.model_validate({**fallback, "start": 3.0, "duration": 2.0}).span()[:2] == (3.0, 5.0)
    with pytest.raises(ValueError, match="none of start_new \\+ duration_new or start_seconds \\+ end_seconds"):
        MergedAnno.model_validate(fallback).span()
    with pytest.raises(ValueError, match="give an empty clip"):
        MergedAnno.model_validate({**authors, "duration_new": 0.0}).span()


def test_the_span_setting_picks_the_frames_cut(standin):
    """Through the stand-in: span "track" cuts [start_new, + duration_new), span "scene" [org_start_seconds,
    + video_total_duration): their lengths, and the same frames 1 s apart where the scene starts 1 s earlier."""
    from tasks.common.media import probe, read_frames
    from tasks.curation.speakervid import speakervid_clips

    hub, root = standin
    cut = {}
    for span in ("track", "scene"):
        sets = ["tracking.enabled=false", *_sv_sets(hub, retries=0, span=span, download_dir=f"data/raw/{span}")]
        cfg = load_config(sets=sets, root=root)
        cut[span] = {c.clip_id: c for c in speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}
    lengths = {span: {n: round(probe(c.video_path).duration_s, 1) for n, c in clips.items() if c.video_path}
               for span, clips in cut.items()}  # fmt: skip
    assert lengths["track"] == {HEAD.format(1): 4.0, HEAD.format(2): 4.0, HALF: 4.0}
    assert lengths["scene"] == {HEAD.format(1): 10.0, HEAD.format(2): 5.5, HALF: 8.0}
    a = read_frames(cut["track"][HEAD.format(2)].video_path).astype(float)  # from 5.0 s
    b = read_frames(cut["scene"][HEAD.format(2)].video_path).astype(float)  # from 4.0 s
    n = 60
    diff = {lag: abs(a[5 : 5 + n] - b[5 + lag : 5 + lag + n]).mean() for lag in range(15, 36)}
    assert min(diff, key=diff.get) == 25 and diff[25] < 3.0, diff


def test_a_local_copy_of_the_repo_and_raw_videos_on_disk_need_no_network(standin):
    """curate.speakervid.repo_dir (a local copy of the dataset repo) and raw_video_dir (videos already
    downloaded): no request reaches the Hub, a video on disk is cut from there (the same frames as a download)
    and kept; a video that is not there is still downloaded (here: the 404)."""
    from tasks.common.media import read_frames
    from tasks.curation.speakervid import SourceError, speakervid_clips

    hub, root = standin
    cfg = load_config(sets=["tracking.enabled=false", *_sv_sets(hub, retries=0)], root=root)
    online = {c.clip_id: c for c in speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}
    hub.hits.clear()
    shutil.copy(root / "videos" / "HALF1-yyyyy.mp4", root / "videos" / "HALF1-yyyyy_512x512.mp4")
    (root / "videos" / "HALF1-yyyyy.mp4").unlink()  # named as SpeakerVid's own cutting script expects
    sets = ["tracking.enabled=false", *_sv_sets(hub, retries=0, repo_dir=str(root / "hubrepo"),
                                                raw_video_dir=str(root / "videos"), download_dir="data/raw/offline")]  # fmt: skip
    cfg = load_config(sets=sets, root=root)
    offline = {c.clip_id: c for c in speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}
    assert dict(hub.hits) == {"/videos/gone0000000.mp4": 1}
    assert "HTTP Error 404" in offline[GONE].error and "no merged_anno record" in offline[NOANNO].error
    assert sorted(p.name for p in (root / "videos").iterdir()) == ["HALF1-yyyyy_512x512.mp4", "hEAd4_xxxxx.mp4"]
    for name in (HEAD.format(1), HEAD.format(2), HALF):
        a, b = read_frames(offline[name].video_path), read_frames(online[name].video_path)
        assert a.shape == b.shape and abs(a.astype(float) - b).mean() < 1.0, name
    bad = load_config(sets=[*sets[:-1], "curate.speakervid.repo_dir=nowhere"], root=root)
    with pytest.raises(SourceError, match="repo_dir: .*nowhere is not a folder"):
        speakervid_clips(bad.curate.speakervid, root, workers=1, progress=False)


def test_ids_of_bad_entries_are_safe_and_deterministic():
    for name in (EVIL, "../x", "$(reboot)", "a/b\\c", "..", ""):
        cid = invalid_id(name)
        assert cid == invalid_id(name) and "/" not in cid and "\\" not in cid and not cid.startswith(".")
        assert set(cid) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    assert invalid_id("../x") != invalid_id("..x")


def test_shards_keep_a_video_together():
    def clip(ytid, i):
        return RemoteClip(f"{ytid}_{i}", ytid, 0.0, 1.0, (0, 0, 1, 1), 64, 64)

    clips = [clip("a" * 11, 0), clip("a" * 11, 1), clip("b" * 11, 0), clip("a" * 11, 2), clip("c" * 11, 0)]
    shards = make_shards(clips, 2)
    assert [[c.name for c in s] for s in shards] == [
        ["aaaaaaaaaaa_0", "aaaaaaaaaaa_1", "aaaaaaaaaaa_2"], ["bbbbbbbbbbb_0", "ccccccccccc_0"]]  # fmt: skip
    assert make_shards(clips, 2) == shards  # deterministic


def test_rate_limit_spaces_starts():
    limiter = RateLimiter(per_minute=1200)  # one start per 50 ms
    t0 = time.monotonic()
    for _ in range(5):
        limiter.wait()
    assert time.monotonic() - t0 >= 4 * 0.05 * 0.99


def test_failed_downloads_are_retried_by_later_runs_up_to_a_limit(standin):
    """A transient failure (503 in every attempt of a run) is tried again by the next run, until the clip has
    failed in curate.speakervid.retry_runs runs; a permanent one (404) never again; raising the limit retries it."""
    from tasks.curation.speakervid import speakervid_clips

    hub, root = standin
    hub.fail_first["/videos/HALF1-yyyyy.mp4"] = 2  # 503 for the first two requests: runs 1 and 2 fail
    cfg = load_config(sets=["tracking.enabled=false", *_sv_sets(hub, retries=0, retry_runs=2)], root=root)
    sv = cfg.curate.speakervid

    def run():
        clips = {c.clip_id: c for c in speakervid_clips(sv, root, workers=1, progress=False)}
        return clips, dict(hub.hits)

    first, hits1 = run()
    assert first[HALF].error and "503" in first[HALF].error and first[HEAD.format(1)].error is None
    assert "HTTP Error 404" in first[GONE].error and hits1["/videos/gone0000000.mp4"] == 1
    second, hits2 = run()  # HALF tried again (its second failing run), GONE not: permanent
    assert hits2["/videos/HALF1-yyyyy.mp4"] == hits1["/videos/HALF1-yyyyy.mp4"] + 1
    assert hits2["/videos/gone0000000.mp4"] == 1 and second[HALF].error
    third, hits3 = run()  # HALF has failed in retry_runs = 2 runs: left alone, like every finished shard
    assert {k: v for k, v in hits3.items() if k.startswith("/videos/")} == {
        k: v for k, v in hits2.items() if k.startswith("/videos/")}
    assert third[HALF].error == second[HALF].error
    status = pd.read_parquet(root / sv.download_dir / "shards" / "00001.parquet").set_index("clip_id")
    assert status.loc[HALF, "runs"] == 2 and not status.loc[HALF, "permanent"] and status.loc[GONE, "permanent"]
    # one more run allowed: the outage is over, HALF downloads and is cut; the finished clips are not fetched
    cfg = load_config(sets=["tracking.enabled=false", *_sv_sets(hub, retries=0, retry_runs=3)], root=root)
    fourth = {c.clip_id: c for c in speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}
    assert fourth[HALF].error is None and fourth[HALF].video_path.endswith(f"{HALF}.mp4")
    assert hub.hits["/videos/gone0000000.mp4"] == 1 and hub.hits["/videos/hEAd4_xxxxx.mp4"] == hits1["/videos/hEAd4_xxxxx.mp4"]


def test_quality_filters_reject_before_downloading(standin):
    """curate.speakervid.min_sync / min_conf / require_clear judge the records' own fields; a rejected clip is
    never downloaded and becomes a `rejected` row that names the field and the threshold."""
    from tasks.curation.clip import curate_clip
    from tasks.curation.speakervid import quality_rejection, speakervid_clips

    hub, root = standin
    cfg = load_config(sets=["tracking.enabled=false", *_sv_sets(hub, min_conf=0.95)], root=root)
    clips = {c.clip_id: c for c in speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}
    for name in (HEAD.format(1), HEAD.format(2), HALF, GONE):
        assert clips[name].rejected == "conf 0.9 < curate.speakervid.min_conf 0.95" and not clips[name].error
    assert not any(k.startswith("/videos/") for k in hub.hits)  # nothing was downloaded
    row = curate_clip(clips[HALF], None, str(root))
    assert row["status"] == "rejected" and row["reason"] == clips[HALF].rejected
    # the rules on their own: sync as a number, a list (its mean) or SpeakerVid's per-person map (the mean
    # confidence of the clip's own person), clear, dover, fields that cannot be judged
    sv = SpeakerVidConfig(min_sync=4.0, require_clear=True)
    assert quality_rejection({"sync": 5.0, "clear": 1}, sv) is None
    assert quality_rejection({"sync": [3.0, 4.0], "clear": 1}, sv) == "sync 3.5 < curate.speakervid.min_sync 4"
    per_person = {"0": [[5.0, 7.0, 0], [6.0, 7.0, 1]], "1": [[2.0, 9.0, -3]]}
    assert quality_rejection({"sync": per_person, "clear": 1}, sv, person=0) is None
    assert quality_rejection({"sync": per_person, "clear": 1}, sv, person=1) == "sync 2 < curate.speakervid.min_sync 4"
    assert "entry for person 2" in quality_rejection({"sync": per_person, "clear": 1}, sv, person=2)
    assert quality_rejection({"sync": 5.0, "clear": 0}, sv) == "clear is 0 (curate.speakervid.require_clear)"
    assert "cannot judge" in quality_rejection({"sync": {"a": 1}, "clear": 1}, sv, person=0)
    sv = SpeakerVidConfig(min_clear=0.5, min_dover=0.25)
    assert quality_rejection({"clear": 0.7, "dover": 0.3}, sv) is None
    assert quality_rejection({"clear": 0.4, "dover": 0.3}, sv) == "clear 0.4 < curate.speakervid.min_clear 0.5"
    assert quality_rejection({"clear": 0.7, "dover": 0.2}, sv) == "dover 0.2 < curate.speakervid.min_dover 0.25"
    assert "cannot judge" in quality_rejection({"clear": 0.7}, sv)  # no dover in the record
    assert quality_rejection({"sync": 0.0, "conf": 0.0, "clear": 0}, SpeakerVidConfig()) is None  # filters off


def test_local_boxes_apply_only_to_raw_videos(tmp_path):
    """A merged_anno box is normalised to the raw frame: applied to a local file that is the raw video, not to
    one that is already the cut clip (it would crop the person away); a file of neither size gets a note."""
    from tasks.curation.sources import local_clips

    video = shared_path("fixtures", "speakervid", "head_4.mp4")  # 1376 x 1088, 10.1 s
    cases = {  # name: (raw size, clip size, clip length, scene length) -> box applied?
        "raw": ((1376, 1088), (256, 320), 4.0, 6.0, True),
        "cut": ((1920, 1080), (1376, 1088), 10.1, 12.0, False),
        "same_size_cut": ((1376, 1088), (1376, 1088), 10.1, 12.0, False),  # as long as the clip's track
        "same_size_scene_cut": ((1376, 1088), (1376, 1088), 4.0, 10.1, False),  # as long as its scene segment
        "same_size_raw": ((1376, 1088), (1376, 1088), 3.0, 6.0, True),
        "resized": ((640, 480), (256, 320), 4.0, 6.0, False),
    }
    for name, (raw, clip, duration, total, _) in cases.items():
        shutil.copy(video, tmp_path / f"{name}.mp4")
        rec = {**_record(name, 0.0, duration, [0.2, 0.1, 0.8, 0.9], scene=(0.0, total)), "raw_video_width": raw[0],
               "raw_video_height": raw[1], "clip_video_width": clip[0], "clip_video_height": clip[1]}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    clips, notes = local_clips([tmp_path])
    boxes = {c.clip_id: c.bbox for c in clips}
    for name, (*_, applied) in cases.items():
        assert (boxes[name] == (0.2, 0.1, 0.8, 0.9)) if applied else boxes[name] is None, name
    assert len(notes) == 1 and "resized.mp4" in notes[0] and "neither the record's raw video" in notes[0]


def test_time_range_downloads_fetch_only_the_clips_sections(standin):
    """download_sections: each video is fetched only around its clips (yt-dlp download ranges through ffmpeg,
    ranges apart by more than section_gap_s downloaded separately), and the clips cut from a section are the
    clips cut from the whole video (same frames, no time shift)."""
    from tasks.common.media import probe, read_frames
    from tasks.curation.speakervid import speakervid_clips

    hub, root = standin
    common = ["tracking.enabled=false", "curate.speakervid.keep_raw_videos=true"]
    cfg = load_config(sets=[*common, *_sv_sets(hub, retries=0, download_sections=True, section_margin_s=0.2,
                                               section_gap_s=0.0, download_dir="data/raw/sections")], root=root)  # fmt: skip
    parts = {c.clip_id: c for c in speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}
    raw = {p.name: probe(p).duration_s for p in (root / "data/raw/sections/videos").glob("*.mp4")}
    # HEAD's clips [0.5, 4.5) and [5.0, 9.0): two sections (0.3-4.7 s, 4.8-9.2 s), HALF's [1, 5): one;
    # each 4.4 s long, none the whole 10 s video
    assert sorted(raw) == ["HALF1-yyyyy_800-5200ms.mp4", "hEAd4_xxxxx_300-4700ms.mp4", "hEAd4_xxxxx_4800-9200ms.mp4"]
    assert all(abs(d - 4.4) < 0.1 for d in raw.values()), raw
    cfg = load_config(sets=[*common, *_sv_sets(hub, retries=0, download_dir="data/raw/whole")], root=root)
    whole = {c.clip_id: c for c in speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}
    for name in (HEAD.format(1), HEAD.format(2), HALF):
        a = read_frames(parts[name].video_path).astype(float)
        b = read_frames(whole[name].video_path).astype(float)
        assert abs(len(a) - len(b)) <= 1, (name, len(a), len(b))
        n = min(len(a), len(b)) - 10
        diff = {lag: abs(a[5 + lag : 5 + lag + n] - b[5 : 5 + n]).mean() for lag in range(-5, 6)}
        assert min(diff, key=diff.get) == 0 and diff[0] < 3.0, (name, diff)  # the same frames, not shifted


def test_archive_index_fetches_only_the_archives_that_hold_missing_clips(standin, monkeypatch):
    """The clip -> archive index: the first run reads archives until its clips are found and indexes each one
    read; a later run fetches only the archive holding its clip, and none at all for a clip no indexed archive
    holds (while one that may batch records in other files would still be read)."""
    from tasks.curation import speakervid as sv

    hub, root = standin
    anno = root / "hubrepo" / "merged_anno"
    for archive in anno.iterdir():
        archive.unlink()

    def write(name: str, clips: list[str]) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for clip in clips:
                data = json.dumps(_record(clip, 0.0, 3.0, [0, 0, 1, 1])).encode()
                info = tarfile.TarInfo(f"merged_anno/{clip}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (anno / name).write_bytes(buf.getvalue())

    write("batch_000.tar.gz", [HEAD.format(1), HEAD.format(2)])
    write("batch_001.tar.gz", [HALF, GONE])
    fetched: list[str] = []
    real_fetch = sv.HubFiles.fetch

    def spy(self, name):
        fetched.append(name)
        return real_fetch(self, name)

    monkeypatch.setattr(sv.HubFiles, "fetch", spy)
    runs = []

    def run(names: list[str]) -> dict:  # each run its own list file (the Hub client caches a file per commit)
        fetched.clear()
        runs.append(f"run{len(runs)}.json")
        (root / "hubrepo" / runs[-1]).write_text(json.dumps(names))
        cfg = load_config(sets=["tracking.enabled=false", *_sv_sets(hub, retries=0, list_file=runs[-1])], root=root)
        return {c.clip_id: c for c in sv.speakervid_clips(cfg.curate.speakervid, root, workers=1, progress=False)}

    first = run([HALF])
    assert first[HALF].error is None
    assert [f for f in fetched if f.endswith(".tar.gz")] == ["merged_anno/batch_000.tar.gz", "merged_anno/batch_001.tar.gz"]
    index = json.loads((root / SpeakerVidConfig().download_dir / "anno" / "archive_index.json").read_text())
    assert index["merged_anno/batch_000.tar.gz"] == {"clips": sorted([HEAD.format(1), HEAD.format(2)]), "batched": False}
    second = run([GONE, HEAD.format(2)])  # both indexed: only their archives, the known holder first
    assert "no merged_anno record" not in (second[HEAD.format(2)].error or "")
    assert sorted(f for f in fetched if f.endswith(".tar.gz")) == ["merged_anno/batch_000.tar.gz", "merged_anno/batch_001.tar.gz"]
    third = run([NOANNO])  # in no indexed archive: nothing fetched, a clear failure
    assert not [f for f in fetched if f.endswith(".tar.gz")] and "no merged_anno record" in third[NOANNO].error
    write("batch_002.tar.gz", [HEAD.format(5)])  # a new archive on the Hub: read, and only it
    fourth = run([HEAD.format(5)])
    assert [f for f in fetched if f.endswith(".tar.gz")] == ["merged_anno/batch_002.tar.gz"]
    assert "no merged_anno record" not in (fourth[HEAD.format(5)].error or "")
