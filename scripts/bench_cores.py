"""The services' own work per request, in one process on warm caches, without gRPC.

``python scripts/bench_cores.py`` (after ``make demo``) loads the champion bundle and the
dataset's Feast store as the services do and times, over a pool of realistic requests
(known users, 500 candidates):

- retrieval: ``RetrievalServicer.Retrieve`` (the one read of the user, the tower, ScaNN,
  candidate assembly, the response) and its parts;
- features: ``FeaturesServicer.GetFeatures`` with the user's features in the request;
- ranking: ``RankingServicer.Rank`` on that matrix, and the compiled predict alone;
- the packed-field codec against ``extend(a.tolist())``.

``--gap-ms 8`` pauses (untimed) before each call, as a service of the mesh at concurrency 1
waits ~8 ms for the other hops between two of its own calls; on this project's 2-vCPU
machines the same call then costs 1.5-2.5x the CPU it costs back to back
(``docs/serving.md``).

Medians and p99s of process CPU per call go to ``reports/cores.json`` and a table. What the
mesh adds on top (gRPC, thread hand-offs, the pauses between a hop's calls) is what
``make bench`` measures against its floor.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2
from homefeed.ranking.v1 import ranking_pb2
from homefeed.retrieval.v1 import retrieval_pb2

from contract.paths import Paths

GAP_MS = 0.0  # untimed pause before each timed call (``--gap-ms``)
GAP_SPIN = False  # the pause spent running Python instead of sleeping (``--gap spin``)


def _gap() -> None:
    if GAP_MS <= 0:
        return
    if not GAP_SPIN:
        time.sleep(GAP_MS / 1e3)
        return
    until = time.perf_counter() + GAP_MS / 1e3
    while time.perf_counter() < until:
        pass


def timed(fn: Callable[[int], object], n: int, warmup: int = 50) -> dict[str, float]:
    for i in range(warmup):
        fn(i)
    ms = np.empty(n)
    for i in range(n):
        _gap()
        start = time.process_time()
        fn(i)
        ms[i] = (time.process_time() - start) * 1e3
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="sim-small")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="an untimed pause before each timed call, as a service in the mesh waits for "
        "the other hops between two of its calls (0: back to back)",
    )
    parser.add_argument(
        "--gap",
        choices=("sleep", "spin"),
        default="sleep",
        help="spend the pause asleep or running a Python loop",
    )
    args = parser.parse_args(argv)
    global GAP_MS, GAP_SPIN
    GAP_MS, GAP_SPIN = args.gap_ms, args.gap == "spin"
    paths = Paths.from_env()

    from services.common.matrix import extend_packed
    from services.common.settings import ServerSettings
    from services.common.users import to_proto
    from services.features.assembler import Assembler
    from services.features.server import load_item_store
    from services.features.servicer import FeaturesServicer
    from services.features.settings import FeaturesSettings
    from services.ranking.server import load_model
    from services.ranking.servicer import RankingServicer
    from services.ranking.settings import RankingSettings
    from services.retrieval.server import load_index, open_online
    from services.retrieval.servicer import RetrievalServicer
    from services.retrieval.settings import RetrievalSettings

    server = ServerSettings()
    retrieval_settings = RetrievalSettings(server=server, home=paths.home, dataset=args.dataset)
    index = load_index(retrieval_settings)
    users, stock = open_online(retrieval_settings, index)
    index.stock = stock.in_stock
    retrieval = RetrievalServicer(index, users)
    items, feature_users, version, _store = load_item_store(
        FeaturesSettings(server=server, home=paths.home, dataset=args.dataset)
    )
    features = FeaturesServicer(Assembler(items, feature_users), version)
    ranking = RankingServicer(load_model(RankingSettings(server=server, home=paths.home)))

    rng = np.random.default_rng(0)
    known = index.history.user_ids if index.history is not None else np.arange(1000)
    user_ids = rng.choice(known, size=200)
    context = common_pb2.RequestContext(country="US", device="ios")
    retrieve = [
        retrieval_pb2.RetrieveRequest(
            request_id=f"r{i}",
            user_id=int(u),
            n=500,
            surface=common_pb2.SURFACE_HOME,
            context=context,
            include_user_features=True,
        )
        for i, u in enumerate(user_ids)
    ]
    answers = [retrieval.Retrieve(r, None) for r in retrieve]
    get = [
        features_pb2.GetFeaturesRequest(
            request_id=r.request_id,
            user_id=r.user_id,
            item_ids=a.item_ids,
            surface=common_pb2.SURFACE_HOME,
            user=a.user,
        )
        for r, a in zip(retrieve, answers, strict=True)
    ]
    matrices = [features.GetFeatures(g, None) for g in get]
    rank = [
        ranking_pb2.RankRequest(
            request_id=g.request_id,
            user_id=g.user_id,
            item_ids=g.item_ids,
            features=m.features,
            values=m.values,
        )
        for g, m in zip(get, matrices, strict=True)
    ]
    X = np.array(rank[0].features.values, dtype=np.float32).reshape(rank[0].features.rows, -1)
    model = ranking.holder.current()
    k = len(retrieve)
    n = args.calls
    empty = np.empty(0, dtype=np.int64)
    floats = rng.random(500).astype(np.float32)

    def read(i: int) -> Any:
        return retrieval.read_user(int(user_ids[i % k]))

    rows = [read(i)[1] for i in range(k)]
    figures: dict[str, dict[str, float]] = {
        "retrieval.Retrieve": timed(
            lambda i: retrieval.Retrieve(retrieve[i % k], None).SerializeToString(),
            n,
        ),
        "retrieval.read_user": timed(read, n),
        "retrieval.user_vector": timed(
            lambda i: index.user_vector(rows[i % k]) if rows[i % k] is not None else None, n
        ),
        "retrieval.retrieve (candidates)": timed(
            lambda i: index.retrieve(
                rows[i % k],
                500,
                empty,
                "HOME",
                empty,
                "US",
                "ios",
                retrieval.rng(f"r{i}"),
                user_id=int(user_ids[i % k]),
            ),
            n,
        ),
        "retrieval.user proto": timed(lambda i: to_proto(read(i)[0]), n),
        "features.GetFeatures (user in the request)": timed(
            lambda i: features.GetFeatures(get[i % k], None).SerializeToString(),
            n,
        ),
        "ranking.Rank": timed(
            lambda i: ranking.Rank(rank[i % k], None).SerializeToString(),
            n,
        ),
        "ranking.compiled predict (500 rows)": timed(lambda i: model.compiled.predict(X), n),
        "codec: 500 floats, extend(tolist())": timed(
            lambda i: retrieval_pb2.RetrieveResponse().scores.extend(floats.tolist()), n
        ),
        "codec: 500 floats, extend_packed": timed(
            lambda i: extend_packed(retrieval_pb2.RetrieveResponse(), "scores", floats), n
        ),
    }
    stock.close()
    items.close()
    out = args.out or paths.reports / "cores.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": args.dataset,
        "calls": n,
        "gap_ms": GAP_MS,
        "gap": args.gap,
        "cpu": figures,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"{'process CPU per call':<46}{'p50 ms':>9}{'p99 ms':>9}")
    for name, f in figures.items():
        print(f"{name:<46}{f['p50_ms']:>9.3f}{f['p99_ms']:>9.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
