#!/usr/bin/env bash
# Unpack Debian bookworm-backports' QEMU 10.0 into .cache/qemu-10.0 for the test matrix.
# The system QEMU (7.2) is left alone: the packages are downloaded and unpacked with
# `dpkg -x`, never installed. Adds the backports suite as a separate apt sources file.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/qemu-10.0
[ -x "$DEST/qemu-system-x86_64" ] && "$DEST/qemu-system-x86_64" --version >/dev/null 2>&1 && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
SRC=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$SRC" ]; then
  $SUDO tee "$SRC" >/dev/null <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi
$SUDO apt-get update -qq
rm -rf "$DEST" && mkdir -p "$DEST/debs"
(cd "$DEST/debs" && apt-get download -q \
  qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
  qemu-system-data/bookworm-backports 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
for deb in "$DEST"/debs/*.deb; do dpkg -x "$deb" "$DEST"; done
cat > "$DEST/qemu-system-x86_64" <<'WRAPPER'
#!/bin/sh
# QEMU 10.0 from bookworm-backports, with its own firmware and modules.
d=$(dirname "$(readlink -f "$0")")
QEMU_MODULE_DIR="$d/usr/lib/x86_64-linux-gnu/qemu" exec "$d/usr/bin/qemu-system-x86_64" -L "$d/usr/share/qemu" "$@"
WRAPPER
chmod +x "$DEST/qemu-system-x86_64"
"$DEST/qemu-system-x86_64" --version | head -1
