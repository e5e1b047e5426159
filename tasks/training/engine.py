"""What every training stage shares: processes (torchrun), per-step randomness, resumable checkpoints,
metrics, the loop with its progress bar.

Multi-process training. Launch any stage with ``torchrun --nproc_per_node K -m flows.cli <stage>``: each rank
computes its slice of the global batch (``batch_size`` is global, split over the ranks, each share run in micro
batches of ``train.micro_batch_size``) and gradients are averaged over ranks before every optimiser step -- data parallelism, exactly what DDP computes. The all-reduce is explicit
(:meth:`Dist.average_gradients`, one bucketed call) rather than DDP's backward hooks because student forcing
runs several forward passes with autograd per step (one exit step per chunk), which DDP's reducer does not
accept. ``train.parallel=fsdp`` (the paper profile, CUDA) shards each transformer block with FSDP2
(``torch.distributed.fsdp.fully_shard``), which reduces gradients itself.

Exact resume. All randomness of step ``s`` comes from generators seeded by (seed, stage, s) and drawn for the
whole global batch before slicing, so a run resumed from a checkpoint at step s computes the same steps as
the uninterrupted run, and K ranks compute what one rank computes on the K-times batch. A checkpoint holds
the models, the optimisers, the step and a fingerprint of what the run depends on; a run whose fingerprint
differs (changed config, new upstream weights) starts over instead of resuming something else.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Mean of every gradient over the ranks (one all-reduce of a flat buffer)."""
        if self.world == 1:
            return
        # FSDP2's parameters (DTensors) have their gradients reduced by FSDP itself: never twice
        grads = [p.grad for p in params if p.grad is not None and type(p).__name__ != "DTensor"]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: float) -> float:
        """Mean of a scalar over the ranks (for logging the global batch's loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def slice(self, batch: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's part of a global batch (dimension 0)."""
        if batch is None or self.world == 1:
            return batch
        per = batch.shape[0] // self.world
        return batch[self.rank * per : (self.rank + 1) * per]


def init_dist(device: torch.device) -> Dist:
    """torchrun's environment -> a process group (gloo on CPU, NCCL on CUDA); one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def shard_model(model: nn.Module, dist: Dist, parallel: str, compute: torch.dtype = torch.float32) -> nn.Module:
    """FSDP2 per transformer block, then the root, for ``train.parallel=fsdp`` with several ranks.

    Mixed precision (``compute`` bf16/fp16, from project.dtype): the sharded master parameters stay float32
    (what AdamW updates), each block's parameters are all-gathered in ``compute`` (MixedPrecisionPolicy: half
    the traffic and memory of gathering float32) and its gradients reduce-scattered in float32. The root's own
    parameters (patch and time embedders, head: what diffusers keeps in float32) are gathered in float32. Block
    inputs are not cast (cast_forward_inputs=False): the time modulation and RoPE tables stay float32 and the
    stages' autocast decides each op's precision, as on the replicated path."""
    if parallel != "fsdp" or dist.world == 1 or getattr(model, "sharded", False):
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    half = compute != torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute if half else None, reduce_dtype=torch.float32 if half else None,
                                  cast_forward_inputs=False)  # fmt: skip
    for block in getattr(model, "blocks", []):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(cast_forward_inputs=False))
    return model


def sharded(parallel: str, dist: Dist) -> bool:
    return parallel == "fsdp" and dist.world > 1


def prepare_training(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], dist: Dist,
                     parallel: str, model_state: dict | None = None, optimizer_state: dict | None = None,
                     compute: torch.dtype = torch.float32) -> tuple[nn.Module, torch.optim.Optimizer]:  # fmt: skip
    """A resumed state loaded into the whole model, the model sharded (FSDP2 with several ranks), then its
    optimiser built over the parameters it now has and its state loaded. The order matters: fully_shard
    replaces the parameters, so an optimiser built before it would update tensors the model no longer uses."""
    if is_dcp_ref(model_state):  # a sharded step checkpoint: loaded into the sharded model and its optimiser
        if not sharded(parallel, dist):
            raise RuntimeError(f"{model_state['__dcp__']}: a sharded (train.sharded_checkpoints) step checkpoint "
                               f"resumes only under train.parallel=fsdp with several processes")  # fmt: skip
        model = shard_model(model, dist, parallel, compute)
        opt = make_optimizer(model)
        load_sharded(model, opt, model_state, optimizer_state)
        return model, opt
    if model_state is not None:
        model.load_state_dict(model_state)
    model = shard_model(model, dist, parallel, compute)
    opt = make_optimizer(model)
    if optimizer_state is not None:
        if sharded(parallel, dist):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, optimizer_state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(optimizer_state)
    return model, opt


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, dist: Dist, parallel: str) -> dict:
    """The optimiser's whole state for a checkpoint (under FSDP2 a collective: call it on every rank)."""
    if sharded(parallel, dist):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


# ------------------------------------------------------------------------------ sharded step checkpoints
def is_dcp_ref(state) -> bool:
    return isinstance(state, dict) and "__dcp__" in state


def save_step(ckpt: Checkpoints, step: int, dist: Dist, parallel: str, nets: dict[str, tuple[nn.Module, object]],
              sharded_files: bool = False, extra: dict | None = None, ema: EMA | None = None) -> None:
    """One resumable step checkpoint of ``nets`` (state key -> (model, optimiser)); the optimiser's key is
    ``optimizer`` for ``model`` and ``<key>_optimizer`` otherwise (``extra``: more entries, e.g. a replicated
    discriminator's). Call it on every rank (FSDP2's gathers and writes are collectives).

    Whole files (the default): every sharded model and optimiser state gathered into one ``step_<n>.pt`` that
    rank 0 writes. ``sharded_files`` (train.sharded_checkpoints, under FSDP2): each rank writes only its own
    shards with torch.distributed.checkpoint into ``step_<n>.dcp/`` -- nothing is gathered, which is what a
    model of billions of parameters needs (the paper's teacher: 29 GB of float32 weights, 58 GB of AdamW state)
    -- and ``step_<n>.pt`` keeps the step, the fingerprint and references into that folder; resuming loads the
    shards back into the sharded model and optimiser (:func:`prepare_training`), under any world size DCP
    can reshard to. ``ema`` (train.ema_decay's average) goes the same way: gathered into the file, or its shards
    into the folder."""
    opt_key = {k: "optimizer" if k == "model" else f"{k}_optimizer" for k in nets}
    if sharded_files and sharded(parallel, dist):
        from torch.distributed import checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        folder = ckpt.dir / f"step_{step:07d}.dcp"
        state = {}
        for k, (m, o) in nets.items():
            state[k] = get_model_state_dict(m)
            state[opt_key[k]] = get_optimizer_state_dict(m, o)
        if ema is not None:
            state["ema"] = dict(ema.avg)
        dcp.save(state, checkpoint_id=str(folder))
        dist.barrier()
        if dist.main:
            refs = {key: {"__dcp__": folder.name, "key": key} for key in state}
            if ema is not None:
                refs["ema"]["updates"] = ema.updates
            ckpt.save(step, {**refs, **(extra or {})})
        dist.barrier()
        return
    state = {}
    for k, (m, o) in nets.items():
        state[k] = state_dict_of(m)
        state[opt_key[k]] = optimizer_state(m, o, dist, parallel)
    if ema is not None:
        state["ema"] = ema.state_dict()
    if dist.main:
        ckpt.save(step, {**state, **(extra or {})})


def load_sharded(model: nn.Module, opt: torch.optim.Optimizer, model_ref: dict, opt_ref: dict) -> None:
    """The shards of a ``step_<n>.dcp`` folder (:func:`save_step`) into an FSDP2 model and its optimiser."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    folder = model_ref["__dcp__"]
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: the sharded step checkpoint's folder is missing")
    state = {model_ref["key"]: get_model_state_dict(model), opt_ref["key"]: get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state[model_ref["key"]])
    set_optimizer_state_dict(model, opt, state[opt_ref["key"]])


# -------------------------------------------------------------------------------------------- randomness
def step_generator(seed: int, stage: str, step: int, stream: str = "") -> torch.Generator:
    """The generator of one step's draws: the same on every rank and after a resume."""
    digest = hashlib.sha256(f"{seed}/{stage}/{step}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def global_batch(gen: torch.Generator, num_items: int, size: int, weights: torch.Tensor | None = None
                 ) -> torch.Tensor:  # fmt: skip
    """Indices of one global batch, drawn with replacement (uniformly, or by ``weights`` [num_items])."""
    if weights is None:
        return torch.randint(num_items, (size,), generator=gen)
    return torch.multinomial(weights, size, replacement=True, generator=gen)


def action_weights(labels, share: float) -> torch.Tensor | None:
    """Draw weights that give the windows labelled with an action (not idle) ``share`` of the draws, spread
    evenly over the actions and within each; None (uniform) for share 0 or when no window has an action."""
    labels = list(labels)
    acted = sorted({a for a in labels if a != "idle"})
    if share <= 0 or not acted:
        return None
    count = {a: labels.count(a) for a in set(labels)}
    idle_share = 1.0 - share if "idle" in count else 0.0
    w = [idle_share / count["idle"] if a == "idle" else (1.0 - idle_share) / len(acted) / count[a] for a in labels]
    return torch.tensor(w, dtype=torch.float64)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------- checkpoints
def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def config_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoints:
    """``<dir>/step_<n>.pt`` (resume points, newest ``keep`` kept) and ``<dir>/final.pt`` (the result)."""

    def __init__(self, directory: Path, fingerprint: str, keep: int = 2) -> None:
        self.dir, self.fingerprint, self.keep = Path(directory), fingerprint, keep

    def steps(self) -> list[Path]:
        return sorted(self.dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))

    def latest(self) -> dict | None:
        """The newest step checkpoint made with the same fingerprint, else None (older ones are removed)."""
        for path in reversed(self.steps()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 -- a torn file from a crash: use the one before
                log.warning("%s: unreadable (%s), trying an older checkpoint", path, exc)
                continue
            if state.get("fingerprint") == self.fingerprint:
                for v in state.values():  # references into the step's sharded folder: made absolute
                    if is_dcp_ref(v):
                        v["__dcp__"] = str(self.dir / v["__dcp__"])
                return state
            log.info("%s: made with other settings (%s != %s): starting over", path, state.get("fingerprint"),
                     self.fingerprint)  # fmt: skip
            break
        for path in self.steps():
            self._remove(path)
        final = self.dir / "final.pt"
        if final.is_file():
            final.unlink()
        return None

    def save(self, step: int, state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:07d}.pt"
        atomic_save({**state, "step": step, "fingerprint": self.fingerprint}, path)
        for old in self.steps()[: -self.keep]:
            self._remove(old)
        return path

    @staticmethod
    def _remove(step_file: Path) -> None:
        """A step checkpoint: its file and, when it was saved sharded, its ``.dcp`` folder."""
        step_file.unlink()
        folder = step_file.with_suffix(".dcp")
        if folder.is_dir():
            shutil.rmtree(folder)

    def save_final(self, state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "final.pt"
        atomic_save({**state, "fingerprint": self.fingerprint}, path)
        return path

    def final(self) -> dict | None:
        path = self.dir / "final.pt"
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state if state.get("fingerprint") == self.fingerprint else None


def atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_final(path: Path, what: str) -> dict:
    """A stage's final.pt, with an error that says which stage to run when it is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no {what} checkpoint; run that stage first")
    return torch.load(path, map_location="cpu", weights_only=True)


def state_dict_of(model: nn.Module) -> dict:
    """A full (unsharded) CPU state dict, also from an FSDP2 model."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


# ---------------------------------------------------------------------------------------- weight averaging
class EMA:
    """An exponential moving average of a model's parameters, what a stage saves as its result when
    ``train.ema_decay`` > 0 (diffusion models are sampled from such an average: a small-batch optimiser's last
    iterate carries the noise of its last steps). After every optimiser step, ``avg += (1 - d) (param - avg)``
    with ``d = min(decay, (1 + n) / (10 + n))`` at the ``n``-th update, so a short run is not held at its
    starting weights (30 steps at decay 0.99 would otherwise keep 74 % of them). Float32 copies; under FSDP2
    each rank averages its own shards (the copies are DTensors like the parameters) and :meth:`state_dict`
    gathers them (a collective: call it on every rank). Buffers are not averaged."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.avg = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def rate(self) -> float:
        """The decay of the next update."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.rate()
        for n, p in model.named_parameters():
            self.avg[n].lerp_(p.detach().float(), 1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "avg": {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone() for n, t in self.avg.items()}}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """A saved average (whole tensors) into this one, sharded like the parameters it averages."""
        if set(state["avg"]) != set(self.avg):
            raise KeyError(f"EMA state: parameters differ ({sorted(set(state['avg']) ^ set(self.avg))[:5]})")
        for n, t in self.avg.items():
            whole = state["avg"][n].to(torch.float32)
            if hasattr(t, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                whole = distribute_tensor(whole.to(t.device), t.device_mesh, t.placements)
            t.copy_(whole)
        self.updates = int(state["updates"])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """The average into ``model``'s parameters (each in its own dtype; sharded as they are): the result."""
        for n, p in model.named_parameters():
            p.copy_(self.avg[n].to(p.dtype))


def make_ema(model: nn.Module, decay: float, state: dict | None) -> EMA | None:
    """``train.ema_decay``'s average of ``model`` (None when 0), resumed from a step checkpoint's ``ema`` entry.
    Make it after :func:`prepare_training` (which shards the model and loads a resumed state into it)."""
    if not decay:
        return None
    ema = EMA(model, decay)
    saved = state.get("ema") if state is not None else None
    if is_dcp_ref(saved):  # a sharded step checkpoint: each rank reads its own shards of the average
        from torch.distributed import checkpoint as dcp

        dcp.load({"ema": ema.avg}, checkpoint_id=str(saved["__dcp__"]))  # in place, into the average's shards
        ema.updates = int(saved["updates"])
    elif saved is not None:
        ema.load_state_dict(saved)
    return ema


# ------------------------------------------------------------------------------------------------- loop
def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, model: nn.Module, dist: Dist, clip: float) -> float:
    """backward, gradients averaged over the ranks, clipped to ``clip`` (0: no clipping), one step; the norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return apply_gradients(opt, model, dist, clip)


def apply_gradients(opt: torch.optim.Optimizer, model: nn.Module, dist: Dist, clip: float) -> float:
    """The gradients already accumulated in ``model`` averaged over the ranks, clipped, one step; the norm."""
    dist.average_gradients(model.parameters())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
    opt.step()
    return float(norm)


# ------------------------------------------------------------------------------ global batch, micro batches
def rank_batch(batch_size: int, dist: Dist, what: str) -> int:
    """This process's share of a global batch (``batch_size`` is the whole step's batch, as in the paper: 32 on
    8 GPUs is 4 per GPU); it must split evenly over the processes."""
    if batch_size % dist.world:
        from tasks.config import ConfigError

        raise ConfigError(f"{what}: the global batch {batch_size} does not split evenly over {dist.world} processes")
    return batch_size // dist.world


def micro_batches(n: int, micro: int) -> list[slice]:
    """``n`` samples in micro batches of ``micro`` (0 or >= n: one batch)."""
    size = micro if 0 < micro < n else n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def gradient_sync(model: nn.Module, on: bool) -> None:
    """FSDP2 reduce-scatters gradients at every backward unless told to wait for the last micro batch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(on)


def accumulate(model: nn.Module, n: int, micro: int,
               compute: Callable[[slice], tuple[torch.Tensor, dict[str, float]]]) -> dict[str, float]:  # fmt: skip
    """Gradients of the mean loss over this rank's ``n`` samples, ``micro`` at a time: ``compute(slice)``
    returns a micro batch's mean loss (and float logs); each is back-propagated weighted by its share, so any
    split gives the gradients of the whole batch. Returns the share-weighted means of "loss" and the logs."""
    parts = micro_batches(n, micro)
    out: dict[str, float] = {}
    for j, sl in enumerate(parts):
        gradient_sync(model, j == len(parts) - 1)
        loss, logs = compute(sl)
        w = (sl.stop - sl.start) / n
        (loss * w).backward()
        for k, v in {"loss": float(loss.detach()), **logs}.items():
            out[k] = out.get(k, 0.0) + w * float(v)
    return out



def resume(ckpt: Checkpoints, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load the newest matching step checkpoint into ``model`` and ``opt``; the step to continue from (0: none)."""
    state = ckpt.latest()
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def warmup_cosine(opt: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int, floor: float) -> None:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` x ``base_lr`` at ``total``."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    lr = base_lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(1, total))))
    for group in opt.param_groups:
        group["lr"] = lr


def history_csv(jsonl: Path, out: Path) -> Path:
    """A stage's per-step history (``Metrics``' JSON-lines file: a resumed run's steps before its checkpoint too, the
    newest row per step) as a CSV, one row per step: the loss curves dvc.yaml's stage plots draw. A missing
    history gives a header-only file."""
    rows: dict[int, dict] = {}
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[int(r["step"])] = r
    cols = ["step"] + sorted({k for r in rows.values() for k in r if k != "step"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows[s] for s in sorted(rows))
    tmp.replace(out)
    return out


class Metrics:
    """Per-step metrics: MLflow (rank 0, when a run is active) and a JSON-lines file next to the checkpoints."""

    def __init__(self, path: Path | None, prefix: str, every: int, enabled: bool, fresh: bool = False) -> None:
        self.path, self.prefix, self.every, self.enabled = path, prefix, every, enabled
        self.history: list[dict] = []
        if fresh and enabled and path is not None and path.is_file():
            path.unlink()  # a run from step 0 starts its history over
        elif path is not None and path.is_file():  # a resumed run continues the history of the steps before it
            self.history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        self.history.append(row)
        if not self.enabled:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        mlflow = sys.modules.get("mlflow")  # a run is active only where mlflow is already imported (not on a bare GPU box)
        if step % self.every == 0 and mlflow is not None:
            if mlflow.active_run() is not None:
                mlflow.log_metrics({f"{self.prefix}/{k}": float(v) for k, v in values.items()}, step=step)


def prefect_progress(name: str, start: int, total: int, updates: int = 20) -> Callable[[int], None]:
    """Inside a Prefect task run (the flows' path), a progress artifact for this loop (the run's Artifacts tab
    shows the % done), updated ~``updates`` times; elsewhere (the CLI, dvc repro, torchrun ranks > 0) a no-op.
    Prefect is never imported from here: only used when the caller already runs under it."""
    if "prefect" not in sys.modules or int(os.environ.get("RANK", "0")) != 0:
        return lambda step: None
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return lambda step: None
    every = max(1, (total - start) // updates)
    artifact = create_progress_artifact(progress=100.0 * start / max(total, 1), description=f"{name}: steps done (%)")

    def report(step: int) -> None:
        if (step - start) % every == 0 or step == total:
            update_progress_artifact(artifact_id=artifact, progress=100.0 * step / max(total, 1))

    return report


def run_loop(
    name: str,
    start: int,
    total: int,
    step_fn: Callable[[int], dict[str, float]],
    save_fn: Callable[[int], None],
    metrics: Metrics,
    checkpoint_every: int,
    progress: bool,
    amp: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """Steps ``start .. total - 1``; a checkpoint every ``checkpoint_every`` steps and after the last one.
    ``amp``: the context each step runs in (mixed precision: Run.autocast)."""
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, total), initial=start, total=total, desc=name, unit="it", disable=not progress)
    report = prefect_progress(name, start, total)
    for step in bar:
        with amp() if amp is not None else contextlib.nullcontext():
            values = step_fn(step)
        for k, v in values.items():
            if not np.isfinite(v):
                raise FloatingPointError(f"{name}: {k} is {v} at step {step}; the last good checkpoint is kept")
        metrics.log(step, values)
        last = values
        bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:3]})
        if (step + 1) % checkpoint_every == 0 or step + 1 == total:
            save_fn(step + 1)
        report(step + 1)
    bar.close()
    if total <= start and metrics.history:  # nothing left to run (a finished stage re-run): its last step
        last = {k: v for k, v in metrics.history[-1].items() if k != "step"}
    if total > start:
        last = {**last, "seconds_per_step": (time.perf_counter() - t0) / (total - start)}
    return last


def run_loop_for(
    name: str,
    start: int,
    schedule: dict[str, int],
    max_seconds: float,
    step_fn: Callable[[int], dict[str, float]],
    save_fn: Callable[[int], None],
    metrics: Metrics,
    checkpoint_every: int,
    progress: bool,
) -> dict[str, float]:
    """:func:`run_loop` to ``schedule["total"]`` steps, or, with ``max_seconds`` > 0, to as many of them as fit that
    training time: 30 steps are run and the last 20 timed, then ``schedule["total"]`` is lowered to the steps that
    fit (the step function reads it there, so its learning-rate schedule spans the steps that will run)."""
    total = schedule["total"]
    if max_seconds and start < total:
        t0, probe, marks = time.perf_counter(), min(total, start + 30), {}

        def timed(s: int) -> dict[str, float]:
            marks.setdefault(s, time.perf_counter())
            return step_fn(s)

        run_loop(name, start, probe, timed, save_fn, metrics, checkpoint_every, progress)
        if probe < total:
            first = min(start + 10, probe - 1)
            per = (time.perf_counter() - marks[first]) / (probe - first)
            schedule["total"] = min(total, probe + max(0, int((max_seconds - (time.perf_counter() - t0)) / per)))
            log.info("%s: %.1f ms a step: %d steps fit %s s", name, 1e3 * per, schedule["total"], max_seconds)
        start = probe
    return run_loop(name, start, schedule["total"], step_fn, save_fn, metrics, checkpoint_every, progress)

