#!/usr/bin/env bash
# The whole test suite: installs what is missing, then three builds, each followed by its tests, then the fuzz targets:
#   1. build/ — Release, -march=native (POSTTRAIN_NATIVE: this machine's widest vectors, AVX-512
#      where it has them), both backends: every test, example and consumer project. This is the
#      build that covers the wide-vector code paths (Eigen's AVX/AVX-512 packets in kernels/ and
#      in the Eigen backend, GCC 12's AVX-512 workaround); POSTTRAIN_TEST_NATIVE=0 builds it with
#      the compiler's defaults instead.
#   2. build-sanitize/ — the compiler's default flags (x86-64: SSE2) under AddressSanitizer +
#      UndefinedBehaviorSanitizer, Eigen only (no LibTorch): the Eigen tests, the reference-only
#      tests and the examples. This is the default-flags run of the Eigen backend and the kernels.
#   3. build-default/ — the compiler's default flags, no sanitizer, the LibTorch test program only, run
#      once as one process (as ctest cases it would pay LibTorch's start-up for each of ~140 cases):
#      so the whole suite, both backends, passes at the default flags too. POSTTRAIN_TEST_DEFAULT_TORCH=0
#      skips it.
# The test programs are unity builds (tests/CMakeLists.txt) and the sanitizer build compiles at -O1,
# which keeps the whole command near 25 minutes on 2 cores. Run as root or with sudo available.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
start=$SECONDS

install_packages
phase=$SECONDS
if [ "${POSTTRAIN_TEST_NATIVE:-1}" = 1 ]; then native=ON; else native=OFF; fi
configure "$BUILD_DIR" -DPOSTTRAIN_NATIVE=$native -DPOSTTRAIN_REQUIRE_TEST_DEPS=ON
build "$BUILD_DIR"
step "build $BUILD_DIR (native: $native) took $((SECONDS - phase)) s"
phase=$SECONDS
step "ctest (Release, both backends, native: $native)"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$JOBS"
step "ctest $BUILD_DIR took $((SECONDS - phase)) s"

SAN_DIR=${BUILD_DIR}-sanitize
phase=$SECONDS
configure "$SAN_DIR" -DPOSTTRAIN_REQUIRE_TEST_DEPS=ON -DPOSTTRAIN_SANITIZE=ON -DPOSTTRAIN_WITH_TORCH=OFF -DPOSTTRAIN_NATIVE=OFF \
  -DPOSTTRAIN_HEADER_CHECKS=OFF
build "$SAN_DIR"
step "build $SAN_DIR took $((SECONDS - phase)) s"
phase=$SECONDS
step "ctest (AddressSanitizer + UBSan, Eigen only, default flags)"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
  ctest --test-dir "$SAN_DIR" --output-on-failure -j"$JOBS"
step "ctest $SAN_DIR took $((SECONDS - phase)) s"

targets=$(cmake --build "$BUILD_DIR" --target help 2>/dev/null || true)  # read whole: no grep -q on a pipe
if [ "${POSTTRAIN_TEST_DEFAULT_TORCH:-1}" = 1 ] && grep -q posttrain_torch_tests <<<"$targets"; then
  DEF_DIR=${BUILD_DIR}-default
  phase=$SECONDS
  configure "$DEF_DIR" -DPOSTTRAIN_REQUIRE_TEST_DEPS=ON -DPOSTTRAIN_NATIVE=OFF -DPOSTTRAIN_HEADER_CHECKS=OFF \
    -DPOSTTRAIN_BUILD_EXAMPLES=OFF -DPOSTTRAIN_BUILD_TOOLS=OFF -DPOSTTRAIN_BUILD_FUZZERS=OFF -DPOSTTRAIN_TEST_CONSUMERS=OFF
  build "$DEF_DIR" posttrain_torch_tests
  step "build $DEF_DIR (LibTorch tests, default flags) took $((SECONDS - phase)) s"
  phase=$SECONDS
  step "$DEF_DIR/tests/posttrain_torch_tests (every LibTorch test case, default flags, one process)"
  timeout 1200 "$DEF_DIR/tests/posttrain_torch_tests"
  step "LibTorch tests at the default flags took $((SECONDS - phase)) s"
fi

# The libFuzzer targets (fuzz/): a Clang build of their own, each target's seed corpus replayed by
# ctest, then each target fuzzed for POSTTRAIN_FUZZ_RUNS inputs (default 2000) from a copy of its corpus
# with a fixed seed (POSTTRAIN_FUZZ_SEED, default 1), so a run is the same on every machine; the
# time cap POSTTRAIN_FUZZ_SECONDS (default 60) only bounds a slow machine.
# Skipped, with a note, where clang++-16 is missing.
FUZZ_CXX=${POSTTRAIN_FUZZ_CXX:-clang++-16}
if command -v "$FUZZ_CXX" >/dev/null; then
  fuzz_start=$SECONDS
  FUZZ_DIR=${BUILD_DIR}-fuzz
  configure "$FUZZ_DIR" -DCMAKE_CXX_COMPILER="$FUZZ_CXX" -DPOSTTRAIN_WITH_TORCH=OFF -DPOSTTRAIN_BUILD_TESTS=OFF \
    -DPOSTTRAIN_BUILD_EXAMPLES=OFF -DPOSTTRAIN_BUILD_FUZZERS=ON
  if ! grep -q "POSTTRAIN_HAVE_LIBFUZZER:INTERNAL=1" "$FUZZ_DIR/CMakeCache.txt"; then
    echo "note: -fsanitize=fuzzer does not link with $FUZZ_CXX: skipping the fuzz targets (apt-get install libclang-rt-16-dev)"
    step "all tests passed in $((SECONDS - start)) s (fuzz targets skipped)"
    exit 0
  fi
  build "$FUZZ_DIR" posttrain_fuzzers
  step "ctest (fuzz targets: seed corpora)"
  ctest --test-dir "$FUZZ_DIR" --output-on-failure -j"$JOBS"
  for target in fuzz/corpus/*/; do
    name=$(basename "$target")
    step "fuzz_$name: ${POSTTRAIN_FUZZ_RUNS:-2000} inputs, seed ${POSTTRAIN_FUZZ_SEED:-1}"
    work="$FUZZ_DIR/fuzz/run-$name"
    rm -rf "$work" && mkdir -p "$work/corpus" && cp "$target"* "$work/corpus/" 2>/dev/null || true
    if ! (cd "$work" && "../fuzz_$name" -runs="${POSTTRAIN_FUZZ_RUNS:-2000}" -seed="${POSTTRAIN_FUZZ_SEED:-1}" \
      -max_total_time="${POSTTRAIN_FUZZ_SECONDS:-60}" -timeout=30 \
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
