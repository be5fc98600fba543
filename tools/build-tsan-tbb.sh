#!/usr/bin/env bash
# Builds oneTBB with ThreadSanitizer from Debian's source of the installed
# libtbb-dev, into build/tsan-deps/prefix (once; later runs reuse it).
#
# Why: Debian's libtbb is not instrumented, so TSan cannot see how a
# parallel_for hands work to TBB's workers and reports every hand-off as a
# race. Linking the TSan build of kvtier against an instrumented TBB keeps the
# whole suite, TBB parallelism included, under TSan.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD/build/tsan-deps
prefix=$top/prefix
if [[ -f $prefix/lib/cmake/TBB/TBBConfig.cmake ]]; then
  exit 0
fi
version=$(dpkg-query -W -f='${source:Version}' libtbb-dev)
echo "build-tsan-tbb: building oneTBB $version with -fsanitize=thread"
rm -rf "$top/src"
mkdir -p "$top/src/lists/partial"
echo "deb-src http://deb.debian.org/debian bookworm main" > "$top/src/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$top/src/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$top/src/lists")
apt-get "${apt_opts[@]}" update -qq
(cd "$top/src" && apt-get "${apt_opts[@]}" -qq source --download-only "onetbb=$version" 2>/dev/null)
tar xf "$top"/src/onetbb_*.orig.tar.xz -C "$top/src"
src=$(find "$top/src" -maxdepth 1 -type d -name 'oneTBB-*' | head -n 1)
cmake -S "$src" -B "$top/src/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTBB_SANITIZE=thread \
  -DTBB_TEST=OFF -DTBB_EXAMPLES=OFF -DTBBMALLOC_BUILD=OFF -DTBB_STRICT=OFF -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCMAKE_INSTALL_LIBDIR=lib >/dev/null
cmake --build "$top/src/build" -j2 >/dev/null
cmake --install "$top/src/build" >/dev/null
