"""The MLflow model registry around the refined student.

- The refine stage logs its final checkpoint as an MLflow pyfunc model (the checkpoint plus the resolved
  config; `predict` makes avatar videos, see StudentAvatar) and registers it as a new version of
  ``registry.model_name`` with the alias ``candidate``.
- The re-evaluation flow (tasks/evaluation/reevaluate.py) measures candidate and champion on the fixed
  evaluation set and moves ``champion`` to the candidate only when ``decide`` says it is better; the decision
  and its reasons go on the candidate version's tags and description.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import Config, to_yaml

CANDIDATE, CHAMPION = "candidate", "champion"
TAG = "streamavatar."  # prefix of the tags this module writes on model versions


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- the decision
@dataclass
class Decision:
    promote: bool
    reason: str
    better: list[str] = field(default_factory=list)
    worse: list[str] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # metrics one of the two lacks
    rows: list[dict] = field(default_factory=list)  # per metric: candidate, champion, direction, verdict

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def decide(candidate: dict[str, float | None], champion: dict[str, float | None] | None, compare: dict[str, str],
           tolerance: float, champion_label: str = "the champion") -> Decision:  # fmt: skip
    """Promote when the candidate is better on at least one compared metric and worse on none.

    ``compare`` maps metric -> "max" | "min" (which way is better). Two values within ``tolerance`` (relative to
    the larger magnitude) are a tie. Metrics either side lacks (None / NaN, e.g. SyncNet without its weights)
    are left out and listed. No champion: the candidate is promoted (the first champion)."""
    if champion is None:
        return Decision(True, "no champion yet: the candidate becomes the first champion")
    d = Decision(False, "")
    for name, direction in compare.items():
        a, b = candidate.get(name), champion.get(name)
        if not (_finite(a) and _finite(b)):
            d.skipped.append(name)
            d.rows.append({"metric": name, "candidate": a, "champion": b, "better": direction, "verdict": "n/a"})
            continue
        a, b = float(a), float(b)
        if abs(a - b) <= tolerance * max(abs(a), abs(b)):
            verdict = "tie"
        elif (a > b) == (direction == "max"):
            verdict = "better"
        else:
            verdict = "worse"
        {"tie": d.ties, "better": d.better, "worse": d.worse}[verdict].append(name)
        d.rows.append({"metric": name, "candidate": a, "champion": b, "better": direction, "verdict": verdict})

    def show(names: list[str]) -> str:
        by = {r["metric"]: r for r in d.rows}
        return ", ".join(f"{n} {by[n]['candidate']:.4g} vs {by[n]['champion']:.4g}" for n in names)

    if not d.better and not d.worse and not d.ties:
        d.reason = f"kept {champion_label}: no compared metric has a value for both ({', '.join(d.skipped)})"
    elif d.worse:
        d.reason = f"kept {champion_label}: the candidate is worse on {show(d.worse)}"
        if d.better:
            d.reason += f" (though better on {show(d.better)})"
    elif not d.better:
        d.reason = f"kept {champion_label}: no metric better beyond the {tolerance:g} tolerance (ties: {show(d.ties)})"
    else:
        d.promote = True
        d.reason = f"promoted over {champion_label}: better on {show(d.better)}, worse on none"
        if d.ties:
            d.reason += f"; tied on {show(d.ties)}"
    if d.skipped:
        d.reason += f"; not compared (a value missing): {', '.join(d.skipped)}"
    return d


# ------------------------------------------------------------------------------------- the pyfunc model
def _python_model_class():
    import mlflow.pyfunc

    class StudentAvatar(mlflow.pyfunc.PythonModel):
        """The refined student as an MLflow model. Input: a DataFrame with columns reference (image path),
        audio (the avatar's voice), out (an .mp4 to write), optionally listen_to (the other voice) and seconds.
        Output: one row per input with the video written, its frames and the real-time factor."""

        def load_context(self, context) -> None:
            from tasks.config import load_config

            art = context.artifacts
            self.checkpoint = art["checkpoint"]
            # the weights the model was registered with, from its own artifacts (not from the project's paths)
            sets = [f"{key}={art[name]}" for name, key in BUNDLED.items() if name in art]
            if "prompt" in art:  # the cached prompt embedding, under the key this environment looks it up by
                data = Path(tempfile.mkdtemp(prefix="streamavatar-model-")) / "data"
                sets.append(f"project.data_dir={data}")
            self.cfg = load_config([art["config"]], sets, use_params=False)
            if "prompt" in art:
                cached = data / "cache" / prompt_cache_name(self.cfg)
                cached.parent.mkdir(parents=True)
                cached.write_bytes(Path(art["prompt"]).read_bytes())
            self.root = Path(art["config"]).parent

        def predict(self, context, model_input, params=None):
            import pandas as pd

            from tasks.inference.generate import generate

            rows = []
            for rec in model_input.to_dict("records"):
                listen = rec.get("listen_to")
                seconds = rec.get("seconds")
                res = generate(self.cfg, self.root, Path(rec["reference"]), Path(rec["audio"]), Path(rec["out"]),
                               listen_to=Path(listen) if isinstance(listen, str) and listen else None,
                               checkpoint=self.checkpoint, progress=False,
                               seconds=float(seconds) if _finite(seconds) else None)  # fmt: skip
                rows.append({"out": res["out"], "frames": res["frames"], "seconds": res["seconds"], "rtf": res["rtf"]})
            return pd.DataFrame(rows)

    return StudentAvatar


# artifact name -> the config key it replaces when the model is loaded: every file the inference path reads
BUNDLED = {"vae": "vae.pretrained_path", "wav2vec2": "audio.wav2vec2_path", "vad": "audio.vad_model_path"}
# the third-party modules the inference path (tasks.inference.generate) imports (mediapipe: the head crop of the
# reference photo); their installed distributions,
# pinned, are the model's pip requirements (tests/test_registry.py installs exactly these in a fresh venv)
INFERENCE_MODULES = ("torch", "numpy", "diffusers", "transformers", "pydantic", "yaml", "tqdm", "scipy", "PIL",
                     "cv2", "ffmpeg", "imageio_ffmpeg", "pandas", "safetensors", "mediapipe")  # fmt: skip


def inference_requirements(cfg: Config) -> list[str]:
    """Pinned pip requirements of the registered model: the installed distributions of INFERENCE_MODULES (and
    silero-vad when the live mask uses it), mlflow-skinny to load it; no local package."""
    from importlib import metadata

    dists = metadata.packages_distributions()
    modules = [*INFERENCE_MODULES, *(["silero_vad"] if cfg.audio.vad == "silero" and not cfg.audio.vad_model_path else [])]
    reqs = []
    for module in modules:
        if not dists.get(module):
            raise RuntimeError(f"the inference path imports {module!r}, which no installed distribution provides")
        dist = dists[module][0]
        reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
    return [f"mlflow-skinny=={metadata.version('mlflow-skinny')}", *reqs]


def prompt_cache_name(cfg: Config) -> str:
    """The file name under data/cache/ that the inference path looks the prompt embedding up by."""
    from model.text import cache_key
    from tasks.common.models import dtype_of

    m = cfg.model
    return f"text_{cache_key(m.text_encoder_path, m.prompt, m.text_len, dtype_of(cfg))}.pt"


def bundle_files(cfg: Config, root: Path) -> dict[str, str]:
    """The files besides the checkpoint that the inference path reads, as artifacts (see BUNDLED): the VAE
    weights, Wav2Vec2 and the VAD model when set, and the prompt embedding (the cached umT5 output, so the 11 GB
    encoder is not needed to run the model; the demo's embedding is seeded and needs no file)."""
    from tasks.config import data_path, resolve_path

    art: dict[str, str] = {}
    for name, key in BUNDLED.items():
        section, field_name = key.split(".")
        value = getattr(cfg.section(section), field_name)
        if not value:
            continue
        path = resolve_path(value, root)
        if not path.exists():
            raise FileNotFoundError(f"{key}: {path} does not exist (the registered model bundles it)")
        art[name] = str(path)
    if cfg.model.text_encoder_path:
        cached = data_path(cfg, root, "cache") / prompt_cache_name(cfg)
        if not cached.is_file():
            raise FileNotFoundError(f"{cached}: the prompt embedding is not cached (run a training stage first)")
        art["prompt"] = str(cached)
    return art


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", "reference"), ColSpec("string", "audio"), ColSpec("string", "out"),
                     ColSpec("string", "listen_to", required=False), ColSpec("double", "seconds", required=False)])
    outputs = Schema([ColSpec("string", "out"), ColSpec("long", "frames"), ColSpec("double", "seconds"),
                      ColSpec("double", "rtf")])  # fmt: skip
    return ModelSignature(inputs=inputs, outputs=outputs)


def root_of_code() -> Path:
    """The directory holding the ``model`` and ``tasks`` packages (copied into the model: code_paths)."""
    return Path(__file__).resolve().parents[2]


def register_student(cfg: Config, root: Path, checkpoint: Path, stage: str) -> dict[str, Any]:
    """Log ``checkpoint`` as a pyfunc model in the active MLflow run, register it, alias it ``candidate``.

    Returns {name, version, model_uri}. Must run inside the stage's MLflow run."""
    import warnings

    import mlflow
    from mlflow import MlflowClient

    with warnings.catch_warnings():  # importing pyfunc defines MLflow's own models, which warn about type hints
        warnings.simplefilter("ignore", UserWarning)
        import mlflow.pyfunc  # noqa: F401
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # "Passing a Python object as python_model ..."

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_student needs an active MLflow run")
    name = cfg.registry.model_name
    sha = file_sha256(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "config.yaml"
        cfg_file.write_text(to_yaml(cfg))
        artifacts = {"checkpoint": str(checkpoint), "config": str(cfg_file), **bundle_files(cfg, root)}
        with warnings.catch_warnings():  # MLflow's hints on type hints and input examples (the signature is set)
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="student", python_model=_python_model_class()(), artifacts=artifacts,
                code_paths=[str(root_of_code() / "model"), str(root_of_code() / "tasks")],
                signature=_signature(), registered_model_name=name, pip_requirements=inference_requirements(cfg),
                metadata={"stage": stage, "checkpoint_sha256": sha},
            )  # fmt: skip
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in {"stage": stage, "checkpoint_sha256": sha, "source_run": run.info.run_id,
                       "registered_at": time.strftime("%Y-%m-%d %H:%M:%S")}.items():  # fmt: skip
        client.set_model_version_tag(name, version, TAG + key, value)
    client.update_model_version(name, version, description=(
        f"The {stage} stage's student ({checkpoint.name}, sha256 {sha[:16]}) from run {run.info.run_id}. Registered "
        f"as '{CANDIDATE}': the re-evaluation flow makes it '{CHAMPION}' only if it beats the champion on the fixed "
        "evaluation set."))  # fmt: skip
    client.set_registered_model_alias(name, CANDIDATE, version)
    mlflow.set_tag(TAG + "registered_model", f"{name} v{version} (alias {CANDIDATE})")
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}"}


# ------------------------------------------------------------------------------------------------ lookups
def version_by_alias(client, name: str, alias: str):
    """The model version ``alias`` points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_checkpoint(name: str, version: str, dst: Path) -> Path:
    """The checkpoint file of a registered version, downloaded under ``dst``."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"models:/{name}/{version} holds no .pt checkpoint (files: "
                                f"{[p.name for p in local.rglob('*') if p.is_file()]})")  # fmt: skip
    return found[0]


def record_decision(client, name: str, version: str, decision: Decision, champion_version: str | None,
                    eval_set_digest: str) -> None:  # fmt: skip
    """Write the decision on the candidate version (tags + description) and move ``champion`` if promoted."""
    tags = {
        "decision": "promoted" if decision.promote else "kept-champion",
        "decision_reason": decision.reason[:5000],
        "compared_to": f"v{champion_version}" if champion_version else "none",
        "eval_set_digest": eval_set_digest,
        "decided_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, TAG + key, value)
    mv = client.get_model_version(name, version)
    desc = (mv.description or "").split("\n\nRe-evaluation:")[0]
    client.update_model_version(name, version, description=f"{desc}\n\nRe-evaluation: {decision.reason}")
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
