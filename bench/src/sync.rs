//! The sans-io sync layer alone (no sockets): client A -> server -> client B through the real
//! `ClientSession` / `ServerSession`, every frame encoded and decoded, memory journals.

use std::time::Instant;

use pagesync::journal::{FileJournal, FileJournalOptions, Journal, JournalId, MemoryJournal};
use pagesync::protocol::{ClientSession, ConnId, Message, ServerSession};
use pagesync::{ClientDocument, DocId, ServerDocument, SqlMutation, Value};

use crate::Config;
use crate::report::{Better, Pair, Target, interleave, per_second};

const T0: i64 = 1_700_000_000_000;
const DOC: DocId = DocId([7; 16]);

fn mem(n: u128) -> Box<dyn Journal> {
    Box::new(MemoryJournal::new(journal_id(n)))
}

/// Journal `n` of a `Trio`: 3 and 5 are A's and B's timelines, whose ids come from their keys.
fn journal_id(n: u128) -> JournalId {
    if n == 3 || n == 5 { pagesync_tests::timeline_journal_id(n) } else { JournalId::from_u128(n) }
}

fn row(i: u64) -> Vec<u8> {
    SqlMutation::one("INSERT INTO t(v) VALUES (?1)", vec![Value::Text(format!("row {i} {}", "x".repeat(40)))])
        .encode()
}

/// Two clients and a server wired back to back.
struct Trio {
    server: ServerSession,
    a: ClientSession,
    b: ClientSession,
    /// Whether to count what B's entries would cost in other forms (`down_bytes_b_full`,
    /// `down_bytes_b_lz4`): off for timed flows, which must not pay for the accounting.
    count_forms: bool,
    /// Encoded bytes of `Storage` messages delivered to B.
    down_bytes_b: usize,
    /// What the same storage entries would cost as whole (LZ4, no delta) wire entries.
    down_bytes_b_full: usize,
    /// What the same frames would cost with every entry in LZ4 (the codec for small entries).
    down_bytes_b_lz4: usize,
    /// Encoded bytes of `Storage` messages delivered to A (the author: confirmations).
    down_bytes_a: usize,
    /// Time A and B spent applying `Storage` messages.
    apply_a: std::time::Duration,
    apply_b: std::time::Duration,
}

const A: ConnId = ConnId(1);
const B: ConnId = ConnId(2);

impl Trio {
    fn new() -> Trio {
        Trio::with(mem)
    }

    /// With journals from `journal(n)`: 1 the server's storage, 2 and 3 A's storage and
    /// timeline, 4 and 5 B's.
    fn with(journal: impl Fn(u128) -> Box<dyn Journal> + Send + 'static) -> Trio {
        let server_storage = std::sync::Mutex::new(Some(journal(1)));
        let mut server = ServerSession::new(Box::new(move |_| {
            ServerDocument::open(server_storage.lock().expect("lock").take().expect("opened once"))
        }));
        let mut a = ClientSession::new("");
        let mut b = ClientSession::new("");
        a.add_document(
            DOC,
            pagesync_tests::keyed(ClientDocument::open(journal(2), journal(3)).expect("a"), 3),
        );
        b.add_document(
            DOC,
            pagesync_tests::keyed(ClientDocument::open(journal(4), journal(5)).expect("b"), 5),
        );
        for (conn, c) in [(A, &mut a), (B, &mut b)] {
            server.connect(conn);
            c.connected(0);
        }
        let mut t = Trio {
            server,
            a,
            b,
            count_forms: false,
            down_bytes_b: 0,
            down_bytes_b_full: 0,
            down_bytes_b_lz4: 0,
            down_bytes_a: 0,
            apply_a: std::time::Duration::ZERO,
            apply_b: std::time::Duration::ZERO,
        };
        t.a.mutate(
            DOC,
            SqlMutation::one("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", vec![]).encode(),
            T0,
            0,
        )
        .expect("schema");
        t.pump(0);
        t
    }

    /// Moves messages until nothing is left to send. The server's clock is `T0 + now`, where
    /// the clients' are.
    fn pump(&mut self, now: i64) {
        let now = T0 + now;
        loop {
            let mut moved = false;
            for (conn, c) in [(A, &mut self.a), (B, &mut self.b)] {
                while let Some(m) = c.poll_transmit() {
                    self.server.handle_frame(conn, now, &m.encode());
                    moved = true;
                }
            }
            self.server.handle_timeout(now);
            while let Some((conn, m)) = self.server.poll_transmit() {
                let frame = m.encode();
                let c = if conn == A { &mut self.a } else { &mut self.b };
                if conn == B && matches!(m, Message::Storage { .. }) {
                    self.down_bytes_b += frame.len();
                }
                if conn == B
                    && self.count_forms
                    && let Message::Storage { first, entries, .. } = &m
                {
                    let ours: usize = entries.iter().map(|e| e.data.len()).sum();
                    let lz4: usize = entries
                        .iter()
                        .map(|e| e.decompress().map_or(e.data.len(), |raw| lz4_wire_len(&raw)))
                        .sum();
                    self.down_bytes_b_lz4 += frame.len() - ours + lz4;
                    // The same entries sent whole: LZ4 of the payload from the server's journal.
                    let doc = self.server.document(DOC).expect("open");
                    let range = pagesync::journal::LsnRange::from_count(*first, entries.len() as u64);
                    let whole: usize =
                        doc.read_storage(range).expect("read").iter().map(|p| lz4_wire_len(p)).sum();
                    self.down_bytes_b_full += frame.len() - ours + whole;
                }
                let storage = matches!(m, Message::Storage { .. });
                if storage && conn == A {
                    self.down_bytes_a += frame.len();
                }
                let start = Instant::now();
                c.handle_frame(now, &frame).expect("apply");
                if storage {
                    *(if conn == A { &mut self.apply_a } else { &mut self.apply_b }) += start.elapsed();
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn b_has_all(&self) -> bool {
        let a = self.a.status(DOC).expect("a");
        a.pending == 0 && self.b.status(DOC).expect("b").storage_next == a.storage_next
    }
}

pub fn run(cfg: &Config) -> Vec<Pair> {
    let mut pairs = vec![throughput(cfg), round_trips_on_files(cfg)];
    pairs.extend(downstream_bytes(cfg));
    pairs.push(batched_bytes(cfg, 64, 70.0));
    pairs.push(batched_bytes(cfg, 1_024, 800.0));
    pairs.push(author_apply(cfg));
    pairs
}

/// What a raw payload costs as a wire entry in LZ4 (the codec small entries keep): its codec
/// byte and length, and the block.
fn lz4_wire_len(raw: &[u8]) -> usize {
    5 + lz4_flex::block::compress(raw).len()
}

/// Rows per round in `batched_bytes`.
const BATCH_ROWS: u64 = 1_000;

/// A row of `len` random letters and digits (about 6 bits per byte, like ids, tokens and
/// hashes: LZ4 finds no repeats in it, an entropy coder saves a quarter).
fn random_text(rng: &mut pagesync_tests::Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..len).map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char).collect()
}

/// Downstream bytes per row when rows of `row_bytes` random text arrive `BATCH_ROWS` per round
/// (one step, one storage entry): B's `Storage` frames over the rows. Peer: the same frames
/// with every entry in LZ4, the codec small entries keep.
fn batched_bytes(cfg: &Config, row_bytes: usize, target: f64) -> Pair {
    let rounds = if cfg.quick { 2 } else { 5 };
    let mut t = Trio::new();
    t.count_forms = true;
    let mut rng = pagesync_tests::Rng(row_bytes as u64);
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    let mut k = 0;
    for _ in 0..cfg.reps {
        let (before, before_lz4) = (t.down_bytes_b, t.down_bytes_b_lz4);
        for r in 0..rounds {
            for _ in 0..BATCH_ROWS {
                let body = SqlMutation::one(
                    "INSERT INTO t(v) VALUES (?1)",
                    vec![Value::Text(random_text(&mut rng, row_bytes))],
                )
                .encode();
                t.a.mutate(DOC, body, T0, k).expect("mutate");
                k += 1;
            }
            t.pump(r as i64);
        }
        assert!(t.b_has_all(), "BUG: B did not receive everything");
        let rows = (rounds * BATCH_ROWS) as f64;
        ours.push((t.down_bytes_b - before) as f64 / rows);
        peer.push((t.down_bytes_b_lz4 - before_lz4) as f64 / rows);
    }
    Pair::new(
        "sync",
        &format!("downstream bytes per {row_bytes}-byte row of random text, 1,000 rows per round"),
        "bytes",
        Better::Lower,
        ours,
        "the same frames with every entry in LZ4",
        peer,
        Some(Target::OursAtMost(target)),
    )
}

/// Rounds of `BIG_ROUND` mutations of a 1 KiB row each: the time the author (A) spends
/// applying the storage that confirms a round, beside B applying the same storage. A keeps its
/// own pages (confirmation by digest); B takes them.
const BIG_ROUND: u64 = 2_000;

fn author_apply(cfg: &Config) -> Pair {
    let rounds = if cfg.quick { 2 } else { 5 };
    let mut t = Trio::new();
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        let (a0, b0) = (t.apply_a, t.apply_b);
        for r in 0..rounds {
            for i in 0..BIG_ROUND {
                let k = r * BIG_ROUND + i;
                let body = SqlMutation::one(
                    "INSERT INTO t(v) VALUES (?1)",
                    vec![Value::Text(format!("{k:08} {}", "y".repeat(1_015)))],
                )
                .encode();
                t.a.mutate(DOC, body, T0, k).expect("mutate");
            }
            t.pump(r as i64);
        }
        assert!(t.b_has_all(), "BUG: B did not receive everything");
        ours.push((t.apply_a - a0).as_secs_f64() * 1e3 / rounds as f64);
        peer.push((t.apply_b - b0).as_secs_f64() * 1e3 / rounds as f64);
    }
    Pair::new(
        "sync",
        "the author's apply of a round of 2,000 mutations of a 1 KiB row, memory journals",
        "ms per round",
        Better::Lower,
        ours,
        "B applying the same entries (pages, as XOR deltas)",
        peer,
        Some(Target::OursAtMost(10.0)),
    )
}

/// One single-row mutation per round on real files (fdatasync on every append): A writes,
/// the server steps, B and A receive the entry. Peer: the disk alone doing the four durable
/// appends a round needs at the least (A's timeline, the server's storage, B's and A's
/// storage), each a small `write` + `fdatasync` to its own file.
fn round_trips_on_files(cfg: &Config) -> Pair {
    let n = if cfg.quick { 30 } else { 300 };
    let ours = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let mut t = Trio::with(move |n| {
            let path = root.join(n.to_string());
            Box::new(
                FileJournal::create(path, journal_id(n), FileJournalOptions::default()).expect("journal"),
            )
        });
        let start = Instant::now();
        for i in 0..n {
            t.a.mutate(DOC, row(i), T0, i).expect("mutate");
            t.pump(i as i64);
        }
        assert!(t.b_has_all(), "BUG: B did not receive everything");
        per_second(n, start.elapsed())
    };
    let peer = || {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut files: Vec<std::fs::File> =
            (0..4).map(|i| std::fs::File::create(dir.path().join(i.to_string())).expect("file")).collect();
        let record = vec![7u8; 120];
        let start = Instant::now();
        for _ in 0..n {
            for f in &mut files {
                f.write_all(&record).expect("write");
                f.sync_data().expect("fdatasync");
            }
        }
        per_second(n, start.elapsed())
    };
    let (x, y) = interleave(cfg.reps, ours, peer);
    Pair::new(
        "sync",
        "A -> server -> B and back, one single-row mutation per round, file journals",
        "rounds/s",
        Better::Higher,
        x,
        "the disk alone: 4 small appends with fdatasync per round",
        y,
        None,
    )
}

/// Single-row mutations in one round of `throughput`: each its own `mutate` (and timeline
/// entry), then the link drains.
const ROUND: u64 = 1_000;

/// Single-row mutations per second from A's `mutate` to B holding them, batched as a client
/// would (`ROUND` mutations made, then the link drains). The peer is the same flow without the
/// protocol: entries handed between documents directly.
fn throughput(cfg: &Config) -> Pair {
    let n = if cfg.quick { 2_000 } else { 20_000 };
    let ours = || {
        let mut t = Trio::new();
        let start = Instant::now();
        for i in 0..n {
            t.a.mutate(DOC, row(i), T0, i).expect("mutate");
            if i % ROUND == ROUND - 1 {
                t.pump(1);
            }
        }
        t.pump(1);
        assert!(t.b_has_all(), "BUG: B did not receive everything");
        per_second(n, start.elapsed())
    };
    let peer = || {
        let mut server = ServerDocument::open(mem(1)).expect("server");
        let mut a = ClientDocument::open(mem(2), mem(3)).expect("a");
        let mut b = ClientDocument::open(mem(4), mem(5)).expect("b");
        a.mutate(SqlMutation::one("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", vec![]).encode(), T0, 0)
            .expect("ddl");
        let start = Instant::now();
        for i in 0..n {
            a.mutate(row(i), T0, i).expect("mutate");
            if i % ROUND == ROUND - 1 || i == n - 1 {
                let up = a.pending_range();
                server.receive(a.timeline_id(), up.first(), a.read_pending(up).expect("read"));
                while server.step(T0).expect("step").is_some() {}
                for c in [&mut a, &mut b] {
                    let have = c.storage_range().next();
                    let r = server.storage_range().intersect(&pagesync::journal::LsnRange::inclusive(
                        have,
                        server.storage_range().last().expect("entries"),
                    ));
                    c.receive_storage(r.first(), &server.read_storage(r).expect("read")).expect("receive");
                }
            }
        }
        per_second(n, start.elapsed())
    };
    let (x, y) = interleave(cfg.reps, ours, peer);
    let peer_name = "same flow without the protocol (entries handed over in process)";
    Pair::new(
        "sync",
        "A -> server -> B, memory journals, rounds of 1,000 single-row mutations (one mutate each)",
        "mutations/s",
        Better::Higher,
        x,
        peer_name,
        y,
        None,
    )
}

/// Bytes of `Storage` frames B receives per single-row commit, when every commit is its own
/// step (a steady trickle). Peer: the same frames with every entry sent whole (LZ4, no delta).
fn downstream_bytes(cfg: &Config) -> [Pair; 2] {
    let n = if cfg.quick { 50 } else { 500 };
    let mut t = Trio::new();
    t.count_forms = true;
    // Some rows first, so the table spans several pages as in a real document.
    for i in 0..200 {
        t.a.mutate(DOC, row(i), T0, i).expect("mutate");
    }
    t.pump(0);
    let (mut ours, mut peer, mut author) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        let (before, before_full, before_a) = (t.down_bytes_b, t.down_bytes_b_full, t.down_bytes_a);
        for i in 0..n {
            t.a.mutate(DOC, row(1_000 + i), T0, i).expect("mutate");
            t.pump(i as i64);
        }
        ours.push((t.down_bytes_b - before) as f64 / n as f64);
        peer.push((t.down_bytes_b_full - before_full) as f64 / n as f64);
        author.push((t.down_bytes_a - before_a) as f64 / n as f64);
    }
    let peer_name = "same entries sent whole (LZ4, no XOR delta)";
    let b = Pair::new(
        "sync",
        "downstream bytes per single-row commit",
        "bytes",
        Better::Lower,
        ours.clone(),
        peer_name,
        peer,
        Some(Target::OursAtMost(1_500.0)),
    );
    let a = Pair::new(
        "sync",
        "the author's download per confirmed single-row commit (confirmation by digest)",
        "bytes",
        Better::Lower,
        author,
        "another subscriber's download of the same commits (the pages, XOR delta)",
        ours,
        Some(Target::OursAtMost(64.0)),
    );
    [b, a]
}
