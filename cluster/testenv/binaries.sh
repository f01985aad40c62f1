#!/usr/bin/env bash
# Print the folder holding kube-apiserver, kube-controller-manager and kube-scheduler 1.20.2,
# getting them first if needed, in this order:
#   1. $DISTGEN_K8S_BIN, when it holds all three;
#   2. the cache ($DISTGEN_K8S_CACHE, default ~/.cache/distgen/k8s-1.20.2), when complete;
#   3. unpacked into the cache from a prebuilt set ($DISTGEN_K8S_PREBUILT, default ../shared/k8s beside
#      the repository: *.gz and SHA256SUMS), the hashes checked;
#   4. built into the cache from Debian's kubernetes 1.20.2 source package with Debian's Go
#      (~10 min on 2 cores, 1.3 GB memory), with the reflect2 fix (the vendored 1.0.1 crashes
#      under Go >= 1.18 on the first custom-resource create).
# Also makes sure etcd is there (Debian's etcd-server, installed when missing and we are root).
# Exit 3 with the reason on stderr when none of this can be done (the tests then skip).
set -euo pipefail
VERSION=1.20.2
BINARIES="kube-apiserver kube-controller-manager kube-scheduler"
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${DISTGEN_K8S_CACHE:-$HOME/.cache/distgen/k8s-$VERSION}
prebuilt=${DISTGEN_K8S_PREBUILT:-$repo/../shared/k8s}

cannot() { echo "cluster/testenv: $*" >&2; exit 3; }
complete() { for b in $BINARIES; do [ -x "$1/$b" ] || return 1; done; }
log() { echo "cluster/testenv: $*" >&2; }

have_etcd() {
    command -v etcd >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    log "installing etcd-server (Debian)"
    (apt-get install -y -qq etcd-server >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 &&
        apt-get install -y -qq etcd-server >/dev/null 2>&1; }) || return 1
    # the package starts a system etcd on 2379; the tests run their own on other ports
    (systemctl disable --now etcd >/dev/null 2>&1 || service etcd stop >/dev/null 2>&1 || true)
    command -v etcd >/dev/null 2>&1
}

build_from_source() {
    [ "$(id -u)" = 0 ] || cannot "no prebuilt binaries, and building them needs root for apt-get (golang-go, the source package)"
    log "building Kubernetes $VERSION from Debian's source package into $cache (about 10 minutes)"
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev >/dev/null 2>&1 ||
        cannot "apt-get install golang-go golang-github-modern-go-reflect2-dev failed"
    work=$(mktemp -d /tmp/distgen-k8s-build.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    # a private source list for bookworm main (the machine's own lists may have no deb-src)
    mkdir -p "$work/apt/lists/partial" "$work/apt/sources.list.d"
    echo "deb-src http://deb.debian.org/debian bookworm main" > "$work/apt/sources.list"
    opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=$work/apt/sources.list.d"
          -o "Dir::State::Lists=$work/apt/lists")
    apt-get "${opts[@]}" update -qq >/dev/null 2>&1 || cannot "apt-get update of the bookworm deb-src list failed"
    (cd "$work" && apt-get "${opts[@]}" source --download-only "kubernetes=$VERSION*" >/dev/null 2>&1 ||
        apt-get "${opts[@]}" source --download-only kubernetes >/dev/null 2>&1) ||
        cannot "apt-get source kubernetes ($VERSION) failed"
    tarball=$(ls "$work"/kubernetes_*.orig.tar.gz 2>/dev/null | head -1)
    [ -n "$tarball" ] || cannot "the kubernetes source package has no .orig.tar.gz"
    tar xzf "$tarball" -C "$work"
    src=$(ls -d "$work"/kubernetes-*/ | head -1)
    r2=$src/vendor/github.com/modern-go/reflect2
    rm -rf "$r2" && mkdir -p "$r2"
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$r2"/
    rm -f "$r2"/*_test.go
    mkdir -p "$src/.go/src/k8s.io" && ln -sfn ../../.. "$src/.go/src/k8s.io/kubernetes"
    (cd "$src" && GOPATH=$src/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS= \
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$work/build.log" 2>&1) ||
        { tail -20 "$work/build.log" >&2; cannot "the build failed (log above)"; }
    mkdir -p "$cache"
    for b in $BINARIES; do cp "$src/_output/local/bin/linux/$(go env GOARCH)/$b" "$cache/$b"; chmod +x "$cache/$b"; done
    (cd "$cache" && sha256sum $BINARIES > SHA256SUMS.built)
}

have_etcd || cannot "etcd is missing (apt-get install etcd-server, as root)"
if [ -n "${DISTGEN_K8S_BIN:-}" ]; then
    complete "$DISTGEN_K8S_BIN" || cannot "DISTGEN_K8S_BIN=$DISTGEN_K8S_BIN lacks one of: $BINARIES"
    echo "$DISTGEN_K8S_BIN"; exit 0
fi
if complete "$cache"; then echo "$cache"; exit 0; fi
if [ -f "$prebuilt/SHA256SUMS" ]; then
    log "unpacking the prebuilt binaries from $prebuilt into $cache"
    mkdir -p "$cache.tmp"
    for b in $BINARIES; do gunzip -c "$prebuilt/$b.gz" > "$cache.tmp/$b"; chmod +x "$cache.tmp/$b"; done
    (cd "$cache.tmp" && sha256sum --quiet -c "$prebuilt/SHA256SUMS") || { rm -rf "$cache.tmp"; cannot "SHA256SUMS do not match"; }
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
    echo "$cache"; exit 0
fi
build_from_source
echo "$cache"
