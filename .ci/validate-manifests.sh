#!/usr/bin/env bash
# Checks every document `palisade install` prints against the Kubernetes API's own schemas,
# strictly (unknown fields are errors), with kubernetes-validate (PyPI) in a venv of its own.
#
#   .ci/validate-manifests.sh              # builds palisade with cargo, then validates
#   PALISADE_BIN=path/to/palisade .ci/validate-manifests.sh
#
# What is validated: `palisade install` (a generated CA: every kind it prints, Secret,
# ConfigMap and MutatingWebhookConfiguration included), `palisade install --no-identity`, and
# the committed deploy/kubernetes/ files. The CRDs are validated as
# CustomResourceDefinition documents; custom resources themselves (an AuthorizationPolicy)
# are not: control-plane/tests/crd_schema.rs checks policies against the CRDs' schemas.
#
# Environment: KUBERNETES_VERSIONS (default "1.30.0 1.37.0": the oldest Kubernetes Palisade
# supports, webhook matchConditions being GA from 1.30, and the newest the validator knows),
# KUBERNETES_VALIDATE_VERSION (the pip requirement, default ==1.37.0), VENV (default
# ~/.cache/palisade-kubernetes-validate). Needs python3 with venv, and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSIONS="${KUBERNETES_VERSIONS:-1.30.0 1.37.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-==1.37.0}"
VENV="${VENV:-$HOME/.cache/palisade-kubernetes-validate}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/palisade-target}"

if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  echo "== installing kubernetes-validate$KUBERNETES_VALIDATE_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate$KUBERNETES_VALIDATE_VERSION"
fi

if [ -z "${PALISADE_BIN:-}" ]; then
  echo "== cargo build --bin palisade"
  cargo build --quiet --bin palisade
  PALISADE_BIN="$CARGO_TARGET_DIR/debug/palisade"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PALISADE_BIN" install > "$work/install.yaml" 2> "$work/install.stderr"
"$PALISADE_BIN" install --no-identity > "$work/install-no-identity.yaml"
cp deploy/kubernetes/palisade.yaml "$work/deploy-palisade.yaml"
cp deploy/kubernetes/example/identity.yaml "$work/deploy-example-identity.yaml"

# Each kind palisade install prints must be there: a document that vanished would otherwise
# pass unnoticed.
for kind in Namespace CustomResourceDefinition ServiceAccount ClusterRole ClusterRoleBinding \
  Role RoleBinding Service Deployment PodDisruptionBudget Secret ConfigMap \
  MutatingWebhookConfiguration; do
  grep -q "^kind: $kind\$" "$work/install.yaml" || { echo "palisade install printed no $kind"; exit 1; }
done

for version in $KUBERNETES_VERSIONS; do
  echo "== kubernetes-validate --strict (Kubernetes $version)"
  # --strict: unknown properties are errors. Exit status non-zero on any invalid document.
  "$VENV/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" \
    "$work"/install.yaml "$work"/install-no-identity.yaml \
    "$work"/deploy-palisade.yaml "$work"/deploy-example-identity.yaml
done
echo "== every document valid"
