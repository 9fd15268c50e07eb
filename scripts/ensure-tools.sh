# Sourced by the scripts: install a tool only when it is missing, so a warm machine pays nothing.

ensure_rust_components() {
  local have
  have=$(rustup component list --installed 2>/dev/null || true)
  for c in rustfmt clippy; do
    grep -q "^$c" <<<"$have" || rustup component add "$c"
  done
}

ensure_nextest() {
  cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
}

# The wasm32 target and clang-19/llvm-ar-19, which sqlite-wasm-rs compiles SQLite with.
ensure_wasm_toolchain() {
  rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
  if ! command -v clang-19 >/dev/null 2>&1 || ! command -v llvm-ar-19 >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19 llvm-19
  fi
}

# The `openssl` command: the `wss://` test makes its CA and certificate with it.
ensure_openssl() {
  if ! command -v openssl >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl
  fi
}

# wasm-bindgen-cli, at exactly the version of the wasm-bindgen crate (4-6 minutes to build, so
# only when missing or at another version). Gives wasm-bindgen and wasm-bindgen-test-runner.
ensure_wasm_bindgen() {
  local want=0.2.130
  if ! wasm-bindgen --version 2>/dev/null | grep -q " $want"; then
    # Not --locked: its lockfile pins a webpki-roots release that crates.io no longer serves.
    cargo install wasm-bindgen-cli --version "$want"
  fi
}

# Debian's Chromium and chromedriver (the wasm-bindgen tests), and playwright-core from npm (the
# page-level tests), which drives that Chromium: no browser download.
ensure_browser() {
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
  fi
  if [ ! -d wasm/tests/page/node_modules/playwright-core ]; then
    (cd wasm/tests/page && npm ci --no-audit --no-fund --silent)
  fi
}

# moto's S3 server, for the object-store backend's tests. Installs it when missing, starts it on
# a free loopback port, and exports the standard AWS_* variables that point object_store at it.
# PAGESYNC_REQUIRE_S3=1 makes the S3 tests fail (rather than skip) if S3 is not reachable.
start_moto() {
  if ! command -v moto_server >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check 'moto[s3]==5.2.5' flask flask-cors
    hash -r
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p target
  moto_server -H 127.0.0.1 -p "$port" > target/moto.log 2>&1 &
  MOTO_PID=$!
  trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
  export AWS_REGION=us-east-1 PAGESYNC_REQUIRE_S3=1
  echo "moto S3 server on $AWS_ENDPOINT_URL (log: target/moto.log)"
}
