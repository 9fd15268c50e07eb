//! Looking at a running server from outside: its resident memory and its `/metrics`. Shared by
//! `server/tests/many.rs` and the bench's `many` group (included there by path).

/// The resident set size of process `pid`, in KiB (Linux: `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).expect("value").parse().expect("number")
}

/// One value from the server's `/metrics` on `port`.
pub fn metric(port: u16, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).expect("metric present");
    line[name.len() + 1..].parse().expect("a number")
}
