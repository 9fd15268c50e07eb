//! SQLite on a replica reads committed pages in place in its storage journal's map (`xFetch`,
//! `PageStore::fetch`), and nothing changes the journal while it holds any.

use pagesync::page::PAGE_SIZE;
use pagesync::store::{PageStore, StoreError};
use pagesync::{ClientDocument, ServerDocument};
use pagesync_tests::{drain, memory_journal, pull, push, replica_storage, sql};

/// A replica over files, synced with a server to `rows` rows of 2,000 bytes (one a page).
fn synced_replica(dir: &std::path::Path, rows: u32) -> (ServerDocument, ClientDocument) {
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let storage = replica_storage(&dir.join("storage"), 2, 1 << 20);
    let mut client = ClientDocument::open(storage, memory_journal(3)).expect("client");
    let fill = format!(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); \
         WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {rows}) \
         INSERT INTO t(v) SELECT zeroblob(2000) FROM c"
    );
    client.mutate(sql(&fill, vec![]), 0, 1).expect("fill");
    push(&client, &mut server);
    drain(&mut server, 0);
    pull(&mut client, &server);
    assert_eq!(client.pending_count(), 0);
    (server, client)
}

#[test]
fn a_replicas_sqlite_reads_pages_in_place_and_the_journal_waits_until_it_gives_them_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, mut client) = synced_replica(dir.path(), 1_000);
    {
        let db = client.database();
        let mut stmt = db.conn().prepare("SELECT id, length(v) FROM t ORDER BY id").expect("prepare");
        let mut rows = stmt.query([]).expect("query");
        let first = rows.next().expect("step").expect("a row");
        assert_eq!(first.get::<_, i64>(0).expect("id"), 1);
        // Mid-statement, SQLite holds the pages of its cursor, in place.
        let in_use = db.store().pages_in_use();
        assert!(in_use > 0, "SQLite reads a replica's committed pages in place");
        let refused = db.store().sync();
        assert!(
            matches!(refused, Err(StoreError::PagesInUse { pages }) if pages == in_use),
            "the journal cannot change under them: {refused:?}"
        );
        let mut n = 1;
        while let Some(row) = rows.next().expect("step") {
            assert_eq!(row.get::<_, i64>(1).expect("length"), 2000);
            n += 1;
        }
        assert_eq!(n, 1_000);
        drop(rows);
        drop(stmt);
        assert_eq!(db.store().pages_in_use(), 0, "every page is given back when the statement ends");
        db.store().sync().expect("the journal changes again");
    }
    // New entries arrive (a roll of the 1 MiB segments among them) and are read in place too.
    let grow = "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 1000) \
                INSERT INTO t(v) SELECT zeroblob(2000) FROM c";
    client.mutate(sql(grow, vec![]), 0, 2).expect("grow");
    push(&client, &mut server);
    drain(&mut server, 0);
    pull(&mut client, &server);
    let rows = client.query("SELECT count(*), sum(length(v)) FROM t", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![pagesync::Value::Integer(2_000), pagesync::Value::Integer(4_000_000)]]);
    assert_eq!(client.database().store().pages_in_use(), 0);
    assert!(pagesync_tests::segment_files(&dir.path().join("storage")).len() > 1, "the journal rolled");
}

#[test]
fn only_committed_pages_other_than_the_first_are_handed_out_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, client) = synced_replica(dir.path(), 10);
    let mut store: std::sync::MutexGuard<'_, PageStore> = client.database().store();
    let pages = store.page_count() as u64;
    let page = |i: u64| (i - 1) * PAGE_SIZE as u64;
    assert!(store.fetch(page(2), PAGE_SIZE).is_some(), "a committed page");
    assert_eq!(store.pages_in_use(), 1);
    assert!(store.fetch(page(1), PAGE_SIZE).is_none(), "page 1 is read patched");
    assert!(store.fetch(page(2) + 1, PAGE_SIZE).is_none(), "not page-aligned");
    assert!(store.fetch(page(2), PAGE_SIZE / 2).is_none(), "not a whole page");
    assert!(store.fetch(page(pages + 1), PAGE_SIZE).is_none(), "past the committed state");
    // A page SQLite wrote and has not committed is read from the overlay.
    store.write(page(3), &[7u8; PAGE_SIZE]).expect("write");
    assert!(store.fetch(page(3), PAGE_SIZE).is_none(), "a page in the overlay");
    assert!(store.fetch(page(4), PAGE_SIZE).is_some(), "a committed page beside it");
    assert_eq!(store.pages_in_use(), 2);
    // With pages out, nothing that changes the journal runs, and the overlay is kept.
    let refused = store.commit_overlay(&[], &[], 0);
    assert!(matches!(refused, Err(StoreError::PagesInUse { pages: 2 })), "{refused:?}");
    assert!(store.has_overlay(), "the overlay is kept when the commit is refused");
    assert!(matches!(store.sync(), Err(StoreError::PagesInUse { .. })));
}
