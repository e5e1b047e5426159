"""`streamavatar`: the project's command line. Every stage is a subcommand (what dvc.yaml's cmds call);
`pipeline` runs the Prefect flow `full-pipeline`; `config` prints the validated configuration."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import flows  # noqa: F401  (sets PREFECT_HOME and telemetry before anything imports prefect)
from tasks.config import ConfigError, load_config, project_root, resolve_path, to_yaml
from tasks.registry import ORDER, STAGES


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML merged over params.yaml; repeat to merge several, in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one value, e.g. --set corpus.num_conversations=2 (repeatable)")


def _port(text: str) -> int:
    """An argparse type: a TCP port number (1-65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamavatar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ORDER:
        p = sub.add_parser(name, help=STAGES[name].help)
        _config_args(p)
    p = sub.add_parser("pretrain", help="train the demo VAE from scratch on real talking-head clips at a longer "
                       "budget (the demo's stand-in for pretrained Wan2.2 weights; not part of `make demo`)")
    _config_args(p)
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also copy demo_vae.pt / demo_dit.pt there with a provenance .json beside each, e.g. weights")
    p.add_argument("--what", default="all", choices=["all", "vae", "dit", "pack"],
                   help="train both (default), only the VAE, or only the base DiT (on the VAE already pretrained); "
                   "pack: write the DiT's clips (face crops, voices, speaking masks) to one file for "
                   "pretrain.dit_pack on another machine")
    p = sub.add_parser("plan", help="capacity planner: memory per GPU, FLOPs and step time of each training stage "
                       "for a profile on N GPUs, and which micro batch / activation checkpointing settings fit")
    _config_args(p)
    p.add_argument("--gpus", type=int, default=8, help="GPUs the stages train on (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation for the step time (0.35)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100 SXM: 989)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p = sub.add_parser("pipeline", help="run the Prefect flow full-pipeline (embedded Prefect, no server needed)")
    _config_args(p)
    p.add_argument("--stages", default="", help=f"comma-separated subset of: {','.join(ORDER)}")
    p.add_argument("--force", action="store_true", help="run stages even when DVC says they are up to date")
    p = sub.add_parser("bench", help="the benchmark stage: real-time speed of the streaming student, DiT and VAE "
                                     "sequential vs pipelined (default; data/reports/benchmark.json + MLflow); or "
                                     "the models alone (--model-only), the curation stage (--curation), identity "
                                     "drift over a long stream (--drift)")
    _config_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--model-only", action="store_true",
                      help="time the models alone on synthetic input (random weights unless the config names some)")
    mode.add_argument("--curation", action="store_true",
                      help="time the curate stage's decode, active speaker detection and head pose on real clips")
    mode.add_argument("--drift", action="store_true",
                      help="identity drift of the trained students over a long stream (the paper's Table 1 in "
                           "miniature): rolling cache vs + reference sink vs + sink + RAPR (distilled student) "
                           "vs + GAN (refined student, sink + RAPR); same seed and inputs")
    mode.add_argument("--memory", action="store_true",
                      help="the memory test ([10]): a marked corpus clip shown until its mark is on screen, then "
                           "--frames generated; the share of frames that keep the mark after it left the window, "
                           "no sink vs sink + window vs LSVM (--memory-checkpoint)")
    mode.add_argument("--lsvm-cost", action="store_true",
                      help="what the Long-Short Visual Memory costs ([10]): the same student with and without "
                           "--memory-slots memory slots, timed chunk by chunk alternately over --chunks chunks (default "
                           "1000): per-chunk ratio, flatness, state held")
    mode.add_argument("--actions", action="store_true",
                      help="action following of the student ([10]): videos with a request schedule and without, "
                           "scored by the action detector (configs/interactive.yaml trains a student for it)")
    mode.add_argument("--lip-sync", action="store_true",
                      help="does the product's mouth follow a voice ([7]'s generate target)? each portrait streamed on "
                           "its whole voice with --seeds noise seeds, mouth opening vs voice envelope pooled over "
                           "every video (as evaluate pools its windows), beside the same with the voices reversed")
    p.add_argument("--seeds", type=int, default=3, help="--lip-sync: noise seeds per portrait (default 3)")
    mode.add_argument("--vad", action="store_true",
                      help="the live talk/listen mask (energy gate, Silero VAD, the both-streams leak rule) against the "
                           "corpus's ground truth: clean, noisy and leaking streams; F1 per detector and its cost")
    mode.add_argument("--conversations", type=int, default=8, help="--vad: corpus conversations to synthesise")
    mode.add_argument("--train-step", action="store_true",
                      help="one teacher training step (forward + backward) at the profile's shapes, random weights: "
                           "step time, TFLOP/s and MFU, peak memory against `streamavatar plan`")
    mode.add_argument("--live", action="store_true",
                      help="latency of the live server (a real `streamavatar live` process) under 1, 2, 4 concurrent "
                           "paced sessions: p50/p95/p99 audio-in to frame-out, dropped frames, MiB per session")
    p.add_argument("--sessions", default="1,2,4", help="--live: concurrent sessions per setting (default 1,2,4)")
    p.add_argument("--reference", default=None, metavar="IMAGE",
                   help="--live, --actions, --lip-sync: the portrait (default ../shared/fixtures/avatars/"
                        "fashion_blogger.jpg; --actions, --lip-sync: it and kitchen_grandmother.jpg)")
    p.add_argument("--voice", default=None, metavar="AUDIO",
                   help="--live, --actions, --lip-sync: the avatar's voice (default ../shared/fixtures/avatars/"
                        "fashion_blogger.wav)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--steps", type=int, default=5, help="--train-step: steps to time (the first is warm-up)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="--train-step: the GPU's dense peak (H100: 989)")
    p.add_argument("--chunks", type=int, default=None,
                   help="--model-only: chunks to stream through the DiT (default 500); --lsvm-cost: per stream "
                        "(default 1000)")
    p.add_argument("--memory-slots", type=int, default=4, help="--lsvm-cost: memory slots per layer (default 4)")
    p.add_argument("--memory-kind", choices=("global", "spatial"), default=None,
                   help="--lsvm-cost: the memory's kind (default model.memory_kind; model/memory.py)")
    p.add_argument("--vae-chunks", type=int, default=60, help="--model-only: chunks to decode with the VAE (default 60)")
    p.add_argument("--teacher-steps", type=int, default=50, help="--model-only: teacher Euler steps for the cost ratio")
    p.add_argument("--clips", nargs="+", metavar="DIR_OR_FILE",
                   help="--curation: video files or folders of them (default: three SpeakerVid fixtures in "
                        "../shared/fixtures/speakervid)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=10.0,
                   help="--curation: seconds of each clip to curate, from its start; --live: seconds of audio per "
                        "session (default 10)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="--curation: torch intra-op threads per worker (default: as the stage runs; one worker: "
                        "torch's own choice, several: cores / workers)")
    p.add_argument("--workers", type=int, default=None,
                   help="--curation: worker processes side by side (default: curate.workers, as the stage runs)")
    p.add_argument("--frames", type=int, default=1500,
                   help="--drift, --memory: video frames to stream per setting (default 1500 = 60 s at 25 fps)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="--drift: the student of the three cache settings (default: "
                        "data/checkpoints/distill/final.pt; the settings are skipped when it is missing); "
                        "'random' for the seeded untrained student")
    p.add_argument("--gan-checkpoint", default=None, metavar="PATH",
                   help="--drift: the student of '+ GAN' (default: data/checkpoints/refine/final.pt; skipped "
                        "when missing); 'random' for the seeded untrained student")
    p.add_argument("--memory-checkpoint", default=None, metavar="PATH",
                   help="--memory: a student trained with model.memory_slots > 0 (the LSVM row; skipped without)")
    p.add_argument("--memory-clips", type=int, default=2, help="--memory: marked clips to stream (default 2)")
    p.add_argument("--every", type=float, default=2.5, help="--actions: seconds between requests (default 2.5)")
    p.add_argument("--ceiling", action="store_true",
                   help="--actions: also score the profile's curated action clips against their labels, as they "
                        "are and through the autoencoder (what the student is measured against)")
    p.add_argument("--window-s", type=float, default=10.0,
                   help="--drift, --memory: seconds per measurement window (default 10)")
    p.add_argument("--out", default=None,
                   help="where to write the JSON report (default benchmark.report = data/reports/benchmark.json; "
                        "data/reports/model_bench.json with --model-only, or "
                        "data/reports/curation_bench.json with --curation, data/reports/drift_bench.json "
                        "with --drift, its plot beside it as .png)")  # fmt: skip
    p = sub.add_parser("generate", help="make an mp4 of the avatar in a reference image talking on one voice and "
                                        "listening to another, streamed chunk by chunk by the trained student")
    _config_args(p)
    p.add_argument("--reference", required=True, metavar="IMAGE",
                   help="the avatar's picture (jpg, png, webp, ... any size: cropped to the profile's aspect "
                        "around the face, see --crop, and resized)")
    p.add_argument("--crop", choices=("head", "face", "centre"), default="head",
                   help="head (default): the head crop the training clips have (curate.head_scale x the face "
                        "FaceMesh finds); face: the largest crop of the profile's aspect around the face; centre: "
                        "always the centre (head and face fall back to it when no face is found)")
    p.add_argument("--audio", required=True, metavar="AUDIO",
                   help="the avatar's own voice (wav, mp3, m4a, ... any rate or channels): it talks on it")
    p.add_argument("--listen-to", default=None, metavar="AUDIO",
                   help="the other person's voice: the avatar listens to it (default: silence); the video "
                        "lasts as long as the longer of the two")
    p.add_argument("--out", required=True, metavar="OUT.mp4", help="the video to write (with both voices mixed)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="student checkpoint (default: data/checkpoints/refine/final.pt, else distill/final.pt); "
                        "'random' for the seeded untrained student")
    p.add_argument("--seconds", type=float, default=None, help="use only the first S seconds of the audio")
    p.add_argument("--actions", default=None, metavar="T:ACTION,...",
                   help="requested actions, e.g. '2.0:nod,5.5:smile' (nod, shake, turn_left, turn_right, smile; "
                        "idle ends one): each starts at the next chunk boundary and runs --action-seconds; needs a "
                        "student trained with action prompts (configs/interactive.yaml)")
    p.add_argument("--action-seconds", type=float, default=None,
                   help="how long each requested action runs (default: the middle of corpus.action_s)")
    p.add_argument("--measure", action="store_true",
                   help="then measure the video as `evaluate` does: face found (FaceMesh) and mouth-voice "
                        "correlation; with --actions also the action detector's following rate")
    p = sub.add_parser("live", help="the real-time session server (what `make live` runs): WebSocket /ws sessions "
                                    "of the trained student (the registry's champion by default), /health, /metrics")
    _config_args(p)
    p.add_argument("--host", default=None, help="bind address (default live.host, 127.0.0.1; beyond loopback a "
                                                "token is required)")
    p.add_argument("--port", type=int, default=None, help="port (default live.port, 8765; 0 = any free port)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="auto (default: the registry's champion, else the last trained student), champion, a "
                        "student checkpoint, or random (the seeded untrained student)")
    p.add_argument("--max-sessions", type=int, default=None, help="sessions at once (default live.max_sessions)")
    p.add_argument("--ready-file", default=None, metavar="FILE",
                   help="write {url, port, pid} there once the server listens (for scripts and tests)")
    p = sub.add_parser("live-client", help="stream a reference portrait and two voices to a live server in real "
                                           "time, record the avatar that comes back to an mp4, print the latency")
    p.add_argument("--server", default="http://127.0.0.1:8765", help="the server's URL (default %(default)s)")
    p.add_argument("--reference", required=True, metavar="IMAGE", help="the avatar's portrait (jpg, png, webp)")
    p.add_argument("--audio", required=True, metavar="AUDIO", help="the avatar's own voice (any format and rate)")
    p.add_argument("--listen-to", default=None, metavar="AUDIO", help="the user's voice: the avatar listens to it")
    p.add_argument("--out", required=True, metavar="OUT.mp4", help="where to record what came back")
    p.add_argument("--token", default=os.environ.get("STREAMAVATAR_LIVE_TOKEN", ""),
                   help="the server's token (default $STREAMAVATAR_LIVE_TOKEN)")
    p.add_argument("--seconds", type=float, default=None, help="send only the first S seconds of the audio")
    p.add_argument("--no-pace", action="store_true", help="send the audio as fast as possible, not in real time")
    p = sub.add_parser("reevaluate", help="the re-evaluation flow (what the nightly schedule runs): the registry's "
                                          "champion and candidate (or a checkpoint) on the fixed evaluation set, "
                                          "the candidate promoted only if better; appended to "
                                          "data/reports/reevaluate/history.parquet with a plot")
    _config_args(p)
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="evaluate this student checkpoint instead of the registry's champion and candidate (without "
                        "a registered version: evaluate.checkpoint, refine/final.pt, else distill/final.pt)")
    p = sub.add_parser("serve", help="start on 127.0.0.1 a Prefect server + worker and an MLflow server, create "
                                     "the work pool and deploy prefect.yaml (what `make serve` runs)")
    p.add_argument("--prefect-port", type=_port, default=int(os.environ.get("PREFECT_PORT", 4200)),
                   help="Prefect API and UI port (default $PREFECT_PORT or 4200)")
    p.add_argument("--mlflow-port", type=_port, default=int(os.environ.get("MLFLOW_PORT", 5000)),
                   help="MLflow server port (default $MLFLOW_PORT or 5000)")
    p.add_argument("--status", action="store_true", help="only say what is running")
    p.add_argument("--no-deploy", action="store_true", help="start the services without (re)deploying")
    sub.add_parser("stop", help="stop exactly the processes `streamavatar serve` started (what `make stop` runs)")
    p = sub.add_parser("config", help="print the effective, validated configuration")
    _config_args(p)
    sub.add_parser("stages", help="list the stages in pipeline order")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a Prefect cancellation, a scheduler, `kill`): unwinds like Ctrl-C, so every stage stops the same
    way -- worker processes ended, finished work kept, the next run resumes."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        # Ctrl-C / SIGINT raises KeyboardInterrupt even when the parent started us with SIGINT ignored (a process
        # inherits an ignored SIGINT, and Python then keeps it ignored: the run went on after a SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"{what}: stopped; finished work is kept and the next run resumes from it", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tasks.runner import SUMMARY_RECORD

    for handler in logging.getLogger().handlers:  # the stage's summary is printed below (once), not logged too
        handler.addFilter(lambda record: not getattr(record, SUMMARY_RECORD, False))
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = project_root()
    from tasks.common.media import MediaError

    try:
        if args.command in ("serve", "stop"):
            return _serve(args, root)
        if args.command == "live-client":
            return _live_client(args)
        if args.command == "stages":
            for name in ORDER:
                print(f"{name:12s} {STAGES[name].help}")
            return 0
        cfg = load_config(args.config, args.sets, root=root)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        if args.command == "pipeline":
            return _pipeline(args, root)
        if args.command == "bench":
            return _bench(args, cfg, root)
        if args.command == "reevaluate":
            from flows.reevaluate import reevaluate_flow

            result = reevaluate_flow(configs=args.config, sets=args.sets, root=str(root), checkpoint=args.checkpoint)
            for row in result["rows_added"]:
                alias = f" ({row['alias']})" if row.get("alias") else ""
                print(f"re-evaluated {row['checkpoint']}{alias} on {row['windows']} windows")
            if result["decision"] is not None:
                print(f"registry: candidate v{result['decision']['candidate']}: {result['decision']['reason']}")
            print(f"history {result['history']} ({result['rows']} rows), plot {result['plot']}")
            return 0
        if args.command == "generate":
            return _generate(args, cfg, root)
        if args.command == "live":
            return _live(args, cfg, root)
        if args.command == "pretrain":
            return _pretrain(args, cfg, root)
        if args.command == "plan":
            from tasks.planning import plan

            print(plan(cfg, args.gpus, args.gpu_memory_gib, args.mfu, args.peak_tflops, as_json=args.json))
            return 0
        from tasks.runner import run_stage
        from tasks.training.engine import rank_from_env

        rank = rank_from_env()
        if rank > 0:  # torchrun: only rank 0 records the run in MLflow (and holds the data/ lock)
            cfg.tracking.enabled = False
        outcome = run_stage(args.command, cfg, root, lock=rank == 0)
        print(outcome.summary)
        for item, reason in outcome.failures.items():
            print(f"  failed: {item}: {reason}", file=sys.stderr)
        return 0 if outcome.metrics.get("clips_ok", 1) or not outcome.failures else 1
    except (ConfigError, MediaError, FileNotFoundError) as exc:  # a bad setting, an input file missing or unreadable
        print(f"error: {exc}", file=sys.stderr)  # (each message names the file and the setting or flag)
        return 2


def _serve(args, root: Path) -> int:
    from flows import serve

    if args.command == "stop":
        serve.stop(root)
        return 0
    if args.status:
        serve.status(root)
        return 0
    ports = serve.Ports(prefect=args.prefect_port, mlflow=args.mlflow_port)
    try:
        info = serve.start(root, ports, deploy=not args.no_deploy)
    except serve.ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    serve.write_env_file(root, ports)
    print()
    print(serve.HOWTO.format(**info))
    return 0


def _pretrain(args, cfg, root: Path) -> int:
    from tasks.common import tracking
    from tasks.training.pretrain import run_pretrain

    params = tracking.flatten({k: cfg.section(k).model_dump(mode="json") for k in ("vae", "vae_train", "pretrain",
                                                                                 "video", "model")})  # fmt: skip
    with tracking.stage_run(cfg, root, "pretrain", params) as run:
        result = run_pretrain(cfg, root, export=args.export, what=args.what)
        if run is not None:
            tracking.log_result(result, root)
    print(result.summary)
    for item, reason in result.failures.items():
        print(f"  skipped: {item}: {reason}", file=sys.stderr)
    for out in result.outputs:
        print(f"  wrote {out}")
    return 0


def _pipeline(args, root: Path) -> int:
    from flows.full_pipeline import full_pipeline

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] or None
    unknown = sorted(set(stages or []) - set(ORDER))
    if unknown:  # said here, before a Prefect flow run starts (the flow refuses them too, in its own run)
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; the stages are {','.join(ORDER)}")
    result = full_pipeline(configs=args.config, sets=args.sets, root=str(root), stages=stages, force=args.force)
    print("\nfull-pipeline finished")
    for name, outcome in result["stages"].items():
        print(f"  {name:10s} {outcome['status']:10s} {outcome['summary']}")
        if outcome["dvc"]:
            print(f"  {'':10s} dvc: {outcome['dvc']}")
    print(f"  MLflow run {result['mlflow_run_id']}")
    return 0


def _bench(args, cfg, root: Path) -> int:
    import json

    from tasks.common.media import writable_output

    if args.out:  # before the bench runs: a report that cannot be written would lose minutes of measuring
        writable_output(root / args.out)

    if args.curation:
        from tasks.evaluation.curation_bench import curation_clips, format_report, run_curation_bench

        workers = args.workers if args.workers is not None else cfg.curate.workers
        report = run_curation_bench(cfg, root, curation_clips(args.clips, root), seconds=args.seconds,
                                    torch_threads=args.torch_threads, workers=workers, progress=not args.json)  # fmt: skip
        default_out = f"{cfg.project.data_dir}/reports/curation_bench.json"
    elif args.model_only:
        from tasks.evaluation.model_bench import format_report, run_model_bench

        chunks = 500 if args.chunks is None else args.chunks
        if chunks < 1 or args.vae_chunks < 1 or args.teacher_steps < 1:
            raise ConfigError("--chunks, --vae-chunks and --teacher-steps must be at least 1")
        report = run_model_bench(cfg, chunks=chunks, vae_chunks=args.vae_chunks,
                                 teacher_steps=args.teacher_steps, progress=not args.json)  # fmt: skip
        default_out = f"{cfg.project.data_dir}/reports/model_bench.json"
    elif args.lsvm_cost:
        from tasks.evaluation.model_bench import format_lsvm_report as format_report
        from tasks.evaluation.model_bench import run_lsvm_cost

        chunks = 1000 if args.chunks is None else args.chunks
        if chunks < 2 or args.memory_slots < 1:
            raise ConfigError("--lsvm-cost: --chunks must be at least 2 and --memory-slots at least 1")
        report = run_lsvm_cost(cfg, chunks=chunks, slots=args.memory_slots, progress=not args.json,
                               kind=args.memory_kind)  # fmt: skip
        default_out = f"{cfg.project.data_dir}/reports/lsvm_cost.json"
    elif args.vad:
        from tasks.evaluation.vad_bench import format_report, run_vad_bench

        if args.conversations < 1:
            raise ConfigError("--conversations must be at least 1")
        report = run_vad_bench(cfg, conversations=args.conversations)
        default_out = f"{cfg.project.data_dir}/reports/vad_bench.json"
    elif args.train_step:
        from tasks.evaluation.train_step_bench import format_report, run_train_step_bench

        report = run_train_step_bench(cfg, steps=args.steps, peak_tflops=args.peak_tflops)
        default_out = f"{cfg.project.data_dir}/reports/train_step_bench.json"
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: the first process reports
            return 0
    elif args.live:
        from live.bench import format_report, run_live_bench

        shared = resolve_path("../shared/fixtures/avatars", root)
        try:
            sessions = sorted({int(x) for x in args.sessions.split(",") if x.strip()})
        except ValueError:
            raise ConfigError(f"--sessions {args.sessions!r}: give whole numbers, e.g. 1,2,4") from None
        if not sessions or min(sessions) < 1:
            raise ConfigError(f"--sessions {args.sessions!r}: give at least one positive number")
        report = run_live_bench(cfg, root, sessions, args.seconds, args.checkpoint or "auto",
                                Path(args.reference or shared / "fashion_blogger.jpg"),
                                Path(args.voice or shared / "fashion_blogger.wav"), args.sets)  # fmt: skip
        default_out = f"{cfg.project.data_dir}/reports/live_bench.json"
    elif args.actions:
        from tasks.evaluation.action_bench import format_report, run_action_bench

        pairs = _portrait_pair(args, "--actions")
        report = run_action_bench(cfg, root, args.checkpoint, pairs, seconds=args.seconds, every_s=args.every,
                                  progress=not args.json, ceiling=args.ceiling)  # fmt: skip
        default_out = f"{cfg.project.data_dir}/reports/action_bench.json"
    elif args.lip_sync:
        from tasks.evaluation.lip_sync_bench import format_report, run_lip_sync_bench

        pairs = _portrait_pair(args, "--lip-sync")
        report = run_lip_sync_bench(cfg, root, pairs, seeds=args.seeds, checkpoint=args.checkpoint,
                                    progress=not args.json)  # fmt: skip
        default_out = f"{cfg.project.data_dir}/reports/lip_sync_bench.json"
    elif args.memory:
        from tasks.evaluation.memory_bench import format_report, run_memory_bench

        default_out = f"{cfg.project.data_dir}/reports/memory_bench.json"
        report = run_memory_bench(cfg, root, seconds=args.frames / cfg.video.fps, window_s=args.window_s,
                                  clips=args.memory_clips, checkpoint=args.checkpoint,
                                  memory_checkpoint=args.memory_checkpoint, progress=not args.json,
                                  plot_path=(root / (args.out or default_out)).with_suffix(".png"))  # fmt: skip
    elif args.drift:
        from tasks.evaluation.drift_bench import format_report, run_drift_bench

        default_out = f"{cfg.project.data_dir}/reports/drift_bench.json"
        plot = (root / (args.out or default_out)).with_suffix(".png")
        report = run_drift_bench(cfg, root, frames=args.frames, checkpoint=args.checkpoint, window_s=args.window_s,
                                 progress=not args.json, gan_checkpoint=args.gan_checkpoint,
                                 plot_path=plot)  # fmt: skip
    else:  # the benchmark stage itself: recorded in MLflow like `streamavatar benchmark`
        from tasks.evaluation.benchmark import format_report
        from tasks.runner import run_stage

        if args.out:
            cfg.benchmark.report = args.out
        from tasks.runner import dvc_record, matches_params_file

        run_stage("benchmark", cfg, root)
        if matches_params_file(cfg, root, "benchmark"):  # dvc.lock follows, as after a flow run
            try:
                dvc_record(root, "benchmark")
            except RuntimeError as exc:  # e.g. no trained student yet: the stage's dependencies are missing
                print(f"note: the report is not recorded in dvc.lock ({exc})", file=sys.stderr)
        out = resolve_path(cfg.benchmark.report, root)
        report = json.loads(out.read_text())
        print(json.dumps(report, indent=2) if args.json else f"{format_report(report)}\n  report: {out}")
        return 0
    out = root / (args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not args.json:
        print(f"  report: {out}")
    return 0


def _portrait_pair(args, mode: str) -> list[tuple[Path, Path]] | None:
    """--reference with --voice as the one (portrait, voice) pair of a bench; None (the bench's defaults) without."""
    if not (args.reference or args.voice):
        return None
    if not (args.reference and args.voice):
        raise ConfigError(f"{mode}: give --reference and --voice together")
    for flag, path in (("--reference", args.reference), ("--voice", args.voice)):
        if not Path(path).is_file():
            raise ConfigError(f"{mode}: {flag} {path}: file not found")
    return [(Path(args.reference), Path(args.voice))]


def _generate(args, cfg, root: Path) -> int:
    from tasks.common.media import MediaError
    from tasks.inference.generate import format_summary, generate

    try:
        summary = generate(cfg, root, Path(args.reference), Path(args.audio), Path(args.out),
                           listen_to=Path(args.listen_to) if args.listen_to else None, checkpoint=args.checkpoint,
                           seconds=args.seconds, crop=args.crop, actions=args.actions,
                           action_s=args.action_seconds)  # fmt: skip
    except MediaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.measure:
        from tasks.inference.generate import measure

        m = measure(cfg, args.out, args.audio, args.seconds)
        face = "n/a" if m["face_rate"] is None else f"{100 * m['face_rate']:.0f}%"
        corr = "n/a (no mouth found)" if m["lip_corr"] is None else f"{m['lip_corr']:.2f} at lag {m['lip_lag']}"
        if m["lip_corr"] is not None and m["lip_corr_null"] is not None:
            corr += f" (chance level, the voice reversed: {m['lip_corr_null']:.2f})"
        print(f"  measured:   face found in {face} of frames; mouth opening vs voice envelope r = {corr}")
        if summary["requests"]:
            from tasks.inference.generate import measure_actions

            f = measure_actions(args.out, summary["requests"], cfg.video.fps)
            per = ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(f["per_action"].items()))
            false = "n/a" if f["false_per_min"] is None else f"{f['false_per_min']:.1f}"
            print(f"  actions:    {f['followed']} of {f['requested']} requested actions detected within 1 s ({per}); "
                  f"false actions per idle minute {false}")
    return 0


def _live(args, cfg, root: Path) -> int:
    from live.server import serve

    sets = {"host": args.host, "port": args.port, "checkpoint": args.checkpoint, "max_sessions": args.max_sessions}
    extra = [f"live.{k}={v}" for k, v in sets.items() if v is not None]
    if extra:
        cfg = load_config(args.config, [*args.sets, *extra], root=root)
    serve(cfg, root, ready_file=Path(args.ready_file) if args.ready_file else None)
    return 0


def _live_client(args) -> int:
    from live.client import LiveClientError, format_summary, run_client
    from tasks.common.media import MediaError

    try:
        summary = run_client(args.server, Path(args.reference), Path(args.audio), Path(args.out),
                             listen_to=Path(args.listen_to) if args.listen_to else None, token=args.token,
                             pace=not args.no_pace, seconds=args.seconds)  # fmt: skip
    except (LiveClientError, MediaError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
