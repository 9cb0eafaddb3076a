#!/usr/bin/env bash
# The demo: installs what is missing, builds examples/tour.cpp and runs it. The tour trains a tiny
# causal transformer on CPU through every stage of post-training (base, SFT, reward model, PPO with
# and without the KL leash, DPO/IPO, GRPO, a tool-using episode with masked tool tokens), every loss
# computed by posttrain's torch backend, and prints each stage's numbers before and after (about two
# minutes on a 2-core machine). With gnuplot (gnuplot-nox) it draws a picture per stage into tour-out/
# (pass --out DIR for another folder), listed in order in tour-out/index.md. Without LibTorch it runs examples/quickstart.cpp (the Eigen reference)
# instead and says so. Run from anywhere, as root or with sudo available.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

install_packages
configure "$BUILD_DIR"
# The target list is read whole before it is searched: `| grep -q` would exit at the first match and, under
# pipefail, cmake's SIGPIPE on the rest of a long list would read as "no tour".
targets=$(cmake --build "$BUILD_DIR" --target help)
if grep -q posttrain_tour <<<"$targets"; then
  build "$BUILD_DIR" posttrain_tour
  step "$BUILD_DIR/examples/posttrain_tour"
  time "$BUILD_DIR/examples/posttrain_tour" "$@"
else
  echo "note: LibTorch was not found, so the tour (examples/tour.cpp) cannot be built; running the quickstart instead"
  build "$BUILD_DIR" posttrain_quickstart
  step "$BUILD_DIR/examples/posttrain_quickstart"
  "$BUILD_DIR/examples/posttrain_quickstart"
fi
