"""services.rollout.kube: the ConfigMap store and the Lease election, against a fake API
server (no cluster here). The fake keeps objects as the wire JSON the real client would send
(so a Lease time the server would reject fails here too), enforces resourceVersion (409 on
a stale write) and answers 404 for what is absent; the tests check the objects built and the
calls made."""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from kubernetes.client import ApiClient, V1ConfigMap, V1Lease
from kubernetes.client.rest import ApiException

from services.rollout import kube
from services.rollout.kube import ConfigMapStore, LeaseElection, from_cluster
from services.rollout.state import Rollout, RolloutSpec, RolloutState
from services.rollout.store import StoreError

if TYPE_CHECKING:
    from kubernetes.client import CoordinationV1Api, CoreV1Api

NS = "homefeed"
CM = "rollout-state"
LEASE = "rollout-controller"
T0 = 1_700_000_000.0  # a whole second: microsecond 0, which MicroTime must not be sent as
# the API server's MicroTime layout: exactly six fractional digits
MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
WIRE = ApiClient()


@dataclass
class Call:
    method: str
    namespace: str
    name: str
    body: dict[str, Any] | None  # as sent on the wire
    timeout: Any


class FakeApi:
    """CoreV1Api (ConfigMaps) and CoordinationV1Api (Leases) over a dict."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.fail: dict[str, BaseException] = {}  # method -> raised once, before anything
        self.before: dict[str, Callable[[], None]] = {}  # method -> run once first (races)
        self._version = 100

    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    def wire(self, kind: str, name: str) -> dict[str, Any]:
        return self.objects[(kind, NS, name)]

    def _handle(
        self, method: str, kind: str, namespace: str, name: str, body: Any, timeout: Any
    ) -> Any:
        hook = self.before.pop(method, None)
        if hook is not None:
            hook()
        wire = WIRE.sanitize_for_serialization(body) if body is not None else None
        self.calls.append(Call(method, namespace, name, wire, timeout))
        if method in self.fail:
            raise self.fail.pop(method)
        key = (kind, namespace, name)
        if method.startswith("read"):
            if key not in self.objects:
                raise ApiException(status=404, reason="Not Found")
            return self._model(kind, self.objects[key])
        assert wire is not None
        wire = copy.deepcopy(wire)  # the call keeps what was sent
        meta = wire.setdefault("metadata", {})
        assert meta.get("name") == name, "body names another object"
        for field in ("acquireTime", "renewTime"):
            value = wire.get("spec", {}).get(field)
            if value is not None and not MICROTIME.match(value):
                raise ApiException(status=400, reason=f"{field} {value!r} is not a MicroTime")
        if method.startswith("create"):
            if meta.get("resourceVersion"):
                raise ApiException(status=400, reason="resourceVersion set on create")
            if key in self.objects:
                raise ApiException(status=409, reason="AlreadyExists")
        else:
            if key not in self.objects:
                raise ApiException(status=404, reason="Not Found")
            stored = self.objects[key]["metadata"]["resourceVersion"]
            if meta.get("resourceVersion") not in (None, stored):
                raise ApiException(status=409, reason="Conflict")
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        meta["namespace"] = namespace
        self.objects[key] = wire
        return self._model(kind, wire)

    @staticmethod
    def _model(kind: str, wire: dict[str, Any]) -> Any:
        return WIRE.deserialize(json.dumps(wire), f"V1{kind}", "application/json")

    def read_namespaced_config_map(
        self, name: str, namespace: str, _request_timeout: Any = None
    ) -> V1ConfigMap:
        return self._handle("read_cm", "ConfigMap", namespace, name, None, _request_timeout)

    def create_namespaced_config_map(
        self, namespace: str, body: V1ConfigMap, _request_timeout: Any = None
    ) -> V1ConfigMap:
        name = (body.metadata.name if body.metadata else None) or ""
        return self._handle("create_cm", "ConfigMap", namespace, name, body, _request_timeout)

    def replace_namespaced_config_map(
        self, name: str, namespace: str, body: V1ConfigMap, _request_timeout: Any = None
    ) -> V1ConfigMap:
        return self._handle("replace_cm", "ConfigMap", namespace, name, body, _request_timeout)

    def read_namespaced_lease(
        self, name: str, namespace: str, _request_timeout: Any = None
    ) -> V1Lease:
        return self._handle("read_lease", "Lease", namespace, name, None, _request_timeout)

    def create_namespaced_lease(
        self, namespace: str, body: V1Lease, _request_timeout: Any = None
    ) -> V1Lease:
        name = (body.metadata.name if body.metadata else None) or ""
        return self._handle("create_lease", "Lease", namespace, name, body, _request_timeout)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: V1Lease, _request_timeout: Any = None
    ) -> V1Lease:
        return self._handle("replace_lease", "Lease", namespace, name, body, _request_timeout)


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(t: float) -> str:
    """A clock reading as the wire form of a Lease time written then."""
    return kube._microtime(datetime.fromtimestamp(t, UTC)).isoformat()


def parse(wire_time: str) -> datetime:
    return datetime.fromisoformat(wire_time)


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


def store(api: FakeApi, key: str = "state.json") -> ConfigMapStore:
    return ConfigMapStore(cast("CoreV1Api", api), NS, CM, key=key)


def candidate(api: FakeApi, identity: str, clock: Clock) -> LeaseElection:
    return LeaseElection(cast("CoordinationV1Api", api), NS, LEASE, identity, clock=clock)


def a_state(version: str = "3") -> RolloutState:
    state = RolloutState()
    state.start(Rollout.new(RolloutSpec(version=version)))
    return state


# --- ConfigMapStore ----------------------------------------------------------------------


def test_load_without_a_configmap_is_none(api: FakeApi) -> None:
    s = store(api)
    assert s.load() is None
    assert api.methods() == ["read_cm"]
    assert (api.calls[0].namespace, api.calls[0].name) == (NS, CM)
    assert api.calls[0].timeout == kube.API_TIMEOUT_S
    assert s.describe() == f"configmap/{NS}/{CM}"


def test_save_creates_then_load_round_trips(api: FakeApi) -> None:
    state = a_state()
    s = store(api)
    assert s.load() is None
    s.save(state)
    assert api.methods() == ["read_cm", "create_cm"]
    body = api.calls[1].body
    assert body is not None
    assert body["apiVersion"] == "v1" and body["kind"] == "ConfigMap"
    assert body["metadata"]["name"] == CM and body["metadata"]["namespace"] == NS
    assert "resourceVersion" not in body["metadata"]
    assert body["metadata"]["labels"] == {
        "app.kubernetes.io/name": "homefeed",
        "app.kubernetes.io/component": "rollout-controller",
    }
    assert list(body["data"]) == ["state.json"]

    loaded = store(api).load()  # another process reads it back
    assert loaded is not None
    assert loaded.to_json() == state.to_json()
    assert loaded.current is not None and loaded.current.spec.version == "3"


def test_saves_replace_the_version_last_written(api: FakeApi) -> None:
    s = store(api)
    s.load()
    s.save(a_state("3"))
    created = api.wire("ConfigMap", CM)["metadata"]["resourceVersion"]
    s.save(a_state("4"))
    assert api.methods() == ["read_cm", "create_cm", "replace_cm"]
    replace = api.calls[2]
    assert replace.body is not None and replace.name == CM
    assert replace.body["metadata"]["resourceVersion"] == created
    loaded = store(api).load()
    assert loaded is not None and loaded.current is not None
    assert loaded.current.spec.version == "4"


def test_save_after_someone_else_changed_it_is_refused(api: FakeApi) -> None:
    ours, theirs = store(api), store(api)
    ours.save(a_state("3"))
    assert ours.load() is not None and theirs.load() is not None
    theirs.save(a_state("4"))
    with pytest.raises(StoreError, match="changed by someone else"):
        ours.save(a_state("5"))
    assert api.methods()[-1] == "replace_cm"
    kept = store(api).load()
    assert kept is not None and kept.current is not None
    assert kept.current.spec.version == "4"  # theirs, not overwritten


def test_save_without_reading_does_not_overwrite(api: FakeApi) -> None:
    store(api).save(a_state("3"))
    with pytest.raises(StoreError, match="changed by someone else"):
        store(api).save(a_state("4"))  # never loaded: it would create, and it exists


def test_precreated_configmap_keeps_its_labels_and_takes_the_key(api: FakeApi) -> None:
    api.objects[("ConfigMap", NS, CM)] = {
        "metadata": {
            "name": CM,
            "namespace": NS,
            "resourceVersion": "7",
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": "homefeed"},
        },
    }
    s = store(api, key="rollout.json")
    assert s.load() is None  # no key yet: nothing saved
    s.save(a_state())
    assert api.methods() == ["read_cm", "replace_cm"]
    body = api.calls[1].body
    assert body is not None
    assert body["metadata"]["resourceVersion"] == "7"
    assert body["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/name": "homefeed",
        "app.kubernetes.io/component": "rollout-controller",
    }
    assert body["metadata"]["annotations"] == {"meta.helm.sh/release-name": "homefeed"}
    assert list(body["data"]) == ["rollout.json"]
    assert store(api, key="rollout.json").load() is not None


def test_deleted_since_read_is_created_again(api: FakeApi) -> None:
    s = store(api)
    s.save(a_state("3"))
    del api.objects[("ConfigMap", NS, CM)]
    s.save(a_state("4"))
    assert api.methods() == ["create_cm", "replace_cm", "create_cm"]
    loaded = store(api).load()
    assert loaded is not None and loaded.current is not None
    assert loaded.current.spec.version == "4"


def test_oversize_document_is_refused_before_any_call(api: FakeApi) -> None:
    state = a_state()
    assert state.current is not None
    state.current.message = "x" * kube.MAX_DOCUMENT_BYTES
    with pytest.raises(StoreError, match="more than the 921600"):
        store(api).save(state)
    assert api.calls == []


def test_api_errors_name_the_configmap_and_status(api: FakeApi) -> None:
    api.fail["read_cm"] = ApiException(status=403, reason="Forbidden")
    with pytest.raises(StoreError, match=f"configmap/{NS}/{CM}: API status 403 Forbidden"):
        store(api).load()
    api.fail["create_cm"] = ApiException(status=500, reason="Internal Server Error")
    with pytest.raises(StoreError, match=r"cannot write .* API status 500"):
        store(api).save(a_state())
    api.fail["read_cm"] = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(StoreError, match="ConnectionRefusedError"):
        store(api).load()


def test_unreadable_document_is_a_store_error(api: FakeApi) -> None:
    api.objects[("ConfigMap", NS, CM)] = {
        "metadata": {"name": CM, "namespace": NS, "resourceVersion": "1"},
        "data": {"state.json": "{not json"},
    }
    with pytest.raises(StoreError, match="does not hold a rollout state"):
        store(api).load()


# --- LeaseElection -----------------------------------------------------------------------


def test_first_acquire_creates_the_lease(api: FakeApi) -> None:
    a = candidate(api, "pod-a", Clock())
    assert a.acquire() is True
    assert api.methods() == ["read_lease", "create_lease"]
    body = api.calls[1].body
    assert body is not None
    assert body["apiVersion"] == "coordination.k8s.io/v1" and body["kind"] == "Lease"
    assert body["metadata"]["name"] == LEASE and body["metadata"]["namespace"] == NS
    assert body["metadata"]["labels"]["app.kubernetes.io/component"] == "rollout-controller"
    assert body["spec"] == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "acquireTime": at(T0),
        "renewTime": at(T0),
        "leaseTransitions": 0,
    }
    assert api.calls[1].timeout == a.timeout_s


def test_a_second_candidate_is_refused_while_the_lease_is_fresh(api: FakeApi) -> None:
    clock = Clock()
    a, b = candidate(api, "pod-a", clock), candidate(api, "pod-b", clock)
    assert a.acquire()
    before = api.wire("Lease", LEASE)
    clock.t += 14.9
    assert b.acquire() is False
    assert api.methods() == ["read_lease", "create_lease", "read_lease"]  # b only read
    assert api.wire("Lease", LEASE) == before


def test_an_expired_lease_is_taken_over(api: FakeApi) -> None:
    clock = Clock()
    a, b = candidate(api, "pod-a", clock), candidate(api, "pod-b", clock)
    assert a.acquire()
    clock.t += 15  # renewTime + leaseDurationSeconds: no longer valid
    assert b.acquire() is True
    assert api.methods()[-2:] == ["read_lease", "replace_lease"]
    spec = api.wire("Lease", LEASE)["spec"]
    assert spec["holderIdentity"] == "pod-b"
    assert spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == spec["renewTime"] == at(T0 + 15)
    assert a.acquire() is False  # the old leader comes back and sees it held


def test_renew_keeps_the_holder_and_moves_renew_time(api: FakeApi) -> None:
    clock = Clock()
    a = candidate(api, "pod-a", clock)
    assert a.acquire()
    created = api.wire("Lease", LEASE)["metadata"]["resourceVersion"]
    clock.t += 5
    assert a.acquire() is True
    assert api.methods() == ["read_lease", "create_lease", "read_lease", "replace_lease"]
    body = api.calls[-1].body
    assert body is not None
    assert body["metadata"]["resourceVersion"] == created
    spec = body["spec"]
    assert spec["holderIdentity"] == "pod-a"
    assert spec["leaseTransitions"] == 0
    # the time read back from the server (microsecond 0) went out as a MicroTime again
    assert parse(spec["acquireTime"]) - parse(at(T0)) < timedelta(milliseconds=1)
    assert spec["renewTime"] == at(T0 + 5)
    assert api.wire("Lease", LEASE)["metadata"]["resourceVersion"] != created


def test_losing_the_create_race_is_false(api: FakeApi) -> None:
    clock = Clock()
    a, b = candidate(api, "pod-a", clock), candidate(api, "pod-b", clock)
    api.before["create_lease"] = lambda: assert_true(a.acquire())  # a creates it first
    assert b.acquire() is False
    assert api.wire("Lease", LEASE)["spec"]["holderIdentity"] == "pod-a"
    assert [c.method for c in api.calls if c.method.startswith("create")] == ["create_lease"] * 2


def test_losing_the_takeover_race_is_false(api: FakeApi) -> None:
    clock = Clock()
    a, b, c = (candidate(api, who, clock) for who in ("pod-a", "pod-b", "pod-c"))
    assert c.acquire()
    clock.t += 60  # c died
    api.before["replace_lease"] = lambda: assert_true(a.acquire())  # a takes over first
    assert b.acquire() is False
    spec = api.wire("Lease", LEASE)["spec"]
    assert spec["holderIdentity"] == "pod-a" and spec["leaseTransitions"] == 1


def test_release_lets_another_acquire_at_once(api: FakeApi) -> None:
    clock = Clock()
    a, b = candidate(api, "pod-a", clock), candidate(api, "pod-b", clock)
    assert a.acquire()
    a.release()
    assert api.methods()[-1] == "replace_lease"
    spec = api.wire("Lease", LEASE)["spec"]
    assert "holderIdentity" not in spec  # None is left out: no holder
    assert spec["leaseDurationSeconds"] == 1
    assert b.acquire() is True  # same instant
    spec = api.wire("Lease", LEASE)["spec"]
    assert spec["holderIdentity"] == "pod-b" and spec["leaseTransitions"] == 1
    calls = len(api.calls)
    a.release()  # not holding: nothing to do
    assert len(api.calls) == calls


def test_release_ignores_errors(api: FakeApi) -> None:
    a = candidate(api, "pod-a", Clock())
    assert a.acquire()
    api.fail["replace_lease"] = ApiException(status=500, reason="Internal Server Error")
    a.release()
    assert api.wire("Lease", LEASE)["spec"]["holderIdentity"] == "pod-a"  # it will expire


def test_release_after_a_takeover_leaves_the_new_holder(api: FakeApi) -> None:
    clock = Clock()
    a, b = candidate(api, "pod-a", clock), candidate(api, "pod-b", clock)
    assert a.acquire()
    clock.t += 30
    assert b.acquire()
    a.release()  # a's last version is stale: 409, ignored
    assert api.calls[-1].method == "replace_lease"
    assert api.wire("Lease", LEASE)["spec"]["holderIdentity"] == "pod-b"


def test_api_errors_are_false_and_logged(api: FakeApi, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    a = candidate(api, "pod-a", clock)
    api.fail["read_lease"] = ApiException(status=500, reason="Internal Server Error")
    with caplog.at_level(logging.WARNING, logger="services.rollout.kube"):
        assert a.acquire() is False
    assert f"lease/{NS}/{LEASE}: cannot acquire: API status 500" in caplog.text
    assert a.acquire() is True
    clock.t += 1
    api.fail["read_lease"] = ConnectionRefusedError(111, "Connection refused")
    assert a.acquire() is False  # the leader stops leading while it cannot renew
    assert "ConnectionRefusedError" in caplog.text


def test_lease_times_are_sent_as_microtime() -> None:
    whole = datetime(2026, 1, 1, tzinfo=UTC)
    assert whole.isoformat() == "2026-01-01T00:00:00+00:00"  # what the server rejects
    assert MICROTIME.match(kube._microtime(whole).isoformat())
    naive = datetime(2026, 1, 1, 12, 0, 0, 250_000)
    assert kube._microtime(naive) == naive.replace(tzinfo=UTC)


def test_arguments_are_checked(api: FakeApi) -> None:
    with pytest.raises(ValueError, match="identity"):
        candidate(api, "", Clock())
    with pytest.raises(ValueError, match="lease_duration_s"):
        LeaseElection(cast("CoordinationV1Api", api), NS, LEASE, "a", lease_duration_s=0.5)


# --- from_cluster ------------------------------------------------------------------------


def test_from_cluster_builds_both_from_the_service_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kubernetes

    loaded: list[bool] = []
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: loaded.append(True))
    s, e = from_cluster(NS, CM, LEASE, "pod-a")
    assert loaded == [True]
    assert isinstance(s.api, kubernetes.client.CoreV1Api)
    assert isinstance(e.api, kubernetes.client.CoordinationV1Api)
    assert s.describe() == f"configmap/{NS}/{CM}" and e.describe() == f"lease/{NS}/{LEASE}"
    assert e.identity == "pod-a"


def test_importing_the_module_does_not_import_kubernetes() -> None:
    code = "import sys, services.rollout.kube; sys.exit('kubernetes' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def assert_true(value: bool) -> None:
    assert value
