#!/usr/bin/env bash
# deploy/dev.sh - the quickstart on a fresh Debian 12 machine.
#   deploy/dev.sh run  [mtproxy flags...]  install packages, build, start mtproxy, print its links
#   deploy/dev.sh test                     install packages, build, run the whole CTest suite
#   deploy/dev.sh build                    install packages and build only
# Run as root (or with sudo available) so missing packages can be installed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${MTP_BUILD_DIR:-$root/build}"

packages=(build-essential cmake pkg-config libuv1-dev libmbedtls-dev libprotobuf-c-dev
          protobuf-c-compiler libcjson-dev zlib1g-dev libcurl4-openssl-dev ca-certificates
          libsystemd-dev libqrencode-dev)
test_packages=(openssl iproute2 curl python3-telethon)

install_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "dev.sh: installing ${missing[*]}" >&2
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

do_build() {
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" -j"$(nproc)"
}

has_flag() { # has_flag NAME... -- ARGS...
  local names=() a
  while [ "$1" != "--" ]; do names+=("$1"); shift; done
  shift
  for a in "$@"; do
    for n in "${names[@]}"; do
      case "$a" in "$n"|"$n="*) return 0 ;; esac
    done
  done
  return 1
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  run)
    install_packages "${packages[@]}"
    do_build
    args=("$@")
    if ! has_flag --port --listen --config -- "$@"; then
      args+=(--port "${PORT:-443}")
    fi
    if ! has_flag --secret --config -- "$@"; then
      # One secret per checkout, kept so that the printed links stay valid across restarts.
      secret_file="$root/.mtproxy-secret"
      if [ ! -s "$secret_file" ]; then
        head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secret_file"
        chmod 600 "$secret_file"
      fi
      args+=(--secret "$(cat "$secret_file")")
    fi
    if ! has_flag --cache-dir --config -- "$@"; then
      args+=(--cache-dir "$root/.mtproxy-cache")
    fi
    exec "$build/mtproxy" "${args[@]}"
    ;;
  test)
    install_packages "${packages[@]}" "${test_packages[@]}"
    do_build
    cd "$build"
    exec ctest --output-on-failure --timeout 600 -j2
    ;;
  build)
    install_packages "${packages[@]}"
    do_build
    ;;
  *)
    echo "usage: deploy/dev.sh run [mtproxy flags...] | test | build" >&2
    exit 2
    ;;
esac
