//! Writing secrets (keys, bootstrap tokens) so that nothing planted in their place is ever
//! written through.
//!
//! A file is never opened for writing where it stands: it is written to a new temporary file
//! beside it (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600 from the first byte) and renamed over the
//! target. A symlink planted at the target is replaced, not followed; a pre-existing file is
//! replaced, not reused with its old owner and mode.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;

/// Owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

fn open_options_new(mode: u32) -> std::fs::OpenOptions {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        opts.mode(mode).custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = mode;
    opts
}

/// A name for a temporary file beside `path`; unique within this process, and `O_EXCL` makes
/// a clash with another process an error rather than a shared file.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Creates `path` with `contents` and `mode`; fails if anything (a file, a symlink) is already
/// there.
pub fn create_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut f = open_options_new(mode).open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Replaces `path` with a new file holding `contents` (mode 0600): written to a temporary file
/// beside it, synced, then renamed over it.
pub fn write_private_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let res =
        create_new(&tmp, contents, PRIVATE_FILE_MODE).and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Appends `line` to `path` (created 0600 if missing) and syncs it, without following a
/// symlink at `path`.
pub fn append_private(path: &Path, line: &[u8]) -> io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        opts.mode(PRIVATE_FILE_MODE).custom_flags(libc::O_NOFOLLOW);
    }
    let mut f = opts.open(path)?;
    f.write_all(line)?;
    f.sync_data()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_write_replaces_a_planted_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let target = dir.path().join("secret");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_private_atomic(&target, b"s3cret").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "s3cret");
        assert_eq!(mode(&target), 0o600);
        // A pre-existing world-readable file is replaced by a 0600 one.
        std::fs::write(&victim, "old").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private_atomic(&victim, b"new").unwrap();
        assert_eq!(mode(&victim), 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn create_new_and_append_refuse_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(create_new(&link, b"x", 0o600).is_err());
        assert!(append_private(&link, b"x\n").is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let fresh = dir.path().join("log");
        append_private(&fresh, b"a\n").unwrap();
        append_private(&fresh, b"b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "a\nb\n");
        assert_eq!(mode(&fresh), 0o600);
    }
}
