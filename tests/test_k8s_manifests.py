"""The deployment artifacts: the kustomize overlays (``k8s/``) and the serving image's
dependency set (``requirements-serving.lock``, what the Dockerfile's serving target installs).

- Each overlay renders with the real ``kubectl kustomize`` and every document validates
  strictly against the Kubernetes 1.35 schemas; then the properties a schema cannot see:
  hardened pods, gRPC probes on the right ports, the settings and addresses each service
  reads, the NetworkPolicies' reachability, the rollout controller's RBAC, and what each
  overlay adds.
- The serving dependency set installs alone in a fresh venv (wheels only, no compiler) and
  holds every module the services import, at start and lazily, and none of the training
  stack. ``tests/test_layers.py`` checks the other side: what a service really loads at run
  time inside the development venv, where everything is installed.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from contract.paths import REPO_ROOT

KUBECTL = REPO_ROOT / ".venv" / "bin" / "kubectl"
K8S_VERSION = "1.35"
OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "homefeed-dev", "prod": "homefeed"}
IMAGE = "ghcr.io/homefeed/homefeed"
UID = 10001
METRICS_PORT = 9464


@dataclass(frozen=True)
class Svc:
    port: int
    readiness: str  # the health service the readiness probe asks ("" for the server's own)
    admin_port: int | None = None


SERVICES = {
    "gateway": Svc(50051, "homefeed.feed.v1.FeedService"),
    "retrieval": Svc(50052, "homefeed.retrieval.v1.RetrievalService"),
    "features": Svc(50053, "homefeed.features.v1.FeaturesService"),
    "ranking": Svc(50054, "homefeed.ranking.v1.RankingService", admin_port=50064),
    "rollout": Svc(50055, "homefeed.rollout.v1.RolloutService", admin_port=50065),
}
# What a serving image does not have (pyproject's import contract lists a few more).
TRAINING_STACK = ("torch", "optuna", "lightgbm", "sklearn", "duckdb")


# ---- rendering --------------------------------------------------------------------------------

Doc = dict[str, Any]


@dataclass(frozen=True)
class Render:
    overlay: str
    docs: list[Doc]

    def all(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> Doc:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def deployment(self, component: str) -> Doc:
        return self.get("Deployment", f"homefeed-{component}")

    def container(self, component: str) -> Doc:
        containers = self.deployment(component)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, f"{component}: one container per pod"
        return containers[0]

    def env(self, component: str) -> dict[str, Doc]:
        """The container's env entries by name (each name once)."""
        entries = self.container(component).get("env", [])
        names = [e["name"] for e in entries]
        assert len(names) == len(set(names)), f"{component}: an env name set twice: {names}"
        return {e["name"]: e for e in entries}

    def settings(self, component: str) -> dict[str, str]:
        """What the container reads: its envFrom ConfigMaps, then its own plain values."""
        values: dict[str, str] = {}
        for source in self.container(component).get("envFrom", []):
            values |= self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {})
        values |= {n: e["value"] for n, e in self.env(component).items() if "value" in e}
        return values


def _render(overlay: str) -> Render:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(REPO_ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay}:\n{done.stderr}"
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert docs, f"k8s/overlays/{overlay} rendered nothing"
    return Render(overlay, docs)


@pytest.fixture(scope="module")
def renders() -> dict[str, Render]:
    if not KUBECTL.exists():
        pytest.skip(f"{KUBECTL.relative_to(REPO_ROOT)} is missing: run `make k8s-tools`")
    return {overlay: _render(overlay) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def render(request: pytest.FixtureRequest, renders: dict[str, Render]) -> Render:
    return renders[request.param]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(kind/name, pod spec) of every object that runs pods."""
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield where, d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield where, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield where, d["spec"]


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# ---- every document ---------------------------------------------------------------------------


def test_every_document_validates_strictly_against_kubernetes_1_35(render: Render) -> None:
    errors = []
    for doc in render.docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            version = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{where}: {'.'.join(map(str, err.path))}: {err.message}")
            continue
        except kubernetes_validate.SchemaNotFoundError as err:  # an unknown kind is an error
            errors.append(f"{where}: {err.message}")
            continue
        if version != K8S_VERSION:
            errors.append(f"{where}: validated against {version}, not {K8S_VERSION}")
    assert errors == [], f"{render.overlay}:\n" + "\n".join(errors)


def test_strict_validation_refuses_a_field_kubernetes_does_not_have(render: Render) -> None:
    doc = copy.deepcopy(render.deployment("gateway"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_overlay_renders_the_mesh_into_its_namespace(render: Render) -> None:
    namespace = NAMESPACES[render.overlay]
    ns = render.get("Namespace", namespace)
    # every homefeed pod meets the restricted Pod Security Standard, so it is enforced
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
    for doc in render.docs:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]
    assert not [d for d in render.docs if d["kind"] in cluster_scoped - {"Namespace"}]
    # the admin token is created by hand, never rendered
    assert render.all("Secret") == []
    deployments = {d["metadata"]["name"] for d in render.all("Deployment")}
    assert deployments == {f"homefeed-{c}" for c in SERVICES}


# ---- pods -------------------------------------------------------------------------------------


def test_every_pod_is_non_root_read_only_and_without_capabilities(render: Render) -> None:
    specs = list(pod_specs(render.docs))
    assert len(specs) == len(SERVICES)
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] == UID and pod["runAsGroup"] == UID, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
        # service links would inject HOMEFEED_<SVC>_PORT=tcp://... over the settings
        assert spec["enableServiceLinks"] is False, where
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("privileged") is not True, where
            assert c["image"].rsplit(":", 1)[0] == IMAGE, where
            # writable scratch: emptyDir volumes at /tmp and the model cache
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            for path in ("/tmp", "/var/cache/homefeed/models"):
                assert "emptyDir" in mounts[path], f"{where}: {path}"


def test_only_the_rollout_controller_talks_to_the_api_server(render: Render) -> None:
    for where, spec in pod_specs(render.docs):
        if where == "Deployment/homefeed-rollout":
            assert spec["serviceAccountName"] == "homefeed-rollout"
            assert spec["automountServiceAccountToken"] is True
        else:
            assert spec["automountServiceAccountToken"] is False, where
            assert spec.get("serviceAccountName", "default") == "default", where


@pytest.mark.parametrize("component", list(SERVICES))
def test_each_service_runs_its_module_and_listens_where_its_service_points(
    render: Render, component: str
) -> None:
    svc = SERVICES[component]
    deployment = render.deployment(component)
    container = render.container(component)
    assert container["command"] == ["python", "-m", f"services.{component}"]
    labels = {
        "app.kubernetes.io/name": "homefeed",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "homefeed",
    }
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels.items() <= deployment["metadata"]["labels"].items()
    assert labels.items() <= pod_labels.items()
    assert matches(deployment["spec"]["selector"], pod_labels)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == svc.port and ports["metrics"] == METRICS_PORT
    env = render.settings(component)
    prefix = f"HOMEFEED_{component.upper()}_"
    assert env[prefix + "HOST"] == "0.0.0.0"
    assert env[prefix + "PORT"] == str(svc.port)
    assert env[prefix + "METRICS_PORT"] == str(METRICS_PORT)
    assert env["OTEL_SERVICE_NAME"] == f"homefeed-{component}"
    if svc.admin_port is not None:
        assert ports["grpc-admin"] == svc.admin_port
        assert env[prefix + "ADMIN_PORT"] == str(svc.admin_port)

    service = render.get("Service", f"homefeed-{component}")
    assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == svc.port and ports[grpc["targetPort"]] == svc.port


def test_every_service_reads_the_shared_settings(render: Render) -> None:
    sampling = {"dev": "1.0", "prod": "0.1"}[render.overlay]
    for component in SERVICES:
        env = render.settings(component)
        assert env["HOMEFEED_HOME"] == "/var/lib/homefeed"
        assert env["HOMEFEED_MODEL"] == "champion"
        assert env["HOMEFEED_MODEL_CACHE"] == "/var/cache/homefeed/models"
        assert env["HOMEFEED_DATASET"]
        assert env["HOMEFEED_ONLINE_STORE"] == "redis"
        assert re.fullmatch(r"[a-z0-9.-]+:\d+", env["HOMEFEED_REDIS"]), env["HOMEFEED_REDIS"]
        assert re.fullmatch(r"https?://\S+", env["MLFLOW_TRACKING_URI"])
        assert re.fullmatch(r"https?://\S+:4317", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == sampling
        assert env["HOME"] == "/tmp"  # writable: the root filesystem is not


def test_the_addresses_name_rendered_services_of_the_right_pods(render: Render) -> None:
    def pods_behind(address: str) -> str:
        """The component whose pods serve ``host:port``, through a rendered Service."""
        host, port = address.rsplit(":", 1)
        service = render.get("Service", host)
        assert int(port) in [p["port"] for p in service["spec"]["ports"]], address
        components = {
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            for d in render.all("Deployment")
            if matches(
                {"matchLabels": service["spec"]["selector"]},
                d["spec"]["template"]["metadata"]["labels"],
            )
        }
        assert len(components) == 1, f"{address} selects {components}"
        return components.pop()

    gateway = render.settings("gateway")
    for hop in ("retrieval", "features", "ranking", "rollout"):
        assert pods_behind(gateway[f"HOMEFEED_{hop.upper()}_ADDR"]) == hop
    assert gateway["HOMEFEED_ROLLOUT_ADDR"] == "homefeed-rollout:50055"
    assert render.env("gateway")["HOMEFEED_GATEWAY_REPLICA"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }

    rollout = render.settings("rollout")
    # the headless Service names every stable ranking pod: the controller reloads each
    assert rollout["HOMEFEED_ROLLOUT_STABLE_ADMIN_ADDR"] == "homefeed-ranking-admin:50064"
    assert pods_behind(rollout["HOMEFEED_ROLLOUT_STABLE_ADMIN_ADDR"]) == "ranking"
    assert render.get("Service", "homefeed-ranking-admin")["spec"]["clusterIP"] == "None"
    # the canary is released separately (k8s/README.md); its address is fixed
    assert rollout["HOMEFEED_ROLLOUT_CANARY_ADDR"] == "homefeed-ranking-canary:50054"
    field_refs = {
        name: e["valueFrom"]["fieldRef"]["fieldPath"]
        for name, e in render.env("rollout").items()
        if "fieldRef" in e.get("valueFrom", {})
    }
    assert field_refs == {
        "HOMEFEED_ROLLOUT_NAMESPACE": "metadata.namespace",
        "POD_NAME": "metadata.name",
    }


def test_only_ranking_and_the_controller_get_the_admin_token(render: Render) -> None:
    secrets: dict[str, set[tuple[str, str, str]]] = {}
    for component in SERVICES:
        for name, e in render.env(component).items():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                secrets.setdefault(component, set()).add((name, ref["name"], ref["key"]))
        assert not [s for s in render.container(component).get("envFrom", []) if "secretRef" in s]
    token = {("HOMEFEED_ADMIN_TOKEN", "homefeed-admin", "token")}
    assert secrets == {"ranking": token, "rollout": token}


@pytest.mark.parametrize("component", list(SERVICES))
def test_probes_are_native_grpc_on_the_serving_port(render: Render, component: str) -> None:
    svc = SERVICES[component]
    container = render.container(component)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert not {"httpGet", "tcpSocket", "exec"} & probe.keys(), f"{component} {kind}"
        assert probe["grpc"]["port"] == svc.port, f"{component} {kind}"
    # alive while the server answers; ready per the service (the gateway while a hop answers,
    # the controller while it leads)
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert container["readinessProbe"]["grpc"]["service"] == svc.readiness


# ---- network policies -------------------------------------------------------------------------


def ingress_allowed(
    policies: list[Doc], target: dict[str, str], source: dict[str, str], port: int
) -> bool:
    """Whether a pod labelled ``source`` may open ``port`` on a pod labelled ``target``, both
    in the policies' namespace: allowed when no policy selects the target, else when a rule
    of a selecting policy admits the source and the port."""
    selecting = [
        p
        for p in policies
        if matches(p["spec"]["podSelector"], target)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = peers is None or any(
                "namespaceSelector" not in peer and matches(peer["podSelector"], source)
                for peer in peers
            )
            ports = rule.get("ports")
            port_ok = ports is None or any(
                p["port"] <= port <= p.get("endPort", p["port"]) for p in ports
            )
            if peer_ok and port_ok:
                return True
    return False


def test_network_policies_admit_only_the_meshs_paths(render: Render) -> None:
    policies = render.all("NetworkPolicy")
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                assert set(peer) == {"podSelector"}, f"{policy['metadata']['name']}: {peer}"
            for p in rule.get("ports", []):
                assert isinstance(p["port"], int), "numbered ports: what the test reads"
    pods = {c: render.deployment(c)["spec"]["template"]["metadata"]["labels"] for c in SERVICES}
    # the canary, as the chart labels it, once released
    pods["canary"] = pods["ranking"] | {
        "app.kubernetes.io/component": "ranking-canary",
        "homefeed.io/track": "canary",
    }
    sources = {
        **{c: pods[c] for c in SERVICES},
        "frontend": {"homefeed.io/frontend": "true"},
        "operator": {"homefeed.io/operator": "true"},
        "prometheus": {"app.kubernetes.io/name": "prometheus"},
        "stranger": {"app": "something-else"},
    }
    expected = {
        ("gateway", 50051): {"frontend"},
        ("retrieval", 50052): {"gateway"},
        ("features", 50053): {"gateway", "frontend"},  # frontends send LogEvents
        ("ranking", 50054): {"gateway"},
        ("ranking", 50064): {"rollout"},
        ("canary", 50054): {"gateway", "rollout"},  # the controller checks its health
        ("canary", 50064): {"rollout"},
        ("rollout", 50055): {"gateway"},
        ("rollout", 50065): {"operator"},
        **{(target, METRICS_PORT): {"prometheus"} for target in pods},
        **{(target, 8080): set() for target in pods},  # any other port: nobody
    }
    actual = {
        (target, port): {
            name
            for name, labels in sources.items()
            if ingress_allowed(policies, pods[target], labels, port)
        }
        for target, port in expected
    }
    assert actual == expected


# ---- the rollout controller's RBAC ------------------------------------------------------------


def test_the_controllers_role_grants_only_its_two_objects(render: Render) -> None:
    assert {d["metadata"]["name"] for d in render.all("Role")} == {"homefeed-rollout"}
    role = render.get("Role", "homefeed-rollout")
    env = render.settings("rollout")
    configmap, lease = env["HOMEFEED_ROLLOUT_CONFIGMAP"], env["HOMEFEED_ROLLOUT_LEASE"]
    assert (configmap, lease) == ("homefeed-rollout-state", "homefeed-rollout-leader")
    granted = {}
    for rule in role["rules"]:
        assert len(rule["apiGroups"]) == len(rule["resources"]) == 1, rule
        assert "nonResourceURLs" not in rule
        key = (rule["apiGroups"][0], rule["resources"][0])
        assert key not in granted, f"{key} granted twice"
        granted[key] = (rule.get("resourceNames"), set(rule["verbs"]))
    assert granted.keys() == {("", "configmaps"), ("coordination.k8s.io", "leases")}
    assert granted[("", "configmaps")][0] == [configmap]
    assert granted[("coordination.k8s.io", "leases")][0] == [lease]
    for _, verbs in granted.values():
        # read and replace; `create` cannot be narrowed by name: the objects are rendered
        assert {"get", "update"} <= verbs <= {"get", "update", "patch"}, verbs
    assert render.get("ConfigMap", configmap).get("data") is None  # the controller writes it
    assert render.get("Lease", lease)["spec"] == {}  # no holder until the controller takes it

    bindings = render.all("RoleBinding")
    assert len(bindings) == 1
    assert bindings[0]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "homefeed-rollout",
    }
    assert bindings[0]["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "homefeed-rollout",
            "namespace": NAMESPACES[render.overlay],
        }
    ]
    render.get("ServiceAccount", "homefeed-rollout")
    # a rolling update would wait for a new pod that cannot lead while the old one holds
    # the Lease
    rollout = render.deployment("rollout")
    assert rollout["spec"]["strategy"] == {"type": "Recreate"}
    assert rollout["spec"]["replicas"] == 1


# ---- what each overlay adds -------------------------------------------------------------------


def test_dev_runs_one_small_replica_of_each(renders: dict[str, Render]) -> None:
    dev = renders["dev"]
    for component in SERVICES:
        assert dev.deployment(component)["spec"]["replicas"] == 1, component
        requests = dev.container(component)["resources"]["requests"]
        assert requests["cpu"] in ("50m", "100m"), component
    assert dev.all("HorizontalPodAutoscaler") == [] and dev.all("PodDisruptionBudget") == []


def test_prod_autoscales_and_protects_the_gateway_and_ranking(
    renders: dict[str, Render],
) -> None:
    prod = renders["prod"]
    hpas = {d["metadata"]["name"]: d for d in prod.all("HorizontalPodAutoscaler")}
    assert hpas.keys() == {"homefeed-gateway", "homefeed-ranking"}
    for component, least in (("gateway", 3), ("ranking", 2)):
        hpa = hpas[f"homefeed-{component}"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"homefeed-{component}",
        }
        assert hpa["spec"]["minReplicas"] == least < hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        # the HPA owns the count: an applied spec.replicas would reset it on every deploy
        assert "replicas" not in prod.deployment(component)["spec"]
    for component in ("retrieval", "features"):
        assert prod.deployment(component)["spec"]["replicas"] == 2

    pdbs = prod.all("PodDisruptionBudget")
    protected = set()
    for pdb in pdbs:
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["maxUnavailable"] == 1
        for component in SERVICES:
            labels = prod.deployment(component)["spec"]["template"]["metadata"]["labels"]
            if matches(pdb["spec"]["selector"], labels):
                protected.add(component)
    assert protected == {"gateway", "retrieval", "features", "ranking"}

    for component in ("gateway", "retrieval", "features", "ranking"):
        spec = prod.deployment(component)["spec"]["template"]["spec"]
        labels = prod.deployment(component)["spec"]["template"]["metadata"]["labels"]
        spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
        assert spread.keys() == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        assert all(matches(c["labelSelector"], labels) for c in spread.values())
        # larger than dev's
        assert prod.container(component)["resources"]["requests"]["cpu"] == "1"


# ---- the serving dependency set ---------------------------------------------------------------

# The project as the Dockerfile's build context holds it (.dockerignore): what `pip install .`
# needs, copied so the build writes nothing into the work tree.
PROJECT = (
    "pyproject.toml",
    "README.md",
    "contract",
    "services",
    "training",
    "tools",
    "feature_repo",
)
FIRST_PARTY = {"contract", "services", "feature_repo", "training", "tools", "homefeed"}

PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys
    from pathlib import Path

    services, lazy, training_stack, scratch = json.loads(sys.argv[1])
    for name in services:
        importlib.import_module(f"services.{name}.server")
        importlib.import_module(f"services.{name}.settings")
    missing = []
    for module, attr in lazy:
        try:
            loaded = importlib.import_module(module)
            if attr and not hasattr(loaded, attr):
                importlib.import_module(f"{module}.{attr}")
        except ImportError as err:
            missing.append(f"{module}:{attr} ({err})")
    # the services' Feast store: Redis online, no DuckDB offline store
    from contract.feature_store import open_store
    from contract.paths import Paths
    store = open_store(
        "probe", paths=Paths(Path(scratch)), online="redis", redis="127.0.0.1:9", offline=False
    )
    print("PROBE " + json.dumps({
        "missing": missing,
        "present": [m for m in training_stack if importlib.util.find_spec(m) is not None],
        "loaded": sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None}),
        "store": [store.config.online_store.type, store.config.offline_store.type],
        "contract": importlib.util.find_spec("contract").submodule_search_locations[0],
    }))
    """
)
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Network is unreachable|Name or service not known|ConnectTimeoutError"
)


def lazy_imports() -> list[tuple[str, str]]:
    """(module, name) of every third-party import inside a function of services/ or
    contract/: what a service imports only when it runs (Feast, the Kubernetes client, the
    MLflow client, ScaNN, TL2cgen, the telemetry exporters)."""
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.update((alias.name, "") for alias in child.names)
            elif in_function and isinstance(child, ast.ImportFrom) and child.level == 0:
                found.update((child.module or "", alias.name) for alias in child.names)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    for package in ("services", "contract"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            visit(ast.parse(path.read_text()), False)
    return sorted(
        (module, name)
        for module, name in found
        if module.split(".")[0] not in FIRST_PARTY | set(sys.stdlib_module_names)
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary folder removed afterwards (a venv of ~1 GB: not left to pytest's
    retention of the last three runs' tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="homefeed-serving-set-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pip(python: Path, *args: str, timeout: float) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if NETWORK_ERRORS.search(output):
            pytest.skip(f"network: the package registry cannot be reached: {output[-500:]}")
        pytest.fail(f"pip {' '.join(args)} failed:\n{output[-3000:]}")


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(900)
def test_the_serving_set_installs_alone_and_holds_what_the_services_import(
    scratch: Path,
) -> None:
    python = shutil.which("python3.11")
    if python is None:
        pytest.fail("python3.11 is not on PATH (make setup needs it too)")
    venv = scratch / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    # as the Dockerfile's serving-deps stage: the lock alone, wheels only (no compiler)
    lock = REPO_ROOT / "requirements-serving.lock"
    pip(vpy, "install", "--no-deps", "--only-binary=:all:", "-r", str(lock), timeout=600)
    source = scratch / "src"
    for name in PROJECT:
        item = REPO_ROOT / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(item, source / name)
    pip(vpy, "install", "--no-deps", str(source), timeout=300)
    # the lock is closed: everything the project and the lock's packages require is in it
    pip(vpy, "check", timeout=60)
    # the Dockerfile copies the Feast configurations beside the installed feature_repo
    # (pyproject.toml does not ship them as package data)
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for config in ("feature_store.yaml", "feature_store.redis.yaml"):
        shutil.copy2(REPO_ROOT / "feature_repo" / config, Path(site) / "feature_repo" / config)

    lazy = lazy_imports()
    assert ("feast", "FeatureStore") in lazy and ("kubernetes", "") in lazy  # the scan works
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMEFEED_", "PYTHON"))}
    env["PYTHONPATH"] = str(REPO_ROOT / "protos" / "gen")  # the generated stubs
    argument = json.dumps([list(SERVICES), lazy, TRAINING_STACK, str(scratch / "home")])
    probe = subprocess.run(
        [str(vpy), "-c", PROBE, argument],
        capture_output=True,
        text=True,
        env=env,
        cwd=scratch,  # not the work tree: the installed copy is what is probed
        timeout=300,
    )
    lines = [line for line in probe.stdout.splitlines() if line.startswith("PROBE ")]
    assert probe.returncode == 0 and lines, probe.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("PROBE "))
    assert Path(result["contract"]).is_relative_to(venv), result["contract"]
    assert result["missing"] == []
    assert result["present"] == []
    assert set(TRAINING_STACK) & set(result["loaded"]) == set()
    assert result["store"] == ["redis", "dask"]
    assert "redis" in result["loaded"]  # Feast's Redis online store, with its client
