#!/usr/bin/env bash
# Lints the repository's shell scripts (or the files given) with shellcheck, plus one check it
# lacks: under pipefail, a pipeline that ends in a reader which may stop early
# (`grep -q`, `grep -m`, `head`, awk with `exit`) fails at random: the writer gets SIGPIPE when
# it writes after the reader is gone. Read the whole output into a variable and match that.
#
#   hack/lint-shell.sh [FILE...]
set -euo pipefail
cd "$(dirname "$0")/.."

command -v shellcheck >/dev/null || { echo "lint-shell: shellcheck is missing (run hack/host-deps.sh)" >&2; exit 1; }
pipefail_only=()
if [ $# -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(git ls-files '*.sh' '.ci/*')
  # The Makefile's recipes run under pipefail too (its SHELL); only the second check applies.
  pipefail_only=(Makefile)
fi

status=0
shellcheck -x "${files[@]}" || status=1

early_exit='\|[[:space:]]*(grep[[:space:]]+(-[a-zA-Z]*[qm]|--quiet|--max-count)|(head)([[:space:]]|$)|awk[^|]*[{;[:space:]]exit[[:space:];}])'
for f in "${files[@]}" "${pipefail_only[@]}"; do
  grep -q pipefail "$f" || continue
  if hits=$(grep -nE "$early_exit" "$f"); then
    echo "lint-shell: $f: a pipeline under pipefail ends in a reader that may exit early:" >&2
    while IFS= read -r line; do echo "  $line" >&2; done <<<"$hits"
    status=1
  fi
done
[ $status -eq 0 ] && echo "lint-shell: ${#files[@]} scripts clean"
exit $status
