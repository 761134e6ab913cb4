#!/usr/bin/env bash
# Side-by-side A/B of gpu_lookup_bench builds on the device machine: every binary in turn, ROUNDS
# times over (alternating, so drift in clocks or neighbours falls on all of them alike), then the
# median of each case's lookup and whole-path graph replay per binary. Prints a table (median µs,
# and the change against the first binary).
#
#   bench/ab_lookup.sh [-r ROUNDS] [-a "BENCH ARGS"] NAME=PATH NAME=PATH ...
#   e.g. bench/ab_lookup.sh -r 3 old=.devbin-ab/bench_old new=.devbin-ab/bench_new
#
# Defaults: 3 rounds, bench args "--whole-only --cases decode --iters 200". The binaries need their
# shared libraries on LD_LIBRARY_PATH (tools/collect-devbin.sh puts them beside the binaries; this
# script adds each binary's folder). Raw rows go to $OUT/ab_raw.log when OUT is set. A run that
# fails, or a binary that lacks a round of a case another binary has, makes the script report it
# and exit 1 (the table is still printed, with the gaps marked).
set -uo pipefail
rounds=3
args="--whole-only --cases decode --iters 200"
while getopts "r:a:h" opt; do
  case $opt in
    r) rounds=$OPTARG ;;
    a) args=$OPTARG ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -lt 1 ]; then
  sed -n '2,12p' "$0"
  exit 2
fi
raw=$(mktemp)
trap 'rm -f "$raw"' EXIT
failed=0
for ((r = 1; r <= rounds; ++r)); do
  for spec in "$@"; do
    name=${spec%%=*}
    bin=${spec#*=}
    dir=$(cd "$(dirname "$bin")" && pwd)
    # The main table's rows only (the prefill steps table starts its rows the same way).
    # shellcheck disable=SC2086  # args split on purpose
    LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin" $args 2>&1 |
      awk -v n="$name" 'NF >= 13 && /^(32K|128K) (decode|prefill) [0-9b]+ / {print n, $1" "$2" "$3, $5, $13}' \
        >> "$raw"
    rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
      echo "ab_lookup: $name round $r exited with $rc" >&2
      failed=1
    fi
  done
done
[ -n "${OUT:-}" ] && cp "$raw" "$OUT/ab_raw.log"
python3 - "$raw" "$rounds" "$@" <<'PY'
import collections
import statistics
import sys

rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, c1, c2, c3, lookup, whole = line.split()
    rows[(name, f"{c1} {c2} {c3}")].append((float(lookup), float(whole)))
rounds = int(sys.argv[2])
names = [spec.split("=", 1)[0] for spec in sys.argv[3:]]
cases = sorted({case for _, case in rows}, key=lambda c: (len(c.split()[0]), c))
print("median graph µs over rounds: lookup / whole (change against " + names[0] + ")")
print(f"{'case':<18}" + "".join(f"{n:>26}" for n in names))
for case in cases:
    line = f"{case:<18}"
    base = None
    for n in names:
        got = rows.get((n, case))
        if not got:
            line += f"{'-':>26}"
            continue
        lk = statistics.median(x[0] for x in got)
        wh = statistics.median(x[1] for x in got)
        if base is None:
            base = (lk, wh)
        cell = f"{lk:.1f} / {wh:.1f}" + (f" ({wh - base[1]:+.1f})" if n != names[0] else "")
        line += f"{cell:>26}"
    print(line)
short = [(n, case, len(rows.get((n, case), []))) for case in cases for n in names
         if len(rows.get((n, case), [])) != rounds]
for n, case, got in short:
    print(f"ab_lookup: {n} has {got} of {rounds} rounds of {case}", file=sys.stderr)
if not cases:
    print("ab_lookup: no rows at all", file=sys.stderr)
sys.exit(1 if short or not cases else 0)
PY
[ $? = 0 ] || failed=1
exit $failed
