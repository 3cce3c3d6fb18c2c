//! The built-in `toy` model: a small Wan2.1 trained by longtake on procedural videos
//! (`worker/toy/train.py`), embedded in the binary as its diffusers-layout files and written out
//! on first use into a cache directory, from where it loads exactly like any checkpoint
//! directory. So `--model toy` works from any working directory with nothing installed.
//!
//! The cache directory is `$LONGTAKE_CACHE_DIR`, else `$XDG_CACHE_HOME/longtake`, else
//! `$HOME/.cache/longtake`, else the temporary directory's `longtake`. The model goes under a
//! name made from a hash of the embedded files, so another build's model never mixes with this
//! one's. It is written into a staging directory beside its place and renamed into it, so a
//! second process never sees half-written files; a complete directory already there is reused
//! once every file is checked against the embedded bytes, and one with a missing, truncated or
//! altered file is replaced.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that names the cache directory.
pub const CACHE_DIR_VAR: &str = "LONGTAKE_CACHE_DIR";

/// The name the toy model is served under.
pub const TOY: &str = "toy";

/// Every file of the toy checkpoint (`worker/toy/model`, listed by `build.rs`), as its path
/// relative to the checkpoint directory (`/`-separated) and its bytes.
pub const TOY_FILES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/toy_model_files.rs"));

/// The toy model could not be written out.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    #[error(
        "cannot write the built-in toy model into {}: {source}; set {CACHE_DIR_VAR} to a writable directory",
        dir.display()
    )]
    Cache {
        dir: PathBuf,
        source: std::io::Error,
    },
}

fn cache_error(dir: &Path) -> impl FnOnce(std::io::Error) -> BuiltinError + '_ {
    move |source| BuiltinError::Cache {
        dir: dir.to_path_buf(),
        source,
    }
}

/// The directory the built-in models are written to (see the module's doc).
pub fn cache_root() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(CACHE_DIR_VAR) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("longtake");
    }
    if let Some(home) = var("HOME") {
        return PathBuf::from(home).join(".cache/longtake");
    }
    std::env::temp_dir().join("longtake")
}

/// The toy checkpoint's directory in [`cache_root`], written out or repaired when it is not
/// complete. The cache root is read once per process.
pub fn toy_dir() -> Result<&'static Path, BuiltinError> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| cache_root().join(toy_dir_name()));
    materialise_at(dir)?;
    Ok(dir)
}

/// Writes the toy checkpoint under `root` (unless a complete copy is there) and returns its
/// directory.
pub fn materialise(root: &Path) -> Result<PathBuf, BuiltinError> {
    let dir = root.join(toy_dir_name());
    materialise_at(&dir)?;
    Ok(dir)
}

/// `toy-` and a hash of the embedded files' paths and bytes.
pub fn toy_dir_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| format!("{TOY}-{:016x}", content_hash(TOY_FILES)))
}

/// FNV-1a over every file's path, length and bytes: a name for this set of files (a collision
/// costs nothing: the files themselves are compared before a directory is reused).
fn content_hash(files: &[(&str, &[u8])]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (path, bytes) in files {
        feed(path.as_bytes());
        feed(&(bytes.len() as u64).to_le_bytes());
        feed(bytes);
    }
    hash
}

/// Makes `dir` a complete copy of the toy checkpoint.
fn materialise_at(dir: &Path) -> Result<(), BuiltinError> {
    if is_complete(dir) {
        return Ok(());
    }
    let root = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(root).map_err(cache_error(root))?;
    let staging = sibling(dir, "partial");
    let written = write_files(&staging);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    match std::fs::rename(&staging, dir) {
        Ok(()) => Ok(()),
        // Renaming onto a directory that is there fails: another process finished first, or a
        // broken copy is in the way.
        Err(_) if dir.exists() => {
            if is_complete(dir) {
                let _ = std::fs::remove_dir_all(&staging);
                return Ok(());
            }
            let stale = sibling(dir, "stale");
            match std::fs::rename(dir, &stale) {
                Ok(()) => {}
                // Another process moved it aside first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(cache_error(dir)(e));
                }
            }
            let placed = std::fs::rename(&staging, dir);
            let _ = std::fs::remove_dir_all(&stale);
            match placed {
                Ok(()) => Ok(()),
                Err(_) if is_complete(dir) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    Ok(())
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    Err(cache_error(dir)(e))
                }
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(cache_error(dir)(e))
        }
    }
}

/// A fresh path beside `dir` that no other process or thread picks: `.NAME.KIND-PID-N`.
fn sibling(dir: &Path, kind: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(
        ".{name}.{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn write_files(staging: &Path) -> Result<(), BuiltinError> {
    for (relative, bytes) in TOY_FILES {
        let path = staging.join(relative);
        let parent = path.parent().unwrap_or(staging);
        std::fs::create_dir_all(parent).map_err(cache_error(parent))?;
        std::fs::write(&path, bytes).map_err(cache_error(staging))?;
    }
    Ok(())
}

/// Whether every embedded file is in `dir` with its exact bytes (the size first, which finds a
/// truncated file without reading it).
fn is_complete(dir: &Path) -> bool {
    TOY_FILES.iter().all(|(relative, bytes)| {
        let path = dir.join(relative);
        std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64)
            && std::fs::read(&path).is_ok_and(|on_disk| on_disk == *bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files on disk in `dir`, by `/`-separated relative path.
    fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let relative = path.strip_prefix(root).unwrap();
                    let name: Vec<_> = relative
                        .components()
                        .map(|c| c.as_os_str().to_str().unwrap().to_string())
                        .collect();
                    out.push((name.join("/"), std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn embedded() -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = TOY_FILES
            .iter()
            .map(|(path, bytes)| (path.to_string(), bytes.to_vec()))
            .collect();
        files.sort();
        files
    }

    /// The binary never serves stale weights: what is embedded is exactly `worker/toy/model`.
    #[test]
    fn the_embedded_files_are_the_toy_model_directory() {
        let source = crate::model::reference::toy_checkpoint_dir();
        let on_disk = files_under(&source);
        let names: Vec<_> = on_disk.iter().map(|(name, _)| name.as_str()).collect();
        for needed in [
            "model_index.json",
            "tokenizer/tokenizer.json",
            "text_encoder/config.json",
            "transformer/config.json",
            "vae/config.json",
            "scheduler/scheduler_config.json",
        ] {
            assert!(names.contains(&needed), "{needed} missing: {names:?}");
        }
        assert!(
            on_disk == embedded(),
            "the embedded toy model differs from {}: rebuild",
            source.display()
        );
    }

    #[test]
    fn materialisation_is_reused_and_repairs_a_truncated_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = materialise(root.path()).unwrap();
        assert_eq!(dir, root.path().join(toy_dir_name()));
        assert!(files_under(&dir) == embedded());
        // Nothing but the model is left beside it.
        let beside: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(beside.len(), 1);

        // Reused: the same files, not written again.
        let weights = dir.join("transformer/diffusion_pytorch_model.safetensors");
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = inode(&weights);
        assert_eq!(materialise(root.path()).unwrap(), dir);
        assert_eq!(inode(&weights), before, "a complete copy must be reused");

        // A truncated file (an interrupted copy, a full disk) is found and the copy replaced.
        let bytes = std::fs::read(&weights).unwrap();
        std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(materialise(root.path()).unwrap(), dir);
        assert!(files_under(&dir) == embedded());
        // Same size, other bytes: found too.
        let mut altered = bytes.clone();
        altered[bytes.len() / 2] ^= 0xff;
        std::fs::write(&weights, &altered).unwrap();
        materialise(root.path()).unwrap();
        assert_eq!(std::fs::read(&weights).unwrap(), bytes);
        let beside: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(beside.len(), 1, "no staging or stale copy left behind");
    }

    /// Writers racing for the same place all end with the complete model.
    #[test]
    fn concurrent_writers_all_see_a_complete_model() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| materialise(root.path()).unwrap()))
                .collect();
            writers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for dir in &dirs {
            assert!(files_under(dir) == embedded());
        }
        let beside: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(beside.len(), 1, "no staging copy left behind");
    }

    #[test]
    fn an_unwritable_cache_names_the_directory_and_the_variable() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let err = materialise(&file).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains(CACHE_DIR_VAR), "{err}");
    }

    #[test]
    fn the_directory_name_follows_the_content() {
        let a: &[(&str, &[u8])] = &[("model_index.json", b"{}")];
        let b: &[(&str, &[u8])] = &[("model_index.json", b"{ }")];
        let c: &[(&str, &[u8])] = &[("model_index.jso", b"n{}")];
        assert_ne!(content_hash(a), content_hash(b));
        assert_ne!(content_hash(a), content_hash(c));
        assert_eq!(content_hash(a), content_hash(a));
    }
}
