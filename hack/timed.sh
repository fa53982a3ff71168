#!/usr/bin/env bash
# Runs a set-up step and says on stderr how long it took, so a first run shows where its time
# goes (later runs show each cached step taking well under a second).
#
#   hack/timed.sh WHAT COMMAND [ARG...]
set -euo pipefail
what=$1
shift
start=$(date +%s.%N)
status=0
"$@" || status=$?
end=$(date +%s.%N)
took=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
if [ $status -eq 0 ]; then
  echo "setup: $what: $took s" >&2
else
  echo "setup: $what: failed after $took s (exit $status)" >&2
fi
exit $status
