#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds everything (Release) and runs ctest, then
# builds the Eigen-only tests and examples again under AddressSanitizer + UndefinedBehaviorSanitizer
# (no LibTorch, a separate build directory) and runs them. Run as root or with sudo available.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
start=$SECONDS

install_packages
configure "$BUILD_DIR"
build "$BUILD_DIR"
step "ctest (Release, both backends)"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$JOBS"

SAN_DIR=${BUILD_DIR}-sanitize
configure "$SAN_DIR" -DPOSTTRAIN_SANITIZE=ON -DPOSTTRAIN_WITH_TORCH=OFF
build "$SAN_DIR"
step "ctest (AddressSanitizer + UBSan, Eigen only)"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
  ctest --test-dir "$SAN_DIR" --output-on-failure -j"$JOBS"

# The libFuzzer targets (fuzz/): a Clang build of their own, each target's seed corpus replayed by
# ctest, then each target fuzzed for POSTTRAIN_FUZZ_SECONDS (default 20) from a copy of its corpus.
# Skipped, with a note, where clang++-16 is missing.
FUZZ_CXX=${POSTTRAIN_FUZZ_CXX:-clang++-16}
if command -v "$FUZZ_CXX" >/dev/null; then
  fuzz_start=$SECONDS
  FUZZ_DIR=${BUILD_DIR}-fuzz
  configure "$FUZZ_DIR" -DCMAKE_CXX_COMPILER="$FUZZ_CXX" -DPOSTTRAIN_WITH_TORCH=OFF -DPOSTTRAIN_BUILD_TESTS=OFF \
    -DPOSTTRAIN_BUILD_EXAMPLES=OFF -DPOSTTRAIN_BUILD_FUZZERS=ON
  build "$FUZZ_DIR" posttrain_fuzzers
  step "ctest (fuzz targets: seed corpora)"
  ctest --test-dir "$FUZZ_DIR" --output-on-failure -j"$JOBS"
  for target in fuzz/corpus/*/; do
    name=$(basename "$target")
    step "fuzz_$name for ${POSTTRAIN_FUZZ_SECONDS:-20} s"
    work="$FUZZ_DIR/fuzz/run-$name"
    rm -rf "$work" && mkdir -p "$work/corpus" && cp "$target"* "$work/corpus/" 2>/dev/null || true
    if ! (cd "$work" && "../fuzz_$name" -max_total_time="${POSTTRAIN_FUZZ_SECONDS:-20}" -timeout=30 \
      -rss_limit_mb=4096 -print_final_stats=1 corpus >fuzz.log 2>&1); then
      tail -n 40 "$work/fuzz.log"
      echo "fuzz_$name failed: the input is $work/crash-* (replay: $FUZZ_DIR/fuzz/fuzz_$name <file>)" >&2
      exit 1
    fi
    grep -E "^stat::(number_of_executed_units|average_exec_per_sec)" "$work/fuzz.log" || true
  done
  step "fuzz build and runs took $((SECONDS - fuzz_start)) s"
else
  echo "note: $FUZZ_CXX not found: skipping the fuzz targets (apt-get install clang-16 libclang-rt-16-dev)"
fi

step "all tests passed in $((SECONDS - start)) s"
