//! In headless Chromium, inside a dedicated worker (OPFS sync access handles exist only there):
//! the journal conformance suite on OPFS files, and a replica that keeps its writes across a
//! reopen. Run by `scripts/test-browser` through `wasm-bindgen-test-runner`.
#![cfg(target_arch = "wasm32")]

use pagesync::journal::conformance::{self, Backend};
use pagesync::journal::{HandleJournal, JournalId};
use pagesync_wasm::{OpfsFile, Replica, open_pair, remove_document};
use wasm_bindgen::JsValue;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_dedicated_worker);

const ID: JournalId = JournalId::from_bytes([9; 16]);

/// Hands out one pre-opened pair of OPFS files: each conformance property creates one journal.
struct Opfs {
    files: Option<[OpfsFile; 2]>,
    compact_min_bytes: u64,
}

impl Backend for Opfs {
    type J = HandleJournal<OpfsFile>;
    fn create(&mut self) -> Self::J {
        let files = self.files.take().expect("one journal per property");
        let mut j = HandleJournal::create(files, ID).expect("create on OPFS");
        j.set_compact_min_bytes(self.compact_min_bytes);
        j
    }
    fn reopen(&mut self, journal: Self::J) -> Option<Self::J> {
        let mut j = HandleJournal::open(journal.into_files()).expect("reopen on OPFS");
        j.set_compact_min_bytes(self.compact_min_bytes);
        Some(j)
    }
}

async fn fresh(name: &str, compact_min_bytes: u64) -> Opfs {
    let path = ["pagesync-test", name];
    remove_document(&path).await.expect("clear the test directory");
    let files = open_pair(&path, "j").await.expect("open OPFS files");
    Opfs { files: Some(files), compact_min_bytes }
}

macro_rules! opfs_conformance {
    ($($name:ident),*) => {$(
        #[wasm_bindgen_test]
        async fn $name() {
            for compact in [pagesync::journal::handles::COMPACT_MIN_BYTES, 0] {
                let mut backend = fresh(stringify!($name), compact).await;
                conformance::$name(&mut backend);
            }
        }
    )*};
}

pagesync::journal::conformance_properties!(opfs_conformance!());

const DOC: &str = "0000000000000000000000000000abcd";

#[wasm_bindgen_test]
async fn replica_keeps_pending_writes_across_a_reopen_and_refuses_a_second_opener() {
    remove_document(&["pagesync", DOC]).await.expect("clear");
    let mut r = Replica::open(DOC.into(), String::new(), true, vec![1; 32]).await.expect("open");
    assert_eq!(r.storage_kind(), "opfs");
    r.exec("CREATE TABLE t(x TEXT NOT NULL)".into(), JsValue::NULL, 1.0, 1).expect("create");
    let params = js_sys::Array::of1(&JsValue::from_str("kept"));
    r.exec("INSERT INTO t VALUES (?)".into(), params.into(), 2.0, 2).expect("insert");
    let locked = Replica::open(DOC.into(), String::new(), true, vec![2; 32]).await;
    let message = format!("{:?}", JsValue::from(locked.expect_err("a second opener is refused")));
    assert!(message.contains("open in another tab"), "{message}");
    drop(r);

    // Another fresh key at the reopen: the one kept in OPFS opens the timeline (a new key would
    // name another timeline, which the journal written under the first refuses).
    let r = Replica::open(DOC.into(), String::new(), true, vec![3; 32]).await.expect("reopen");
    let rows = r.query("SELECT x FROM t".into(), JsValue::NULL).expect("query");
    assert_eq!(rows.length(), 1);
    let x = js_sys::Reflect::get(&rows.get(0), &"x".into()).expect("column x");
    assert_eq!(x.as_string().as_deref(), Some("kept"));
    let status = r.status().expect("status");
    let pending = js_sys::Reflect::get(&status, &"pending".into()).expect("pending");
    assert_eq!(pending.as_f64(), Some(2.0), "both writes are still pending: no server has seen them");
}

/// Storage entries come to the browser in every codec (LZ4 for small ones, zstd for large
/// ones that compress, stored for large ones that do not): each decodes here, in wasm32, to
/// the bytes the server sent.
#[wasm_bindgen_test]
fn every_wire_codec_decodes_in_the_browser() {
    use pagesync::page::{PAGE_SIZE, Page, PageIdx};
    use pagesync::wire::WireEntry;
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noise = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    for (pages, random, codec) in [(2u32, false, 0u8), (16, false, 1), (16, true, 2)] {
        let owned: Vec<Page> = (0..pages)
            .map(|p| std::array::from_fn(|i| if random { noise() } else { (p as usize ^ (i % 11)) as u8 }))
            .collect();
        let refs: Vec<(PageIdx, &Page)> = owned
            .iter()
            .enumerate()
            .map(|(i, p)| (PageIdx::new(i as u32 + 1).expect("non-zero"), p))
            .collect();
        let raw = pagesync::storage::encode(pages, 1, None, &[], &[], &refs);
        assert!(raw.len() > pages as usize * PAGE_SIZE);
        let wire = WireEntry::full(&raw);
        assert_eq!(wire.data[0], codec, "{pages} pages, random: {random}");
        assert_eq!(wire.decompress().expect("decodes"), raw);
    }
}

/// The browser's replica runs the same sandbox as the native one, where its SQLite differs:
/// a mutation that would make SQLite hold gigabytes is stopped at the client's bound (the
/// wasm heap ends at 4 GiB, and a worker that reaches it is gone), `'localtime'` is refused (it
/// would read the browser's time zone, not the server's) while a query may show it, and the
/// exact math functions give what the server's give.
#[wasm_bindgen_test]
async fn the_sandbox_holds_in_the_browser() {
    let mut r = Replica::open("0000000000000000000000000000abce".into(), String::new(), false, vec![4; 32])
        .await
        .expect("open");
    r.exec("CREATE TABLE t(v)".into(), JsValue::NULL, 1.0, 1).expect("create");
    let columns = (0..40).map(|i| format!("printf('%.*c', 16000000 + {i}, 'x')")).collect::<Vec<_>>();
    let hostile = format!("INSERT INTO t SELECT length(concat({}))", columns.join(", "));
    let out = r.exec(hostile, JsValue::NULL, 2.0, 2).expect("queued for the server");
    let error = js_sys::Reflect::get(&out, &"localError".into()).expect("localError");
    let text = |key: &str| js_sys::Reflect::get(&error, &key.into()).ok().and_then(|v| v.as_string());
    assert_eq!(text("code").as_deref(), Some("too_big"), "{error:?}");
    assert!(text("message").is_some_and(|m| m.contains("memory")), "{error:?}");

    let out = r.exec("INSERT INTO t VALUES (datetime('now', 'localtime'))".into(), JsValue::NULL, 3.0, 3);
    let out = out.expect("queued for the server");
    let error = js_sys::Reflect::get(&out, &"localError".into()).expect("localError");
    let message = js_sys::Reflect::get(&error, &"message".into()).ok().and_then(|v| v.as_string());
    assert!(message.is_some_and(|m| m.contains("time zone")), "{error:?}");
    let shown = r.query("SELECT datetime(0, 'unixepoch', 'localtime') AS t".into(), JsValue::NULL);
    assert_eq!(shown.expect("a query may show local time").length(), 1);

    r.exec("INSERT INTO t VALUES (sqrt(2)), (floor(-1.5)), (mod(7.5, 2))".into(), JsValue::NULL, 4.0, 4)
        .expect("math");
    let rows = r.query("SELECT v FROM t".into(), JsValue::NULL).expect("query");
    let values: Vec<f64> = (0..rows.length())
        .map(|i| js_sys::Reflect::get(&rows.get(i), &"v".into()).expect("v").as_f64().expect("a number"))
        .collect();
    assert_eq!(values, [std::f64::consts::SQRT_2, -2.0, 1.5]);
}
