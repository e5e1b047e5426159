"""`streamavatar`: the project's command line. Every stage is a subcommand (what dvc.yaml's cmds call);
`pipeline` runs the Prefect flow `full-pipeline`; `config` prints the validated configuration."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import flows  # noqa: F401  (sets PREFECT_HOME and telemetry before anything imports prefect)
from tasks.config import ConfigError, load_config, project_root, to_yaml
from tasks.registry import ORDER, STAGES


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML merged over params.yaml; repeat to merge several, in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one value, e.g. --set corpus.num_conversations=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamavatar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ORDER:
        p = sub.add_parser(name, help=STAGES[name].help)
        _config_args(p)
    p = sub.add_parser("pipeline", help="run the Prefect flow full-pipeline (embedded Prefect, no server needed)")
    _config_args(p)
    p.add_argument("--stages", default="", help=f"comma-separated subset of: {','.join(ORDER)}")
    p.add_argument("--force", action="store_true", help="run stages even when DVC says they are up to date")
    p = sub.add_parser("config", help="print the effective, validated configuration")
    _config_args(p)
    sub.add_parser("stages", help="list the stages in pipeline order")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = project_root()
    try:
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
        from tasks.runner import run_stage

        outcome = run_stage(args.command, cfg, root)
        print(outcome.summary)
        for item, reason in outcome.failures.items():
            print(f"  failed: {item}: {reason}", file=sys.stderr)
        return 0 if outcome.metrics.get("clips_ok", 1) or not outcome.failures else 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _pipeline(args, root: Path) -> int:
    from flows.full_pipeline import full_pipeline

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] or None
    result = full_pipeline(configs=args.config, sets=args.sets, root=str(root), stages=stages, force=args.force)
    print("\nfull-pipeline finished")
    for name, outcome in result["stages"].items():
        print(f"  {name:10s} {outcome['status']:10s} {outcome['summary']}")
        if outcome["dvc"]:
            print(f"  {'':10s} dvc: {outcome['dvc']}")
    print(f"  MLflow run {result['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
