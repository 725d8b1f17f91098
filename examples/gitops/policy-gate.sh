#!/bin/sh
# The policy-as-code gate: the command sequence the example CI workflow
# (github-workflow.yml) runs, kept in one script so that `cargo xtask test`
# runs exactly what CI runs (meshctl/tests/gitops.rs).
#
#   policy-gate.sh check FILE   offline: syntax, names, the policy's tests
#   policy-gate.sh plan FILE    + control's validation and the per-node diff
#                               (pull requests; sets nothing)
#   policy-gate.sh apply FILE   + make FILE the active policy (main branch)
#
# Control is reached the way meshctl always does: MESHCTL_SERVER (host:port),
# MESHCTL_CA_FILE (control's ca.pem, `meshctl ca`), and the admin token in
# MESHCTL_TOKEN or MESHCTL_TOKEN_FILE (a CI secret). MESHCTL names the
# meshctl binary (default: meshctl on PATH).
# Any problem or failing test exits non-zero and nothing is applied.
set -eu

usage() {
    echo "usage: $0 check|plan|apply POLICY_FILE" >&2
    exit 2
}
[ $# -eq 2 ] || usage
step=$1
file=$2
meshctl=${MESHCTL:-meshctl}

echo "== meshctl policy check $file"
"$meshctl" policy check "$file"
[ "$step" = check ] && exit 0

echo "== meshctl policy apply --check-only $file"
"$meshctl" policy apply --check-only "$file"
echo "== meshctl policy diff $file"
"$meshctl" policy diff "$file"
case $step in
    plan) ;;
    apply)
        echo "== meshctl policy apply $file"
        "$meshctl" policy apply "$file"
        ;;
    *) usage ;;
esac
