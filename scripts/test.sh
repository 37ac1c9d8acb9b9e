#!/usr/bin/env bash
# Run test tiers, each with a given virtualenv, in the order given; keep going after a failing tier and end with a
# summary (exit 1 if any tier failed). `make test` and the make test-* targets call it.
#
#   scripts/test.sh .venv:unit .venv:parallel .venv:integration .venv:slurm .venv-tf2.15:unit .venv-tf2.15:stacks
#   scripts/test.sh .venv:unit .venv:parallel + .venv:slurm .venv-tf2.15:unit      # two lanes at once
#   PYTEST_ARGS="-x -k resume" scripts/test.sh .venv:parallel
# A tier is a pytest marker: unit, parallel, integration, slurm (the directories of tests/; tests/bench runs with
# unit), or stacks (the tests that also run on the TF 2.15 stack); parallel-stages is the part of the parallel tier
# about pipeline stages and sharded state (STAGE_TESTS), which `make test` runs in another lane than the rest of the
# parallel tier (so that no lane is much longer than the others). pytest finding no tests counts as a failure.
# Every tier leaves its JUnit XML (each test's time) in test-reports/.
# `+` starts another lane: lanes run side by side, each its tiers in order (the Slurm tier mostly waits on Slurm, so
# `make test` runs it next to the other stack's tiers). A lane's tier prints its whole output when it ends, so the
# lanes' outputs do not interleave.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/test.sh VENV:TIER... [+ VENV:TIER...]" >&2; exit 2; }
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
reports=test-reports   # each tier's JUnit XML (every test's time), kept after the run
rm -rf "$reports"; mkdir -p "$reports"

# Where a tier's tests live: pytest collects (imports) only those files.
STAGE_TESTS="tests/parallel/test_pipeline.py tests/parallel/test_keras_api_pipeline.py tests/parallel/test_sharded.py"
tier_dirs() {
  case "$1" in
    unit) echo tests/unit tests/bench ;;
    stacks) echo tests/parallel ;;
    parallel-stages) echo $STAGE_TESTS ;;
    parallel) echo tests/parallel; for f in $STAGE_TESTS; do echo "--ignore=$f"; done ;;
    *) echo "tests/$1" ;;
  esac
}
tier_marker() { [ "$1" = parallel-stages ] && echo parallel || echo "$1"; }   # parallel-stages is part of parallel

# One tier: its output to $work/<n>.out (or straight through with one lane), its summary line to $work/<n>.result.
run_tier() {
  local n="$1" spec="$2" out="$3" venv tier stack started rc
  venv="${spec%%:*}"; tier="${spec#*:}"
  [ -x "$venv/bin/python" ] || { echo "test.sh: $venv has no python; run make install first" >&2; exit 2; }
  stack="$(cut -d' ' -f1 "$venv/.hvdtrain-installed" 2>/dev/null || echo "stack=?")"
  {
    printf '\n\033[1m== %s tests, %s (%s), %s\033[0m\n' "$tier" "$venv" "${stack#stack=}" "$(date -u +%H:%M:%S)"
    started=$SECONDS
    # shellcheck disable=SC2086
    PATH="$PWD/$venv/bin:$PATH" "$venv/bin/python" -m pytest -m "$(tier_marker "$tier")" $(tier_dirs "$tier") --junitxml="$reports/$n-$tier-${venv#.}.xml" \
      -o junit_suite_name="$tier $venv" ${PYTEST_ARGS:-} </dev/null; rc=$?
    [ "$rc" = 5 ] && { echo "test.sh: pytest collected no $tier tests; that is a failure" >&2; rc=1; }
    printf '%-15s %-13s %-7s %5ds  %s\n' "$tier" "$venv" "${stack#stack=}" $((SECONDS - started)) \
      "$([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)")" >"$work/$n.result"
  } >"$out" 2>&1
}

slowest() {
  python3 - "$reports"/*.xml <<'PY' 2>/dev/null || true
import sys, xml.etree.ElementTree as ET
cases = []
for path in sys.argv[1:]:
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for case in suite.iter("testcase"):
            cases.append((float(case.get("time", 0)), suite.get("name", ""), f"{case.get('classname')}::{case.get('name')}"))
if cases:
    print("ten slowest tests:")
    for seconds, suite, name in sorted(cases, reverse=True)[:10]:
        print(f"  {seconds:7.1f}s  {suite:28s} {name}")
PY
}

lane() {   # lane TIER_NUMBERS...: run them in order; with several lanes, print each tier's output when it ends
  local n
  for n in "$@"; do
    if [ "$lanes" = 1 ]; then run_tier "$n" "${specs[$n]}" /dev/stdout
    else run_tier "$n" "${specs[$n]}" "$work/$n.out"; flock "$work" cat "$work/$n.out"; fi
  done
}

specs=(); lane_of=(); lanes=1
for arg in "$@"; do
  if [ "$arg" = + ]; then lanes=$((lanes + 1)); else specs+=("$arg"); lane_of+=("$lanes"); fi
done
pids=()
for l in $(seq "$lanes"); do
  numbers=(); for n in "${!specs[@]}"; do [ "${lane_of[$n]}" = "$l" ] && numbers+=("$n"); done
  if [ "$lanes" = 1 ]; then lane "${numbers[@]}"; else lane "${numbers[@]}" & pids+=("$!"); fi
done
[ "${#pids[@]}" = 0 ] || wait "${pids[@]}"

printf '\n\033[1m== summary\033[0m\n'
slowest   # where the time went: the ten slowest tests of all tiers (module fixtures count in their first test)
failed=0
for n in "${!specs[@]}"; do
  if [ -f "$work/$n.result" ]; then cat "$work/$n.result"; else echo "${specs[$n]}: did not run"; fi
  grep -q ' passed$' "$work/$n.result" 2>/dev/null || failed=1
done
exit "$failed"
