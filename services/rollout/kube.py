"""The rollout controller's state and leader election on a Kubernetes API server.

- ``ConfigMapStore`` keeps the state document (``store.dump_state``) in one key of a ConfigMap
  and saves it with optimistic concurrency: a save replaces the version this process last
  read, so a write by anyone else in between fails with ``StoreError`` instead of being
  overwritten.
- ``LeaseElection`` elects the leader with a ``coordination.k8s.io/v1`` Lease, the way
  client-go does. The controller calls ``acquire()`` every tick: the leader renews the
  Lease, the others see it held and stand by. A leader that crashes without ``release()``
  stays leader until ``renewTime + leaseDurationSeconds`` (about ``lease_duration_s``), then
  the next candidate to look takes over. Unlike a lock file, a Lease works across pods and
  nodes, and a crashed leader costs one lease duration rather than a stuck lock. Expiry
  compares the holder's ``renewTime`` with the local clock, so it assumes clocks in sync
  (NTP) to well within a lease duration; and one tick's work should take less than a lease
  duration, since the lead is only known to be held when ``acquire()`` returns.
- ``from_cluster`` builds both from the pod's service account.

RBAC (a Role in the controller's namespace, bound to its service account)::

    - apiGroups: [""]
      resources: ["configmaps"]
      verbs: ["get", "create", "update"]
    - apiGroups: ["coordination.k8s.io"]
      resources: ["leases"]
      verbs: ["get", "create", "update"]

``resourceNames`` can narrow ``get``/``update`` to the two objects but not ``create``; when
they are created beforehand (an empty ConfigMap reads as "no state yet"), ``create`` can go.

``kubernetes`` is imported only when these run: it is slow to import, and the serving
path must not pay for it unless the controller runs in Kubernetes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from services.rollout.state import RolloutState
from services.rollout.store import StoreError, dump_state, parse_state

if TYPE_CHECKING:
    from kubernetes.client import (
        CoordinationV1Api,
        CoreV1Api,
        V1ConfigMap,
        V1Lease,
        V1LeaseSpec,
    )

log = logging.getLogger(__name__)

LABELS = {
    "app.kubernetes.io/name": "homefeed",
    "app.kubernetes.io/component": "rollout-controller",
}
# a ConfigMap holds at most 1 MiB in all (keys and metadata included); refuse well before
MAX_DOCUMENT_BYTES = 900 * 1024
API_TIMEOUT_S = 10.0


def _error_text(err: BaseException) -> str:
    """An API error in one line (``str(ApiException)`` spans several, with headers)."""
    status = getattr(err, "status", None)
    if status is None:
        return f"{type(err).__name__}: {err}"
    reason = getattr(err, "reason", None) or ""
    return f"API status {status} {reason}".rstrip()


def _api_errors() -> tuple[type[BaseException], ...]:
    """What a call to the API server raises when it fails: an API error status, or the
    transport (connection refused, timeout)."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    return (ApiException, HTTPError, OSError)


class ConfigMapStore:
    """The rollout state as ``data[key]`` of a ConfigMap (a ``StateStore``)."""

    def __init__(
        self,
        core_api: CoreV1Api,
        namespace: str,
        name: str,
        key: str = "state.json",
        timeout_s: float = API_TIMEOUT_S,
    ) -> None:
        self.api = core_api
        self.namespace = namespace
        self.name = name
        self.key = key
        self.timeout_s = timeout_s
        # from the last read or write: the version a save replaces (None: create it), and
        # the labels and annotations others put on the ConfigMap, which a save keeps
        self._resource_version: str | None = None
        self._labels: dict[str, str] = {}
        self._annotations: dict[str, str] = {}

    def describe(self) -> str:
        return f"configmap/{self.namespace}/{self.name}"

    def load(self) -> RolloutState | None:
        """The saved state; None when there is no ConfigMap or it has no ``key`` yet."""
        from kubernetes.client.rest import ApiException

        try:
            cm = self.api.read_namespaced_config_map(
                self.name, self.namespace, _request_timeout=self.timeout_s
            )
        except ApiException as err:
            if err.status == 404:
                self._remember(None)
                return None
            raise StoreError(f"cannot read {self.describe()}: {_error_text(err)}") from None
        except _api_errors() as err:
            raise StoreError(f"cannot read {self.describe()}: {_error_text(err)}") from None
        self._remember(cm)
        text = (cm.data or {}).get(self.key)
        if text is None:
            return None
        return parse_state(text, f"{self.describe()} key {self.key}")

    def save(self, state: RolloutState) -> None:
        """Replace the version last read (or written) with ``state``; create the ConfigMap
        when there was none. StoreError when someone else changed it since."""
        from kubernetes.client.rest import ApiException

        doc = dump_state(state)
        size = len(doc.encode())
        if size > MAX_DOCUMENT_BYTES:
            raise StoreError(
                f"rollout state is {size} bytes, more than the {MAX_DOCUMENT_BYTES} a "
                f"ConfigMap ({self.describe()}) is allowed here; not saved"
            )
        try:
            if self._resource_version is not None:
                try:
                    written = self.api.replace_namespaced_config_map(
                        self.name,
                        self.namespace,
                        self._body(doc, self._resource_version),
                        _request_timeout=self.timeout_s,
                    )
                except ApiException as err:
                    if err.status != 404:
                        raise
                    log.warning("%s was deleted since it was read; creating it", self.describe())
                    written = self._create(doc)
            else:
                written = self._create(doc)
        except ApiException as err:
            if err.status == 409:
                raise StoreError(
                    f"{self.describe()} was changed by someone else since it was read; "
                    "not saved (load it again)"
                ) from None
            raise StoreError(f"cannot write {self.describe()}: {_error_text(err)}") from None
        except _api_errors() as err:
            raise StoreError(f"cannot write {self.describe()}: {_error_text(err)}") from None
        self._remember(written)

    def _create(self, doc: str) -> V1ConfigMap:
        return self.api.create_namespaced_config_map(
            self.namespace, self._body(doc, None), _request_timeout=self.timeout_s
        )

    def _body(self, doc: str, resource_version: str | None) -> V1ConfigMap:
        from kubernetes.client import V1ConfigMap, V1ObjectMeta

        meta = V1ObjectMeta(
            name=self.name,
            namespace=self.namespace,
            labels={**self._labels, **LABELS},
            annotations=dict(self._annotations) or None,
            resource_version=resource_version,
        )
        return V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=meta, data={self.key: doc})

    def _remember(self, cm: V1ConfigMap | None) -> None:
        meta = cm.metadata if cm is not None else None
        if meta is None:
            self._resource_version, self._labels, self._annotations = None, {}, {}
            return
        self._resource_version = meta.resource_version
        self._labels = dict(meta.labels or {})
        self._annotations = dict(meta.annotations or {})


def _microtime(moment: datetime) -> datetime:
    """``moment`` as a Lease time the API server accepts: aware, in UTC, microsecond not 0.

    The client writes datetimes with ``isoformat()``, which leaves the fraction out when the
    microsecond is 0, and the server parses a MicroTime with exactly six fractional digits
    (400 otherwise). A time read back from the server often has microsecond 0, and the clock
    lands on one once in a million; one microsecond later changes nothing for a lease."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=1) if moment.microsecond == 0 else moment


class LeaseElection:
    """Leader election on a ``coordination.k8s.io/v1`` Lease (a ``LeaderElection``).

    ``acquire()`` reads the Lease every call: it creates it when absent, renews it when this
    process holds it, and takes it over when the holder let it expire (or released it). All
    writes replace the version read, so of two candidates racing only one wins (409 for the
    other). It never raises: on any error this process does not lead this tick."""

    def __init__(
        self,
        coordination_api: CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: float = 15.0,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 5.0,
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty (an empty holder is a free lease)")
        if lease_duration_s < 1:
            raise ValueError(f"lease_duration_s must be at least 1 s, got {lease_duration_s}")
        self.api = coordination_api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.clock = clock
        self.timeout_s = timeout_s
        self._lease: V1Lease | None = None  # as last written by this process
        self._leading = False

    def describe(self) -> str:
        return f"lease/{self.namespace}/{self.name}"

    def acquire(self) -> bool:
        """Become or stay the leader; True while this process holds the Lease."""
        try:
            leading = self._try_acquire()
        except Exception as err:  # never raise: the controller just does not lead this tick
            if getattr(err, "status", None) == 409:
                log.info("%s: another candidate got it first", self.describe())
            else:
                log.warning("%s: cannot acquire: %s", self.describe(), _error_text(err))
            leading = False
        if self._leading and not leading:
            log.warning("%s: %s no longer leads", self.describe(), self.identity)
        self._leading = leading
        return leading

    def release(self) -> None:
        """Give the Lease up so another candidate takes over at once (as client-go does:
        no holder, a 1 s duration). Errors are ignored: the Lease then expires by itself."""
        lease, self._leading = self._lease, False
        if lease is None or lease.spec is None or lease.spec.holder_identity != self.identity:
            return
        now = self._now()
        lease.spec = self._spec(None, 1, now, now, lease.spec.lease_transitions or 0)
        try:
            # replaces the version this process last wrote: a 409 means someone else holds it
            self.api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self.timeout_s
            )
            log.info("%s: released by %s", self.describe(), self.identity)
        except Exception as err:
            log.info("%s: not released (%s); it expires", self.describe(), _error_text(err))
        self._lease = None

    def _try_acquire(self) -> bool:
        from kubernetes.client.rest import ApiException

        now = self._now()
        duration = math.ceil(self.lease_duration_s)
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.timeout_s
            )
        except ApiException as err:
            if err.status != 404:
                raise
            self._lease = self.api.create_namespaced_lease(
                self.namespace, self._new_lease(now, duration), _request_timeout=self.timeout_s
            )
            log.info("%s: created, held by %s", self.describe(), self.identity)
            return True

        old = lease.spec
        holder = old.holder_identity if old is not None else None
        transitions = (old.lease_transitions if old is not None else None) or 0
        if old is not None and holder == self.identity:
            spec = self._spec(self.identity, duration, old.acquire_time or now, now, transitions)
        elif old is not None and holder and not self._expired(old, now):
            return False
        else:
            spec = self._spec(self.identity, duration, now, now, transitions + 1)
            log.info("%s: taken over by %s from %r", self.describe(), self.identity, holder)
        lease.spec = spec
        self._lease = self.api.replace_namespaced_lease(
            self.name, self.namespace, lease, _request_timeout=self.timeout_s
        )
        return True

    def _expired(self, spec: V1LeaseSpec, now: datetime) -> bool:
        if spec.renew_time is None:
            return True
        seconds = spec.lease_duration_seconds or self.lease_duration_s
        return _microtime(spec.renew_time) + timedelta(seconds=seconds) <= now

    def _now(self) -> datetime:
        return _microtime(datetime.fromtimestamp(self.clock(), UTC))

    @staticmethod
    def _spec(
        holder: str | None,
        duration_s: int,
        acquired: datetime,
        renewed: datetime,
        transitions: int,
    ) -> V1LeaseSpec:
        from kubernetes.client import V1LeaseSpec

        return V1LeaseSpec(
            holder_identity=holder,
            lease_duration_seconds=duration_s,
            acquire_time=_microtime(acquired),
            renew_time=_microtime(renewed),
            lease_transitions=transitions,
        )

    def _new_lease(self, now: datetime, duration_s: int) -> V1Lease:
        from kubernetes.client import V1Lease, V1ObjectMeta

        meta = V1ObjectMeta(name=self.name, namespace=self.namespace, labels=dict(LABELS))
        return V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=meta,
            spec=self._spec(self.identity, duration_s, now, now, 0),
        )


def from_cluster(
    namespace: str, configmap: str, lease: str, identity: str
) -> tuple[ConfigMapStore, LeaseElection]:
    """The store and the election for a controller running in a pod, authenticated as the
    pod's service account (``identity``: unique per candidate, e.g. the pod name)."""
    import kubernetes

    kubernetes.config.load_incluster_config()
    return (
        ConfigMapStore(kubernetes.client.CoreV1Api(), namespace, configmap),
        LeaseElection(kubernetes.client.CoordinationV1Api(), namespace, lease, identity),
    )
