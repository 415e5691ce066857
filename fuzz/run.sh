#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 15) on the stable
# toolchain; exits non-zero on the first crash, leak, timeout or build failure.
# The default build (unoptimised, debug assertions and overflow checks on, no sanitizer: the
# targets are safe Rust) compiles in about a third of the CPU time of an optimised ASan
# build, which keeps this short enough for CI. For a longer local run, e.g.:
#   FUZZ_SECONDS=600 FUZZ_BUILD="-O -s address" fuzz/run.sh
# New corpus entries go to a scratch directory, so the committed seeds stay as they are;
# a crashing input is kept in fuzz/artifacts/<target>/ for `cargo fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-15}
read -r -a build <<<"${FUZZ_BUILD:---dev -s none}"
# cargo-fuzz needs nightly-only flags (sanitizers); RUSTC_BOOTSTRAP lets stable accept them.
export RUSTC_BOOTSTRAP=1
if command -v rustup >/dev/null; then
  export RUSTUP_TOOLCHAIN=${RUSTUP_TOOLCHAIN:-stable}
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# cargo-fuzz has no --locked: check the committed lock file first, so that a stale one
# fails here, by name, instead of being rewritten in the checkout by the build.
if ! cargo metadata --locked --format-version 1 >/dev/null; then
  echo "fuzz: fuzz/Cargo.lock is out of date with the crate's dependencies: run cargo update -p strait in fuzz/ and commit it" >&2
  exit 1
fi

start=$SECONDS
cargo fuzz build "${build[@]}"
echo "fuzz: built all targets in $((SECONDS - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "$scratch/$target"
  seeds=()
  [ -d "corpus/$target" ] && seeds+=("corpus/$target")
  echo "fuzz: $target for ${seconds} s"
  if ! cargo fuzz run "${build[@]}" "$target" "$scratch/$target" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      2>"$scratch/$target.log"; then
    tail -n 60 "$scratch/$target.log" >&2
    echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units|^Done ' "$scratch/$target.log" || true
done
echo "fuzz: all targets passed in $((SECONDS - start)) s"
