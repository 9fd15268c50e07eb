//! A server that accepts the TCP connection and then says nothing (a hung process, a middlebox
//! that swallows the handshake) must not hold a client forever: the attempt gives up after
//! `CONNECT_TIMEOUT` and the client moves to its next URL, where its write is confirmed.

mod support;

use std::time::{Duration, Instant};

use pagesync::DocId;
use support::start_server;

#[test]
fn a_server_that_accepts_and_never_answers_does_not_hold_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, addr, stop, server) = start_server(dir.path());
    // Accepts and keeps every connection, never reading or writing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let urls = format!("ws://{silent_addr}/v1/sync,ws://{addr}/v1/sync");
    let doc: DocId = "000000000000000000000000000051e7".parse().expect("doc");

    let _guard = rt.enter();
    let client = pagesync_client::Client::connect(&urls, "", dir.path().join("client")).expect("client");
    let d = client.open(doc).expect("open");
    d.execute("CREATE TABLE t(x)", vec![]).expect("ddl");
    let start = Instant::now();
    let limit = pagesync_client::CONNECT_TIMEOUT + Duration::from_secs(20);
    rt.block_on(d.sync(limit)).expect("synced through the second URL");
    assert!(start.elapsed() < limit, "took {:?}", start.elapsed());
    assert!(
        start.elapsed() >= pagesync_client::CONNECT_TIMEOUT - Duration::from_secs(1),
        "the silent server was tried first"
    );
    drop(client);
    let _ = stop.send(());
    rt.block_on(server).expect("join").expect("server ran");
}
