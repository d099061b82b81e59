"""The Helm chart (helm/homefeed), rendered offline with the real helm for each values variant
in helm/homefeed/ci/ and checked for what the cluster would enforce or rely on: probes,
hardening, NetworkPolicies (evaluated as the API defines them), the canary, the online loop's
event log and experiment (read back with the services' own settings), RBAC, the admin
token's reach, the values schema, that every value is read, and the helm test pods' scripts
(run here against real gRPC servers). No cluster: nothing is applied."""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

HELM = Path(sys.executable).parent / "helm"
if not HELM.exists():
    pytest.skip(f"{HELM} not found: run `make k8s-tools`", allow_module_level=True)

from tools import chart  # noqa: E402 (after the skip: it needs helm to be useful)

Doc = dict[str, Any]
FULLNAME = chart.RELEASE  # a release named "homefeed" is not prefixed twice
TOKEN = "ci-admin-token"  # the ci/ values' token
SERVING_PORTS = {
    "gateway": 50051,
    "retrieval": 50052,
    "features": 50053,
    "ranking": 50054,
    "ranking-canary": 50054,
    "rollout": 50055,
}
ADMIN_PORTS = {"ranking": 50064, "ranking-canary": 50064, "rollout": 50065}
READINESS_SERVICE = {
    "gateway": "homefeed.feed.v1.FeedService",
    "rollout": "homefeed.rollout.v1.RolloutService",
}
ENV_PREFIX = {c: c.split("-")[0].upper() for c in SERVING_PORTS}  # the canary is a RANKING
METRICS_PORT = 9464
ADMIN_COMPONENTS = {"ranking", "ranking-canary", "rollout"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """Every ci/ variant's documents, tests and hooks included."""
    return {
        path.name.removesuffix("-values.yaml"): chart.render([path]) for path in chart.variants()
    }


def write_values(tmp: Path, name: str, values: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def with_token(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"admin": {"token": TOKEN}, **(values or {})}


# ---- reading rendered documents ----------------------------------------------------------


def kind(docs: list[Doc], k: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == k]


def named(docs: list[Doc], k: str, name: str) -> Doc:
    found = [d for d in kind(docs, k) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{k}/{name}: {len(found)} rendered"
    return found[0]


def component(doc: Doc) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def is_hook(doc: Doc) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def pod_templates(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(owner, pod template {metadata, spec}) of every workload and bare Pod."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]
        elif doc["kind"] == "Pod":
            yield doc, {"metadata": doc["metadata"], "spec": doc["spec"]}


def serving(docs: list[Doc]) -> dict[str, Doc]:
    """The homefeed gRPC Deployments by component."""
    return {component(d): d for d in kind(docs, "Deployment") if component(d) in SERVING_PORTS}


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(docs: list[Doc], c: Doc) -> dict[str, Any]:
    """A container's environment: envFrom ConfigMaps (rendered ones), then env; a valueFrom
    is kept as its dict."""
    env: dict[str, Any] = {}
    for source in c.get("envFrom") or []:
        ref = source["configMapRef"]["name"]
        env.update(named(docs, "ConfigMap", ref)["data"])
    for item in c.get("env") or []:
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


# ---- probes ------------------------------------------------------------------------------


def test_every_service_probes_grpc_on_its_serving_port(rendered: dict[str, list[Doc]]) -> None:
    for variant in ("default", "canary", "external-services"):
        deployments = serving(rendered[variant])
        expected = set(SERVING_PORTS) - ({"ranking-canary"} if variant != "canary" else set())
        assert set(deployments) == expected, variant
        for name, deployment in deployments.items():
            c = container(deployment)
            port = SERVING_PORTS[name]
            for probe in ("startupProbe", "livenessProbe"):
                assert c[probe]["grpc"] == {"port": port}, (variant, name, probe)
            ready: dict[str, Any] = {"port": port}
            if name in READINESS_SERVICE:
                ready["service"] = READINESS_SERVICE[name]
            assert c["readinessProbe"]["grpc"] == ready, (variant, name)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["grpc"] == port
            if name in ADMIN_PORTS:
                assert ports["grpc-admin"] == ADMIN_PORTS[name]
            assert c["command"] == ["python", "-m", f"services.{name.split('-')[0]}"]


def test_probes_are_tcp_under_mtls(rendered: dict[str, list[Doc]]) -> None:
    for name, deployment in serving(rendered["mtls"]).items():
        c = container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in c[probe], (name, probe)
            assert c[probe]["tcpSocket"] == {"port": SERVING_PORTS[name]}, (name, probe)


def test_every_container_has_readiness_and_liveness(rendered: dict[str, list[Doc]]) -> None:
    for variant, docs in rendered.items():
        for deployment in kind(docs, "Deployment"):
            for c in deployment["spec"]["template"]["spec"]["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, (variant, c["name"])


# ---- hardening, volumes ------------------------------------------------------------------


def test_every_pod_runs_hardened(rendered: dict[str, list[Doc]]) -> None:
    for variant, docs in rendered.items():
        pods = list(pod_templates(docs))
        assert len(pods) >= 7, variant
        for owner, pod in pods:
            where = (variant, owner["kind"], owner["metadata"]["name"])
            spec = pod["spec"]
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True, where
            assert psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001, where
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert spec["automountServiceAccountToken"] is (component(owner) == "rollout"), where
            # service links would set HOMEFEED_<SVC>_PORT=tcp://... from the Services' names
            assert spec["enableServiceLinks"] is False, where
            volumes = {v["name"]: v for v in spec["volumes"]}
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert "privileged" not in sc and "runAsUser" not in sc, where
                mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
                assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where  # writable /tmp


def test_data_is_read_only_for_serving_and_writable_for_jobs(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["canary"]
    for owner, pod in pod_templates(docs):
        if owner["kind"] == "Pod" or component(owner) not in {
            *SERVING_PORTS,
            "retrain",
            "materialize",
        }:
            continue
        c = pod["spec"]["containers"][0]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        data = mounts["/var/lib/homefeed/data"]
        claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == f"{FULLNAME}-data"
        is_job = owner["kind"] in ("Job", "CronJob")
        assert data["readOnly"] is (not is_job), owner["metadata"]["name"]
        if not is_job:
            cache = mounts["/var/cache/homefeed/models"]
            assert "emptyDir" in volumes[cache["name"]]
            assert env_of(docs, c)["HOMEFEED_MODEL_CACHE"] == "/var/cache/homefeed/models"
    assert named(docs, "PersistentVolumeClaim", f"{FULLNAME}-data")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


# ---- NetworkPolicies, evaluated ----------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector against labels, as the API server evaluates it."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str] = field(hash=False)
    namespace: str = chart.NAMESPACE


NAMESPACE_LABELS = {
    ns: {"kubernetes.io/metadata.name": ns}
    for ns in (chart.NAMESPACE, "storefront", "ops", "monitoring")
}


def admits(policies: list[Doc], source: Pod, target: Pod, port: int) -> bool:
    """Would ingress from ``source`` to ``target``'s ``port`` be allowed? (All policies live
    in the release namespace; policies add up; an unselected pod is not isolated.)"""
    selecting = [p for p in policies if selects(p["spec"]["podSelector"], target.labels)]
    if not selecting or target.namespace != chart.NAMESPACE:
        return True
    for policy in selecting:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"].get("ingress") or []:
            ports = [p["port"] for p in rule.get("ports") or []]
            assert all(isinstance(p, int) for p in ports), "ports must be numbers"
            if ports and port not in ports:
                continue
            for peer in rule.get("from") or [{}]:
                assert "ipBlock" not in peer
                ns_selector = peer.get("namespaceSelector")
                if ns_selector is None:
                    in_namespace = source.namespace == chart.NAMESPACE
                else:
                    in_namespace = selects(ns_selector, NAMESPACE_LABELS[source.namespace])
                if in_namespace and selects(peer.get("podSelector") or {}, source.labels):
                    return True
    return False


def release_pods(docs: list[Doc]) -> dict[str, Pod]:
    """One pod per component (replicas share labels), test pods included."""
    pods: dict[str, Pod] = {}
    for owner, pod in pod_templates(docs):
        name = owner["metadata"]["name"].removeprefix(f"{FULLNAME}-")
        if owner["kind"] != "Pod":
            name = component(owner)
        pods[name] = Pod(name, dict(pod["metadata"]["labels"]))
    return pods


OUTSIDERS = [
    Pod("frontend", {"homefeed.io/frontend": "true"}),
    Pod("operator", {"homefeed.io/operator": "true"}),
    Pod("scraper", {"app.kubernetes.io/name": "prometheus"}),
    Pod("stranger", {}),
    # another release's gateway: same chart, other instance
    Pod(
        "impostor",
        {
            "app.kubernetes.io/name": "homefeed",
            "app.kubernetes.io/instance": "other",
            "app.kubernetes.io/component": "gateway",
        },
    ),
]


def container_ports(docs: list[Doc]) -> dict[str, list[int]]:
    return {
        component(d): [
            p["containerPort"]
            for c in d["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports") or []
        ]
        for d in kind(docs, "Deployment")
    }


def test_network_policies_admit_exactly_the_mesh_paths(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["canary"]
    policies = [p for p in kind(docs, "NetworkPolicy") if not is_hook(p)]
    pods = release_pods(docs)
    everyone = [*pods.values(), *OUTSIDERS]
    release = {p.name for p in pods.values()}
    assert {"test-health", "test-feed", "retrain", "materialize"} <= release
    expected: dict[tuple[str, int], set[str]] = {
        ("gateway", 50051): {"frontend"},
        ("retrieval", 50052): {"gateway"},
        ("features", 50053): {"gateway", "frontend"},  # frontend: LogEvents
        ("ranking", 50054): {"gateway"},
        ("ranking-canary", 50054): {"gateway", "rollout"},  # rollout: its health check
        ("ranking", 50064): {"rollout"},
        ("ranking-canary", 50064): {"rollout"},
        ("rollout", 50055): {"gateway"},
        ("rollout", 50065): {"operator"},
        ("redis", 6379): {"retrieval", "features", "materialize", "retrain"},
        ("mlflow", 5000): set(SERVING_PORTS) | {"retrain"},
        ("jaeger", 4317): release,
        ("jaeger", 4318): release,
        ("jaeger", 16686): {"operator"},
    }
    for name in SERVING_PORTS:
        expected[(name, METRICS_PORT)] = {"scraper"}
    checked = 0
    for target_name, ports in container_ports(docs).items():
        target = pods[target_name]
        for port in ports:
            allowed = {s.name for s in everyone if admits(policies, s, target, port)}
            assert allowed == expected.get((target_name, port), set()), (target_name, port)
            checked += 1
    assert checked == 21  # every container port of the canary variant
    # the default-deny policy isolates every pod of the release, jobs and test pods included
    deny = named(docs, "NetworkPolicy", f"{FULLNAME}-default-deny")
    assert "ingress" not in deny["spec"]
    assert all(selects(deny["spec"]["podSelector"], p.labels) for p in pods.values())


def test_test_pods_reach_the_services_only_during_helm_test(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["canary"]
    hook = named(docs, "NetworkPolicy", f"{FULLNAME}-test")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    policies = kind(docs, "NetworkPolicy")  # the hook included
    pods = release_pods(docs)
    for name, port in SERVING_PORTS.items():
        assert admits(policies, pods["test-health"], pods[name], port), name
    for name, port in ADMIN_PORTS.items():
        assert not admits(policies, pods["test-health"], pods[name], port), name


def test_selectors_from_other_namespaces(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["external-services"]
    policies = [p for p in kind(docs, "NetworkPolicy") if not is_hook(p)]
    pods = release_pods(docs)
    for labels, namespace, target, port in [
        ({"homefeed.io/frontend": "true"}, "storefront", "gateway", 50051),
        ({"homefeed.io/frontend": "true"}, "storefront", "features", 50053),
        ({"homefeed.io/operator": "true"}, "ops", "rollout", 50065),
        ({"app.kubernetes.io/name": "prometheus"}, "monitoring", "ranking", METRICS_PORT),
    ]:
        assert admits(policies, Pod("there", labels, namespace), pods[target], port)
        assert not admits(policies, Pod("here", labels), pods[target], port)
        assert not admits(policies, Pod("elsewhere", labels, "ops"), pods["retrieval"], 50052)


# ---- the canary ----------------------------------------------------------------------------


def test_canary_exists_only_when_enabled(rendered: dict[str, list[Doc]]) -> None:
    for variant, docs in rendered.items():
        names = {d["metadata"]["name"] for d in docs}
        enabled = variant in ("canary", "mtls")
        assert (f"{FULLNAME}-ranking-canary" in names) is enabled, variant


def test_canary_serves_its_version_with_its_faults(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["canary"]
    canary = named(docs, "Deployment", f"{FULLNAME}-ranking-canary")
    stable = named(docs, "Deployment", f"{FULLNAME}-ranking")
    env = env_of(docs, container(canary))
    assert env["HOMEFEED_RANKING_MODEL"] == "7"
    assert env["HOMEFEED_RANKING_FAULTS"] == "error_rate=0.2,delay_ms=50,scores=shuffle"
    assert env["HOMEFEED_RANKING_PORT"] == "50054"
    assert env["HOMEFEED_RANKING_ADMIN_PORT"] == "50064"
    assert env["OTEL_SERVICE_NAME"] == "homefeed-ranking-canary"
    stable_env = env_of(docs, container(stable))
    assert "HOMEFEED_RANKING_MODEL" not in stable_env
    assert "HOMEFEED_RANKING_FAULTS" not in stable_env
    assert stable_env["HOMEFEED_MODEL"] == "champion"
    assert canary["spec"]["template"]["metadata"]["labels"]["homefeed.io/track"] == "canary"
    assert stable["spec"]["template"]["metadata"]["labels"]["homefeed.io/track"] == "stable"
    # each Service selects its own track only; the headless admin Service, stable's pods
    canary_pod = canary["spec"]["template"]["metadata"]["labels"]
    stable_pod = stable["spec"]["template"]["metadata"]["labels"]
    for service, own in [
        (f"{FULLNAME}-ranking-canary", canary_pod),
        (f"{FULLNAME}-ranking", stable_pod),
        (f"{FULLNAME}-ranking-admin", stable_pod),
    ]:
        selector = named(docs, "Service", service)["spec"]["selector"]
        assert selects({"matchLabels": selector}, own), service
        other = stable_pod if own is canary_pod else canary_pod
        assert not selects({"matchLabels": selector}, other), service
    admin = named(docs, "Service", f"{FULLNAME}-ranking-admin")["spec"]
    assert admin["clusterIP"] == "None"
    assert [p["port"] for p in admin["ports"]] == [50064]
    rollout = env_of(docs, container(named(docs, "Deployment", f"{FULLNAME}-rollout")))
    assert rollout["HOMEFEED_ROLLOUT_CANARY_ADDR"] == f"{FULLNAME}-ranking-canary:50054"
    assert rollout["HOMEFEED_ROLLOUT_STABLE_ADMIN_ADDR"] == f"{FULLNAME}-ranking-admin:50064"
    # a canary without faults has no HOMEFEED_RANKING_FAULTS at all
    mtls = rendered["mtls"]
    plain = env_of(mtls, container(named(mtls, "Deployment", f"{FULLNAME}-ranking-canary")))
    assert plain["HOMEFEED_RANKING_MODEL"] == "12"
    assert "HOMEFEED_RANKING_FAULTS" not in plain


# ---- the rollout controller's RBAC ---------------------------------------------------------


def test_controller_role_grants_only_its_lease_and_configmap(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["default"]
    assert not kind(docs, "ClusterRole") and not kind(docs, "ClusterRoleBinding")
    (role,) = kind(docs, "Role")
    state, lease = f"{FULLNAME}-rollout-state", f"{FULLNAME}-rollout-leader"
    grants = {
        (group, resource, name, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for name in rule["resourceNames"]
        for verb in rule["verbs"]
    }
    allowed = {
        (group, resource, name, verb)
        for group, resource, name in [
            ("", "configmaps", state),
            ("coordination.k8s.io", "leases", lease),
        ]
        for verb in ("get", "update", "patch")
    }
    assert grants <= allowed  # nothing else: no create, delete, list, watch, no other object
    needed = {(g, r, n, verb) for g, r, n, _ in allowed for verb in ("get", "update")}
    assert needed <= grants  # the controller reads and replaces both (services/rollout/kube.py)
    assert all(
        set(rule) == {"apiGroups", "resources", "resourceNames", "verbs"} for rule in role["rules"]
    )
    # both objects are rendered (nothing to create), the state kept on uninstall
    configmap = named(docs, "ConfigMap", state)
    assert "data" not in configmap
    assert configmap["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    named(docs, "Lease", lease)
    # the binding ties the Role to the controller's ServiceAccount, and only the controller uses it
    (binding,) = kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    users = [
        component(owner)
        for owner, pod in pod_templates(docs)
        if pod["spec"].get("serviceAccountName") == subject["name"]
    ]
    assert users == ["rollout"]
    controller = named(docs, "Deployment", f"{FULLNAME}-rollout")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"] == {"type": "Recreate"}
    env = env_of(docs, container(controller))
    assert env["HOMEFEED_ROLLOUT_CONFIGMAP"] == state
    assert env["HOMEFEED_ROLLOUT_LEASE"] == lease
    assert env["HOMEFEED_ROLLOUT_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["HOMEFEED_ROLLOUT_STEPS"] == "5,25,50,100"
    service = named(docs, "Service", f"{FULLNAME}-rollout")
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [50055, 50065]


# ---- the admin token -----------------------------------------------------------------------


def secret_refs(c: Doc) -> set[str]:
    refs = {
        item["valueFrom"]["secretKeyRef"]["name"]
        for item in c.get("env") or []
        if "secretKeyRef" in (item.get("valueFrom") or {})
    }
    refs |= {s["secretRef"]["name"] for s in c.get("envFrom") or [] if "secretRef" in s}
    return refs


def test_admin_token_only_in_its_secret_and_only_for_admin_services(
    rendered: dict[str, list[Doc]],
) -> None:
    encoded = base64.b64encode(TOKEN.encode()).decode()
    for variant, docs in rendered.items():
        external = variant == "external-services"
        secret_name = "homefeed-admin" if external else f"{FULLNAME}-admin"
        holders = [d for d in docs if TOKEN in json.dumps(d) or encoded in json.dumps(d)]
        if external:
            assert holders == [] and not kind(docs, "Secret")
        else:
            assert [(d["kind"], d["metadata"]["name"]) for d in holders] == [
                ("Secret", secret_name)
            ]
            assert holders[0]["data"] == {"token": encoded}
        readers = set()
        for owner, pod in pod_templates(docs):
            for c in pod["spec"]["containers"]:
                refs = secret_refs(c)
                if secret_name in refs:
                    readers.add(component(owner))
                    assert env_of(docs, c)["HOMEFEED_ADMIN_TOKEN"]["secretKeyRef"] == {
                        "name": secret_name,
                        "key": "admin-token" if external else "token",
                    }
            volumes = pod["spec"].get("volumes") or []
            assert all((v.get("secret") or {}).get("secretName") != secret_name for v in volumes)
        assert readers == {c for c in ADMIN_COMPONENTS if c in serving(docs)}, variant


# ---- environment, metrics, tracing, mTLS --------------------------------------------------


def test_services_settings_metrics_and_tracing(rendered: dict[str, list[Doc]]) -> None:
    for variant, docs in rendered.items():
        external = variant == "external-services"
        for name, deployment in serving(docs).items():
            c = container(deployment)
            env = env_of(docs, c)
            prefix = f"HOMEFEED_{ENV_PREFIX[name]}_"
            assert env[prefix + "HOST"] == "0.0.0.0"
            assert env[prefix + "PORT"] == str(SERVING_PORTS[name])
            assert env[prefix + "METRICS_PORT"] == str(METRICS_PORT)
            assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in c[
                "ports"
            ]
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(METRICS_PORT)
            assert env["OTEL_SERVICE_NAME"] == f"homefeed-{name}"
            assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
            assert env["OTEL_TRACES_SAMPLER_ARG"] == ("0.05" if external else "0.1")
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
                "http://otel-collector.observability.svc.cluster.local:4317"
                if external
                else f"http://{FULLNAME}-jaeger:4317"
            )
            assert env["HOMEFEED_HOME"] == "/var/lib/homefeed"
            assert env["HOMEFEED_ONLINE_STORE"] == "redis"
            assert env["HOMEFEED_REDIS"] == (
                "redis.data.svc.cluster.local:6379" if external else f"{FULLNAME}-redis:6379"
            )
            assert env["MLFLOW_TRACKING_URI"] == (
                "http://mlflow.mlops.svc.cluster.local:5000"
                if external
                else f"http://{FULLNAME}-mlflow:5000"
            )
            tls = {k: v for k, v in env.items() if k.startswith("HOMEFEED_TLS_")}
            if variant == "mtls":
                assert tls == {
                    "HOMEFEED_TLS_CERT": "/etc/homefeed/tls/tls.crt",
                    "HOMEFEED_TLS_KEY": "/etc/homefeed/tls/tls.key",
                    "HOMEFEED_TLS_CA": "/etc/homefeed/tls/ca.crt",
                }
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/homefeed/tls")
                assert mount["readOnly"] is True
                volume = next(
                    v
                    for v in deployment["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == mount["name"]
                )
                assert volume["secret"]["secretName"] == "homefeed-mtls"
            else:
                assert tls == {}
        gateway = env_of(docs, container(serving(docs)["gateway"]))
        for hop in ("retrieval", "features", "ranking", "rollout"):
            assert (
                gateway[f"HOMEFEED_{hop.upper()}_ADDR"] == f"{FULLNAME}-{hop}:{SERVING_PORTS[hop]}"
            )
        assert gateway["HOMEFEED_GATEWAY_REPLICA"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_tracing_off_sets_no_endpoint(tmp_path: Path) -> None:
    values = write_values(tmp_path, "off", with_token({"tracing": {"enabled": False}}))
    docs = chart.render([values])
    settings = named(docs, "ConfigMap", f"{FULLNAME}-settings")["data"]
    assert not any(k.startswith("OTEL_EXPORTER") or k.startswith("OTEL_TRACES") for k in settings)


def test_disruption_budgets_and_autoscalers(rendered: dict[str, list[Doc]]) -> None:
    default = {component(d) for d in kind(rendered["default"], "PodDisruptionBudget")}
    assert default == {"gateway", "retrieval", "features", "ranking"}  # 2 replicas each
    assert not kind(rendered["default"], "HorizontalPodAutoscaler")
    docs = rendered["canary"]  # canary with 2 replicas, HPAs on gateway and ranking
    assert {component(d) for d in kind(docs, "PodDisruptionBudget")} == default | {"ranking-canary"}
    hpas = {component(d): d for d in kind(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"gateway", "ranking"}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-{name}"
        assert "replicas" not in named(docs, "Deployment", f"{FULLNAME}-{name}")["spec"]


def test_dashboard_shows_the_mesh(rendered: dict[str, list[Doc]]) -> None:
    (dashboard,) = [
        d
        for d in kind(rendered["canary"], "ConfigMap")
        if "grafana_dashboard" in d["metadata"]["labels"]
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["homefeed.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for metric in [
        "histogram_quantile(0.99, sum by (le, rpc) (rate(homefeed_rpc_duration_seconds_bucket",
        "homefeed_feeds_total",
        "sum by (hop) (rate(homefeed_fallbacks_total",
        "homefeed_shed_total",
        "homefeed_breaker_state",
        "homefeed_canary_weight",
        "homefeed_rollout_checks_total",
        "homefeed_model_info",
        "homefeed_feature_age_seconds",
    ]:
        assert metric in exprs, metric
    default = kind(rendered["default"], "ConfigMap")  # the dashboard is off by default
    assert all("grafana_dashboard" not in d["metadata"]["labels"] for d in default)


def test_jobs_run_the_cli_on_the_training_image(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["canary"]
    (cron,) = kind(docs, "CronJob")
    (job,) = kind(docs, "Job")
    retrain = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    materialize = job["spec"]["template"]["spec"]["containers"][0]
    assert retrain["image"] == materialize["image"] == "ghcr.io/homefeed/homefeed:0.1.0-training"
    assert retrain["command"] == [
        *("python", "-m", "tools.cli", "train", "--dataset", "sim-small"),
        *("--trials", "16"),
    ]
    assert materialize["command"][:7] == [
        *("python", "-m", "tools.cli", "features", "materialize", "--dataset", "sim-small")
    ]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"


# ---- the online loop: the event log, the impression log, the experiment ------------------

EVENTS_ADDR = f"{FULLNAME}-features:{SERVING_PORTS['features']}"  # LogEvents: the features port


def set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, Any]) -> None:
    """A rendered container's plain variables in this process (valueFrom ones left out)."""
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)


def test_events_go_to_a_redis_stream_by_default(
    rendered: dict[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from contract.eventlog import is_redis_url
    from services.features.settings import FeaturesSettings
    from services.gateway.settings import GatewaySettings

    for variant, url in [
        ("default", f"redis://{FULLNAME}-redis:6379/1"),
        ("canary", f"redis://{FULLNAME}-redis:6379/1"),
        ("mtls", f"redis://{FULLNAME}-redis:6379/1"),
        ("external-services", "redis://redis.data.svc.cluster.local:6379/1"),
    ]:
        docs = rendered[variant]
        deployments = serving(docs)
        features = env_of(docs, container(deployments["features"]))
        assert features["HOMEFEED_EVENT_LOG"] == url, variant
        assert "HOMEFEED_EVENT_LOG_FSYNC" not in features  # a directory log's setting
        gateway = env_of(docs, container(deployments["gateway"]))
        assert gateway["HOMEFEED_EVENTS_ADDR"] == EVENTS_ADDR
        assert gateway["HOMEFEED_GATEWAY_LOG_FEEDS"] == "true"
        assert gateway["HOMEFEED_GATEWAY_LOG_FEATURES_RATE"] == "0.05"
        assert "HOMEFEED_GATEWAY_EXPERIMENT" not in gateway
        for name, deployment in deployments.items():  # the features process is the one writer
            if name != "features":
                assert "HOMEFEED_EVENT_LOG" not in env_of(docs, container(deployment)), name
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("ConfigMap", f"{FULLNAME}-experiment") not in names
        assert ("PersistentVolumeClaim", f"{FULLNAME}-eventlog") not in names
        # several features replicas share the stream; a rolling update is fine
        assert "strategy" not in named(docs, "Deployment", f"{FULLNAME}-features")["spec"]
    # the release's Redis keeps the stream across restarts: append-only file on its claim
    docs = rendered["default"]
    args = container(named(docs, "Deployment", f"{FULLNAME}-redis"))["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    # and the services read the rendered variables as meant
    set_env(monkeypatch, env_of(docs, container(serving(docs)["features"])))
    features_settings = FeaturesSettings.from_env()
    assert features_settings.event_log_location == f"redis://{FULLNAME}-redis:6379/1"
    assert is_redis_url(features_settings.event_log_location)
    set_env(monkeypatch, env_of(docs, container(serving(docs)["gateway"])))
    gateway_settings = GatewaySettings.from_env()
    assert gateway_settings.events_addr == EVENTS_ADDR
    assert gateway_settings.log_feeds is True
    assert gateway_settings.log_features_rate == 0.05
    assert gateway_settings.experiment is None


def test_directory_event_log_has_one_writer_on_its_claim(
    rendered: dict[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.features.settings import FeaturesSettings

    docs = rendered["online"]  # events.log: directory, features.replicas: 1
    features = named(docs, "Deployment", f"{FULLNAME}-features")
    assert features["spec"]["replicas"] == 1
    # the old pod releases the log's lock (and the ReadWriteOnce volume) before the new starts
    assert features["spec"]["strategy"] == {"type": "Recreate"}
    assert not [d for d in kind(docs, "PodDisruptionBudget") if component(d) == "features"]
    c = container(features)
    env = env_of(docs, c)
    assert env["HOMEFEED_EVENT_LOG"] == "/var/lib/homefeed/eventlog/sim-small"
    assert env["HOMEFEED_EVENT_LOG_FSYNC"] == "true"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    mount = mounts["/var/lib/homefeed/eventlog"]
    assert not mount.get("readOnly")
    volumes = {v["name"]: v for v in features["spec"]["template"]["spec"]["volumes"]}
    claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim_name == f"{FULLNAME}-eventlog"
    claim = named(docs, "PersistentVolumeClaim", claim_name)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # no other pod mounts the claim
    users = [
        owner["metadata"]["name"]
        for owner, pod in pod_templates(docs)
        for v in pod["spec"].get("volumes") or []
        if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim_name
    ]
    assert users == [f"{FULLNAME}-features"]
    set_env(monkeypatch, env)
    settings = FeaturesSettings.from_env()
    assert settings.event_log_location == "/var/lib/homefeed/eventlog/sim-small"
    assert settings.event_log_fsync is True
    # an existing claim is used as is
    docs = chart.render(
        [chart.CI_VALUES / "online-values.yaml"],
        extra=["--set", "events.directory.persistence.existingClaim=eventlog-archive"],
    )
    claims = {d["metadata"]["name"] for d in kind(docs, "PersistentVolumeClaim")}
    assert f"{FULLNAME}-eventlog" not in claims
    features = named(docs, "Deployment", f"{FULLNAME}-features")
    volumes = {v["name"]: v for v in features["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "eventlog-archive"


def test_directory_event_log_with_several_replicas_fails_the_render(tmp_path: Path) -> None:
    for replicas in (2, 3):
        values = with_token({"events": {"log": "directory"}, "features": {"replicas": replicas}})
        done = chart.helm_template([write_values(tmp_path, f"replicas-{replicas}", values)])
        assert done.returncode != 0
        assert (
            "events.log=directory: a directory event log has exactly one writer (it holds a "
            f"lock), so it needs features.replicas=1, got {replicas}"
        ) in done.stderr


def test_experiment_is_a_mounted_configmap_the_gateway_loads(
    rendered: dict[str, list[Doc]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.gateway.experiment import Arm, Experiment
    from services.gateway.settings import GatewaySettings

    docs = rendered["online"]
    configmap = named(docs, "ConfigMap", f"{FULLNAME}-experiment")
    gateway = named(docs, "Deployment", f"{FULLNAME}-gateway")
    c = container(gateway)
    env = env_of(docs, c)
    path = Path(env["HOMEFEED_GATEWAY_EXPERIMENT"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert set(configmap["data"]) == {path.name}
    # the file parses with the gateway's own loader, as the values gave it
    local = tmp_path / path.name
    local.write_text(configmap["data"][path.name])
    experiment = Experiment.load(local)
    assert experiment == Experiment(
        name="champion-vs-heuristic",
        salt="exp-2026-12",
        arms=(
            Arm(name="champion", share=0.45, policy="model", model_version="7"),
            Arm(name="heuristic", share=0.45, policy="heuristic"),
        ),
    )
    set_env(monkeypatch, env)
    monkeypatch.setenv("HOMEFEED_GATEWAY_EXPERIMENT", str(local))
    settings = GatewaySettings.from_env()
    assert settings.experiment == experiment
    assert settings.log_features_rate == 0.1
    # only the experiment's pods carry its checksum, and a change rolls the gateways only
    checksums = {
        component(owner): (pod["metadata"].get("annotations") or {}).get("checksum/experiment")
        for owner, pod in pod_templates(docs)
        if owner["kind"] == "Deployment"
    }
    assert checksums.pop("gateway")
    assert set(checksums.values()) == {None}
    salted = write_values(tmp_path, "salt", {"experiment": {"salt": "exp-2027-01"}})
    changed = chart.render([chart.CI_VALUES / "online-values.yaml", salted])
    assert experiment_checksum(changed) != experiment_checksum(docs)
    for name in ("features", "retrieval", "ranking", "rollout"):
        deployment = f"{FULLNAME}-{name}"
        assert named(changed, "Deployment", deployment) == named(docs, "Deployment", deployment)
    # a --set share (a string) still renders a number
    docs = chart.render(
        [chart.CI_VALUES / "online-values.yaml"],
        extra=["--set", "experiment.arms[1].share=0.55"],
    )
    data = yaml.safe_load(named(docs, "ConfigMap", f"{FULLNAME}-experiment")["data"][path.name])
    assert data["arms"][1]["share"] == 0.55


def experiment_checksum(docs: list[Doc]) -> str:
    gateway = named(docs, "Deployment", f"{FULLNAME}-gateway")
    return str(gateway["spec"]["template"]["metadata"]["annotations"]["checksum/experiment"])


def test_frontends_reach_log_events_on_the_features_port(rendered: dict[str, list[Doc]]) -> None:
    for variant, namespace in [("default", chart.NAMESPACE), ("external-services", "storefront")]:
        docs = rendered[variant]
        policies = [p for p in kind(docs, "NetworkPolicy") if not is_hook(p)]
        pods = release_pods(docs)
        frontend = Pod("frontend", {"homefeed.io/frontend": "true"}, namespace)
        features = pods["features"]
        assert admits(policies, frontend, features, SERVING_PORTS["features"]), variant
        assert admits(policies, pods["gateway"], features, SERVING_PORTS["features"]), variant
        assert not admits(policies, Pod("stranger", {}, namespace), features, 50053), variant
        assert not admits(policies, frontend, features, METRICS_PORT), variant
        for name in ("retrieval", "ranking", "rollout"):
            assert not admits(policies, frontend, pods[name], SERVING_PORTS[name]), (variant, name)


# ---- the values: schema, and every key read -----------------------------------------------


def test_invalid_values_are_refused_by_the_schema() -> None:
    done = chart.helm_template([chart.INVALID_VALUES])
    assert done.returncode != 0
    assert chart.SCHEMA_REFUSAL in done.stderr
    for complaint in [
        "/gateway/replicas",
        "/ranking/canary/faults/scores",
        "enabeld",
        "/ranking/canary/modelVersion",
    ]:
        assert complaint in done.stderr, complaint


def experiment_values(first_arm: dict[str, Any] | None = None) -> dict[str, Any]:
    """An experiment's values: arms a (0.5, model) and b (0.5, heuristic), the first arm
    changed by ``first_arm``."""
    return {
        "enabled": True,
        "name": "ab",
        "salt": "s1",
        "arms": [
            {"name": "a", "share": 0.5, "policy": "model", **(first_arm or {})},
            {"name": "b", "share": 0.5, "policy": "heuristic"},
        ],
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "admin token missing: set admin.token"),
        (with_token({"ranking": {"canary": {"enabled": True}}}), "/ranking/canary/modelVersion"),
        (
            with_token({"ranking": {"canary": {"enabled": True, "modelVersion": "seven"}}}),
            "/ranking/canary/modelVersion",
        ),
        (with_token({"mtls": {"enabled": True}}), "/mtls/secretName"),
        (with_token({"redis": {"enabled": False}}), "/redis/externalAddress"),
        (with_token({"jaeger": {"enabled": False}}), "/tracing/otlpEndpoint"),
        (with_token({"securityContext": {"runAsUser": 0}}), "/securityContext/runAsUser"),
        (with_token({"rollout": {"mirrorShare": "1.5"}}), "/rollout/mirrorShare"),
        (
            with_token({"gateway": {"env": {"HOMEFEED_GATEWAY_PORT": "1"}}}),
            "gateway.env.HOMEFEED_GATEWAY_PORT: the chart sets",
        ),
        (
            with_token({"features": {"env": {"HOMEFEED_EVENT_LOG": "/tmp/log"}}}),
            "features.env.HOMEFEED_EVENT_LOG: the chart sets",
        ),
        (
            with_token({"events": {"log": "directory"}}),
            "events.log=directory: a directory event log has exactly one writer",
        ),
        (
            with_token({"redis": {"persistence": {"enabled": False}}}),
            "events.log=redis keeps the event log in the release's Redis",
        ),
        (with_token({"events": {"logFeaturesRate": 1.5}}), "/events/logFeaturesRate"),
        (with_token({"events": {"log": "kafka"}}), "/events/log"),
        (with_token({"experiment": {"enabled": True}}), "/experiment/arms"),
        (
            with_token({"experiment": experiment_values({"policy": "random"})}),
            "/experiment/arms/0/policy",
        ),
        (
            with_token({"experiment": experiment_values({"share": 0.7})}),
            "experiment.arms: the shares sum to 1.2",
        ),
        (
            with_token({"experiment": experiment_values({"name": "b"})}),
            'experiment.arms: the arm name "b" is used twice',
        ),
    ],
)
def test_wrong_values_fail_with_a_clear_message(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    done = chart.helm_template([write_values(tmp_path, "wrong", values)])
    assert done.returncode != 0
    assert message in done.stderr


def test_decimal_set_values_are_accepted() -> None:
    """`helm --set x=0.2` passes a string; the rehearsal must still be expressible so."""
    docs = chart.render(
        [chart.CI_VALUES / "default-values.yaml"],
        extra=[
            *("--set", "ranking.canary.enabled=true", "--set", "ranking.canary.modelVersion=9"),
            *("--set", "ranking.canary.faults.errorRate=0.2"),
        ],
    )
    canary = named(docs, "Deployment", f"{FULLNAME}-ranking-canary")
    assert env_of(docs, container(canary))["HOMEFEED_RANKING_FAULTS"] == "error_rate=0.2"


def leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every leaf; a list or an empty map is a leaf."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, (*path, key))
    else:
        yield path, tree


def schema_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for key in (*path, None):
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        if key is None:
            break
        node = (node.get("properties") or {}).get(key) or {}
    return node


def scalar_changes(value: Any, node: dict[str, Any]) -> list[Any]:
    """Values that differ from ``value`` and may pass the schema, likeliest first."""
    if "enum" in node:
        return [v for v in node["enum"] if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1] if value > 0 else [value + 1]
    if isinstance(value, float):
        return [value / 2 if value else 0.5]
    if value == "":
        return ["x", "example.com:1", "http://example.com"]
    text = str(value)
    bumped = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), text, count=1)
    return [c for c in (bumped, f"{text}-x") if c != text]


def changes(value: Any, node: dict[str, Any]) -> list[Any]:
    if isinstance(value, list):
        if not value:
            return [["x"], [{"name": "x"}]]
        items = node.get("items") or {}
        if isinstance(value[0], dict):  # a list of objects: change one field of the first
            fields = items.get("properties") or {}
            return [
                [{**value[0], key: c}, *value[1:]]
                for key, v in value[0].items()
                for c in scalar_changes(v, fields.get(key) or {})
            ]
        first = scalar_changes(value[0], items)
        return [[c, *value[1:]] for c in first]
    if isinstance(value, dict):
        return [
            {"EXAMPLE_X": "changed"},
            {"example.com/x": "changed"},
            {"matchLabels": {"example.com/x": "changed"}},
        ]
    return scalar_changes(value, node)


def nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return dict(out)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# The configurations in which each value can matter: every optional part on (autoscaling off,
# so replicas count), the autoscalers on, mTLS on, the directory event log, and the external
# services.
ALL_ON: dict[str, Any] = with_token(
    {
        "ranking": {"canary": {"enabled": True, "modelVersion": 7}},
        "retrain": {"enabled": True},
        "grafana": {"dashboard": {"enabled": True}},
        "experiment": experiment_values({"model_version": 7}),
    }
)
BASES: dict[str, dict[str, Any]] = {
    "all-on": ALL_ON,
    "autoscaled": merged(
        ALL_ON,
        {
            "gateway": {"autoscaling": {"enabled": True}},
            "ranking": {"autoscaling": {"enabled": True}},
        },
    ),
    "mtls": merged(ALL_ON, {"mtls": {"enabled": True, "secretName": "tls"}}),
    # the event log in segment files on a claim (one features replica)
    "directory-log": merged(ALL_ON, {"events": {"log": "directory"}, "features": {"replicas": 1}}),
    "external": yaml.safe_load((chart.CI_VALUES / "external-services-values.yaml").read_text()),
}


def test_every_value_is_read_by_a_template(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each leaf of values.yaml is changed (to a value its schema accepts) on top of a base
    configuration, and the rendered output must change under at least one base.

    Rendering beats grepping templates for ``.Values.<path>``: the templates read many values
    through variables and helpers (``$canary := .Values.ranking.canary``, a component's values
    passed to the shared Deployment), which a grep would miss, and a grep is satisfied by a
    reference that never reaches the output (a comment, a dead branch)."""
    tmp = tmp_path_factory.mktemp("values")
    defaults = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    bases = {}
    for name, overrides in BASES.items():
        path = write_values(tmp, f"base-{name}", overrides)
        bases[name] = (path, merged(defaults, overrides), chart.helm_template([path]).stdout)
        assert bases[name][2], name

    def read_somewhere(index: int, path: tuple[str, ...]) -> str | None:
        """None when a change of ``path`` changes some base's output, else why not."""
        refused = 0
        for name, (base_file, effective, output) in bases.items():
            for candidate in changes(lookup(effective, path), schema_at(schema, path)):
                change = write_values(tmp, f"change-{index}-{name}", nested(path, candidate))
                done = chart.helm_template([base_file, change])
                if done.returncode != 0:
                    refused += 1
                    continue
                if done.stdout != output:
                    return None
                break  # accepted but without effect here: try the next base
        return f"{'.'.join(path)}: {'no accepted change' if refused else 'never read'}"

    paths = [path for path, _ in leaves(defaults)]
    assert len(paths) > 100
    with futures.ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(read_somewhere, range(len(paths)), paths) if p]
    assert problems == []


# ---- the helm test pods' scripts, run against real servers --------------------------------


def pod_script(docs: list[Doc], name: str) -> tuple[str, list[str]]:
    pod = named(docs, "Pod", f"{FULLNAME}-test-{name}")
    c = pod["spec"]["containers"][0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert c["command"][:2] == ["python", "-c"]
    return c["command"][2], list(c["args"])


@pytest.fixture
def grpc_server() -> Iterator[tuple[grpc.Server, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    yield server, port
    server.stop(None)


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
    )


def test_health_test_pod_checks_every_service(
    rendered: dict[str, list[Doc]], grpc_server: tuple[grpc.Server, int]
) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    script, args = pod_script(rendered["canary"], "health")
    assert args == [f"{c}={FULLNAME}-{c}:{port}" for c, port in SERVING_PORTS.items()]
    server, port = grpc_server
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.start()
    done = run_script(script, [f"gateway=127.0.0.1:{port}", f"ranking=127.0.0.1:{port}"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SERVING") == 2


def test_feed_test_pod_asks_the_gateway_for_a_whole_page(
    rendered: dict[str, list[Doc]], grpc_server: tuple[grpc.Server, int]
) -> None:
    from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

    script, args = pod_script(rendered["default"], "feed")
    assert args == [f"{FULLNAME}-gateway:50051", "42"]
    asked: list[int] = []

    class Gateway(feed_pb2_grpc.FeedServiceServicer):
        def GetFeed(self, request: Any, context: Any) -> Any:  # noqa: N802 (the RPC's name)
            asked.append(request.user_id)
            return feed_pb2.GetFeedResponse(item_ids=[3, 1, 2], model_version="7", arm="stable")

    server, port = grpc_server
    feed_pb2_grpc.add_FeedServiceServicer_to_server(Gateway(), server)
    server.start()
    done = run_script(script, [f"127.0.0.1:{port}", "42"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert asked == [42]
    assert "3 items, model 7, arm stable" in done.stdout


# ---- make chart -----------------------------------------------------------------------------


def test_make_chart_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert chart.main([]) == 0
    out = capsys.readouterr().out
    for variant in ("default", "canary", "mtls", "external-services"):
        assert re.search(rf"^{variant}\s+\d+\s+\d+\s+ok$", out, re.M), variant
    assert re.search(r"^values-invalid\s+0\s+0\s+refused \(ok\)$", out, re.M)


def test_kubernetes_schemas_catch_a_wrong_field() -> None:
    """The validation make chart relies on refuses what the API server would."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replica": 2, "selector": {}, "template": {}},
    }
    assert "'replica' was unexpected" in (chart.validation_error(deployment) or "")
