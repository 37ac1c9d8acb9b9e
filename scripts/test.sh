#!/usr/bin/env bash
# Run test tiers, each with a given virtualenv, in the order given; keep going after a failing tier and end with a
# summary (exit 1 if any tier failed). `make test` and the make test-* targets call it.
#
#   scripts/test.sh .venv:unit .venv:parallel .venv:integration .venv:slurm .venv-tf2.15:unit .venv-tf2.15:parallel
#   PYTEST_ARGS="-x -k resume" scripts/test.sh .venv:parallel
# Tiers are directories of tests/ (tests/bench runs with unit). pytest finding no tests counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/test.sh VENV:TIER..." >&2; exit 2; }
results=(); failed=0
for spec in "$@"; do
  venv="${spec%%:*}"; tier="${spec#*:}"
  [ -x "$venv/bin/python" ] || { echo "test.sh: $venv has no python; run make install first" >&2; exit 2; }
  stack="$(cut -d' ' -f1 "$venv/.hvdtrain-installed" 2>/dev/null || echo "stack=?")"
  printf '\n\033[1m== %s tests, %s (%s), %s\033[0m\n' "$tier" "$venv" "${stack#stack=}" "$(date -u +%H:%M:%S)"
  started=$SECONDS
  # shellcheck disable=SC2086
  PATH="$PWD/$venv/bin:$PATH" "$venv/bin/python" -m pytest -m "$tier" ${PYTEST_ARGS:-} ; rc=$?
  [ "$rc" = 5 ] && { echo "test.sh: pytest collected no $tier tests; that is a failure" >&2; rc=1; }
  results+=("$(printf '%-8s %-20s %-13s %4ds  %s' "$tier" "$venv" "${stack#stack=}" $((SECONDS - started)) \
               "$([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)")")")
  [ "$rc" = 0 ] || failed=1
done
printf '\n\033[1m== summary\033[0m\n'; printf '%s\n' "${results[@]}"
exit "$failed"
