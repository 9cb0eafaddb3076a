# scripts/setup.sh — sourced by demo.sh and test.sh: installs what is missing, then helpers.
# Debian/Ubuntu: apt-get as root (or through sudo); nothing is installed when all is present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# clang-16 + libclang-rt-16-dev (its sanitizer and libFuzzer runtimes) + libfuzzer-16-dev: the fuzz targets (fuzz/).
# libcli11-dev + nlohmann-json3-dev: the posttrain-verify command (tools/; skipped with a warning without them).
# gnuplot-nox: the tour's pictures (examples/tour_plots.hpp; without it the tour runs and says plots were skipped).
# libgloo-dev: Gloo's headers, for the data-parallel tests over c10d's ProcessGroupGloo (tests/torch/test_distributed_torch.cpp).
POSTTRAIN_PACKAGES=(cmake g++ make libeigen3-dev librange-v3-dev catch2 libbenchmark-dev libtorch-dev
                    clang-16 libclang-rt-16-dev libfuzzer-16-dev libcli11-dev nlohmann-json3-dev gnuplot-nox libgloo-dev)
BUILD_DIR=${POSTTRAIN_BUILD_DIR:-build}
JOBS=${POSTTRAIN_JOBS:-$(nproc 2>/dev/null || echo 2)}

step() { printf '\n==> %s\n' "$*"; }

install_packages() {
  if ! command -v dpkg-query >/dev/null; then
    echo "not a Debian/Ubuntu system: install ${POSTTRAIN_PACKAGES[*]} yourself" >&2
    return 0
  fi
  local missing=()
  for p in "${POSTTRAIN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    step "all packages present (${POSTTRAIN_PACKAGES[*]}): skipping apt-get"
    return 0
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "run as root (or install sudo): missing ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  step "apt-get install ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  # LibTorch is optional: where the distribution has no libtorch-dev, posttrain builds without it.
  local available=()
  for p in "${missing[@]}"; do
    if apt-cache show "$p" >/dev/null 2>&1; then available+=("$p"); else echo "note: no package $p here; skipping it"; fi
  done
  [ ${#available[@]} -eq 0 ] && return 0
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${available[@]}"
}

# configure <build dir> [cmake args...]: Release unless told otherwise.
configure() {
  local dir=$1
  shift
  step "cmake -S . -B $dir -DCMAKE_BUILD_TYPE=Release $*"
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@"
}

# build <build dir> [targets...]
build() {
  local dir=$1
  shift
  local targets=()
  for t in "$@"; do targets+=(--target "$t"); done
  step "cmake --build $dir -j$JOBS ${targets[*]}"
  cmake --build "$dir" -j"$JOBS" "${targets[@]}"
}
