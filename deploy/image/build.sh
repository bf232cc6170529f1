#!/usr/bin/env bash
# Builds the l2mesh OCI image with buildah, from scratch: the release (or
# dev) binaries, stripped, plus the shared libraries the dynamic ones load,
# and a static l2mesh-cni that runs on any Linux host it is copied onto.
#
#   deploy/image/build.sh [--tag NAME] [--profile release|dev]
#                         [--root DIR --runroot DIR] [--context-dir DIR]
#
# --root/--runroot: buildah's storage (default: the system's); the storage
# driver is always vfs (works as root without overlay support).
# --context-dir: keep the prepared build context there (default: a
# temporary directory, removed at the end).
# Needs: cargo, buildah, binutils (strip, readelf), ldd.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$workspace/Cargo.toml" | head -n1)"
tag="l2mesh:$version"
profile=release
storage=()
context=""

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --root) storage+=(--root "$2"); shift 2 ;;
    --runroot) storage+=(--runroot "$2"); shift 2 ;;
    --context-dir) context="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) echo "build.sh: --profile must be release or dev, not $profile" >&2; exit 2 ;;
esac
for tool in cargo buildah strip readelf ldd; do
  if ! command -v "$tool" >/dev/null; then
    case "$tool" in
      cargo) hint="install Rust (rustup) or put cargo on PATH" ;;
      buildah) hint="apt-get install buildah" ;;
      ldd) hint="apt-get install libc-bin" ;;
      *) hint="apt-get install binutils" ;;
    esac
    echo "build.sh: $tool not found: $hint" >&2
    exit 1
  fi
done

if [ -z "$context" ]; then
  context="$(mktemp -d)"
  trap 'rm -rf "$context"' EXIT
fi
rootfs="$context/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc"

cd "$workspace"
revision="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
target_dir="$(cargo metadata --format-version 1 --no-deps \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin_dir="$target_dir/$profile_dir"

# The whole workspace's binaries, as the e2e harness builds them: the same
# feature unification, so nothing is compiled twice.
cargo build --locked --profile "$profile" --workspace --bins
for bin in l2mesh-broker l2mesh-agent l2mesh-dataplane; do
  strip --strip-all -o "$rootfs/usr/local/bin/$bin" "$bin_dir/$bin"
done
# l2mesh-cni goes onto every host, old and non-Debian ones too: link glibc
# statically. `cargo rustc` applies the flag to the final link only, so the
# dependencies built for the other binaries are reused.
cargo rustc --locked --profile "$profile" -p l2mesh-cluster-agent --bin l2mesh-cni \
  -- -C target-feature=+crt-static
strip --strip-all -o "$rootfs/usr/local/bin/l2mesh-cni" "$bin_dir/l2mesh-cni"
if readelf -d "$rootfs/usr/local/bin/l2mesh-cni" | grep -q NEEDED \
   || readelf -l "$rootfs/usr/local/bin/l2mesh-cni" | grep -q INTERP; then
  echo "build.sh: l2mesh-cni is not static:" >&2
  readelf -d "$rootfs/usr/local/bin/l2mesh-cni" >&2
  exit 1
fi

# The shared libraries (and the loader) the dynamic binaries need, at the
# paths they are looked up at.
for bin in l2mesh-broker l2mesh-agent l2mesh-dataplane; do
  ldd "$rootfs/usr/local/bin/$bin" | awk '
    $2 == "=>" && $3 ~ /^\// { print $3 }
    $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
# The license the binaries are distributed under.
mkdir -p "$rootfs/usr/share/doc/l2mesh"
cp "$workspace/LICENSE" "$rootfs/usr/share/doc/l2mesh/LICENSE"
# Names for the two users the manifests run as.
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' \
  > "$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
chmod 0755 "$rootfs/usr/local/bin/"*

cp "$here/Containerfile" "$context/Containerfile"
buildah "${storage[@]}" --storage-driver vfs build --quiet \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
  -f "$context/Containerfile" -t "$tag" "$context" >/dev/null
echo "built $tag (${profile}, revision $revision):"
du -b "$rootfs/usr/local/bin/"* | awk '{ printf "  %-40s %6.1f MiB\n", $2, $1 / 1048576 }'
