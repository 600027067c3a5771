#!/usr/bin/env bash
# Installs every Debian package moerl needs (idempotent), then configures and builds.
#   scripts/setup.sh [BUILD_DIR]      default BUILD_DIR: build
# Environment: MOERL_BUILD_TYPE (default Release), MOERL_CUDA=auto|on|off (default auto: on when nvcc exists).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}

packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libcli11-dev nlohmann-json3-dev libspdlog-dev libyaml-cpp-dev
  libgtest-dev libgmock-dev libopenblas-openmp-dev libsentencepiece-dev
  libcaf-dev libcaf-openssl0.17 capnproto libcapnp-dev libssl-dev
  librocksdb-dev libcpp-httplib-dev libgloo-dev
  chromium chromium-driver  # the feedback page's browser test (tests/feedback/browser_test.cpp)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cuda_flag=()
case "${MOERL_CUDA:-auto}" in
  on) cuda_flag=(-DMOERL_CUDA=ON) ;;
  off) cuda_flag=(-DMOERL_CUDA=OFF) ;;
esac
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${MOERL_BUILD_TYPE:-Release}" "${cuda_flag[@]}" >/dev/null
cmake --build "$build" --parallel "$(nproc)"
