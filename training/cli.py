"""`homefeed`: the command line. Subcommands import their stage lazily (feast alone costs
seconds), so `homefeed --help` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from training.paths import Paths

# the stage names, repeated here so `homefeed --help` does not import the training stack
_STAGES = ("retrieval", "rankers", "compile", "evaluate", "register")


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _print(summary: Any) -> None:
    print(json.dumps(summary, indent=2, default=str))


def cmd_simulate(args: argparse.Namespace) -> int:
    from training.stages import simulate_stage

    summary = simulate_stage(Paths.from_env(), args.preset, **_overrides(args.set))
    _print({"dataset": summary["dataset"], "rows": summary["rows"], "stats": summary["stats"]})
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from training.stages import ingest_stage

    summary = ingest_stage(
        Paths.from_env(), args.source, args.dataset, args.path, tuple(args.quiet_day)
    )
    _print(summary)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from training.stages import load_raw, read_meta, validate

    paths = Paths.from_env()
    _print(validate(load_raw(paths, args.dataset), read_meta(paths, args.dataset)))
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from training.stages import features_stage

    steps = ("build", "apply", "materialize") if args.step == "all" else (args.step,)
    _print(features_stage(Paths.from_env(), args.dataset, steps, args.online, args.redis))
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from training.stages import dataset_stage

    kw: dict[str, Any] = {}
    if args.negative_rate is not None:
        kw["negative_rate"] = args.negative_rate
    manifest = dataset_stage(Paths.from_env(), args.dataset, **kw)
    manifest.pop("features", None)
    _print(manifest)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import STAGES, TrainConfig, train

    cfg = TrainConfig(
        seed=args.seed,
        eval_requests=args.eval_requests,
        ranker_trials=args.trials,
        ranker_seconds=args.seconds,
    )
    stages = tuple(args.stage) if args.stage else STAGES
    _print(train(Paths.from_env(), args.dataset, stages, cfg))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    run_demo(
        Paths.from_env(), args.preset, train_models=not args.no_train, real_data=not args.no_real
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homefeed", description="Personalized feed ranking for a two-sided marketplace."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a marketplace preset into data/sim-<preset>/")
    p.add_argument("--preset", default="small", help="tiny | small | medium | position")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a simulator setting (see training/configs/simulate.yaml)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ingest", help="bring real event logs in (docs/data-schema.md)")
    p.add_argument("--source", required=True, choices=["generic", "completejourney", "open-bandit"])
    p.add_argument("--path", help="folder of <table>.csv|parquet (generic source)")
    p.add_argument("--dataset", required=True, help="name of the folder under data/")
    p.add_argument(
        "--quiet-day",
        action="append",
        default=[],
        metavar="YYYY-MM-DD",
        help="a UTC day known to be unusual (holiday, explained outage): the "
        "volume check skips it; repeatable",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate", help="check a dataset's tables against the declared schemas")
    p.add_argument("--dataset", default="sim-small")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("features", help="build feature tables, feast apply, materialize")
    p.add_argument("step", choices=["build", "apply", "materialize", "all"])
    p.add_argument("--dataset", default="sim-small")
    p.add_argument("--online", choices=["sqlite", "redis"], help="online store (default sqlite)")
    p.add_argument("--redis", help="host:port of the Redis online store")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("dataset", help="labelled, point-in-time correct training sets")
    p.add_argument("--dataset", default="sim-small")
    p.add_argument("--negative-rate", type=float, help="share of all-negative impressions kept")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("train", help="retrieval, rankers, compile, evaluate, register a bundle")
    p.add_argument("--dataset", default="sim-small")
    p.add_argument(
        "--stage",
        action="append",
        choices=list(_STAGES),
        help="run only this stage (repeatable; default: all, in order)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=8, help="Optuna trials per ranker")
    p.add_argument("--seconds", type=float, default=120.0, help="Optuna budget per ranker (s)")
    p.add_argument(
        "--eval-requests", type=int, default=1000, help="test-period requests the Oracle scores"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="simulate -> validate -> features -> training sets -> train")
    p.add_argument("--preset", default="small")
    p.add_argument("--no-train", action="store_true", help="stop after the training sets")
    p.add_argument(
        "--no-real", action="store_true", help="skip the Complete Journey evaluation (~3 min)"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("feast", "urllib3", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:  # bad input: say what, no traceback
        print(f"homefeed {args.command}: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry. DuckDB's bindings (Feast's offline store) print dozens of
    "nanobind: leaked" lines at interpreter teardown; once our output is flushed, leave
    without that teardown, with our exit code."""
    import os

    code = main()
    if "duckdb" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
