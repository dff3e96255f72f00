#!/usr/bin/env bash
# Idempotent machine setup for Veil on Debian 12 (root): apt packages, kernel
# headers link for bcc, bpffs mount, and the project venv. Used by `make demo`,
# `make test`, `make perf` and .ci/run. Safe to run any number of times.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VEIL_VENV:-$ROOT/.venv}
STAMP=$VENV/.veil-setup-stamp
log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (eBPF, network namespaces and apt need it); re-run with sudo"

APT_PACKAGES=(
  python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-dev
  iproute2 iputils-ping nftables iperf3 stunnel4 socat tshark
  nghttp2-proxy nghttp2-client tinyproxy openssl make
  etcd-server  # the store of the real kube-apiserver in tests/k8s_real
  haproxy      # the baseline of perf/bench_waypoint.py (TLS, jwt_verify, path ACLs)
)

# The HBONE interop test drives our server with Node.js's own http2 client. The
# machine image ships Node.js 20; fall back to Debian's when it is absent.
command -v node >/dev/null 2>&1 || APT_PACKAGES+=(nodejs)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer no without a prompt.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against kernel headers at /lib/modules/$(uname -r)/build. This
# kernel ships none and has CONFIG_IKHEADERS off, so link Debian's headers.
KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
if [ ! -e "$MODDIR/build/Makefile" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$hdr" ] || die "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64; check apt output"
  log "linking kernel headers $hdr -> $MODDIR/build"
  mkdir -p "$MODDIR"
  ln -sfn "$hdr" "$MODDIR/build"
  ln -sfn "${common:-$hdr}" "$MODDIR/source"
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

/usr/bin/python3 -c 'import bcc' 2>/dev/null || die "python3-bpfcc is installed but 'import bcc' fails under /usr/bin/python3"

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV (system site packages, for bcc)"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  log "installing veil-mesh (editable, dev extras) into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
  echo "$want" > "$STAMP"
fi
log "ready: $VENV"
