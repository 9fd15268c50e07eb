//! Decoder robustness: at least 100,000 mutated and truncated frames go through every decoder
//! (protocol messages, wire entries, storage entries, mutations, journal frames) and through a
//! live `ServerSession`. None may panic, and no allocation may exceed a cap far below what a
//! forged length field would ask for (the test's global allocator refuses, which aborts).

use std::alloc::System;

use cap::Cap;
use pagesync::journal::{Lsn, codec};
use pagesync::protocol::{ClientSession, ConnId, Message, PROTOCOL_VERSION, ServerSession};
use pagesync::wire::{Confirm, WireEntry, WireKind};
use pagesync::{DocId, Mutation, ServerDocument, TimelineId, storage};
use pagesync_tests::{Rng, memory_journal, sql};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

/// Headroom over the memory in use when the fuzzing starts. A maximal legitimate storage entry
/// is 64 MiB; a forged 32-bit length would ask for 4 GiB.
const HEADROOM_BYTES: usize = 256 << 20;
const ITERATIONS: usize = 100_000;
const T0: i64 = 1_700_000_000_000;

/// Valid samples of every encoding, taken from a real server and client.
struct Samples {
    messages: Vec<Vec<u8>>,
    wire: Vec<WireEntry>,
    storage: Vec<Vec<u8>>,
    mutations: Vec<Vec<u8>>,
    frames: Vec<Vec<u8>>,
}

fn samples() -> Samples {
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let mut client = pagesync_tests::client_doc(memory_journal(2), 3);
    client.mutate(sql("CREATE TABLE t(x INTEGER PRIMARY KEY, y TEXT)", vec![]), T0, 1).expect("ddl");
    for i in 0..20 {
        client
            .mutate(sql("INSERT INTO t(y) VALUES (?1)", vec![format!("row {i}").into()]), T0, i)
            .expect("ins");
    }
    let up = client.pending_range();
    let mutations = client.read_pending(up).expect("read");
    server.receive(client.timeline_id(), up.first(), mutations.clone());
    while server.step(T0).expect("step").is_some() {}
    let range = server.storage_range();
    let storage = server.read_storage(range).expect("read");
    let mut wire = server.read_wire(range).expect("wire");
    wire.extend(storage.iter().map(|s| WireEntry::full(s)));
    // Large entries take the other codecs: zstd for pages that compress, stored for noise.
    let mut noise = pagesync_tests::Rng(5);
    for random in [false, true] {
        let pages: Vec<pagesync::page::Page> = (0..8u8)
            .map(|p| {
                std::array::from_fn(|i| if random { noise.next_u64() as u8 } else { p ^ (i % 13) as u8 })
            })
            .collect();
        let refs: Vec<_> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (pagesync::page::PageIdx::new(i as u32 + 1).expect("non-zero"), p))
            .collect();
        wire.push(WireEntry::full(&storage::encode(8, T0, None, &[], &[], &refs)));
    }
    let lsn = |n| Lsn::new(n).expect("lsn");
    let forgotten = vec![(TimelineId([4; 16]), lsn(9))];
    let confirm = Confirm { first: lsn(3), more: 4, time_after_ms: 3, forgotten, digest: [5; 16] };
    wire.push(WireEntry::confirm(&confirm));
    let doc = DocId::from_u128(9);
    let timeline = client.timeline_id();
    let lsn = Lsn::FIRST;
    let messages = [
        Message::Hello { version: PROTOCOL_VERSION, token: "token".into() },
        Message::Subscribe {
            doc,
            key: pagesync_tests::timeline_key(3),
            storage_next: lsn,
            digests: true,
            create: true,
        },
        Message::Mutations { doc, timeline, first: lsn, entries: mutations.clone() },
        Message::MutationsAck { doc, timeline, next_expected: lsn, storage_next: lsn },
        Message::Storage { doc, first: lsn, entries: wire.clone() },
        Message::StorageAck { doc, next: lsn, outcomes_through: Some(lsn) },
        Message::Error { doc: Some(doc), code: "x".into(), message: "y".into() },
    ]
    .iter()
    .map(Message::encode)
    .collect();
    let frames = storage
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut f = Vec::new();
            codec::encode_frame(&mut f, Lsn::new(i as u64 + 1).expect("lsn"), s);
            f
        })
        .collect();
    Samples { messages, wire, storage, mutations, frames }
}

/// A damaged copy of `b`: bit flips, truncation, a forged length, inserted or removed bytes.
fn mutate(rng: &mut Rng, b: &[u8]) -> Vec<u8> {
    let mut out = b.to_vec();
    for _ in 0..1 + rng.below(3) {
        if out.is_empty() {
            out.push(rng.next_u64() as u8);
            continue;
        }
        let at = rng.below(out.len() as u64) as usize;
        match rng.below(6) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out.truncate(at),
            2 => {
                let end = (at + 4).min(out.len());
                out[at..end].fill(0xff);
            }
            3 => out.insert(at, rng.next_u64() as u8),
            4 => {
                out.remove(at);
            }
            _ => out[at] = rng.next_u64() as u8,
        }
    }
    out
}

fn zero_previous(
    _: pagesync::page::PageIdx,
) -> Result<std::sync::Arc<pagesync::page::Page>, pagesync::store::StoreError> {
    Ok(std::sync::Arc::new(pagesync::page::ZERO_PAGE))
}

#[test]
fn mutated_frames_never_panic_nor_allocate_without_bound() {
    let s = samples();
    let mut rng = Rng(0xdec0de);
    ALLOC.set_limit(ALLOC.allocated() + HEADROOM_BYTES).expect("set allocation cap");
    let mut probe: Vec<u8> = Vec::new();
    assert!(probe.try_reserve_exact(2 * HEADROOM_BYTES).is_err(), "the allocation cap is not in force");
    let mut accepted = 0usize;
    for i in 0..ITERATIONS {
        match i % 5 {
            0 => {
                let m = {
                    let i = rng.below(s.messages.len() as u64) as usize;
                    mutate(&mut rng, &s.messages[i])
                };
                if let Ok(Message::Storage { entries, .. }) = Message::decode(&m) {
                    for e in entries {
                        let _ = e.resolve(zero_previous);
                    }
                }
                accepted += Message::decode(&m).is_ok() as usize;
            }
            1 => {
                let w = &s.wire[rng.below(s.wire.len() as u64) as usize];
                let kind = [WireKind::Full, WireKind::Delta, WireKind::Confirm][rng.below(3) as usize];
                let damaged = WireEntry { kind, data: mutate(&mut rng, &w.data).into() };
                accepted += match kind {
                    WireKind::Confirm => matches!(damaged.as_confirm(), Some(Ok(_))),
                    _ => matches!(damaged.resolve(zero_previous), Ok(Ok(_))),
                } as usize;
            }
            2 => {
                let st = {
                    let i = rng.below(s.storage.len() as u64) as usize;
                    mutate(&mut rng, &s.storage[i])
                };
                accepted += storage::decode(&st).is_ok() as usize;
            }
            3 => {
                let m = {
                    let i = rng.below(s.mutations.len() as u64) as usize;
                    mutate(&mut rng, &s.mutations[i])
                };
                if let Ok(m) = Mutation::decode(&m) {
                    let _ = postcard::from_bytes::<pagesync::SqlMutation>(&m.body);
                    accepted += 1;
                }
            }
            _ => {
                let f = {
                    let i = rng.below(s.frames.len() as u64) as usize;
                    mutate(&mut rng, &s.frames[i])
                };
                accepted += codec::decode_frame(&f, Lsn::FIRST).is_ok() as usize;
            }
        }
    }
    ALLOC.set_limit(usize::MAX).expect("lift the cap");
    // Some damage is harmless (a flipped bit inside a string); most must be refused.
    assert!(accepted < ITERATIONS / 2, "{accepted} of {ITERATIONS} damaged inputs were accepted");
}

/// Garbage on one connection gets that connection an error; another connection and the
/// document are unaffected.
#[test]
fn garbage_on_one_connection_does_not_hurt_another() {
    let s = samples();
    let doc = DocId::from_u128(5);
    let mut server = ServerSession::new(Box::new(|d: DocId| {
        ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))
    }));
    let mut rng = Rng(7);
    for k in 0..2_000u64 {
        let conn = ConnId(1000 + k);
        server.connect(conn);
        server.handle_message(conn, 0, Message::Hello { version: PROTOCOL_VERSION, token: String::new() });
        for _ in 0..5 {
            let m = {
                let i = rng.below(s.messages.len() as u64) as usize;
                mutate(&mut rng, &s.messages[i])
            };
            server.handle_frame(conn, 0, &m);
        }
        server.handle_timeout(0);
        while server.poll_transmit().is_some() {}
        server.disconnect(conn);
    }
    // A well-behaved client still syncs the document end to end.
    let good = ConnId(1);
    server.connect(good);
    let mut client = ClientSession::new("");
    let cdoc = pagesync_tests::client_doc(memory_journal(20), 21);
    client.add_document(doc, cdoc);
    client.connected(0);
    client.mutate(doc, sql("CREATE TABLE ok(x)", vec![]), T0, 1).expect("mutate");
    for now in 0..50 {
        while let Some(m) = client.poll_transmit() {
            server.handle_frame(good, now, &m.encode());
        }
        server.handle_timeout(now);
        while let Some((c, m)) = server.poll_transmit() {
            if c == good {
                client.handle_frame(now, &m.encode()).expect("client applies");
            }
        }
    }
    assert_eq!(client.status(doc).expect("status").pending, 0);
    let tl: TimelineId = client.document(doc).expect("doc").timeline_id();
    assert!(server.document(doc).expect("open").applied_lsn(tl).is_some());
}
