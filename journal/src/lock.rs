//! One owner per directory: an exclusive OS lock (`flock`) on a `LOCK` file inside it, held for
//! as long as the owner runs. The kernel drops the lock when the process exits, however it
//! exits, so a crash never leaves a stale lock behind. The file names the holder (pid and
//! command line) so a second opener can say who has it.
//!
//! A client replica (`<data>/<doc>/`) and a `file://` server store take one; nothing is ever
//! written by two processes at once. Waiting is the caller's business: this crate reads no
//! clock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file inside a locked directory.
pub const LOCK_FILE: &str = "LOCK";

/// An exclusive lock on a directory; released on drop (or when the process exits).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process (or another open in this one) holds it.
    #[error("{dir} is in use by another process ({holder})")]
    Held { dir: PathBuf, holder: String },
    /// (`error` is in the message, so it is not also a `source`.)
    #[error("cannot lock {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

impl DirLock {
    /// Takes the lock on `dir` (created if missing) without waiting. `who` describes this
    /// process to the next opener; the pid is added.
    pub fn try_lock(dir: &Path, who: &str) -> Result<DirLock, LockError> {
        Self::try_lock_as(dir, who, false)
    }

    /// `try_lock` shared: any number of shared holders at once, none beside an exclusive one
    /// (servers of one `object+file://` cluster, which fence each other, and a `file://`
    /// server, which shares its store with no one).
    pub fn try_lock_shared(dir: &Path, who: &str) -> Result<DirLock, LockError> {
        Self::try_lock_as(dir, who, true)
    }

    fn try_lock_as(dir: &Path, who: &str, shared: bool) -> Result<DirLock, LockError> {
        // A lock taken on a file that is no longer at the path (a `forget` moved the directory
        // aside and removed it between this open and this lock) guards nothing: the next
        // process makes a new file there and takes that. Then it is taken again, on the file
        // that is there now.
        for _ in 0..16 {
            if let Some(lock) = Self::try_lock_once(dir, who, shared)? {
                return Ok(lock);
            }
        }
        let path = dir.join(LOCK_FILE);
        let error = std::io::Error::other("the lock file kept being replaced while it was taken");
        Err(LockError::Io { path, error })
    }

    /// `try_lock`, once: `None` when the file locked is no longer the one at the path.
    fn try_lock_once(dir: &Path, who: &str, shared: bool) -> Result<Option<DirLock>, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |error| LockError::Io { path: path.clone(), error };
        std::fs::create_dir_all(dir).map_err(io)?;
        let (mut file, own_name) = open_lock_file(&path, shared).map_err(io)?;
        let locked = if shared { file.try_lock_shared() } else { file.try_lock() };
        match locked {
            Ok(()) if !still_at(&file, &path) => return Ok(None),
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // The holder writes its name just after it takes the lock: a moment to read it.
                let mut holder = String::new();
                for _ in 0..20 {
                    holder.clear();
                    let _ = file.seek(SeekFrom::Start(0));
                    let _ = file.read_to_string(&mut holder);
                    if !holder.trim().is_empty() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let holder = holder.trim();
                let holder = if holder.is_empty() { "holder unknown".to_owned() } else { holder.to_owned() };
                return Err(LockError::Held { dir: dir.to_path_buf(), holder });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours now: say who holds it, unless the file has other names, which would be
        // overwritten too (a backup made with hard links leaves the lock as good as before).
        if !own_name {
            return Ok(Some(DirLock { _file: file, path }));
        }
        let me = format!("pid {}: {who}", std::process::id());
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(me.as_bytes()).map_err(io)?;
        Ok(Some(DirLock { _file: file, path }))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Opens (creating it if missing) the lock file at `path`, which must be a plain file, not a
/// symbolic link (not followed: the lock's holder writes its name into the file, and a link
/// planted in a shared directory would have it overwrite any file it can write). Says whether
/// the file may be written (it has no other name: a hard link to another file may be locked,
/// not written). A `shared` lock may be taken on a file this process may only read (servers of
/// one `object+file://` cluster running as different users), which is then not written.
fn open_lock_file(path: &Path, shared: bool) -> std::io::Result<(File, bool)> {
    let open = |write: bool| {
        let mut options = OpenOptions::new();
        options.read(true).write(write).create(write).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW | libc::O_NONBLOCK);
        options.open(path)
    };
    let (file, writable) = match open(true) {
        Err(e) if shared && e.kind() == std::io::ErrorKind::PermissionDenied => (open(false), false),
        opened => (opened, true),
    };
    let file = file.map_err(|e| match e.raw_os_error() {
        #[cfg(unix)]
        Some(libc::ELOOP | libc::EMLINK) => {
            std::io::Error::other("it is a symbolic link, which a lock file may not be")
        }
        _ => e,
    })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("it is not a plain file"));
    }
    #[cfg(unix)]
    let own_name = std::os::unix::fs::MetadataExt::nlink(&meta) == 1;
    #[cfg(not(unix))]
    let own_name = true;
    Ok((file, own_name && writable))
}

/// Whether `file` is the file at `path` (the same inode on the same device).
#[cfg(unix)]
fn still_at(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(held), Ok(there)) => held.dev() == there.dev() && held.ino() == there.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_at(_: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

/// This process's command line, for `who`: `pagesync repl`, `pagesync-server --journal ...`.
/// The value of a `--token`, and a password in a URL (`ws://user:password@host`), are left
/// out: the lock file is on disk and shown to other processes.
pub fn this_command() -> String {
    describe(&std::env::args().collect::<Vec<_>>())
}

fn describe(args: &[String]) -> String {
    let mut out = args
        .first()
        .map(|a| Path::new(a).file_name().map_or(a.clone(), |n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut secret_next = false;
    for a in args.iter().skip(1).take(12) {
        let without_userinfo;
        let word = if secret_next {
            "***"
        } else if a.starts_with("--token=") {
            "--token=***"
        } else if let Some(clean) = without_password(a) {
            without_userinfo = clean;
            &without_userinfo
        } else {
            a.as_str()
        };
        secret_next = a == "--token";
        out.push(' ');
        out.push_str(word);
    }
    out
}

/// `a` with the user part of every URL in it (`scheme://user:password@host`) replaced by
/// `***`, if it has one.
fn without_password(a: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = a;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', '?', '#', ',']).unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(user_end) => {
                out.push_str("***");
                rest = &tail[user_end..];
                changed = true;
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_a_dropped_one_frees_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DirLock::try_lock(dir.path(), "first opener").expect("lock");
        match DirLock::try_lock(dir.path(), "second opener") {
            Err(LockError::Held { holder, .. }) => {
                assert!(
                    holder.contains("first opener") && holder.contains(&std::process::id().to_string()),
                    "{holder}"
                );
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        DirLock::try_lock(dir.path(), "third opener").expect("free again");
    }

    /// A lock on a file that was moved away (a `forget` set the directory aside) is not the
    /// directory's: `try_lock` takes it again on the file now at the path, so two processes
    /// never both hold a replica.
    #[test]
    fn a_lock_file_moved_away_is_not_the_lock() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("replica");
        std::fs::create_dir(&dir).expect("mkdir");
        let path = dir.join(LOCK_FILE);
        let opened = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
        let opened = opened.expect("open");
        assert!(still_at(&opened, &path));
        std::fs::rename(&dir, root.path().join("aside")).expect("move aside");
        assert!(!still_at(&opened, &path), "gone from the path");
        std::fs::create_dir(&dir).expect("made again");
        std::fs::write(&path, b"").expect("a new lock file");
        assert!(!still_at(&opened, &path), "another file at the path");
        let lock = DirLock::try_lock(&dir, "after").expect("lock");
        assert!(matches!(DirLock::try_lock(&dir, "second"), Err(LockError::Held { .. })));
        drop(lock);
    }

    /// A lock file planted as a link elsewhere is never written through: a symbolic link is
    /// refused, a hard link locked as it is; what they point at is untouched.
    #[cfg(unix)]
    #[test]
    fn a_lock_file_that_is_a_link_is_refused_and_its_target_kept() {
        let root = tempfile::tempdir().expect("tempdir");
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let (soft, hard) = (root.path().join("soft"), root.path().join("hard"));
        for dir in [&soft, &hard] {
            std::fs::create_dir(dir).expect("mkdir");
        }
        std::os::unix::fs::symlink(&victim, soft.join(LOCK_FILE)).expect("symlink");
        std::fs::hard_link(&victim, hard.join(LOCK_FILE)).expect("hard link");
        match DirLock::try_lock(&soft, "attacked") {
            Err(LockError::Io { error, .. }) => {
                assert!(error.to_string().contains("symbolic link"), "{error}")
            }
            other => panic!("a symbolic link taken as a lock file: {other:?}"),
        }
        // A second name is locked (a backup made with hard links), but not written.
        let lock = DirLock::try_lock(&hard, "attacked").expect("a hard link locks");
        assert!(matches!(DirLock::try_lock(&hard, "second"), Err(LockError::Held { .. })));
        drop(lock);
        let fifo = root.path().join("fifo");
        std::fs::create_dir(&fifo).expect("mkdir");
        let made = std::process::Command::new("mkfifo").arg(fifo.join(LOCK_FILE)).status();
        if made.is_ok_and(|s| s.success()) {
            let err = DirLock::try_lock(&fifo, "fifo").expect_err("a fifo is no lock file");
            assert!(err.to_string().contains("not a plain file"), "{err}");
        }
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
    }

    #[test]
    fn the_command_line_leaves_tokens_out() {
        let args = ["/usr/bin/pagesync", "--token", "s3cret", "--doc", "ab", "--token=t0ken", "repl"];
        let d = describe(&args.map(String::from));
        assert_eq!(d, "pagesync --token *** --doc ab --token=*** repl");
        let args =
            ["pagesync", "--server", "ws://a:pw@h/v1/sync,wss://b:pw2@k/", "--server=ws://u:p@h", "forget"];
        let d = describe(&args.map(String::from));
        assert_eq!(d, "pagesync --server ws://***@h/v1/sync,wss://***@k/ --server=ws://***@h forget");
    }
}
