#!/usr/bin/env bash
# Unpacks Mesa 25's lavapipe (Debian bookworm-backports' mesa-vulkan-drivers, pinned below) into a
# cache directory, without touching the system, and prints the VK_DRIVER_FILES value that makes
# the Vulkan loader use it instead of the installed driver:
#
#   VK_DRIVER_FILES="$(scripts/mesa-lavapipe.sh)" cargo run --release -- devices
#
# A second lavapipe to run the kernel tests on (.ci/run does, at 512-bit vectors: subgroup size
# 16 beside the default 8). Needs amd64, curl, dpkg-deb and the LLVM 15 runtime that Debian 12's
# own Mesa uses (libllvm15). The cache is $WGTRAIN_MESA_CACHE, else ~/.cache/wgtrain; a second
# run finds it there and downloads nothing.
set -euo pipefail

VERSION="25.0.7-2~bpo12+1"
SHA256="3899f1800424c60a05df5d6913076a526ca8fdbabec43672cd397563d1ca3263"
DEB="mesa-vulkan-drivers_${VERSION}_amd64.deb"
URL="${MESA_POOL_URL:-http://deb.debian.org/debian/pool/main/m/mesa}/$DEB"
CACHE="${WGTRAIN_MESA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wgtrain}/mesa-$VERSION"
ICD="$CACHE/lvp_icd.json"

if [ -e "$CACHE" ] && [ ! -f "$ICD" ]; then
  echo "mesa-lavapipe.sh: $CACHE exists without $ICD; remove it to unpack again" >&2
  exit 1
fi
if [ ! -f "$ICD" ]; then
  arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
  if [ "$arch" != amd64 ] && [ "$arch" != x86_64 ]; then
    echo "mesa-lavapipe.sh: $DEB is for amd64; this machine is $arch" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$CACHE")"
  # Unpacked beside the cache and renamed into place, so an interrupted run leaves no half cache.
  work="$(mktemp -d "$CACHE.partial.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "mesa-lavapipe.sh: downloading $URL" >&2
  curl -sSfL --retry 3 -o "$work/$DEB" "$URL"
  if ! echo "$SHA256  $work/$DEB" | sha256sum -c --quiet - >&2; then
    echo "mesa-lavapipe.sh: $DEB does not have the pinned sha256 $SHA256" >&2
    exit 1
  fi
  dpkg-deb -x "$work/$DEB" "$work/root"
  rm "$work/$DEB"
  lib="$CACHE/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so"
  missing="$(ldd "$work/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" | grep 'not found' || true)"
  if [ -n "$missing" ]; then
    echo "mesa-lavapipe.sh: lavapipe $VERSION needs libraries this system lacks:" >&2
    echo "$missing" >&2
    exit 1
  fi
  # The packaged manifest names the library without a path (the system's search path); the
  # cached one points at the unpacked copy.
  sed "s|\"library_path\": \"libvulkan_lvp.so\"|\"library_path\": \"$lib\"|" \
    "$work/root/usr/share/vulkan/icd.d/lvp_icd.json" >"$work/lvp_icd.json"
  if ! grep -q "$lib" "$work/lvp_icd.json"; then
    echo "mesa-lavapipe.sh: unexpected manifest in $DEB (usr/share/vulkan/icd.d/lvp_icd.json)" >&2
    exit 1
  fi
  mv "$work" "$CACHE"
  trap - EXIT
fi
echo "$ICD"
