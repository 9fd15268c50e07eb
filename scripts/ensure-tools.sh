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
