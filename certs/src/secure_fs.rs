//! Secrets on disk (CA keys, bootstrap tokens) and the directories that hold them, safe from
//! other local users.
//!
//! Writing: a file is never opened for writing where it stands. It is either created new
//! (`O_CREAT|O_EXCL|O_NOFOLLOW`, its mode set from the first byte) or written to a new
//! temporary file beside it and renamed over the target. A symlink planted at the target is
//! replaced or refused, never followed; a pre-existing file is never reused with its old owner
//! and mode.
//!
//! Reading and trusting: a directory another user owns, or that group or others can write to,
//! may hold files that user planted (a CA of theirs, a symlink to catch our tokens), so it is
//! refused rather than used; a key file must be ours and 0600.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;

/// Owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Why a path is not safe to keep secrets in or to trust. Each message is one sentence that
/// names the path and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum UnsafePath {
    #[error("cannot use {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is owned by uid {owner}, not by this user (uid {uid}); refusing to use it (remove it, or use another directory)", path.display())]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error("{} is writable by group or others (mode {mode:04o}); refusing to use it (chmod 700 it)", path.display())]
    Writable { path: PathBuf, mode: u32 },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} is not a regular file (a symlink or something else); refusing to read a key through it", path.display())]
    NotAFile { path: PathBuf },
    #[error("{} has mode {mode:04o}; a private key must be 0600 (chmod 600 it)", path.display())]
    KeyMode { path: PathBuf, mode: u32 },
}

/// The effective uid of this process.
#[cfg(unix)]
pub fn current_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(unix)]
fn check_owner(path: &Path, meta: &std::fs::Metadata) -> Result<(), UnsafePath> {
    use std::os::unix::fs::MetadataExt;
    let uid = current_uid();
    if meta.uid() != uid {
        return Err(UnsafePath::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

/// Checks that `path` is a directory owned by this user that group and others cannot write
/// to. A symlink is followed: what matters is the directory files land in.
pub fn check_private_dir(path: &Path) -> Result<(), UnsafePath> {
    let meta = std::fs::metadata(path).map_err(|source| UnsafePath::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(UnsafePath::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        check_owner(path, &meta)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(UnsafePath::Writable {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Creates `path` with mode 0700 if it does not exist (its missing parents get the default
/// mode), then checks it as [`check_private_dir`] does, so a directory someone else made
/// first is refused rather than used.
pub fn ensure_private_dir(path: &Path) -> Result<(), UnsafePath> {
    let io = |source| UnsafePath::Io {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::symlink_metadata(path).is_err() {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(PRIVATE_DIR_MODE);
        }
        match b.create(path) {
            Ok(()) => {
                // The umask may have taken bits away, never added any; make it exact.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(
                        path,
                        std::fs::Permissions::from_mode(PRIVATE_DIR_MODE),
                    )
                    .map_err(io)?;
                }
            }
            // Someone made it in between: judged below like any existing directory.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
    }
    check_private_dir(path)
}

/// Reads a private key file: opened without following a symlink, and refused unless it is a
/// regular file owned by this user with mode 0600 (checked on the opened file, so it cannot
/// be swapped between the check and the read).
pub fn read_private_key(path: &Path) -> Result<Vec<u8>, UnsafePath> {
    use std::io::Read;
    let io = |source| UnsafePath::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    opts.custom_flags(libc::O_NOFOLLOW);
    let mut f = match opts.open(path) {
        Ok(f) => f,
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(UnsafePath::NotAFile {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(UnsafePath::NotAFile {
            path: path.to_path_buf(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        check_owner(path, &meta)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode != PRIVATE_FILE_MODE {
            return Err(UnsafePath::KeyMode {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(io)?;
    Ok(out)
}

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
    // The umask may have taken bits away (a public cert is meant to be 0644); the file is
    // ours and new, so set them exactly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    f.write_all(contents)?;
    f.sync_all()
}

/// Replaces `path` with a new file holding `contents` and `mode`: written to a temporary file
/// beside it, synced, then renamed over it.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let res = create_new(&tmp, contents, mode).and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Replaces `path` with a new file holding `contents` (mode 0600): written to a temporary file
/// beside it, synced, then renamed over it.
pub fn write_private_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, PRIVATE_FILE_MODE)
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

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Root can hand a file to another uid, as another local user would own it.
    fn give_away(p: &Path) -> bool {
        if current_uid() != 0 {
            eprintln!("not root: skipping the other-owner case");
            return false;
        }
        std::os::unix::fs::lchown(p, Some(65534), Some(65534)).unwrap();
        true
    }

    #[test]
    fn a_new_private_dir_is_0700_and_an_unsafe_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b/state");
        ensure_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        ensure_private_dir(&fresh).unwrap();

        chmod(&fresh, 0o777);
        let e = ensure_private_dir(&fresh).unwrap_err().to_string();
        assert!(
            e.contains(&fresh.display().to_string()) && e.contains("writable by group or others"),
            "{e}"
        );
        chmod(&fresh, 0o720);
        assert!(matches!(
            check_private_dir(&fresh),
            Err(UnsafePath::Writable { .. })
        ));
        chmod(&fresh, 0o755);
        check_private_dir(&fresh).unwrap();

        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            ensure_private_dir(&file),
            Err(UnsafePath::NotADirectory { .. })
        ));

        if give_away(&fresh) {
            let e = ensure_private_dir(&fresh).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }

    #[test]
    fn a_key_must_be_ours_0600_and_not_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        create_new(&key, b"k", 0o600).unwrap();
        assert_eq!(read_private_key(&key).unwrap(), b"k");
        chmod(&key, 0o640);
        let e = read_private_key(&key).unwrap_err().to_string();
        assert!(e.contains("mode 0640") && e.contains("key.pem"), "{e}");
        chmod(&key, 0o600);
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        assert!(matches!(
            read_private_key(&link),
            Err(UnsafePath::NotAFile { .. })
        ));
        if give_away(&key) {
            assert!(matches!(
                read_private_key(&key),
                Err(UnsafePath::NotOwned { owner: 65534, .. })
            ));
        }
    }

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
