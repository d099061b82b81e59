"""`make chart`: lint, render and schema-validate the Helm chart and the kustomize overlays.

For every values variant in ``helm/homefeed/ci/<name>-values.yaml``: ``helm lint --strict``,
``helm template`` (tests and hooks included), and every rendered document validated against
the Kubernetes 1.35 OpenAPI schemas with ``kubernetes_validate`` in strict mode (an unknown
field is an error, as the API server's strict field validation makes it).
``ci/values-invalid.yaml`` must be refused by the chart's ``values.schema.json``. Then each
``k8s/overlays/<name>/`` is rendered with ``kubectl kustomize`` and validated the same way.

One table row per variant; exit status 1 on any lint, render or schema failure. No cluster is
needed: helm and kubectl (``make k8s-tools`` puts them next to the venv's python) only render.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "homefeed"
CI_VALUES = CHART / "ci"
INVALID_VALUES = CI_VALUES / "values-invalid.yaml"
OVERLAYS = REPO / "k8s" / "overlays"
KUBE_VERSION = "1.35"
RELEASE = "homefeed"
NAMESPACE = "homefeed"
SCHEMA_REFUSAL = "values don't meet the specifications of the schema"


class ChartError(RuntimeError):
    """A tool is missing, or the chart does not lint or render."""


def tool(name: str) -> Path:
    """``helm`` or ``kubectl`` from the venv's bin folder (``make k8s-tools``)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ChartError(f"{path} not found: run `make k8s-tools`")
    return path


def helm_template(
    values: Sequence[Path] = (), *, chart: Path = CHART, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart as release ``homefeed`` in namespace ``homefeed``."""
    args = [str(tool("helm")), "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    args += ["--kube-version", f"{KUBE_VERSION}.0"]
    for path in values:
        args += ["--values", str(path)]
    return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=60)


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a rendered stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(values: Sequence[Path] = (), *, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The chart's documents for these values files; ChartError with helm's message when it
    refuses them."""
    done = helm_template(values, extra=extra)
    if done.returncode != 0:
        raise ChartError(done.stderr.strip() or f"helm template exited {done.returncode}")
    return documents(done.stdout)


def lint(values: Sequence[Path]) -> str | None:
    """``helm lint --strict``; None when clean, else its output."""
    args = [str(tool("helm")), "lint", "--strict", "--quiet", str(CHART)]
    args += ["--kube-version", f"{KUBE_VERSION}.0"]
    for path in values:
        args += ["--values", str(path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return None
    return (done.stdout + done.stderr).strip()


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


_validated: dict[str, str | None] = {}  # a document's JSON -> its error (None: valid)


def validation_error(doc: dict[str, Any]) -> str | None:
    """None when ``doc`` matches the Kubernetes schema of its kind (strict), else why not.
    Identical documents (most of them, across variants) are validated once."""
    key = json.dumps(doc, sort_keys=True, default=str)
    if key not in _validated:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            _validated[key] = None
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "(top level)"
            _validated[key] = f"{describe(doc)}: {where}: {err.message}"
        except (
            kubernetes_validate.SchemaNotFoundError,
            kubernetes_validate.InvalidSchemaError,
        ) as err:
            _validated[key] = f"{describe(doc)}: {err.message}"
    return _validated[key]


def validate_all(docs: Iterable[dict[str, Any]]) -> list[str]:
    return [error for doc in docs if (error := validation_error(doc)) is not None]


@dataclass
class Row:
    """One variant's outcome."""

    variant: str
    documents: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    result: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def check_variant(values: Path) -> Row:
    """Lint, render and validate one values variant."""
    row = Row(values.name.removesuffix("-values.yaml"))
    if (message := lint([values])) is not None:
        row.problems.append(f"helm lint --strict: {message}")
    try:
        docs = render([values])
    except ChartError as err:
        row.problems.append(f"helm template: {err}")
        docs = []
    row.documents = len(docs)
    row.kinds = Counter(str(doc.get("kind")) for doc in docs)
    row.problems += validate_all(docs)
    row.result = "ok" if row.ok else f"FAILED ({len(row.problems)})"
    return row


def check_refused(values: Path) -> Row:
    """A values file the schema must refuse: ``helm template`` exits non-zero, naming the
    schema."""
    row = Row(values.name.removesuffix(".yaml"))
    done = helm_template([values])
    if done.returncode == 0:
        row.documents = len(documents(done.stdout))
        row.problems.append(f"{values.name} was accepted; the schema must refuse it")
    elif SCHEMA_REFUSAL not in done.stderr:
        row.problems.append(f"refused, but not by the schema: {done.stderr.strip()}")
    row.result = "refused (ok)" if row.ok else "FAILED"
    return row


def check_overlay(overlay: Path) -> Row:
    """``kubectl kustomize`` one overlay and validate what it renders."""
    row = Row(f"k8s/{overlay.name}")
    done = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        row.problems.append(f"kubectl kustomize: {done.stderr.strip()}")
    else:
        docs = documents(done.stdout)
        row.documents = len(docs)
        row.kinds = Counter(str(doc.get("kind")) for doc in docs)
        row.problems += validate_all(docs)
    row.result = "ok" if row.ok else f"FAILED ({len(row.problems)})"
    return row


def variants() -> list[Path]:
    """The values variants that must render: ``ci/<name>-values.yaml``, ``default`` first."""
    return sorted(
        CI_VALUES.glob("*-values.yaml"), key=lambda p: (p.name != "default-values.yaml", p.name)
    )


def overlays() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def check_all() -> list[Row]:
    rows = [check_variant(path) for path in variants()]
    rows.append(check_refused(INVALID_VALUES))
    rows += [check_overlay(path) for path in overlays()]
    return rows


def table(rows: Sequence[Row]) -> str:
    header = ("variant", "documents", "kinds", "result")
    body = [(r.variant, str(r.documents), str(len(r.kinds)), r.result) for r in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
        for line in (header, *body)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m tools.chart", description=summary)
    parser.parse_args(argv)
    try:
        rows = check_all()
    except ChartError as err:
        print(f"chart: {err}", file=sys.stderr)
        return 1
    print(table(rows))
    kinds = sorted(set().union(*(r.kinds for r in rows)))
    print(f"\nkinds rendered: {', '.join(kinds)}")
    version = kubernetes_validate.__version__
    print(f"schemas: Kubernetes {KUBE_VERSION} (kubernetes_validate {version}, strict)")
    if not OVERLAYS.is_dir() or not overlays():
        print("kustomize overlays: none under k8s/overlays/")
    failed = [r for r in rows if not r.ok]
    for row in failed:
        print(f"\n{row.variant}:", file=sys.stderr)
        for problem in row.problems:
            print(f"  {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
