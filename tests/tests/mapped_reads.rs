//! SQLite on a replica reads committed pages in place in its storage journal's map (`xFetch`,
//! `PageStore::fetch`), and nothing changes the journal while it holds any.

use pagesync::journal::{FileJournal, FileJournalOptions};
use pagesync::page::PAGE_SIZE;
use pagesync::store::StoreError;
use pagesync::{ClientDocument, ServerDocument, Value};
use pagesync_tests::{drain, memory_journal, pull, push, replica_storage, sql};

const ROWS_SQL: &str = "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 1000) \
                        INSERT INTO t(v) SELECT zeroblob(2000) FROM c";

/// A replica over files, synced with a server to 1,000 rows of 2,000 bytes.
fn synced_replica(dir: &std::path::Path) -> (ServerDocument, ClientDocument) {
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let storage = replica_storage(&dir.join("storage"), 2, 1 << 20);
    let mut client = ClientDocument::open(storage, memory_journal(3)).expect("client");
    client.mutate(sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)", vec![]), 0, 1).expect("ddl");
    client.mutate(sql(ROWS_SQL, vec![]), 0, 2).expect("fill");
    sync(&mut client, &mut server);
    (server, client)
}

fn sync(client: &mut ClientDocument, server: &mut ServerDocument) {
    push(client, server);
    drain(server, 0);
    pull(client, server);
    assert_eq!(client.pending_count(), 0);
}

/// Steps a scan of `t` to its first row and hands `check` the pages SQLite holds in place
/// there; then reads the rest, and checks every page was given back.
fn mid_scan(client: &ClientDocument, rows: i64, check: impl FnOnce(usize)) {
    let db = client.database();
    let mut stmt = db.conn().prepare("SELECT id, length(v) FROM t ORDER BY id").expect("prepare");
    let mut scan = stmt.query([]).expect("query");
    assert_eq!(scan.next().expect("step").expect("a row").get::<_, i64>(0).expect("id"), 1);
    let in_use = db.store().pages_in_use();
    check(in_use);
    let mut n = 1;
    while let Some(row) = scan.next().expect("step") {
        assert_eq!(row.get::<_, i64>(1).expect("length"), 2000);
        n += 1;
    }
    assert_eq!(n, rows);
    drop(scan);
    drop(stmt);
    assert_eq!(db.store().pages_in_use(), 0, "every page is given back when the statement ends");
}

#[test]
fn a_replicas_sqlite_reads_pages_in_place_and_the_journal_waits_until_it_gives_them_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, mut client) = synced_replica(dir.path());
    mid_scan(&client, 1_000, |in_use| {
        assert!(in_use > 0, "SQLite reads a replica's committed pages in place");
        let refused = client.database().store().sync();
        assert!(
            matches!(refused, Err(StoreError::PagesInUse { pages }) if pages == in_use),
            "the journal cannot change under them: {refused:?}"
        );
    });
    client.database().store().sync().expect("the journal changes again");
    // New entries arrive (rolls of the 1 MiB segments among them), and are read in place too.
    client.mutate(sql(ROWS_SQL, vec![]), 0, 3).expect("grow");
    sync(&mut client, &mut server);
    assert!(pagesync_tests::segment_files(&dir.path().join("storage")).len() > 1, "the journal rolled");
    mid_scan(&client, 2_000, |in_use| assert!(in_use > 0, "the new entries' pages, in place"));
    let rows = client.query("SELECT count(*), sum(length(v)) FROM t", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(2_000), Value::Integer(4_000_000)]]);
    // Reopened over the same files, the replica reads them in place again.
    drop(client);
    let opts = pagesync_tests::replica_storage_options(1 << 20);
    let storage = FileJournal::open(dir.path().join("storage"), opts).expect("reopen");
    let client = ClientDocument::open(Box::new(storage), memory_journal(3)).expect("client");
    mid_scan(&client, 2_000, |in_use| assert!(in_use > 0, "after a reopen, in place"));
}

#[test]
fn only_committed_pages_other_than_the_first_are_handed_out_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, client) = synced_replica(dir.path());
    let mut store = client.database().store();
    let pages = store.page_count() as u64;
    let page = |i: u64| (i - 1) * PAGE_SIZE as u64;
    // Every page lies 4-byte aligned in the map (storage entries since version 4), so every
    // committed page but the first is handed out in place.
    for i in 2..=pages {
        assert!(store.fetch(page(i), PAGE_SIZE).is_some(), "page {i} of {pages}, in place");
        store.unfetch();
    }
    assert!(store.fetch(page(2), PAGE_SIZE).is_some(), "a committed page");
    assert!(store.fetch(page(pages), PAGE_SIZE).is_some(), "the last committed page");
    assert_eq!(store.pages_in_use(), 2);
    assert!(store.fetch(page(1), PAGE_SIZE).is_none(), "page 1 is read patched");
    assert!(store.fetch(page(2) + 1, PAGE_SIZE).is_none(), "not page-aligned");
    assert!(store.fetch(page(2), PAGE_SIZE / 2).is_none(), "not a whole page");
    assert!(store.fetch(page(pages + 1), PAGE_SIZE).is_none(), "past the committed state");
    // A page SQLite wrote and has not committed is read from the overlay, and a page past the
    // size SQLite cut the file to is not there.
    store.write(page(3), &[7u8; PAGE_SIZE]).expect("write");
    assert!(store.fetch(page(3), PAGE_SIZE).is_none(), "a page in the overlay");
    store.truncate(page(pages)).expect("truncate");
    assert!(store.fetch(page(pages), PAGE_SIZE).is_none(), "past the size SQLite cut the file to");
    assert!(store.fetch(page(4), PAGE_SIZE).is_some(), "a committed page beside them");
    assert_eq!(store.pages_in_use(), 3);
    // With pages out, nothing that changes the journal runs, and the overlay is kept.
    let refused = store.commit_overlay(&[], &[], 0);
    assert!(matches!(refused, Err(StoreError::PagesInUse { pages: 3 })), "{refused:?}");
    assert!(store.has_overlay(), "the overlay is kept when the commit is refused");
    assert!(matches!(store.sync(), Err(StoreError::PagesInUse { .. })));
    for _ in 0..3 {
        store.unfetch();
    }
    assert_eq!(store.pages_in_use(), 0);
    store.sync().expect("the journal changes again once every page is back");
}

/// A version 3 storage entry (written before the header's pad) in a mapped journal puts its
/// pages at odd addresses, and shifts the version 4 entry after it: those pages are read by
/// copy, never handed to SQLite unaligned, and read the same.
#[test]
fn pages_at_odd_addresses_of_older_entries_are_read_by_copy() {
    use pagesync::journal::{Journal, JournalId};
    use pagesync::page::{Page, PageIdx};
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = FileJournalOptions { map_reads: true, ..FileJournalOptions::default() };
    let mut journal = FileJournal::create(dir.path(), JournalId::from_u128(9), opts.clone()).expect("create");
    let fill = |b: u8| -> Page { [b; PAGE_SIZE] };
    let (p1, p2, p3, p4) = (fill(1), fill(2), fill(3), fill(4));
    let idx = |i: u32| PageIdx::new(i).expect("page");
    let mut v3 =
        pagesync::storage::encode(3, 0, None, &[], &[], &[(idx(1), &p1), (idx(2), &p2), (idx(3), &p3)]);
    v3.drain(33..36); // the pad
    v3[0] = 3;
    let v4 = pagesync::storage::encode(4, 0, None, &[], &[], &[(idx(4), &p4)]);
    journal.append(&v3).expect("append");
    journal.append(&v4).expect("append");
    let mut store = pagesync::store::PageStore::open(Box::new(journal)).expect("open");
    let at = |i: u64| (i - 1) * PAGE_SIZE as u64;
    for (i, page) in [(2, &p2), (3, &p3), (4, &p4)] {
        assert!(store.fetch(at(i), PAGE_SIZE).is_none(), "page {i} lies at an odd address: not in place");
        let mut copy = [0u8; PAGE_SIZE];
        assert!(store.read(at(i), &mut copy).expect("read"), "page {i}");
        assert_eq!(&copy, page, "page {i}, read by copy");
    }
    assert_eq!(store.pages_in_use(), 0);
    // In a segment of version 4 entries, the same pages lie aligned and are handed out.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut journal = FileJournal::create(dir.path(), JournalId::from_u128(10), opts).expect("create");
    let v4 = pagesync::storage::encode(3, 0, None, &[], &[], &[(idx(1), &p1), (idx(2), &p2), (idx(3), &p3)]);
    journal.append(&v4).expect("append");
    let mut store = pagesync::store::PageStore::open(Box::new(journal)).expect("open");
    assert!(store.fetch(at(2), PAGE_SIZE).is_some() && store.fetch(at(3), PAGE_SIZE).is_some());
}
