//! OPFS files as [`RandomAccess`]: a `FileSystemSyncAccessHandle` (dedicated workers only).
//! Handles are exclusive: a second handle on the same file fails until the first is closed,
//! which is what keeps two tabs from writing one document's journals at once.

use pagesync::journal::RandomAccess;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemGetDirectoryOptions, FileSystemGetFileOptions,
    FileSystemReadWriteOptions, FileSystemSyncAccessHandle,
};

/// One OPFS file, open for synchronous access. Closed on drop.
#[derive(Debug)]
pub struct OpfsFile {
    path: String,
    handle: FileSystemSyncAccessHandle,
}

impl Drop for OpfsFile {
    fn drop(&mut self) {
        self.handle.close();
    }
}

fn js_err(op: &str, path: &str, e: JsValue) -> std::io::Error {
    let detail = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| format!("{}: {}", e.name(), e.message()))
        .unwrap_or_else(|| format!("{e:?}"));
    std::io::Error::other(format!("OPFS {op} on {path}: {detail}"))
}

fn at(offset: u64) -> FileSystemReadWriteOptions {
    let opts = FileSystemReadWriteOptions::new();
    opts.set_at(offset as f64);
    opts
}

impl RandomAccess for OpfsFile {
    fn name(&self) -> String {
        format!("opfs:{}", self.path)
    }

    fn size(&self) -> std::io::Result<u64> {
        let size = self.handle.get_size().map_err(|e| js_err("getSize", &self.path, e))?;
        Ok(size as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let n = self
            .handle
            .read_with_u8_array_and_options(buf, &at(offset))
            .map_err(|e| js_err("read", &self.path, e))?;
        if (n as usize) < buf.len() {
            let msg = format!("OPFS read on {}: {} of {} bytes at {offset}", self.path, n, buf.len());
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, msg));
        }
        Ok(())
    }

    fn write_all_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let n = self
            .handle
            .write_with_u8_array_and_options(data, &at(offset))
            .map_err(|e| js_err("write", &self.path, e))?;
        if (n as usize) < data.len() {
            // OPFS writes short when the origin's quota is exhausted.
            let msg = format!("OPFS write on {}: {} of {} bytes (storage quota?)", self.path, n, data.len());
            return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, msg));
        }
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.handle.truncate_with_f64(len as f64).map_err(|e| js_err("truncate", &self.path, e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.handle.flush().map_err(|e| js_err("flush", &self.path, e))
    }
}

async fn root() -> Result<FileSystemDirectoryHandle, JsValue> {
    let global: web_sys::WorkerGlobalScope = js_sys::global().dyn_into().map_err(|_| {
        JsValue::from_str("OPFS sync access needs a dedicated worker, and this is not a worker")
    })?;
    let storage = global.navigator().storage();
    JsFuture::from(storage.get_directory()).await?.dyn_into()
}

async fn subdir(
    parent: &FileSystemDirectoryHandle,
    name: &str,
) -> Result<FileSystemDirectoryHandle, JsValue> {
    let opts = FileSystemGetDirectoryOptions::new();
    opts.set_create(true);
    JsFuture::from(parent.get_directory_handle_with_options(name, &opts)).await?.dyn_into()
}

async fn directory(path: &[&str]) -> Result<FileSystemDirectoryHandle, JsValue> {
    let mut dir = root().await?;
    for name in path {
        dir = subdir(&dir, name).await?;
    }
    Ok(dir)
}

/// Opens (creating) `name` in `dir` (at `path`) for synchronous access.
async fn open_in(dir: &FileSystemDirectoryHandle, path: &[&str], name: &str) -> Result<OpfsFile, JsValue> {
    let opts = FileSystemGetFileOptions::new();
    opts.set_create(true);
    let file: FileSystemFileHandle =
        JsFuture::from(dir.get_file_handle_with_options(name, &opts)).await?.dyn_into()?;
    let handle: FileSystemSyncAccessHandle =
        JsFuture::from(file.create_sync_access_handle()).await?.dyn_into()?;
    Ok(OpfsFile { path: format!("{}/{name}", path.join("/")), handle })
}

/// Opens (creating) `<path>/<name>`, one file.
pub async fn open_file(path: &[&str], name: &str) -> Result<OpfsFile, JsValue> {
    open_in(&directory(path).await?, path, name).await
}

/// Opens (creating) `<path>/<name>.a` and `<path>/<name>.b`: a handle journal's two files.
pub async fn open_pair(path: &[&str], name: &str) -> Result<[OpfsFile; 2], JsValue> {
    let dir = directory(path).await?;
    let a = open_in(&dir, path, &format!("{name}.a")).await?;
    let b = open_in(&dir, path, &format!("{name}.b")).await?;
    Ok([a, b])
}

/// Deletes a directory under the OPFS root and everything in it (tests; "forget this device").
pub async fn remove_document(path: &[&str]) -> Result<(), JsValue> {
    let Some((last, parents)) = path.split_last() else { return Ok(()) };
    let parent = directory(parents).await?;
    let opts = web_sys::FileSystemRemoveOptions::new();
    opts.set_recursive(true);
    match JsFuture::from(parent.remove_entry_with_options(last, &opts)).await {
        Ok(_) => Ok(()),
        Err(e) if e.dyn_ref::<js_sys::Error>().is_some_and(|e| e.name() == "NotFoundError") => Ok(()),
        Err(e) => Err(e),
    }
}
