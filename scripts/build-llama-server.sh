#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU) from the llama.cpp sources that the llama-cpp-python sdist on PyPI
# vendors: no prebuilt llama-server ships on PyPI or npm for linux x86_64, Debian 12 packages none, and the
# sdist is the one llama.cpp source a pip client reaches. Everything goes into a cache folder; a second run
# finds the binary there and only prints its path. The last line printed is the binary's path, so callers
# can do: export MEMSERVE_LLAMA_SERVER_COMMAND="$(scripts/build-llama-server.sh | tail -n 1)"
#
# Needs: python3 with pip, cmake >= 3.14, a C++17 compiler, make. The first build took 50 minutes on 2 cores
# shared with other work (nice 10, load about 5); a second run finds the binary and takes no time.
# Environment: LLAMA_CPP_PYTHON_VERSION (default below), JOBS (default: nproc), XDG_CACHE_HOME.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/memserve/llama.cpp-${version}"
binary="$cache/build/bin/llama-server"
jobs="${JOBS:-$(nproc)}"

if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "build-llama-server: fetching llama-cpp-python==$version (sdist) from PyPI" >&2
# pip prepares an sdist's metadata even for `download`; scikit-build-core in a throwaway venv lets it do so
# without building the package.
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check scikit-build-core >&2
"$work/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    --no-build-isolation "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
rm -rf "$cache/src"
mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$cache/src"

echo "build-llama-server: configuring and building llama-server in $cache/build (-j$jobs)" >&2
# No network at build time: no prebuilt web UI download, no HTTPS client, no tests or examples.
cmake -S "$cache/src" -B "$cache/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF >&2
cmake --build "$cache/build" --target llama-server -j "$jobs" >&2

"$binary" --version >&2
echo "$binary"
