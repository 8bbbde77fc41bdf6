#!/bin/sh
# The build step of docker/Dockerfile, kept in one script so that CI runs the
# very same commands outside Docker: a release build of the four binaries,
# installed into OUT.
#
#   sh docker/build.sh OUT
set -eu
out=${1:?usage: build.sh OUT}
cd "$(dirname "$0")/.."
cargo build --release --locked -p manager -p proplet -p proxy -p propeller-mqtt-cli
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$out"
for binary in manager proplet proxy propeller-mqtt; do
  install -m 0755 "$target/release/$binary" "$out/$binary"
done
echo "built: $(cd "$out" && ls)"
