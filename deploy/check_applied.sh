#!/usr/bin/env bash
# Did every EP rank load the plan? UNTESTED on a GPU cluster (no GPUs here); the log line it looks
# for is the one vllm_moeplace/serving/plugin.py writes after a worker loaded its weights.
#
#   bash deploy/check_applied.sh EP_SIZE PLAN_SHA256 node0.log node1.log ...
#
# Passes iff the plugin's "placed experts" line appears once per EP rank across the logs. When the
# line carries `ep_rank=N` and `sha256=<prefix>` fields, it also checks that every rank 0..EP_SIZE-1
# appears exactly once and that every rank loaded the expected plan content.
set -euo pipefail
EP=${1:?EP size}; SHA=${2:?expected plan sha256}; shift 2
[[ $# -gt 0 ]] || { echo "usage: $0 EP_SIZE PLAN_SHA256 LOG..." >&2; exit 2; }
PATTERN=${PATTERN:-"vllm-moeplace: placed experts"}

lines=$(grep -h -- "$PATTERN" "$@" || true)
n=$(printf '%s' "$lines" | grep -c . || true)
echo "plan-applied lines: $n (expected $EP)"
fail=0
[[ "$n" == "$EP" ]] || { echo "FAIL: $n of $EP ranks report the plan"; fail=1; }
if grep -q "ep_rank=" <<<"$lines"; then
    ranks=$(grep -o "ep_rank=[0-9]*" <<<"$lines" | cut -d= -f2 | sort -n | uniq -c)
    missing=$(comm -23 <(seq 0 $((EP - 1)) | sort) <(grep -o "ep_rank=[0-9]*" <<<"$lines" | cut -d= -f2 | sort -u))
    [[ -z "$missing" ]] || { echo "FAIL: ranks without the line: $(echo $missing)"; fail=1; }
    dup=$(awk '$1 > 1 {print $2}' <<<"$ranks")
    [[ -z "$dup" ]] || { echo "FAIL: ranks reporting twice: $(echo $dup)"; fail=1; }
fi
if grep -q "sha256=" <<<"$lines"; then
    bad=$(grep -o "sha256=[0-9a-f]*" <<<"$lines" | cut -d= -f2 | while read -r p; do [[ "$SHA" == "$p"* ]] || echo "$p"; done | sort -u)
    [[ -z "$bad" ]] || { echo "FAIL: ranks loaded other plan content: $(echo $bad)"; fail=1; }
fi
# The plugin refuses instead of misrouting: any refusal is in the logs as a PlanError line.
if grep -h -E "PlanError|UnsupportedVllmError|cannot be served with" "$@" >/dev/null; then
    echo "FAIL: the plugin refused the plan:"; grep -h -E "PlanError|UnsupportedVllmError|cannot be served with" "$@" | head -5; fail=1
fi
[[ $fail == 0 ]] && echo "OK: the plan is applied on all $EP EP ranks"
exit $fail
