#!/usr/bin/env bash
# Provides the binaries the Kubernetes tests run, cached under ~/.cache/llm-epp/k8s/bin (shared by
# every clone on the machine, so a fresh clone or CI run reuses them):
#
#   kube-apiserver  v1.20.2, BUILT from Debian's `kubernetes` source package with Debian's
#                   Go 1.19 (no registry ships the binary; ~3 min once, then reused)
#   etcd            from Debian's `etcd-server` (3.4.x)
#   kubectl         from Debian's `kubernetes-client` (1.20, matches the server)
#
# etcd and kubectl are unpacked from their .deb files into the cache instead of installed:
# installing etcd-server would try to start a system etcd, and kubernetes-client's
# /usr/bin/kubectl may collide with a kubectl already on the machine. Build tools (Go,
# rsync, reflect2) are installed with apt-get when missing (we run as root in CI).
#
# Usage: tests/k8s/build-kube-apiserver.sh [CACHE_DIR]   (default: $K8S_CACHE_DIR, else
#        ${XDG_CACHE_HOME:-$HOME/.cache}/llm-epp/k8s)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEFAULT_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llm-epp/k8s"
CACHE=$(mkdir -p "${1:-${K8S_CACHE_DIR:-$DEFAULT_CACHE}}" && cd "${1:-${K8S_CACHE_DIR:-$DEFAULT_CACHE}}" && pwd)
BIN=$CACHE/bin
K8S_VERSION=v1.20.2
mkdir -p "$BIN"

# Two `make test` runs on one checkout must not build into the same directory at once.
exec 9>"$CACHE/.lock"
flock 9

log() { printf '[k8s-binaries] %s\n' "$*" >&2; }

have_apiserver() { [[ -x $BIN/kube-apiserver ]] && "$BIN/kube-apiserver" --version 2>/dev/null | grep -q "$K8S_VERSION"; }
have_etcd() { [[ -x $BIN/etcd ]] && "$BIN/etcd" --version >/dev/null 2>&1; }
have_kubectl() { [[ -x $BIN/kubectl ]] && "$BIN/kubectl" version --client >/dev/null 2>&1; }

if have_apiserver && have_etcd && have_kubectl && command -v openssl >/dev/null; then
    exit 0
fi

# Whatever is missing comes from Debian's archive through apt-get, which needs root: say so, not apt's error.
need_apt() {
    if [[ $EUID != 0 ]] || ! command -v apt-get >/dev/null; then
        log "the Kubernetes test binaries are not all in $BIN yet, and getting them needs apt-get as root"
        log "on Debian bookworm (as in CI)."
        log "Run this script once as root (sudo $0), or put kube-apiserver $K8S_VERSION, etcd 3.4 and kubectl 1.20 in $BIN."
        exit 1
    fi
}

APT_UPDATED=0
apt_update_once() {
    need_apt
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        APT_UPDATED=1
    fi
}

apt_install() {  # apt_install PKG... : installs the packages that are not installed yet
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        apt_update_once
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

unpack_deb() {  # unpack_deb PKG PATH_IN_DEB DEST : one binary out of a Debian package, no install
    local pkg=$1 path=$2 dest=$3 tmp
    tmp=$(mktemp -d)
    apt_update_once
    # Downloads run as root: the sandbox user _apt cannot write into our private directories.
    (cd "$tmp" && apt-get -o APT::Sandbox::User=root download -qq "$pkg" >/dev/null)
    dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/root"
    install -m 0755 "$tmp/root/$path" "$dest"
    rm -rf "$tmp"
    log "unpacked $pkg: $dest"
}

have_etcd || unpack_deb etcd-server usr/bin/etcd "$BIN/etcd"
have_kubectl || unpack_deb kubernetes-client usr/bin/kubectl "$BIN/kubectl"
command -v openssl >/dev/null || apt_install openssl

if have_apiserver; then
    exit 0
fi

start=$(date +%s)
apt_install golang-1.19-go rsync make patch golang-github-modern-go-reflect2-dev ca-certificates

WORK=$CACHE/build
rm -rf "$WORK"
mkdir -p "$WORK/apt/lists/partial"
cd "$WORK"

# Source packages through a private deb-src list: the machine's /etc/apt stays untouched.
printf 'deb-src http://deb.debian.org/debian bookworm main\ndeb-src http://deb.debian.org/debian-security bookworm-security main\n' \
    >apt/src.list
APTOPT=(-o APT::Sandbox::User=root -o "Dir::Etc::SourceList=$WORK/apt/src.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$WORK/apt/lists")
log "downloading Debian's kubernetes source package"
apt-get "${APTOPT[@]}" update -qq
apt-get "${APTOPT[@]}" source --download-only -qq kubernetes >/dev/null

tar xzf kubernetes_*.orig.tar.gz
tar xf kubernetes_*.debian.tar.xz
SRC=$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
cd "$SRC"
grep -v -E '^\s*(#|$)' ../debian/patches/series | while read -r p; do
    patch -s -p1 <"../debian/patches/$p"
done

# Go >= 1.18 + the vendored reflect2 v1.0.1 crash the apiserver on its first custom-resource
# write (fatal error in reflect2 UnsafeMapType.UnsafeIterate): use Debian's reflect2 1.0.2.
V=vendor/github.com/modern-go/reflect2
rm -f "$V"/*.go "$V"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$V"/

log "building kube-apiserver $K8S_VERSION (about 3 minutes on 2 cores)"
# Kubernetes 1.20 builds in GOPATH mode through its Makefile (a plain `go build` fails).
export GOCACHE=$WORK/gocache GOFLAGS=
PATH=/usr/lib/go-1.19/bin:$PATH make WHAT=cmd/kube-apiserver KUBE_GIT_VERSION=$K8S_VERSION >"$WORK/make.log" 2>&1 ||
    { tail -50 "$WORK/make.log"; exit 1; }
install -m 0755 _output/bin/kube-apiserver "$BIN/kube-apiserver.new"
mv "$BIN/kube-apiserver.new" "$BIN/kube-apiserver"
cd "$CACHE"
rm -rf "$WORK"
have_apiserver
log "kube-apiserver built in $(($(date +%s) - start)) s: $BIN/kube-apiserver"
