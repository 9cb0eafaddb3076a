#!/usr/bin/env bash
# The demo: installs what is missing, builds examples/quickstart.cpp and runs it. It computes the
# SFT loss and the KL estimators on a tiny batch on the Eigen reference (double) and on LibTorch
# (float32), side by side with their agreement. Run from anywhere, as root or with sudo available.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

install_packages
configure "$BUILD_DIR"
build "$BUILD_DIR" posttrain_quickstart
step "$BUILD_DIR/examples/posttrain_quickstart"
"$BUILD_DIR/examples/posttrain_quickstart"
