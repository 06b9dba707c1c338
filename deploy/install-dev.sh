#!/usr/bin/env bash
# Set up qmpguard on a fresh Debian 12 machine: system packages, a virtualenv, the package.
# Idempotent. Uses sudo for apt when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PACKAGES=(
  qemu-system-x86 qemu-system-arm   # the VMs qmpguard inspects (tests, demo)
  seabios ipxe-qemu                 # firmware for running (non -S) test VMs
  gcc libc6-dev                     # builds the demo's VFIO emulation and tiny guest
  python3 python3-venv python3-dev  # the virtualenv
  prometheus                        # promtool and a real server test deploy/'s rules and dashboard
  prometheus-alertmanager           # amtool validates deploy/alertmanager.yml
  libvirt-daemon-system libvirt-clients  # a real libvirtd for the libvirt tests
  libvirt-dev pkg-config            # to build libvirt-python (qmpguard[libvirt])
  chromium chromium-driver          # headless browser test of the daemon's topology page
  openssl                           # a throwaway certificate for the daemon TLS test
  patchelf                          # points trixie's QEMU 11.1 at its own libraries
)
missing=()
for p in "${PACKAGES[@]}"; do
  [[ "$p" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# QEMU 10.0 and 11.1 beside the system 7.2, for the version test matrix (no system change).
deploy/fetch-qemu-backport.sh
deploy/fetch-qemu-11.sh

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test,libvirt]'

# libvirtd for the libvirt tests. Debian's udev gives /dev/kvm to group kvm (0660);
# containers often do not, and libvirt then re-probes every emulator on each call
# ("KVM was enabled when probing, but it is not available now"): ~1 minute per define.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  $SUDO chgrp kvm /dev/kvm && $SUDO chmod 0660 /dev/kvm
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl start libvirtd
  else
    $SUDO virtlogd -d
    $SUDO libvirtd -d
  fi
fi
echo "qmpguard installed in $(pwd)/.venv (run: .venv/bin/qmpguard --help)"
