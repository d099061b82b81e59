"""The reference server: ``homefeed.feed.v1.FeedService`` in one process over
:class:`tools.reference.feed.ReferenceFeed` (the naive pipeline), so the benchmark can
drive it with the same requests as the gateway. ``python -m tools.reference`` runs
``main()``.

Settings (environment):

- ``HOMEFEED_HOME`` (default: the repo root): data, registry and model cache.
- ``HOMEFEED_REFERENCE_DATASET`` (else ``HOMEFEED_DATASET``, else ``sim-small``).
- ``HOMEFEED_REFERENCE_MODEL`` (``champion``): registry alias or version.
- ``HOMEFEED_REFERENCE_BUNDLE_DIR`` (unset): serve this bundle directory instead.
- ``HOMEFEED_REFERENCE_CACHE_DIR`` (``<home>/artifacts/model_cache``): registry downloads.
- ``HOMEFEED_REFERENCE_CANDIDATES`` (500): items retrieved and ranked per request.
- ``MLFLOW_TRACKING_URI`` (``sqlite:///<home>/mlruns/mlflow.db``).
- ``HOMEFEED_REFERENCE_{HOST,PORT,MAX_WORKERS,...}`` (``ServerSettings``); the pool is 4
  threads unless ``HOMEFEED_REFERENCE_MAX_WORKERS`` says otherwise.

Every response carries the trailing metadata ``hf-stage-ms`` in the gateway's format, so
the benchmark can show where the reference spends its time.
"""

# RPC methods carry the proto's names (GetFeed), as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1.health import HealthServicer
from homefeed.common.v1 import common_pb2
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

from contract import columns as C
from contract.bundle import ALIAS_CHAMPION, BundleError
from contract.paths import Paths
from contract.registry import default_tracking_uri
from services.common.errors import InvalidArgument, check_ids, check_range, check_surface
from services.common.server import Started, StartupError, build_server, run_service
from services.common.settings import ServerSettings, SettingsError, env_int, env_str
from tools.reference.feed import (
    DEFAULT_CANDIDATES,
    FeedRequest,
    ReferenceFeed,
    format_stage_ms,
)

log = logging.getLogger(__name__)

SERVICE = "reference"
SERVICE_NAME: str = feed_pb2.DESCRIPTOR.services_by_name["FeedService"].full_name
STAGE_METADATA_KEY = "hf-stage-ms"
MAX_PAGE_SIZE = 100
MAX_CART = 100
DEFAULT_MAX_WORKERS = 4
DEFAULT_DATASET = "sim-small"
_COUNTRY = re.compile(r"[A-Z]{2}")


@dataclass(frozen=True)
class ReferenceSettings:
    """Where the data and the bundle come from, and how the server listens."""

    server: ServerSettings
    home: Path
    dataset: str = DEFAULT_DATASET
    model: str = ALIAS_CHAMPION
    bundle_dir: Path | None = None
    cache_dir: Path | None = None
    tracking_uri: str | None = None
    candidates: int = DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        if not 1 <= self.candidates <= 100_000:
            raise SettingsError(
                f"HOMEFEED_REFERENCE_CANDIDATES must be 1..100000, got {self.candidates}"
            )

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    @property
    def model_cache(self) -> Path:
        return self.cache_dir or self.paths.artifacts / "model_cache"

    @classmethod
    def from_env(cls) -> ReferenceSettings:
        server = ServerSettings.from_env(SERVICE)
        if env_str("HOMEFEED_REFERENCE_MAX_WORKERS") is None:
            server = dataclasses.replace(server, max_workers=DEFAULT_MAX_WORKERS)
        bundle_dir = env_str("HOMEFEED_REFERENCE_BUNDLE_DIR")
        cache_dir = env_str("HOMEFEED_REFERENCE_CACHE_DIR")
        return cls(
            server=server,
            home=Paths.from_env().home,
            dataset=env_str(
                "HOMEFEED_REFERENCE_DATASET", env_str("HOMEFEED_DATASET", DEFAULT_DATASET)
            ),
            model=env_str("HOMEFEED_REFERENCE_MODEL", ALIAS_CHAMPION),
            bundle_dir=Path(bundle_dir).resolve() if bundle_dir else None,
            cache_dir=Path(cache_dir).resolve() if cache_dir else None,
            tracking_uri=env_str("MLFLOW_TRACKING_URI"),
            candidates=env_int("HOMEFEED_REFERENCE_CANDIDATES", DEFAULT_CANDIDATES),
        )


def load_feed(settings: ReferenceSettings) -> ReferenceFeed:
    """The naive feed over the settings' dataset and bundle; StartupError saying to run
    ``make demo`` when the data or the registered bundle are missing."""
    paths = settings.paths
    hint = f"run `make demo` first (HOMEFEED_HOME={paths.home})"
    for needed in (paths.raw(settings.dataset) / "items.parquet", paths.feast(settings.dataset)):
        if not needed.exists():
            raise StartupError(f"dataset {settings.dataset!r} is missing {needed}: {hint}")
    version = ""
    if settings.bundle_dir is not None:
        bundle_dir = settings.bundle_dir
        if not bundle_dir.is_dir():
            raise StartupError(f"HOMEFEED_REFERENCE_BUNDLE_DIR {bundle_dir} is not a directory")
    else:
        uri = settings.tracking_uri or default_tracking_uri(paths)
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            raise StartupError(f"no model registry at {uri}: {hint}")
        from contract.registry import Registry

        try:
            bundle_dir = Registry(uri).load(settings.model, settings.model_cache)
        except BundleError as err:
            raise StartupError(f"registry model {settings.model!r} is unusable: {err}") from err
        except Exception as err:  # MLflow raises its own exception for an unknown alias
            raise StartupError(
                f"registry model {settings.model!r} not found at {uri} ({err}): {hint}"
            ) from err
        version = bundle_dir.name.removeprefix("v")
    try:
        return ReferenceFeed.open(
            paths.home, settings.dataset, bundle_dir, version, settings.candidates
        )
    except (BundleError, ValueError, FileNotFoundError) as err:
        raise StartupError(f"cannot load the reference feed from {bundle_dir}: {err}") from err


def to_domain(request: feed_pb2.GetFeedRequest) -> FeedRequest:
    """The validated request; InvalidArgument naming the field otherwise."""
    surface = check_surface(request.surface)
    page_size = check_range("page_size", request.page_size, 1, MAX_PAGE_SIZE)
    cart = check_ids("cart_item_ids", request.cart_item_ids, max_len=MAX_CART)
    country, device = request.context.country, request.context.device
    if country and not _COUNTRY.fullmatch(country):
        raise InvalidArgument(
            f'context.country must be an ISO 3166-1 alpha-2 code in upper case ("US") or '
            f"empty, got {country!r}"
        )
    if device and device not in C.DEVICES:
        raise InvalidArgument(
            f"context.device must be one of {', '.join(C.DEVICES)} or empty, got {device!r}"
        )
    when = request.context.time.ToDatetime(tzinfo=UTC) if request.context.HasField("time") else None
    name = common_pb2.Surface.Name(surface).removeprefix("SURFACE_")
    return FeedRequest(
        user_id=int(request.user_id),
        surface=name,
        page_size=int(page_size),
        cart=cart,
        country=country,
        device=device,
        when=when,
    )


class ReferenceServicer(feed_pb2_grpc.FeedServiceServicer):
    """GetFeed over the naive feed: proto <-> domain only."""

    def __init__(self, feed: ReferenceFeed) -> None:
        self.feed = feed

    def GetFeed(
        self, request: feed_pb2.GetFeedRequest, context: grpc.ServicerContext
    ) -> feed_pb2.GetFeedResponse:
        page = self.feed.feed(to_domain(request))
        context.set_trailing_metadata(((STAGE_METADATA_KEY, format_stage_ms(page.stage_ms)),))
        n = len(page.item_ids)
        response = feed_pb2.GetFeedResponse(
            request_id=request.request_id or uuid.uuid4().hex,
            model_version=page.model_version,
            arm="reference",
            candidates=page.candidates,
        )
        response.item_ids.extend(page.item_ids.tolist())
        response.positions.extend(range(1, n + 1))
        egmv = page.egmv.astype(np.float32).tolist()
        response.scores.extend(egmv)
        response.egmv.extend(egmv)
        response.reasons.extend([feed_pb2.REASON_RANKED] * n)
        response.propensities.extend([1.0] * n)
        return response


def _build(settings: ReferenceSettings) -> tuple[grpc.Server, int, HealthServicer]:
    feed = load_feed(settings)  # before build_server, which reports SERVING
    servicer = ReferenceServicer(feed)
    server, port, health = build_server(
        settings.server,
        [SERVICE_NAME],
        lambda s: feed_pb2_grpc.add_FeedServiceServicer_to_server(servicer, s),
    )
    log.info(
        "reference ready",
        extra={
            "port": port,
            "dataset": settings.dataset,
            "model_version": feed.model_version,
            "candidates": feed.candidates,
            "max_workers": settings.server.max_workers,
        },
    )
    return server, port, health


def create_server(settings: ReferenceSettings) -> tuple[grpc.Server, int]:
    """A bound, not yet started server with the feed loaded, and its port."""
    server, port, _ = _build(settings)
    return server, port


def _start(settings: ReferenceSettings) -> Started:
    server, _, health = _build(settings)
    return server, health, None


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, ReferenceSettings.from_env, _start)
