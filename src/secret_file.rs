//! Reading files that may hold secrets: the configuration (for its inline
//! secrets) and secret files, including credentials systemd hands over.
//!
//! A file is opened once, without blocking (a FIFO or a device would
//! otherwise hang start-up or a reload) and without following the path
//! again: the verdict comes from `fstat` and the POSIX ACL of that one
//! descriptor, so nothing can be swapped in between the check and the read.
//! Symlinks are followed, as Kubernetes secret volumes and systemd's
//! credential directories use them.
//!
//! The rule: nobody but the file's owner, root and tokend's own user may
//! have any access, and the owner must be root or tokend's user. When
//! tokend runs as root (`tokend check` in an operator's shell), the
//! package's `tokend` user counts as its own too: that is whom the files
//! are for. Since
//! systemd 254 a credential is root's, mode 0400, with an ACL entry granting
//! the service user read, so `stat` shows 0440 while only that user can read
//! it: the ACL decides, not the group bits, which then show the ACL mask.
//!
//! The ACL is read from the `system.posix_acl_access` attribute and decoded
//! here (a dozen bytes per entry, a format fixed by the kernel ABI) rather
//! than through the `posix-acl` crate, which links libacl: a C library the
//! minimal systems tokend runs on need not have.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("failed to open {}: {cause}", path.display())]
    Open {
        path: PathBuf,
        /// Not `source`: the message already says it, and a chain printed
        /// with `{:#}` would say it twice.
        cause: std::io::Error,
    },
    #[error("{} is {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is larger than {max} bytes", path.display())]
    TooLarge { path: PathBuf, max: usize },
    #[error("failed to read {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        /// Not `source`: the message already says it, and a chain printed
        /// with `{:#}` would say it twice.
        cause: std::io::Error,
    },
    #[error("{} is not UTF-8 text", path.display())]
    NotText { path: PathBuf },
}

/// A file's text, kept in memory that is wiped, with what its metadata
/// says about who else can read it.
pub struct Opened {
    pub text: Zeroizing<String>,
    pub exposure: Option<Exposure>,
}

/// Who besides the file's owner, root and tokend's user may access a file,
/// or an owner that should not have it. Carries numbers and names only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exposure {
    /// The file belongs to someone else, who could rewrite or chmod it.
    Owner { uid: u32 },
    /// Mode bits: others have access.
    Others { mode: u32 },
    /// Mode bits, no ACL: the owning group has access.
    Group { mode: u32 },
    /// The ACL's owning-group entry grants access (under its mask).
    AclOwningGroup { gid: u32 },
    /// A named-user ACL entry for someone other than root or tokend's user.
    AclUser { uid: u32 },
    /// A named-group ACL entry.
    AclGroup { gid: u32 },
}

impl Exposure {
    /// What to do about it, for a file at `path`.
    pub fn advice(&self, path: &Path) -> String {
        let shown = path.display();
        match self {
            Exposure::Owner { .. } => format!("chown root {shown}"),
            Exposure::Others { .. } | Exposure::Group { .. } => format!("chmod 0600 {shown}"),
            Exposure::AclOwningGroup { .. } => format!("setfacl -m g::- {shown}"),
            Exposure::AclUser { uid } => format!("setfacl -x u:{uid} {shown}"),
            Exposure::AclGroup { gid } => format!("setfacl -x g:{gid} {shown}"),
        }
    }
}

impl fmt::Display for Exposure {
    /// A phrase that follows the file's name: "… is readable by others".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exposure::Owner { uid } => write!(
                f,
                "is owned by {}; it must belong to root or to tokend's own user ({})",
                user_name(*uid),
                user_name(nix::unistd::geteuid().as_raw())
            ),
            Exposure::Others { mode } => write!(f, "is readable by others (mode {mode:04o})"),
            Exposure::Group { mode } => {
                write!(f, "is readable by group or others (mode {mode:04o})")
            }
            Exposure::AclOwningGroup { gid } => write!(
                f,
                "has an ACL whose owning-group entry lets {} read it",
                group_name(*gid)
            ),
            Exposure::AclUser { uid } => write!(
                f,
                "has an ACL entry user:{} that lets another user read it",
                user_name(*uid)
            ),
            Exposure::AclGroup { gid } => write!(
                f,
                "has an ACL entry group:{} that lets a group read it",
                group_name(*gid)
            ),
        }
    }
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(user)) => format!("user {} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(gid.into()) {
        Ok(Some(group)) => format!("group {} (gid {gid})", group.name),
        _ => format!("gid {gid}"),
    }
}

/// Opens `path` once and reads it whole (at most `max` bytes), judging who
/// else may read it from the same descriptor.
pub fn read(path: &Path, max: usize) -> Result<Opened, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|cause| FileError::Open {
            path: path.to_owned(),
            cause,
        })?;
    let meta = file.metadata().map_err(|cause| FileError::Read {
        path: path.to_owned(),
        cause,
    })?;
    if let Some(kind) = not_regular(&meta.file_type()) {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    let acl = read_acl(&file).map_err(|cause| FileError::Read {
        path: path.to_owned(),
        cause,
    })?;
    let exposure = judge(
        meta.uid(),
        meta.gid(),
        meta.mode(),
        acl.as_deref(),
        &own_users(),
    );
    let text = read_text(file, meta.len(), max, path)?;
    Ok(Opened { text, exposure })
}

/// The uids whose access is tokend's own: root, the effective uid, and
/// when that is root, the package's `tokend` user.
fn own_users() -> Vec<u32> {
    let euid = nix::unistd::geteuid().as_raw();
    let mut own = vec![0, euid];
    if euid == 0 {
        if let Ok(Some(user)) = nix::unistd::User::from_name(SERVICE_USER) {
            own.push(user.uid.as_raw());
        }
    }
    own
}

/// The user the shipped unit runs tokend as.
const SERVICE_USER: &str = "tokend";

fn not_regular(kind: &std::fs::FileType) -> Option<&'static str> {
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device")
    } else {
        Some("not a plain file")
    }
}

/// Reads into a buffer sized from `fstat` up front, so it never grows: a
/// growing buffer leaves unwiped copies of the secret behind in freed memory.
fn read_text(
    file: File,
    size: u64,
    max: usize,
    path: &Path,
) -> Result<Zeroizing<String>, FileError> {
    let too_large = || FileError::TooLarge {
        path: path.to_owned(),
        max,
    };
    let size = usize::try_from(size).map_err(|_| too_large())?;
    if size > max {
        return Err(too_large());
    }
    // One byte more than fstat said, to notice a file that grew meanwhile.
    let mut bytes = Zeroizing::new(Vec::with_capacity(size + 1));
    file.take(size as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|cause| FileError::Read {
            path: path.to_owned(),
            cause,
        })?;
    if bytes.len() > size {
        return Err(too_large());
    }
    // Moves the buffer into the string, no copy; either way it is wiped.
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            Err(FileError::NotText {
                path: path.to_owned(),
            })
        }
    }
}

const ACL_XATTR: &str = "system.posix_acl_access";

/// The file's access ACL, when it has one beyond its mode bits.
fn read_acl(file: &File) -> std::io::Result<Option<Vec<AclEntry>>> {
    use xattr::FileExt;
    match file.get_xattr(ACL_XATTR) {
        Ok(Some(raw)) => Ok(Some(decode_acl(&raw).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "unreadable POSIX ACL")
        })?)),
        Ok(None) => Ok(None),
        // A file system without extended attributes has no ACLs either.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One entry of a POSIX access ACL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AclEntry {
    tag: AclTag,
    /// rwx as 4, 2, 1.
    perm: u16,
    /// The uid or gid of a named entry.
    id: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AclTag {
    UserObj,
    User,
    GroupObj,
    Group,
    Mask,
    Other,
}

/// Decodes the kernel's ACL attribute: a little-endian version (2), then
/// 8-byte entries of tag (u16), permissions (u16) and id (u32), as
/// `include/uapi/linux/posix_acl_xattr.h` lays them out.
fn decode_acl(raw: &[u8]) -> Option<Vec<AclEntry>> {
    let (version, entries) = raw.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != 2 || entries.len() % 8 != 0 {
        return None;
    }
    entries
        .chunks_exact(8)
        .map(|e| {
            let tag = match u16::from_le_bytes([e[0], e[1]]) {
                0x01 => AclTag::UserObj,
                0x02 => AclTag::User,
                0x04 => AclTag::GroupObj,
                0x08 => AclTag::Group,
                0x10 => AclTag::Mask,
                0x20 => AclTag::Other,
                _ => return None,
            };
            Some(AclEntry {
                tag,
                perm: u16::from_le_bytes([e[2], e[3]]) & 0o7,
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
        })
        .collect()
}

/// The rule itself, pure: `None` when only the owner and the `own` uids
/// can access the file and the owner is one of `own`.
fn judge(
    owner: u32,
    group: u32,
    mode: u32,
    acl: Option<&[AclEntry]>,
    own: &[u32],
) -> Option<Exposure> {
    if !own.contains(&owner) {
        return Some(Exposure::Owner { uid: owner });
    }
    let Some(acl) = acl else {
        return if mode & 0o007 != 0 {
            Some(Exposure::Others {
                mode: mode & 0o7777,
            })
        } else if mode & 0o070 != 0 {
            Some(Exposure::Group {
                mode: mode & 0o7777,
            })
        } else {
            None
        };
    };
    // Named entries and the owning group are limited by the mask, when
    // there is one; the owner and others never are.
    let mask = acl
        .iter()
        .find(|e| e.tag == AclTag::Mask)
        .map_or(0o7, |e| e.perm);
    for entry in acl {
        let exposed = match entry.tag {
            AclTag::UserObj | AclTag::Mask => None,
            AclTag::Other if entry.perm != 0 => Some(Exposure::Others {
                mode: mode & 0o7777,
            }),
            AclTag::GroupObj if entry.perm & mask != 0 => {
                Some(Exposure::AclOwningGroup { gid: group })
            }
            AclTag::User if entry.perm & mask != 0 && !own.contains(&entry.id) => {
                Some(Exposure::AclUser { uid: entry.id })
            }
            AclTag::Group if entry.perm & mask != 0 => Some(Exposure::AclGroup { gid: entry.id }),
            AclTag::Other | AclTag::GroupObj | AclTag::User | AclTag::Group => None,
        };
        if exposed.is_some() {
            return exposed;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEND: u32 = 998;
    /// tokend running as its own user.
    const AS_TOKEND: &[u32] = &[0, TOKEND];
    /// tokend running as root, with the package's user present.
    const AS_ROOT: &[u32] = &[0, 0, TOKEND];

    fn encode(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut raw = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            raw.extend(tag.to_le_bytes());
            raw.extend(perm.to_le_bytes());
            raw.extend(id.to_le_bytes());
        }
        raw
    }

    const NONE: u32 = u32::MAX;

    /// What systemd 254 and later write for a credential: root 0400 plus
    /// `user:<service user>:r--`, mask `r--`.
    fn systemd_254(user: u32) -> Vec<AclEntry> {
        decode_acl(&encode(&[
            (0x01, 4, NONE),
            (0x02, 4, user),
            (0x04, 0, NONE),
            (0x10, 4, NONE),
            (0x20, 0, NONE),
        ]))
        .unwrap()
    }

    #[test]
    fn a_systemd_254_credential_is_private_to_its_service_user() {
        let acl = systemd_254(TOKEND);
        assert_eq!(judge(0, 0, 0o100440, Some(&acl), AS_TOKEND), None);
        // The same file is private when tokend runs as root, too.
        assert_eq!(judge(0, 0, 0o100440, Some(&acl), AS_ROOT), None);
        assert_eq!(
            judge(0, 0, 0o100440, Some(&acl), &[0, 0]),
            Some(Exposure::AclUser { uid: TOKEND })
        );
    }

    #[test]
    fn an_acl_for_another_user_or_any_group_is_refused() {
        let acl = systemd_254(1234);
        assert_eq!(
            judge(0, 0, 0o100440, Some(&acl), AS_TOKEND),
            Some(Exposure::AclUser { uid: 1234 })
        );
        let group = decode_acl(&encode(&[
            (0x01, 6, NONE),
            (0x04, 0, NONE),
            (0x08, 4, 50),
            (0x10, 4, NONE),
            (0x20, 0, NONE),
        ]))
        .unwrap();
        assert_eq!(
            judge(TOKEND, 0, 0o100640, Some(&group), AS_TOKEND),
            Some(Exposure::AclGroup { gid: 50 })
        );
        let owning = decode_acl(&encode(&[
            (0x01, 6, NONE),
            (0x02, 4, TOKEND),
            (0x04, 4, NONE),
            (0x10, 4, NONE),
            (0x20, 0, NONE),
        ]))
        .unwrap();
        assert_eq!(
            judge(0, 7, 0o100640, Some(&owning), AS_TOKEND),
            Some(Exposure::AclOwningGroup { gid: 7 })
        );
    }

    #[test]
    fn the_mask_limits_named_entries() {
        let masked = decode_acl(&encode(&[
            (0x01, 6, NONE),
            (0x02, 4, 1234),
            (0x04, 4, NONE),
            (0x10, 0, NONE),
            (0x20, 0, NONE),
        ]))
        .unwrap();
        assert_eq!(judge(0, 0, 0o100600, Some(&masked), AS_TOKEND), None);
    }

    #[test]
    fn mode_bits_alone() {
        assert_eq!(judge(TOKEND, 1, 0o100600, None, AS_TOKEND), None);
        assert_eq!(judge(0, 1, 0o100400, None, AS_TOKEND), None);
        assert_eq!(
            judge(TOKEND, 1, 0o100640, None, AS_TOKEND),
            Some(Exposure::Group { mode: 0o640 })
        );
        assert_eq!(
            judge(TOKEND, 1, 0o100604, None, AS_TOKEND),
            Some(Exposure::Others { mode: 0o604 })
        );
        // Write access for others is refused as well: they could swap the
        // secret.
        assert_eq!(
            judge(TOKEND, 1, 0o100620, None, AS_TOKEND),
            Some(Exposure::Group { mode: 0o620 })
        );
    }

    #[test]
    fn the_owner_must_be_root_or_tokend() {
        assert_eq!(
            judge(1234, 1, 0o100600, None, AS_TOKEND),
            Some(Exposure::Owner { uid: 1234 })
        );
    }

    #[test]
    fn garbled_acls_are_not_decoded() {
        assert_eq!(decode_acl(&[2, 0, 0, 0, 1]), None);
        assert_eq!(decode_acl(&encode(&[(0x40, 4, 1)])), None);
        assert_eq!(decode_acl(&[1, 0, 0, 0]), None);
        assert_eq!(decode_acl(&[2, 0, 0, 0]), Some(vec![]));
    }

    #[test]
    fn a_fifo_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let err = read(&fifo, 1024).err().unwrap();
        assert!(
            matches!(err, FileError::NotRegular { kind: "a FIFO", .. }),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let err = read(dir.path(), 1024).err().unwrap();
        assert!(
            matches!(
                err,
                FileError::NotRegular {
                    kind: "a directory",
                    ..
                }
            ),
            "{err}"
        );
    }
}
