//! `--web DIR`: the server serves a directory (the browser bundle) on the paths it does not
//! own, with content types the browser needs, and nothing outside that directory.

mod support;

use std::io::{Read, Write};

fn get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn static_files_are_served_with_their_types_and_nothing_outside_the_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = dir.path().join("web");
    std::fs::create_dir_all(web.join("pkg")).expect("mkdir");
    std::fs::write(web.join("index.html"), "<h1>demo</h1>").expect("write");
    std::fs::write(web.join("pkg/app.wasm"), b"\0asm").expect("write");
    std::fs::write(dir.path().join("secret.txt"), "do not serve").expect("write");
    let journal = format!("file://{}", dir.path().join("data").display());
    let (_server, port) = support::start_on_any_port(&journal, &["--web", web.to_str().expect("utf-8 path")]);

    let index = get(port, "/?doc=00");
    assert!(index.starts_with("HTTP/1.1 200"), "{index}");
    assert!(index.contains("content-type: text/html") && index.ends_with("<h1>demo</h1>"), "{index}");
    let wasm = get(port, "/pkg/app.wasm");
    assert!(wasm.contains("content-type: application/wasm"), "{wasm}");
    for bad in ["/../secret.txt", "/pkg/../../secret.txt", "/.hidden"] {
        let out = get(port, bad);
        assert!(out.starts_with("HTTP/1.1 400"), "{bad}: {out}");
        assert!(!out.contains("do not serve"), "{bad} escaped the root");
    }
    assert!(get(port, "/missing.js").starts_with("HTTP/1.1 404"));
    // A link in the directory is not followed out of it (a link inside it is), and a FIFO is
    // not opened: opening one waits for a writer, and held the request.
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), web.join("out.txt")).expect("symlink");
    std::os::unix::fs::symlink(web.join("index.html"), web.join("in.html")).expect("symlink");
    let fifo = std::process::Command::new("mkfifo").arg(web.join("pipe.js")).status().expect("mkfifo");
    assert!(fifo.success());
    let out = get(port, "/out.txt");
    assert!(out.starts_with("HTTP/1.1 404") && !out.contains("do not serve"), "{out}");
    assert!(get(port, "/in.html").ends_with("<h1>demo</h1>"));
    assert!(get(port, "/pipe.js").starts_with("HTTP/1.1 404"));
    // A large file is sent whole and exact, as it is read.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(web.join("big.bin"), &big).expect("write");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    write!(s, "GET /big.bin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("send");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read");
    let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    assert!(String::from_utf8_lossy(&answer[..body_at]).contains("content-length: 3000000"));
    assert!(answer[body_at..] == big[..], "the body differs from the file");
    // The server's own routes still win.
    assert!(get(port, "/healthz").ends_with("ok\n"));
}
