#!/usr/bin/env bash
# The build-time benchmark (BENCHMARKS.md, "Build time"): cold `cargo build` and `cargo build
# --release` of two commits, three times each, alternating, each in an empty target directory;
# prints every run and the medians. Not part of CI: it takes about 25 minutes on 2 cores.
#
#   scripts/cold-build.sh <before-commit> <after-commit> [runs]
#
# Each commit is unpacked with `git archive` into a scratch directory and its dependencies are
# fetched once, untimed, so the figures are compile time only. CPU seconds (user + sys of cargo and
# every rustc it runs) are the primary figure: wall time follows whatever else the machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."

before=${1:?usage: scripts/cold-build.sh <before-commit> <after-commit> [runs]}
after=${2:?usage: scripts/cold-build.sh <before-commit> <after-commit> [runs]}
runs=${3:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for commit in "$before" "$after"; do
  mkdir -p "$work/src-$commit"
  git archive "$commit" | tar -x -C "$work/src-$commit"
  (cd "$work/src-$commit" && cargo fetch --locked --quiet)
done

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
results="$work/results"
for profile in debug release; do
  flag=()
  [ "$profile" = release ] && flag=(--release)
  for run in $(seq "$runs"); do
    for commit in "$before" "$after"; do
      target="$work/target"
      rm -rf "$target"
      load=$(cut -d' ' -f1 /proc/loadavg)
      (cd "$work/src-$commit" && CARGO_TARGET_DIR="$target" /usr/bin/time -f "%e %U %S" -o "$work/time" \
        cargo build --locked --offline --quiet "${flag[@]}")
      read -r wall user sys <"$work/time"
      cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')
      echo "$profile $commit run $run: ${cpu} CPU s, ${wall} s wall (load average ${load} at start)"
      echo "$profile $commit $cpu $wall" >>"$results"
    done
  done
done
rm -rf "$work/target"

# NB: the median of an odd number of runs is the middle one.
for profile in debug release; do
  for commit in "$before" "$after"; do
    awk -v p="$profile" -v c="$commit" '$1 == p && $2 == c { print $3, $4 }' "$results" | sort -n \
      | awk -v p="$profile" -v c="$commit" '{ cpu[NR] = $1; wall[NR] = $2 }
          END { m = int((NR + 1) / 2); printf "median %s %s: %s CPU s, %s s wall\n", p, c, cpu[m], wall[m] }'
  done
done
