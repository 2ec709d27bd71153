//! One error type for the whole library. Every error carries a [`Kind`] that
//! decides its errno (through the mount) and its exit code (through the CLI),
//! and a message that names the problem and the next step.

use std::fmt;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// Bad command-line usage (exit 1).
    Usage,
    /// Master key missing, malformed, unreadable or wrong (exit 2).
    MasterKey,
    /// The store cannot be opened, created or written (exit 3).
    Store,
    /// The store is held by another process (exit 3, `EBUSY`).
    Busy,
    /// No such key, version, client or path (exit 4, `ENOENT`).
    NotFound,
    /// Target exists (exit 5, `EEXIST`).
    Exists,
    /// Directory not empty (exit 5, `ENOTEMPTY`).
    NotEmpty,
    /// A path component is not a directory (exit 5, `ENOTDIR`).
    NotDir,
    /// Operation needs a file but found a directory (exit 5, `EISDIR`).
    IsDir,
    /// Invalid name, ClientID, timestamp or key material (exit 5, `EINVAL`).
    Invalid,
    /// Secret larger than 64 KiB (exit 5, `EFBIG`).
    TooBig,
    /// Name longer than 255 bytes (exit 5, `ENAMETOOLONG`).
    NameTooLong,
    /// Read-only mount or immutable archived version (exit 5, `EROFS`).
    ReadOnly,
    /// Not permitted by keyfs's rules (exit 5, `EPERM`).
    Perm,
    /// A record failed authentication or decoding (exit 6, `EIO`).
    Integrity,
    /// A shared store (etcd) cannot take changes now: unreachable or
    /// without quorum. Reads go on from the last synchronised state
    /// (exit 3, `EROFS`).
    Unavailable,
    /// Another writer changed what this operation read, again and again:
    /// nothing was changed (exit 3, `EAGAIN`).
    Conflict,
    /// The disk holding the store is full (exit 3, `ENOSPC`).
    NoSpace,
}

impl Kind {
    /// Exit code of the `keyfs` command for this kind (SPEC §4).
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Usage => 1,
            Kind::MasterKey => 2,
            Kind::Store | Kind::Busy | Kind::Unavailable | Kind::Conflict | Kind::NoSpace => 3,
            Kind::NotFound => 4,
            Kind::Exists
            | Kind::NotEmpty
            | Kind::NotDir
            | Kind::IsDir
            | Kind::Invalid
            | Kind::TooBig
            | Kind::NameTooLong
            | Kind::ReadOnly
            | Kind::Perm => 5,
            Kind::Integrity => 6,
        }
    }

    /// The errno the mount returns for this kind.
    pub fn errno(self) -> i32 {
        match self {
            Kind::Usage | Kind::Invalid => libc::EINVAL,
            Kind::MasterKey | Kind::Store | Kind::Integrity => libc::EIO,
            Kind::Busy => libc::EBUSY,
            Kind::NotFound => libc::ENOENT,
            Kind::Exists => libc::EEXIST,
            Kind::NotEmpty => libc::ENOTEMPTY,
            Kind::NotDir => libc::ENOTDIR,
            Kind::IsDir => libc::EISDIR,
            Kind::TooBig => libc::EFBIG,
            Kind::NameTooLong => libc::ENAMETOOLONG,
            Kind::ReadOnly | Kind::Unavailable => libc::EROFS,
            Kind::Conflict => libc::EAGAIN,
            Kind::NoSpace => libc::ENOSPC,
            Kind::Perm => libc::EPERM,
        }
    }
}

/// The library's error: a kind and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
    msg: String,
}

/// Result alias used throughout keyfs.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Build an error of `kind` with a message that says what to do.
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
        }
    }
    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }
    /// Exit code for the CLI.
    pub fn exit_code(&self) -> i32 {
        self.kind.exit_code()
    }
    /// Errno for the mount.
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }
    /// Prefix the message with context (for example the path concerned).
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            msg: format!("{what}: {}", self.msg),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

/// Shorthands used across the crate.
pub fn err<T>(kind: Kind, msg: impl Into<String>) -> Result<T> {
    Err(Error::new(kind, msg))
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => Error::new(
                Kind::Integrity,
                format!("the store's database is corrupted ({e}); restore the store directory from a backup copy (or a new store from an export bundle)"),
            ),
            other => Error::new(
                Kind::Store,
                format!("store database error: {other}; check the store directory's permissions and free space"),
            ),
        }
    }
}
