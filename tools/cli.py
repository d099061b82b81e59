"""`homefeed`: the command line. Subcommands import their stage lazily (feast alone costs
seconds), so `homefeed --help` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from contract.paths import Paths
from tools.pages import page_facts, print_feed, table
from training.memory import MemoryEstimateError

# the stage names, repeated here so `homefeed --help` does not import the training stack
_STAGES = ("retrieval", "rankers", "compile", "evaluate", "register")
# likewise the services (tools.mesh.SERVICES and CONTROLLER), so --help imports no grpc
_SERVICES = ("retrieval", "features", "ranking", "gateway", "rollout")
_T = TypeVar("_T")
_U = TypeVar("_U")


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
    from training.stages import ingest_stage, read_meta

    paths = Paths.from_env()
    quiet_days, closed = tuple(args.quiet_day), tuple(args.closed_weekday)
    tolerance = args.volume_tolerance
    if args.base is not None:
        if args.source != "eventlog":
            raise ValueError(f"--base applies to the eventlog source only, not {args.source!r}")
        if args.base == args.dataset:
            raise ValueError(
                f"--base and --dataset are both {args.base!r}: the log's rows go to a new "
                "dataset and the base stays as it is; name another --dataset"
            )
        # the base's rows are validated again with the log's: its declared quiet days,
        # closed weekdays and tolerance still hold for them
        base = read_meta(paths, args.base)
        quiet_days = (*base.get("quiet_days", ()), *quiet_days)
        closed = (*base.get("closed_weekdays", ()), *closed)
        if tolerance is None:
            tolerance = base.get("volume_tolerance")
    summary = ingest_stage(
        paths,
        args.source,
        args.dataset,
        args.path,
        quiet_days,
        max_categories=args.max_categories,
        closed_weekdays=closed,
        volume_tolerance=tolerance,
        default_margin=args.default_margin,
        content_from_text=args.content_from_text,
        base=args.base,
    )
    _print(summary)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from training.stages import load_raw, read_meta, validate

    paths = Paths.from_env()
    meta = read_meta(paths, args.dataset)
    summary = validate(
        load_raw(paths, args.dataset),
        meta,
        quiet_days=tuple(args.quiet_day),
        closed_weekdays=tuple(args.closed_weekday),
        volume_tolerance=args.volume_tolerance,
    )
    _print(summary)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from training.stages import features_stage

    steps = ("build", "apply", "materialize") if args.step == "all" else (args.step,)
    _print(features_stage(Paths.from_env(), args.dataset, steps, args.online, args.redis))
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from training.stages import dataset_stage

    kw: dict[str, Any] = {"label": args.label}
    if args.negative_rate is not None:
        kw["negative_rate"] = args.negative_rate
    if args.join_chunk_rows is not None:
        kw["join_chunk_rows"] = args.join_chunk_rows
    if args.eval_max_rows is not None:
        kw["eval_max_rows"] = args.eval_max_rows
    if args.label_window_days is not None:
        kw["label_window_days"] = args.label_window_days
    if args.split_ratio is not None:
        kw["split_ratio"] = args.split_ratio
    dates = (args.train_end, args.valid_end, args.test_end)
    if any(dates):
        kw["split_dates"] = dates
    manifest = dataset_stage(Paths.from_env(), args.dataset, **kw)
    manifest.pop("features", None)
    _print(manifest)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import STAGES, TrainConfig, train

    cfg = TrainConfig(
        seed=args.seed,
        eval_requests=args.eval_requests,
        ope_requests=args.ope_requests,
        ranker_trials=args.trials,
        ranker_seconds=args.seconds,
        two_stage=not args.one_stage,
        **({} if args.evidence_kappa is None else {"evidence_kappa": args.evidence_kappa}),
        **(
            {}
            if args.retrieval_value_weight is None
            else {"retrieval_value_weight": args.retrieval_value_weight}
        ),
    )
    stages = tuple(args.stage) if args.stage else STAGES
    _print(train(Paths.from_env(), args.dataset, stages, cfg))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    run_demo(
        Paths.from_env(), args.preset, train_models=not args.no_train, real_data=not args.no_real
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Become ``python -m services.<name>``: the service owns the process (signals, exit
    status, logging) exactly as it does under a supervisor."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", f"services.{args.service}"])
    return 1  # not reached: execv replaces the process or raises


def cmd_up(args: argparse.Namespace) -> int:
    """Start the mesh under a detached supervisor (``python -m tools.mesh supervise``) that
    restarts a service that exits, and return once every service answers SERVING."""
    import subprocess

    from tools.mesh import Mesh, MeshError, pid_alive, run_dir, tail

    home = Paths.from_env().home
    try:
        running = Mesh.from_state(home)
    except MeshError as err:
        print(f"homefeed up: {err}", file=sys.stderr)
        return 1
    if running is not None:
        print(
            f"homefeed up: a mesh is already running under {home}; stop it with `homefeed down`",
            file=sys.stderr,
        )
        return 1
    print(
        f"starting the mesh under {home} (dataset {args.dataset}, model {args.model}) ...",
        file=sys.stderr,
        flush=True,
    )
    log_path = run_dir(home) / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "tools.mesh", "supervise", "--home", str(home),
        "--dataset", args.dataset, "--model", args.model,
        "--startup-timeout", str(args.timeout),
    ]  # fmt: skip
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command
        )
    deadline = time.monotonic() + 2 * args.timeout + 30
    mesh = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"homefeed up: the mesh did not start:\n{tail(log_path)}", file=sys.stderr)
            return 1
        try:
            mesh = Mesh.from_state(home)
        except MeshError:
            mesh = None
        if mesh is not None and mesh.supervisor_pid == proc.pid and mesh.status == "running":
            break
        time.sleep(0.1)
    else:
        if pid_alive(proc.pid):
            proc.terminate()
        print(f"homefeed up: not running after {args.timeout:g} s; see {log_path}", file=sys.stderr)
        return 1
    assert mesh is not None
    rows = [("service", "address", "pid", "log")]
    rows += [
        (name, info.address or "-", str(info.pid), str(info.log))
        for name, info in mesh.services.items()
    ]
    print(table(rows, align="<<><"))
    print(f"\nadmin token: {mesh.admin_token_file}\nstate: {mesh.state_file}")
    print("try: homefeed feed --user 1    stop: homefeed down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from tools.mesh import Mesh, MeshError

    home = Paths.from_env().home
    try:
        mesh = Mesh.from_state(home)
        if mesh is None:
            print(f"no mesh is running under {home}")
            return 0
        pids = sorted(mesh.pids.items(), key=lambda item: item[0] != "gateway")  # stop order
        mesh.stop(timeout=args.timeout)
    except MeshError as err:
        print(f"homefeed down: {err}", file=sys.stderr)
        return 1
    print("stopped " + ", ".join(f"{name} (pid {pid})" for name, pid in pids))
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    import grpc
    from homefeed.common.v1 import common_pb2
    from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

    address = args.addr or _gateway_address()
    request = feed_pb2.GetFeedRequest(
        user_id=args.user,
        surface=common_pb2.SURFACE_CHECKOUT
        if args.surface == "checkout"
        else common_pb2.SURFACE_HOME,
        cart_item_ids=args.cart,
        page_size=args.page_size,
        context=common_pb2.RequestContext(country=args.country, device=args.device),
    )
    with grpc.insecure_channel(address) as channel:
        stub = feed_pb2_grpc.FeedServiceStub(channel)
        start = time.perf_counter()
        try:
            response = stub.GetFeed(request, timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"homefeed feed: {err.code().name}: {err.details()}", file=sys.stderr)
            return 2
        round_trip_ms = (time.perf_counter() - start) * 1000.0
    if args.json:
        from google.protobuf.json_format import MessageToDict

        page = MessageToDict(
            response,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
        _print({**page, "round_trip_ms": round(round_trip_ms, 3)})
    else:
        paths = Paths.from_env()
        facts = page_facts(
            paths.raw(args.dataset), paths.features(args.dataset), args.user, response.item_ids
        )
        print_feed(response, round_trip_ms, facts=facts)
        if facts is None:
            print(f"(no tables of dataset {args.dataset!r} here: item facts not shown)")
    return 0


def _gateway_address() -> str:
    from tools.mesh import running_mesh

    home = Paths.from_env().home
    mesh = running_mesh(home, "pass --addr host:port")
    address = mesh.addresses.get("gateway")
    if address is None:
        raise ValueError(f"the mesh under {home} has no listening gateway yet (still starting?)")
    return address


def _item_ids(text: str) -> list[int]:
    """``--cart 1,2,3`` -> [1, 2, 3]; argparse turns the error into exit status 2."""
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        return []
    try:
        ids = [int(part) for part in parts]
    except ValueError:
        ids = []
    if len(ids) != len(parts) or not all(-(2**63) <= i < 2**63 for i in ids):
        raise argparse.ArgumentTypeError(
            f"expects comma-separated 64-bit integer item ids such as 1,2,3, got {text!r}"
        )
    return ids


def _int64(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an integer id, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expects a 64-bit integer id, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}")
    return value


def _utc_date(text: str) -> str:
    """``--train-end 2019-11-28``: a calendar date, kept as text for the manifest."""
    from datetime import date

    try:
        return date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a UTC date YYYY-MM-DD, got {text!r}") from None


def _split_ratio(text: str) -> tuple[float, float, float]:
    """``--split-ratio 80,10,10`` -> (80.0, 10.0, 10.0)."""
    try:
        parts = tuple(float(part) for part in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(part > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            f"expects three positive numbers train,valid,test such as 60,7,7, got {text!r}"
        )
    return parts[0], parts[1], parts[2]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expects a positive number of seconds, got {text!r}")
    return value


def _quiet_day(text: str) -> str:
    from training.validate import parse_quiet_day

    return _checked(parse_quiet_day, text)


def _weekday(text: str) -> str:
    from training.validate import parse_weekday

    return _checked(parse_weekday, text)


def _volume_tolerance(text: str) -> float:
    from training.validate import check_volume_tolerance

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a factor > 1 such as 3, got {text!r}") from None
    return _checked(check_volume_tolerance, value)


def _checked(parse: Callable[[_T], _U], value: _T) -> _U:
    """``parse(value)``, its ValueError message as argparse's (exit status 2)."""
    try:
        return parse(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _volume_arguments(p: argparse.ArgumentParser, ingest: bool) -> None:
    """The volume check's options (training/validate.py), each checked as it is parsed,
    before any data is read. ``ingest`` stores them in the dataset; ``validate`` adds to
    (the tolerance: replaces) the stored ones for one run."""
    stored = "stored with the dataset" if ingest else "added to those stored at ingest"
    p.add_argument(
        "--quiet-day",
        action="append",
        default=[],
        type=_quiet_day,
        metavar="DAY[..DAY]",
        help="a UTC day (YYYY-MM-DD) or inclusive range (2011-12-23..2012-01-03) known to be "
        f"unusual (holiday, explained outage): the volume check skips it; repeatable; {stored}",
    )
    p.add_argument(
        "--closed-weekday",
        action="append",
        default=[],
        type=_weekday,
        metavar="mon..sun",
        help="a (UTC) weekday the shop is closed every week: the volume check skips it; "
        f"repeatable; {stored}",
    )
    p.add_argument(
        "--volume-tolerance",
        type=_volume_tolerance,
        metavar="FACTOR",
        help="flag a day under 1/FACTOR or over FACTOR times both its same-weekday and its "
        "rolling median (default 3; docs/data-schema.md); "
        + ("stored with the dataset" if ingest else "replaces the one stored at ingest"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homefeed", description="Personalized feed ranking for a two-sided marketplace."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a marketplace preset into data/sim-<preset>/")
    p.add_argument(
        "--preset",
        default="small",
        help="tiny | small | small-feed-only | small-explore | medium | large | position",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a simulator setting (see training/configs/simulate.yaml)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ingest", help="bring real event logs in (docs/data-schema.md)")
    p.add_argument(
        "--source",
        required=True,
        choices=["generic", "completejourney", "open-bandit", "eventlog"],
    )
    p.add_argument(
        "--path",
        help="folder of <table>.csv|parquet (generic source); event log directory or redis:// "
        "URL (eventlog source; default data/<base>/eventlog)",
    )
    p.add_argument("--dataset", required=True, help="name of the folder under data/")
    p.add_argument(
        "--base",
        metavar="DATASET",
        help="eventlog source: the dataset whose sellers, items and users the log refers to "
        "and whose events are kept; the log's rows are appended (docs/data-schema.md)",
    )
    _volume_arguments(p, ingest=True)
    p.add_argument(
        "--max-categories",
        type=int,
        metavar="N",
        help="keep the N-1 most engaged categories and merge the rest into one (memory "
        "grows with users x categories x days; docs/data-schema.md)",
    )
    p.add_argument(
        "--default-margin",
        type=float,
        metavar="FRACTION",
        help="generic source: the margin of items whose log has none, in [0, 1] (default "
        "0.15; a margin equal for all items does not change the ranking)",
    )
    p.add_argument(
        "--content-from-text",
        metavar="COLUMN",
        help="generic source: build the items' content vectors from this text column of "
        "items (product titles): tf-idf of hashed word and character n-grams, truncated SVD "
        "(docs/data-schema.md)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate", help="check a dataset's tables against the declared schemas")
    p.add_argument("--dataset", default="sim-small")
    _volume_arguments(p, ingest=False)
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
    p.add_argument(
        "--join-chunk-rows",
        type=int,
        metavar="N",
        help="entity rows per Feast point-in-time join (default 250,000; ~4.8 KB each while "
        "joined): fewer to fit a smaller machine, at more joins",
    )
    p.add_argument(
        "--eval-max-rows",
        type=int,
        metavar="N",
        help="valid and test keep every feed up to N rows each (default 2,000,000); past it, "
        "a uniform sample of whole requests (the share kept is in the manifest)",
    )
    p.add_argument(
        "--label",
        choices=["purchase", "add_to_cart", "click"],
        default="purchase",
        help="the outcome the rankers learn (default purchase); with click or add_to_cart "
        "the served score is an expected clicked / carted value, not GMV (docs/models.md)",
    )
    p.add_argument(
        "--label-window-days",
        type=_positive_int,
        metavar="N",
        help="days after an impression its outcome may come in; the last N days of the data "
        "are dropped (default: 7 for purchase, 1 for click and add_to_cart)",
    )
    split = p.add_argument_group(
        "split", "by end dates (exclusive, UTC) or by a ratio of days, not both"
    )
    for option, what in (
        ("--train-end", "first day of the validation period"),
        ("--valid-end", "first day of the test period"),
        ("--test-end", "day after the test period (default: the last the label window allows)"),
    ):
        split.add_argument(option, type=_utc_date, metavar="YYYY-MM-DD", help=what)
    split.add_argument(
        "--split-ratio",
        type=_split_ratio,
        metavar="A,B,C",
        help="train, valid and test days in this ratio (default 60,7,7)",
    )
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
    p.add_argument(
        "--one-stage",
        action="store_true",
        help="one purchase model, not p(click) x p(purchase | click) (the default where the "
        "log has clicks; docs/models.md); takes effect from the rankers stage",
    )
    p.add_argument(
        "--evidence-kappa",
        type=float,
        default=None,
        help="the served E[GMV] times n/(n+kappa), n the item's logged impressions "
        "(0: off; default contract.scorer.EVIDENCE_KAPPA); takes effect from the rankers stage",
    )
    p.add_argument(
        "--retrieval-value-weight",
        type=float,
        default=None,
        help="value-aware retrieval: the index scores the tower's taste + w x log(price x "
        "margin) (0: taste alone; default contract.tower.VALUE_WEIGHT); takes effect from the "
        "retrieval stage",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=1800.0,
        help="wall-clock safety net per ranker's search (s): the budget is --trials, so the "
        "same seed gives the same model on any machine; reported when it fires",
    )
    p.add_argument(
        "--eval-requests", type=int, default=1000, help="test-period requests the Oracle scores"
    )
    p.add_argument(
        "--ope-requests",
        type=int,
        default=2000,
        help="heuristic-logged test requests the ranker's off-policy estimates read (0: none)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="simulate -> validate -> features -> training sets -> train")
    p.add_argument("--preset", default="small")
    p.add_argument("--no-train", action="store_true", help="stop after the training sets")
    p.add_argument(
        "--no-real", action="store_true", help="skip the Complete Journey evaluation (~3 min)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "serve", help="run one service in the foreground (python -m services.<name>)"
    )
    p.add_argument("service", choices=list(_SERVICES))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "up",
        help="start the local mesh (four services) in the background, under a supervisor "
        "that restarts a service that exits",
    )
    p.add_argument(
        "--dataset",
        default=os.environ.get("HOMEFEED_DATASET") or "sim-small",
        help="dataset the services read (default: $HOMEFEED_DATASET or sim-small)",
    )
    p.add_argument("--model", default="champion", help="registry alias or version to serve")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        help="seconds each start phase may take (default 120)",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the local mesh started by `homefeed up`")
    p.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="seconds to drain before SIGKILL"
    )
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("feed", help="ask the gateway for one page and print it")
    p.add_argument("--user", type=_int64, required=True, help="buyer id (unknown: cold start)")
    p.add_argument("--surface", choices=["home", "checkout"], default="home")
    p.add_argument(
        "--cart", type=_item_ids, default=[], metavar="ID,ID,...", help="item ids in the cart"
    )
    p.add_argument("--page-size", type=_positive_int, default=20)
    p.add_argument("--country", default="", help="ISO 3166-1 alpha-2, e.g. US")
    p.add_argument("--device", default="", help="ios | android | web")
    p.add_argument("--addr", help="gateway host:port (default: the running mesh's)")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument(
        "--dataset",
        default=os.environ.get("HOMEFEED_DATASET", "sim-small"),
        help="the dataset whose tables give each item's category, price and seller and the "
        "buyer's top categories (default $HOMEFEED_DATASET or sim-small)",
    )
    p.set_defaults(func=cmd_feed)
    _rollout_parser(sub)
    _online_parsers(sub)
    return parser


def _online_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "traffic",
        help="simulated buyers through the running gateway for N simulated days (events back "
        "through LogEvents) -> reports/traffic.json",
    )
    p.add_argument("--dataset", default="sim-small", help="a simulated dataset")
    p.add_argument("--days", type=_positive_float, default=1.0, help="simulated days to play")
    p.add_argument("--users", type=_positive_int, help="play this many sampled users (all)")
    p.add_argument("--threads", type=_positive_int, default=4, help="sessions at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--addr", help="gateway host:port (default: the running mesh's)")
    p.add_argument("--events-addr", help="LogEvents host:port (default: the mesh's features)")
    p.set_defaults(func=cmd_traffic)

    p = sub.add_parser("experiment", help="A/B experiments on the event log")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "analyze",
        help="lifts with and without CUPED, SRM, A/A, power, guardrails -> "
        "reports/experiment.{json,md,png}",
    )
    a.add_argument("--dataset", default="sim-small")
    a.add_argument("--log", help="event log directory or redis:// URL (default: the online loop's)")
    a.add_argument(
        "--experiment",
        help="the experiment's JSON/YAML file (default: the one `homefeed online` ran)",
    )
    a.add_argument("--aa-splits", type=_positive_int, default=400)
    a.add_argument("--pre-days", type=_positive_float, default=30.0)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "monitor",
        help="drift, score drift, freshness and calibration of the serving window in the "
        "event log -> reports/monitor.{json,md,png}",
    )
    p.add_argument("--dataset", default="sim-small")
    p.add_argument("--log", help="event log directory or redis:// URL (the online loop's)")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser(
        "online",
        help="the online loop: the mesh with a ranker-vs-heuristic experiment, simulated "
        "traffic, analysis -> reports/experiment.json",
    )
    p.add_argument("--dataset", default="sim-small")
    p.add_argument("--days", type=_positive_float, default=3.0)
    p.add_argument("--users", type=_positive_int, help="play this many sampled users (all)")
    p.add_argument("--threads", type=_positive_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="registry version to serve (default: the dataset's newest)")
    p.set_defaults(func=cmd_online)


def cmd_monitor(args: argparse.Namespace) -> int:
    from tools.monitor import run_monitor
    from tools.online import serving_version

    paths = Paths.from_env()
    location = args.log or str(paths.data / args.dataset / "online" / "eventlog")
    _, bundle = serving_version(paths, args.dataset)
    result = run_monitor(paths, args.dataset, location, bundle)
    flags = result["flags"]
    print(f"{len(flags)} flag(s)" + (":" if flags else ""))
    for flag in flags:
        print(f"  {flag['kind']:<12} {flag['name']:<28} {flag['value']} > {flag['threshold']}")
    print("report: reports/monitor.md")
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    from tools.traffic import TrafficConfig, iter_rows, run_traffic

    paths = Paths.from_env()
    gateway = args.addr or _gateway_address()
    events = args.events_addr or _mesh_address("features")
    cfg = TrafficConfig(days=args.days, threads=args.threads, seed=args.seed, users=args.users)
    summary = run_traffic(paths, args.dataset, gateway, events, cfg)
    print(table(list(iter_rows(summary)), align="<>>>>>>"))
    print(
        f"\n{summary['feeds']} feeds in {summary['seconds']:.1f} s: "
        f"{summary['feeds_per_s']:.1f} feeds/s, "
        f"{summary['simulated_days_per_minute']:.2f} simulated days/min; "
        f"{summary['events_sent']} events sent, {summary['feed_errors']} feed errors"
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from tools.online import analyze, eval_report_of, serving_version

    paths = Paths.from_env()
    location = args.log or str(paths.data / args.dataset / "online" / "eventlog")
    exp_file = Path(args.experiment) if args.experiment else paths.home / "run" / "experiment.json"
    if not exp_file.exists():
        raise FileNotFoundError(f"no experiment file at {exp_file}: pass --experiment")
    import yaml

    experiment = yaml.safe_load(exp_file.read_text())
    traffic_file = paths.reports / "traffic.json"
    traffic = json.loads(traffic_file.read_text()) if traffic_file.exists() else None
    try:
        eval_report = eval_report_of(serving_version(paths, args.dataset)[1])
    except Exception:  # no registry: the offline comparison is left out
        eval_report = None
    result = analyze(
        paths,
        args.dataset,
        location,
        experiment,
        eval_report=eval_report,
        traffic=traffic,
        pre_days=args.pre_days,
        aa_splits=args.aa_splits,
    )
    _print_experiment(result)
    return 0


def cmd_online(args: argparse.Namespace) -> int:
    from tools.online import OnlineConfig, run_online

    cfg = OnlineConfig(
        dataset=args.dataset,
        days=args.days,
        threads=args.threads,
        seed=args.seed,
        users=args.users,
        model=args.model,
    )
    result = run_online(Paths.from_env(), cfg)
    _print_experiment(result)
    return 0


def _print_experiment(result: dict[str, Any]) -> None:
    lift = result["lift"]["gmv_per_user"]
    rows = [("arm", "users", "sessions", "GMV/user", "conversion")]
    for arm, s in result["arms"].items():
        rows.append(
            (arm, str(s["users"]), str(s["sessions"]), f"{s['gmv_per_user']:.3f}",
             f"{s['conversion']:.4f}")
        )  # fmt: skip
    print(table(rows, align="<>>>>"))
    print(
        f"\nGMV/user lift {lift['estimate']:+.3f} [{lift['ci_low']:+.3f}, {lift['ci_high']:+.3f}]"
        f", CUPED {lift.get('cuped_estimate', float('nan')):+.3f} "
        f"[{lift.get('cuped_ci_low', float('nan')):+.3f}, "
        f"{lift.get('cuped_ci_high', float('nan')):+.3f}]; "
        f"SRM p = {result['srm_p_value']:.3g}; "
        f"A/A false positives {result['aa']['false_positive_rate']:.3f}"
    )
    for key in ("offline_expected_lift", "oracle_true_lift"):
        value = result.get(key)
        print(f"{key}: {'-' if value is None else f'{value:+.1%}'}")
    print("report: reports/experiment.md")


def _mesh_address(name: str) -> str:
    from tools.mesh import running_mesh

    home = Paths.from_env().home
    mesh = running_mesh(home, f"pass the {name} address")
    address = mesh.addresses.get(name)
    if address is None:
        raise ValueError(f"the mesh under {home} has no listening {name} yet (still starting?)")
    return address


def _rollout_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rollout",
        help="canary releases of a ranking model: start, status, abort, undo, history, report",
    )
    p.add_argument("--addr", help="the controller's admin host:port (default: the local mesh's)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("start", help="start a canary release of a registry version")
    a.add_argument("--version", required=True, type=_positive_int, help="registry version")
    a.add_argument("--steps", help="canary weights in percent, e.g. 5,25,50,100")
    a.add_argument("--interval", type=_positive_float, help="seconds per analysis window")
    a.add_argument("--threshold", type=_positive_int, help="failed checks that roll back")
    a.add_argument("--mirror-share", type=float, help="share of stable requests mirrored (0..1)")
    a.add_argument("--min-feeds", type=_positive_int, help="feeds per arm for a window to count")
    a.add_argument("--wait", action="store_true", help="wait until promoted or rolled back")
    a.add_argument("--wait-timeout", type=_positive_float, default=3600.0)
    a = actions.add_parser("status", help="the current (or last) rollout")
    a.add_argument("--json", action="store_true", help="everything, with every window")
    a = actions.add_parser("abort", help="stop the rollout in progress: weight 0")
    a.add_argument("--reason", default="")
    a = actions.add_parser("undo", help="roll back the last promotion (alias back, stable reloads)")
    a.add_argument("--reason", default="")
    a = actions.add_parser("history", help="past rollouts, newest first")
    a.add_argument("--limit", type=int, default=0)
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("report", help="write reports/rollout.md and a PNG timeline")
    a.add_argument("--id", help="rollout id (default: the latest)")
    a.add_argument("--out", default=str(Paths.from_env().home / "reports"))
    p.set_defaults(func=cmd_rollout)


def cmd_rollout(args: argparse.Namespace) -> int:
    from tools.rollout import run

    return run(args)


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
    except MemoryEstimateError as exc:  # refused before allocating: the estimate and remedy
        print(f"homefeed {args.command}: {exc}", file=sys.stderr)
        return 3


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
