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

step "all tests passed in $((SECONDS - start)) s"
