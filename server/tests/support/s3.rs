//! A fresh S3 bucket for a test, on the endpoint `scripts/test` starts (moto). Shared by the
//! server's tests and, through `#[path]`, by `pagesync-tests`.

/// A fresh, empty bucket on the S3 server named by `AWS_ENDPOINT_URL` (moto, started by
/// `scripts/test`), as an `s3://bucket/prefix` URL. `None` when no endpoint is set, unless
/// `PAGESYNC_REQUIRE_S3` is set (as in CI), which turns that into a failure.
pub fn s3_url(prefix: &str) -> Option<String> {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") else {
        assert!(
            std::env::var_os("PAGESYNC_REQUIRE_S3").is_none(),
            "PAGESYNC_REQUIRE_S3 is set but AWS_ENDPOINT_URL is not: start moto_server (scripts/test does)"
        );
        eprintln!("skipped: no S3 endpoint (set AWS_ENDPOINT_URL, or run scripts/test, which starts moto)");
        return None;
    };
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let bucket = format!("pagesync-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let mut s =
        std::net::TcpStream::connect(&host).unwrap_or_else(|e| panic!("cannot reach S3 at {host}: {e}"));
    write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .expect("send CreateBucket");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read CreateBucket reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "CreateBucket {bucket} failed: {reply}");
    Some(format!("s3://{bucket}/{prefix}"))
}
