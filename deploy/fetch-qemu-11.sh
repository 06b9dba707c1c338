#!/usr/bin/env bash
# Unpack Debian trixie-backports' QEMU 11.1 (x86_64 and aarch64) into .cache/qemu-11.1 for
# the test matrix, on a Debian 12 host, without changing the system.
#
# trixie's QEMU is built against trixie's glibc and libraries, so it gets its own: a
# private apt (own sources, lists, cache and an empty dpkg status, so the whole dependency
# closure is downloaded) fetches the packages, `dpkg -x` unpacks them into one root, and
# patchelf points each QEMU binary at that root's loader and (as DT_RPATH, which also
# covers transitive and dlopen'ed libraries) its library directory. A wrapper per binary
# adds the root's firmware (-L, before the system's /usr/share/seabios that the build
# also searches) and modules (QEMU_MODULE_DIR; otherwise QEMU loads the
# system 7.2's) and execs it, so a running VM's argv[0] is the qemu-system-* binary.
# Nothing is installed, no system apt file is written. Idempotent: skips when the
# wrappers already run this QEMU from this checkout; downloaded packages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=11.1
SUITE=trixie-backports
DEST="$PWD/.cache/qemu-$VERSION"
ROOT="$DEST/root"
APTDIR="$DEST/apt"
LIBDIR="$ROOT/usr/lib/x86_64-linux-gnu"
LOADER="$ROOT/usr/lib64/ld-linux-x86-64.so.2"
ARCHES=(x86_64 aarch64)

ready() {
  local arch
  for arch in "${ARCHES[@]}"; do
    [ -x "$DEST/qemu-system-$arch" ] || return 1
    # The loader path is absolute: a checkout moved elsewhere must be patched again.
    [ "$(patchelf --print-interpreter "$ROOT/usr/bin/qemu-system-$arch" 2>/dev/null)" = "$LOADER" ] ||
      return 1
    "$DEST/qemu-system-$arch" --version 2>/dev/null | grep -q "version $VERSION\." || return 1
  done
}
command -v patchelf >/dev/null && ready && exit 0

[ "$(dpkg --print-architecture)" = amd64 ] || {
  echo "fetch-qemu-11: only amd64 hosts are supported" >&2
  exit 1
}
command -v patchelf >/dev/null || {
  echo "fetch-qemu-11: patchelf is missing (deploy/install-dev.sh installs it)" >&2
  exit 1
}
# trixie's archive keys: in Debian 12's debian-archive-keyring since 2023.3+deb12u1.
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f /usr/share/keyrings/debian-archive-trixie-automatic.gpg ] || {
  echo "fetch-qemu-11: $KEYRING lacks trixie's keys; upgrade debian-archive-keyring" >&2
  exit 1
}

mkdir -p "$APTDIR"/{state/lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d,log}
: >"$APTDIR/status"
cat >"$APTDIR/etc/sources.list" <<SOURCES
deb [signed-by=$KEYRING] http://deb.debian.org/debian trixie main
deb [signed-by=$KEYRING] http://deb.debian.org/debian trixie-updates main
deb [signed-by=$KEYRING] http://deb.debian.org/debian-security trixie-security main
deb [signed-by=$KEYRING] http://deb.debian.org/debian $SUITE main
SOURCES
APT=(
  -o "Dir::State=$APTDIR/state"
  -o "Dir::State::status=$APTDIR/status"
  -o "Dir::Cache=$APTDIR/cache"
  -o "Dir::Etc::SourceList=$APTDIR/etc/sources.list"
  -o "Dir::Etc::SourceParts=$APTDIR/etc/sources.list.d"
  -o "Dir::Etc::Preferences=$APTDIR/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$APTDIR/etc/preferences.d"
  -o "Dir::Log=$APTDIR/log"
  -o "APT::Architecture=amd64"
  -o "APT::Architectures=amd64"
  -o "APT::Sandbox::User=root"
)
apt-get "${APT[@]}" update -qq
# Firmware: seabios and ipxe-qemu come as dependencies of qemu-system-x86; the ARM tests
# start `virt` with -S and need none (add qemu-efi-aarch64 here for booting ARM guests).
WANT=(qemu-system-x86 qemu-system-arm qemu-system-data seabios ipxe-qemu)
# The closure as apt resolves it today ("Inst NAME (VERSION SUITE [ARCH])"): exactly these
# files are unpacked, whatever older downloads the cache still holds.
mapfile -t PLAN < <(apt-get "${APT[@]}" install -s --no-install-recommends -t "$SUITE" "${WANT[@]}" |
  sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) .*/\1_\2/p')
printf '%s\n' "${PLAN[@]}" | grep -q "^qemu-system-x86_1:$VERSION\.[0-9]" || {
  echo "fetch-qemu-11: $SUITE no longer has QEMU $VERSION:" >&2
  printf '%s\n' "${PLAN[@]}" | grep '^qemu-system-x86_' >&2
  exit 1
}
apt-get "${APT[@]}" install -qq -y --download-only --no-install-recommends -t "$SUITE" \
  "${WANT[@]}" >/dev/null
DEBS="$APTDIR/cache/archives"
FILES=()
for p in "${PLAN[@]}"; do
  deb=$(compgen -G "$DEBS/${p//:/%3a}_*.deb") || {
    echo "fetch-qemu-11: $p was not downloaded" >&2
    exit 1
  }
  FILES+=("$deb")
done
for deb in "$DEBS"/*.deb; do  # drop superseded downloads
  [[ " ${FILES[*]} " == *" $deb "* ]] || rm -f "$deb"
done

rm -rf "$ROOT" && mkdir -p "$ROOT"
for deb in "${FILES[@]}"; do dpkg -x "$deb" "$ROOT"; done
# Debian links some firmware by absolute path (into seabios, ipxe-qemu, ...): keep the
# links inside the root, never on the system's files.
find "$ROOT" -type l -lname '/*' -print0 | while IFS= read -r -d '' link; do
  ln -sfn "$ROOT$(readlink "$link")" "$link"
done
[ -e "$LOADER" ] || {
  echo "fetch-qemu-11: no loader at $LOADER" >&2
  exit 1
}
for arch in "${ARCHES[@]}"; do
  bin="$ROOT/usr/bin/qemu-system-$arch"
  patchelf --set-interpreter "$LOADER" --force-rpath --set-rpath "$LIBDIR" "$bin"
  cat >"$DEST/qemu-system-$arch" <<WRAPPER
#!/bin/sh
# QEMU $VERSION from Debian $SUITE with its own loader, libraries, firmware and modules
# (deploy/fetch-qemu-11.sh). exec: the VM's argv[0] is the qemu-system-$arch binary.
d=\$(dirname "\$(readlink -f "\$0")")/root
QEMU_MODULE_DIR="\$d/usr/lib/x86_64-linux-gnu/qemu" exec "\$d/usr/bin/qemu-system-$arch" \\
  -L "\$d/usr/share/qemu" -L "\$d/usr/share/seabios" "\$@"
WRAPPER
  chmod +x "$DEST/qemu-system-$arch"
done
ready || {
  echo "fetch-qemu-11: the unpacked QEMU does not run" >&2
  "$DEST/qemu-system-x86_64" --version >&2
  exit 1
}
"$DEST/qemu-system-x86_64" --version | head -1
