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
