from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import Config, ConfigError, load_config, parse_set

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_equal_params_yaml():
    # params.yaml is the demo profile written out in full: it validates and equals the typed defaults
    assert load_config(root=REPO) == Config()


def test_merge_order_params_then_configs_then_sets(tmp_path):
    write(tmp_path / "params.yaml", "corpus: {num_conversations: 3, seed: 1, fps: 30}\n")
    a = write(tmp_path / "a.yaml", "corpus: {num_conversations: 4, seed: 2}\n")
    b = write(tmp_path / "b.yaml", "corpus: {num_conversations: 5}\n")
    cfg = load_config([a, b], root=tmp_path)
    assert (cfg.corpus.num_conversations, cfg.corpus.seed, cfg.corpus.fps) == (5, 2, 30)
    cfg = load_config([b, a], root=tmp_path)
    assert (cfg.corpus.num_conversations, cfg.corpus.seed) == (4, 2)
    cfg = load_config([a, b], ["corpus.num_conversations=7", "corpus.seed=9"], root=tmp_path)
    assert (cfg.corpus.num_conversations, cfg.corpus.seed, cfg.corpus.fps) == (7, 9, 30)
    # untouched keys keep their defaults
    assert cfg.corpus.duration_s == Config().corpus.duration_s


def test_set_parses_yaml_values(tmp_path):
    cfg = load_config(sets=["corpus.voices=[en-us, en+f2]", "model.pretrained_path=null", "distill.lr=3e-6",
                            "tracking.enabled=false"], root=tmp_path)
    assert cfg.corpus.voices == ["en-us", "en+f2"]
    assert cfg.model.pretrained_path is None
    assert cfg.distill.lr == pytest.approx(3e-6)
    assert cfg.tracking.enabled is False
    assert parse_set("a.b.c=1") == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_set("corpus.seed")


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(sets=["corpus.num_convs=3"], root=tmp_path)
    msg = str(err.value)
    assert "unknown key 'corpus.num_convs'" in msg
    assert "num_conversations" in msg and "duration_s" in msg
    assert "--set corpus.num_convs=3" in msg
    with pytest.raises(ConfigError, match="unknown key 'corpuss'; allowed keys in the top level: .*corpus"):
        load_config(sets=["corpuss.seed=1"], root=tmp_path)


def test_bad_value_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(sets=["student.context=sometimes"], root=tmp_path)
    assert "'student.context'" in str(err.value) and "'noisy' or 'clean'" in str(err.value)
    with pytest.raises(ConfigError, match=r"'corpus.num_conversations' \(got 0\).*greater than or equal to 1"):
        load_config(sets=["corpus.num_conversations=0"], root=tmp_path)
    with pytest.raises(ConfigError, match="'corpus.width'.*multiple of 2"):
        load_config(sets=["corpus.width=255"], root=tmp_path)
    with pytest.raises(ConfigError, match="corpus.pause_s: low 2.0 is above high 1.0"):
        load_config(sets=["corpus.pause_s=[2.0, 1.0]"], root=tmp_path)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"], root=tmp_path)
    bad = write(tmp_path / "bad.yaml", "corpus: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config([bad], root=tmp_path)
    listy = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config([listy], root=tmp_path)


def test_paper_profile_has_the_papers_settings():
    cfg = load_config(["configs/paper.yaml"], root=REPO)
    s = cfg.student
    assert (s.steps, s.chunk_frames, s.sink_frames, s.window_frames, s.rapr_max_distance) == (3, 3, 4, 6, 10)
    assert (cfg.video.width, cfg.video.height, cfg.video.fps) == (928, 704, 25)
    assert cfg.model.backbone == "wan2.2-ti2v-5b" and cfg.audio.features == "wav2vec2"
    assert (cfg.teacher.iterations, cfg.teacher.batch_size, cfg.teacher.lr) == (20000, 32, 5e-6)
    assert (cfg.ode_init.iterations, cfg.ode_init.batch_size, cfg.ode_init.lr) == (5000, 8, 2e-6)
    assert (cfg.distill.iterations, cfg.distill.batch_size, cfg.distill.lr) == (6000, 16, 3e-6)
    assert (cfg.refine.iterations, cfg.refine.batch_size, cfg.refine.lr, cfg.refine.num_qformers) == (1400, 32, 5e-6, 3)


def test_each_profile_has_its_own_data_root():
    """project.data_dir re-roots every data/... path: the paper profile's outputs never land in the demo's data/."""
    from tasks.config import data_path

    demo = load_config([], root=REPO)
    paper = load_config(["configs/paper.yaml"], root=REPO)
    assert demo.train.latents_dir == "data/latents" and demo.curate.manifest == "data/manifests/curated.parquet"
    assert paper.project.data_dir == "data/paper"
    assert paper.train.latents_dir == "data/paper/latents" and paper.train.checkpoint_dir == "data/paper/checkpoints"
    assert paper.curate.manifest == "data/paper/manifests/curated.parquet"
    assert paper.curate.speakervid.download_dir == "data/paper/raw/speakervid"  # nested sections too
    assert paper.benchmark.report == "data/paper/reports/benchmark.json"
    assert data_path(paper, REPO, "reports", "teacher") == REPO / "data/paper/reports/teacher"
    assert paper.teacher.init_from is None and paper.model.pretrained_path.startswith("models/")  # untouched
    # every path setting of the paper profile that names the data root is under data/paper
    flat = paper.model_dump(mode="json")

    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    assert not [v for v in strings(flat) if v.startswith("data/") and not v.startswith("data/paper")]


def test_curate_takes_several_sources_and_the_single_source_keys_still_work(tmp_path):
    cfg = load_config(root=tmp_path)
    assert cfg.curate.sources == ["synthetic", "local"]  # the demo: its corpus and the shared real clips
    cfg = load_config(sets=["curate.source=local", "curate.local_dir=clips"], root=tmp_path)
    assert cfg.curate.sources == ["local"] and cfg.curate.local_dirs == ["clips"]
    assert load_config(sets=["curate.source=synthetic"], root=tmp_path).curate.sources == ["synthetic"]
    with pytest.raises(ConfigError, match="curate.sources: each source once"):
        load_config(sets=["curate.sources=[local, local]"], root=tmp_path)
    with pytest.raises(ConfigError, match="curate.local_dirs: give at least one folder"):
        load_config(sets=["curate.sources=[local]", "curate.local_dirs=[]"], root=tmp_path)
    with pytest.raises(ConfigError, match=r"'curate.sources.0' \(got 'youtube'\)"):
        load_config(sets=["curate.sources=[youtube]"], root=tmp_path)
    with pytest.raises(ConfigError, match="curate.balance_min_keep"):
        load_config(sets=["curate.balance_min_keep=1.5"], root=tmp_path)


def test_asd_device_is_checked(tmp_path):
    from tasks.config import ConfigError, load_config

    assert load_config(sets=["curate.asd_device=cuda:1"], root=tmp_path).curate.asd_device == "cuda:1"
    with pytest.raises(ConfigError, match="asd_device"):
        load_config(sets=["curate.asd_device=gpu"], root=tmp_path)
