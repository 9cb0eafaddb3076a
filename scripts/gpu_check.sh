#!/usr/bin/env bash
# scripts/gpu_check.sh — the CUDA checks of the torch backend's chunked path, for any machine with
# an NVIDIA GPU and a CUDA build of PyTorch (python3 -c 'import torch'). It builds the torch tests
# and the benchmarks against that PyTorch's LibTorch, runs them on the GPU and prints a summary.
#
#   scripts/gpu_check.sh prepare   # copies the header-only and small dependencies (Eigen, Catch2,
#                                  # Google Benchmark: headers, CMake package files, libbenchmark)
#                                  # from /usr into .gpu-deps/prefix (about 13 MiB, git-ignored
#                                  # by .gitignore), for machines that lack them and
#                                  # cannot install packages; copy .gpu-deps/ along with the tree
#   scripts/gpu_check.sh run       # the checks below, with PyTorch's LibTorch (the default mode)
#   scripts/gpu_check.sh local     # the same build and checks against the system LibTorch (found by
#                                  # CMake itself; on a CPU-only build the CUDA cases print SKIPPED)
#   scripts/gpu_check.sh checks    # steps 3-5 only, on an existing build (POSTTRAIN_GPU_BUILD_DIR)
#   scripts/gpu_check.sh nccl      # step 6 only (on an existing build's configuration)
#
# `run` (each step under its own timeout; about 8 minutes with 16 cores):
#   1. configure build-gpu (or $POSTTRAIN_GPU_BUILD_DIR) against the PyTorch that
#      `python3 -c 'import torch;print(torch.utils.cmake_prefix_path)'` names, with .gpu-deps/prefix
#      on CMAKE_PREFIX_PATH. That PyTorch is usually newer than the Debian 1.13 that CI uses, so a
#      compiler launcher appends -Wno-error: new warnings from its headers are printed, not fatal.
#      TORCH_CUDA_ARCH_LIST (environment) is passed on; default 9.0 (Hopper).
#   2. build posttrain_torch_tests and posttrain_bench (-j$POSTTRAIN_JOBS, default nproc);
#   3. print the GPU (nvidia-smi: name, memory, driver), run the torch kernel tests (the "torch
#      kernels CUDA" cases run on the GPU; without CUDA they print SKIPPED), then the whole suite;
#   4. run the S1-S4 benchmarks' CUDA cases (naive LibTorch vs posttrain's chunked path; S3/S4 also
#      cuBLAS's three GEMMs alone, fp32 and bf16; each call followed by torch::cuda::synchronize)
#      at full size, no peak-memory children;
#   5. print each step's exit status, the wall time and the number of skipped CUDA cases;
#   6. data-parallel over NCCL (issue 18), only with 2 or more GPUs (else it prints that it needs 2 GPUs and
#      skips): reconfigure with the examples on (nccl.h from the pip package nvidia-nccl-* when present; Gloo's
#      headers from that PyTorch, else from .gpu-deps/gloo, which `prepare` copies from libgloo-dev), build
#      posttrain_data_parallel_grpo and run `--backend nccl --ranks 2 --steps 3`: 2 processes, rank r on cuda:r, the
#      loss and gradient norm against one process (1e-12). That path has never run yet.
# Logs go to $OUT when it is set, else to build-gpu/logs. The exit status is 0 only when the kernel
# tests, the torch suite, the benchmarks and (with 2 or more GPUs) the NCCL run all succeed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
MODE=${1:-run}
DEPS=$ROOT/.gpu-deps/prefix
BUILD=${POSTTRAIN_GPU_BUILD_DIR:-$ROOT/build-gpu}
LOGS=${OUT:-$BUILD/logs}
JOBS=${POSTTRAIN_JOBS:-$(nproc 2>/dev/null || echo 2)}
START=$SECONDS

step() { printf '\n==> [%4ds] %s\n' $((SECONDS - START)) "$*"; }

prepare() {
  local arch=x86_64-linux-gnu
  rm -rf "$DEPS"
  mkdir -p "$DEPS/include" "$DEPS/share" "$DEPS/lib/cmake" "$DEPS/lib/$arch/cmake"
  # Each package's CMake files find their headers and libraries relative to their own folder, so
  # the /usr layout is kept under the prefix.
  cp -r /usr/include/eigen3 "$DEPS/include/" && mkdir -p "$DEPS/share/eigen3" &&
    cp -r /usr/share/eigen3/cmake "$DEPS/share/eigen3/" || return 1
  cp -r /usr/include/catch2 "$DEPS/include/" && cp -r /usr/lib/cmake/Catch2 "$DEPS/lib/cmake/" &&
    cp /usr/lib/libCatch2WithMain.a "$DEPS/lib/" || return 1
  cp -r /usr/include/benchmark "$DEPS/include/" && cp -r /usr/lib/$arch/cmake/benchmark "$DEPS/lib/$arch/cmake/" &&
    cp -a /usr/lib/$arch/libbenchmark.so* /usr/lib/$arch/libbenchmark_main.a "$DEPS/lib/$arch/" || return 1
  # Gloo's headers for the data-parallel example (step 6), in their own folder: used only when the PyTorch lacks them
  if [ -d /usr/include/gloo ]; then
    mkdir -p "$ROOT/.gpu-deps/gloo/include" && cp -r /usr/include/gloo "$ROOT/.gpu-deps/gloo/include/" || return 1
  fi
  grep -qx '/.gpu-deps/' .git/info/exclude 2>/dev/null || echo '/.gpu-deps/' >>.git/info/exclude
  du -sh "$DEPS"
  echo "prepared: $DEPS (copy .gpu-deps/ with the tree to a machine that lacks these packages)"
}

# configure_build <torch prefix or empty>
configure_build() {
  local torch_prefix=$1 prefix_path=$DEPS
  [ -n "$torch_prefix" ] && prefix_path="$DEPS;$torch_prefix"
  mkdir -p "$BUILD" "$LOGS"
  # Appends -Wno-error to every compile (see the header).
  printf '#!/bin/sh\nexec "$@" -Wno-error\n' >"$BUILD/cxx-no-werror"
  chmod +x "$BUILD/cxx-no-werror"
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  step "configure $BUILD (CMAKE_PREFIX_PATH=$prefix_path)"
  timeout 180 cmake -S "$ROOT" -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix_path" -DPOSTTRAIN_BUILD_BENCHMARKS=ON -DPOSTTRAIN_BUILD_EXAMPLES=OFF \
    -DCMAKE_CXX_COMPILER_LAUNCHER="$BUILD/cxx-no-werror" -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    -DCMAKE_BUILD_RPATH="$DEPS/lib/x86_64-linux-gnu" >"$LOGS/configure.log" 2>&1
  local rc=$?
  tail -5 "$LOGS/configure.log"
  [ $rc -eq 0 ] || { echo "configure FAILED (rc $rc): see configure.log"; return 1; }
  step "build posttrain_torch_tests posttrain_bench (-j$JOBS)"
  timeout 330 cmake --build "$BUILD" -j"$JOBS" --target posttrain_torch_tests posttrain_bench >"$LOGS/build.log" 2>&1
  rc=$?
  grep -E "error|warning:" "$LOGS/build.log" | head -20
  tail -3 "$LOGS/build.log"
  [ $rc -eq 0 ] || { echo "build FAILED (rc $rc): see build.log"; return 1; }
}

run_checks() {
  mkdir -p "$LOGS"
  export LD_LIBRARY_PATH="$DEPS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local tests=$BUILD/tests/posttrain_torch_tests bench=$BUILD/benchmarks/posttrain_bench
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  step "torch kernel tests (CUDA cases included)"
  timeout 120 "$tests" "torch kernels*" >"$LOGS/kernel_tests.log" 2>&1
  local krc=$?
  grep -E "SKIPPED|FAILED|passed|failed" "$LOGS/kernel_tests.log" | tail -8
  step "the whole torch suite"
  timeout 150 "$tests" >"$LOGS/torch_tests.log" 2>&1
  local trc=$?
  tail -3 "$LOGS/torch_tests.log"
  step "S1-S4 benchmarks, CUDA cases"
  timeout 200 "$bench" --no-peak-memory --benchmark_filter=cuda >"$LOGS/bench.log" 2>&1
  local brc=$?
  sed -n '/=== CUDA/,$p' "$LOGS/bench.log"
  step "summary"
  echo "kernel tests rc=$krc, torch suite rc=$trc, benchmark rc=$brc, wall $((SECONDS - START)) s"
  grep -c "SKIPPED: no CUDA" "$LOGS/kernel_tests.log" | sed 's/^/CUDA test cases skipped: /'
  [ $krc -eq 0 ] && [ $trc -eq 0 ] && [ $brc -eq 0 ]
}

# Step 6: the data-parallel example over NCCL with 2 ranks, where there are 2 GPUs.
nccl_check() {
  mkdir -p "$LOGS"
  local ngpu
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  step "data-parallel GRPO over NCCL (2 ranks)"
  if [ "${ngpu:-0}" -lt 2 ]; then
    echo "SKIPPED: data-parallel over NCCL needs 2 GPUs; this machine has ${ngpu:-0}"
    return 0
  fi
  local extra=() nccl_inc torch_inc
  nccl_inc=$(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"include"))' 2>/dev/null)
  [ -n "$nccl_inc" ] && [ -f "$nccl_inc/nccl.h" ] && extra+=(-DPOSTTRAIN_NCCL_INCLUDE_DIR="$nccl_inc")
  torch_inc=$(python3 -c 'import torch.utils.cpp_extension as c;print(c.include_paths()[0])' 2>/dev/null)
  if { [ -z "$torch_inc" ] || [ ! -f "$torch_inc/gloo/config.h" ]; } && [ -f "$ROOT/.gpu-deps/gloo/include/gloo/config.h" ]; then
    extra+=(-DPOSTTRAIN_GLOO_INCLUDE_DIR="$ROOT/.gpu-deps/gloo/include")
  fi
  timeout 180 cmake -S "$ROOT" -B "$BUILD" -DPOSTTRAIN_BUILD_EXAMPLES=ON ${extra[@]+"${extra[@]}"} >"$LOGS/nccl_configure.log" 2>&1 ||
    { tail -5 "$LOGS/nccl_configure.log"; echo "NCCL configure FAILED: see nccl_configure.log"; return 1; }
  grep -E "NCCL|Gloo" "$LOGS/nccl_configure.log"
  timeout 330 cmake --build "$BUILD" -j"$JOBS" --target posttrain_data_parallel_grpo >"$LOGS/nccl_build.log" 2>&1 ||
    { grep -E "error" "$LOGS/nccl_build.log" | head -20; echo "NCCL example build FAILED: see nccl_build.log"; return 1; }
  timeout 180 "$BUILD/examples/posttrain_data_parallel_grpo" --backend nccl --ranks 2 --steps 3 >"$LOGS/nccl.log" 2>&1
  local rc=$?
  cat "$LOGS/nccl.log"
  echo "data-parallel over NCCL rc=$rc"
  return $rc
}

case $MODE in
  prepare) prepare ;;
  run)
    [ -d "$DEPS" ] || { echo "no $DEPS: run 'scripts/gpu_check.sh prepare' on a machine with the packages and copy .gpu-deps/ here"; exit 1; }
    torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)' 2>/dev/null)
    python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
    configure_build "$torch_prefix" && run_checks
    rc=$?
    nccl_check || rc=1
    exit $rc
    ;;
  local)
    # The system LibTorch (e.g. Debian's libtorch-dev), found by CMake itself; on a CPU-only build the CUDA cases SKIP.
    [ -d "$DEPS" ] || prepare || exit 1
    configure_build "${TORCH_PREFIX:-}" && run_checks
    rc=$?
    nccl_check || rc=1
    exit $rc
    ;;
  checks) run_checks ;;
  nccl) nccl_check ;;
  *)
    echo "usage: scripts/gpu_check.sh [prepare|run|local|checks|nccl]" >&2
    exit 2
    ;;
esac
