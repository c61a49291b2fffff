//! Reading the files tokend is configured by: the configuration itself,
//! secret files (including credentials systemd hands over), private keys,
//! `ca_file`s and client certificates. Each says where secrets go, whom
//! tokend trusts, or what it proves itself with, so each is held to two
//! rules: nobody but root and tokend's own user may change it, and, for
//! secrets, nobody else may read it.
//!
//! A file is opened once, without blocking (a FIFO or a device would
//! otherwise hang start-up or a reload) and without following the path
//! again: the verdict on the file comes from `fstat` and the POSIX ACL of
//! that one descriptor, so nothing can be swapped in between the check and
//! the read. Symlinks are followed, as Kubernetes secret volumes and
//! systemd's credential directories use them.
//!
//! Who may change it: the file must belong to root or tokend's own user,
//! and neither its mode nor its ACL may let anyone else write it. Then the
//! path: a file in a directory another user may write can be replaced, not
//! written, so the path is walked from `/` as the kernel resolves it
//! (every symlink followed, `..` taken physically), and each directory on
//! the way must belong to root or tokend's own user and be writable by
//! nobody else. A directory others may write passes only with the sticky
//! bit, as /tmp has it: there nobody may rename or remove an entry that is
//! not theirs, so the entry the path goes through in it (directory, symlink
//! or the file) must be root's or tokend's own. The walk ends where the
//! descriptor's file is, or the read is refused: the descriptor is what is
//! read, the walk what proves nobody else could have put it there. Group
//! write counts as others': who is in a group can change (and NSS sources
//! such as LDAP need not list every member), so "only tokend is in that
//! group" is not a promise a file's mode can keep. Walking by path between
//! `lstat`s is safe here because each directory is judged before anything
//! in it is looked at: one nobody else may write cannot change under us.
//!
//! Who may read it, for secrets: nobody but the file's owner, root and
//! tokend's own user may have any access. When
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

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

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
    #[error("{} {tampering}; {}", path.display(), tampering.advice(path))]
    Tampered { path: PathBuf, tampering: Tampering },
    #[error("failed to check the directories on the way to {}: {}: {cause}", path.display(), at.display())]
    Walk {
        path: PathBuf,
        at: PathBuf,
        cause: std::io::Error,
    },
    #[error("{} was replaced while tokend read it; try again", path.display())]
    Replaced { path: PathBuf },
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
        f.write_str(&describe(self, Access::Read))
    }
}

/// The access an [`Exposure`] was found for: reading a file that holds
/// secrets, or writing (changing) a file or directory tokend trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// What `by` lets others do, as a phrase after a file's name. The owner
/// case reads the same for either access: the owner can do anything.
fn describe(by: &Exposure, access: Access) -> String {
    let (able, verb, group) = match access {
        Access::Read => ("readable", "read", "group or others"),
        Access::Write => ("writable", "write", "its group"),
    };
    match by {
        Exposure::Owner { uid } => format!(
            "is owned by {}; it must belong to root or to tokend's own user ({})",
            user_name(*uid),
            user_name(nix::unistd::geteuid().as_raw())
        ),
        Exposure::Others { mode } => format!("is {able} by others (mode {mode:04o})"),
        Exposure::Group { mode } => format!("is {able} by {group} (mode {mode:04o})"),
        Exposure::AclOwningGroup { gid } => format!(
            "has an ACL whose owning-group entry lets {} {verb} it",
            group_name(*gid)
        ),
        Exposure::AclUser { uid } => format!(
            "has an ACL entry user:{} that lets another user {verb} it",
            user_name(*uid)
        ),
        Exposure::AclGroup { gid } => format!(
            "has an ACL entry group:{} that lets a group {verb} it",
            group_name(*gid)
        ),
    }
}

/// How someone besides root and tokend's own user could change what a
/// path leads to. Carries paths, numbers and names only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tampering {
    /// The file itself: its owner, or a mode or ACL entry that lets
    /// others write it.
    File(Exposure),
    /// A directory on the way, whose owner or writers could put another
    /// file in the path's place.
    Directory { dir: PathBuf, by: Exposure },
    /// An entry on the way (the file, a directory or a symlink) that is
    /// another user's, in a sticky directory: its owner may replace it.
    Entry {
        entry: PathBuf,
        dir: PathBuf,
        uid: u32,
    },
}

impl Tampering {
    /// What to do about it, for a file at `path`.
    pub fn advice(&self, path: &Path) -> String {
        match self {
            Tampering::File(by) => write_advice(by, path),
            Tampering::Directory { dir, by } => write_advice(by, dir),
            Tampering::Entry { entry, .. } => format!("chown -h root {}", entry.display()),
        }
    }
}

/// How to take write access away from whoever `by` names, at `path`.
fn write_advice(by: &Exposure, path: &Path) -> String {
    let shown = path.display();
    match by {
        Exposure::Owner { .. } => format!("chown root {shown}"),
        Exposure::Others { .. } | Exposure::Group { .. } => format!("chmod go-w {shown}"),
        // With an ACL, the group bits are its mask, which limits the
        // owning group and every named entry at once.
        Exposure::AclOwningGroup { .. } => format!("chmod g-w {shown}"),
        Exposure::AclUser { uid } => format!("setfacl -x u:{uid} {shown}"),
        Exposure::AclGroup { gid } => format!("setfacl -x g:{gid} {shown}"),
    }
}

impl fmt::Display for Tampering {
    /// A phrase that follows the file's name: "… is writable by others".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tampering::File(by) => f.write_str(&describe(by, Access::Write)),
            Tampering::Directory { dir, by } => {
                write!(
                    f,
                    "can be replaced by others: directory {} {}",
                    dir.display(),
                    describe(by, Access::Write)
                )?;
                if !matches!(by, Exposure::Owner { .. }) {
                    f.write_str(" without the sticky bit")?;
                }
                Ok(())
            }
            Tampering::Entry { entry, dir, uid } => write!(
                f,
                "can be replaced by others: {} is owned by {}, in the sticky directory {}, \
                 where its owner may replace it",
                entry.display(),
                user_name(*uid),
                dir.display()
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
/// else may change it (refused) and read it ([`Opened::exposure`]) from the
/// same descriptor, and who could replace it from the directories on the
/// way.
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
    let own = own_users();
    let judged = |access| {
        judge(
            meta.uid(),
            meta.gid(),
            meta.mode(),
            acl.as_deref(),
            &own,
            access,
        )
    };
    if let Some(by) = judged(WRITE) {
        return Err(FileError::Tampered {
            path: path.to_owned(),
            tampering: Tampering::File(by),
        });
    }
    check_path(path, &meta, &own)?;
    let exposure = judged(ANY_ACCESS);
    let text = read_text(file, meta.len(), max, path)?;
    Ok(Opened { text, exposure })
}

/// Refuses a path through which someone else could have put a file in
/// place of the one opened, whose metadata is `opened`.
fn check_path(path: &Path, opened: &Metadata, own: &[u32]) -> Result<(), FileError> {
    match walk(path, own) {
        Ok(reached) if reached == (opened.dev(), opened.ino()) => Ok(()),
        Ok(_) => Err(FileError::Replaced {
            path: path.to_owned(),
        }),
        Err(Walked::Tampered(tampering)) => Err(FileError::Tampered {
            path: path.to_owned(),
            tampering,
        }),
        Err(Walked::Io { at, cause }) => Err(FileError::Walk {
            path: path.to_owned(),
            at,
            cause,
        }),
    }
}

/// Why a walk stopped.
enum Walked {
    Tampered(Tampering),
    Io { at: PathBuf, cause: std::io::Error },
}

/// One step of a path as the walk takes them.
enum Step {
    Up,
    Into(OsString),
}

/// What a directory on the way allows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Passage {
    /// Nobody else may write it.
    Closed,
    /// Others may write it, but the sticky bit keeps them from replacing
    /// what is not theirs.
    Sticky,
}

/// As many symlinks as the kernel follows in one path.
const MAX_SYMLINKS: usize = 40;

/// Follows `path` from `/` as the kernel resolves it, judging each
/// directory on the way, and returns the device and inode it ends at.
fn walk(path: &Path, own: &[u32]) -> Result<(u64, u64), Walked> {
    let io = |at: &Path| {
        let at = at.to_owned();
        move |cause| Walked::Io { at, cause }
    };
    // A stack: the next step is on top.
    let mut steps = Vec::new();
    push_steps(&mut steps, path);
    if path.is_relative() {
        let cwd = std::env::current_dir().map_err(io(Path::new(".")))?;
        push_steps(&mut steps, &cwd);
    }
    let root = PathBuf::from("/");
    let mut dir = root.clone();
    let mut passage = judge_dir_at(&dir, own)?;
    let mut links = 0;
    while let Some(step) = steps.pop() {
        let name = match step {
            Step::Into(name) => name,
            Step::Up => {
                if dir.pop() {
                    passage = judge_dir_at(&dir, own)?;
                }
                continue;
            }
        };
        let entry = dir.join(&name);
        let meta = std::fs::symlink_metadata(&entry).map_err(io(&entry))?;
        if passage == Passage::Sticky && !own.contains(&meta.uid()) {
            return Err(Walked::Tampered(Tampering::Entry {
                entry,
                dir,
                uid: meta.uid(),
            }));
        }
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(io(&entry)(std::io::Error::from_raw_os_error(libc::ELOOP)));
            }
            let target = std::fs::read_link(&entry).map_err(io(&entry))?;
            if target.is_absolute() {
                dir.clone_from(&root);
                passage = judge_dir_at(&dir, own)?;
            }
            push_steps(&mut steps, &target);
        } else if steps.is_empty() {
            return Ok((meta.dev(), meta.ino()));
        } else {
            passage = judge_dir(&entry, &meta, own)?;
            dir = entry;
        }
    }
    // The path ended at a directory (`/`, `..`).
    let meta = std::fs::symlink_metadata(&dir).map_err(io(&dir))?;
    Ok((meta.dev(), meta.ino()))
}

/// Puts `path`'s components on the stack, the first on top.
fn push_steps(steps: &mut Vec<Step>, path: &Path) {
    for component in path.components().rev() {
        match component {
            Component::Normal(name) => steps.push(Step::Into(name.to_owned())),
            Component::ParentDir => steps.push(Step::Up),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

fn judge_dir_at(dir: &Path, own: &[u32]) -> Result<Passage, Walked> {
    let meta = std::fs::symlink_metadata(dir).map_err(|cause| Walked::Io {
        at: dir.to_owned(),
        cause,
    })?;
    judge_dir(dir, &meta, own)
}

/// Whether anyone else could replace what is in `dir`.
fn judge_dir(dir: &Path, meta: &Metadata, own: &[u32]) -> Result<Passage, Walked> {
    let acl = read_acl_at(dir).map_err(|cause| Walked::Io {
        at: dir.to_owned(),
        cause,
    })?;
    let refused = |by| {
        Walked::Tampered(Tampering::Directory {
            dir: dir.to_owned(),
            by,
        })
    };
    match judge(
        meta.uid(),
        meta.gid(),
        meta.mode(),
        acl.as_deref(),
        own,
        WRITE,
    ) {
        None => Ok(Passage::Closed),
        // Its owner may chmod it, sticky or not.
        Some(by @ Exposure::Owner { .. }) => Err(refused(by)),
        Some(_) if meta.mode() & libc::S_ISVTX != 0 => Ok(Passage::Sticky),
        Some(by) => Err(refused(by)),
    }
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
    acl_of(file.get_xattr(ACL_XATTR))
}

/// The access ACL of what is at `path`, not following a symlink there.
fn read_acl_at(path: &Path) -> std::io::Result<Option<Vec<AclEntry>>> {
    acl_of(xattr::get(path, ACL_XATTR))
}

fn acl_of(attribute: std::io::Result<Option<Vec<u8>>>) -> std::io::Result<Option<Vec<AclEntry>>> {
    match attribute {
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

/// `rwx` bits `judge` looks for: any access, for who may read a secret;
/// write, for who may change what tokend reads.
const ANY_ACCESS: u16 = 0o7;
const WRITE: u16 = 0o2;

/// The rule itself, pure: `None` when only the owner and the `own` uids
/// have any of the `access` bits on the file and the owner is one of `own`.
fn judge(
    owner: u32,
    group: u32,
    mode: u32,
    acl: Option<&[AclEntry]>,
    own: &[u32],
    access: u16,
) -> Option<Exposure> {
    if !own.contains(&owner) {
        return Some(Exposure::Owner { uid: owner });
    }
    let access = u32::from(access);
    let Some(acl) = acl else {
        return if mode & access != 0 {
            Some(Exposure::Others {
                mode: mode & 0o7777,
            })
        } else if mode & (access << 3) != 0 {
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
    let grants = |perm: u16, limit: u16| u32::from(perm & limit) & access != 0;
    for entry in acl {
        let exposed = match entry.tag {
            AclTag::UserObj | AclTag::Mask => None,
            AclTag::Other if grants(entry.perm, 0o7) => Some(Exposure::Others {
                mode: mode & 0o7777,
            }),
            AclTag::GroupObj if grants(entry.perm, mask) => {
                Some(Exposure::AclOwningGroup { gid: group })
            }
            AclTag::User if grants(entry.perm, mask) && !own.contains(&entry.id) => {
                Some(Exposure::AclUser { uid: entry.id })
            }
            AclTag::Group if grants(entry.perm, mask) => Some(Exposure::AclGroup { gid: entry.id }),
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

    /// Who besides tokend may read the file.
    fn readers(
        owner: u32,
        group: u32,
        mode: u32,
        acl: Option<&[AclEntry]>,
        own: &[u32],
    ) -> Option<Exposure> {
        judge(owner, group, mode, acl, own, ANY_ACCESS)
    }

    /// Who besides tokend may change the file.
    fn writers(
        owner: u32,
        group: u32,
        mode: u32,
        acl: Option<&[AclEntry]>,
        own: &[u32],
    ) -> Option<Exposure> {
        judge(owner, group, mode, acl, own, WRITE)
    }

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
        assert_eq!(readers(0, 0, 0o100440, Some(&acl), AS_TOKEND), None);
        // The same file is private when tokend runs as root, too.
        assert_eq!(readers(0, 0, 0o100440, Some(&acl), AS_ROOT), None);
        assert_eq!(
            readers(0, 0, 0o100440, Some(&acl), &[0, 0]),
            Some(Exposure::AclUser { uid: TOKEND })
        );
    }

    #[test]
    fn an_acl_for_another_user_or_any_group_is_refused() {
        let acl = systemd_254(1234);
        assert_eq!(
            readers(0, 0, 0o100440, Some(&acl), AS_TOKEND),
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
            readers(TOKEND, 0, 0o100640, Some(&group), AS_TOKEND),
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
            readers(0, 7, 0o100640, Some(&owning), AS_TOKEND),
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
        assert_eq!(readers(0, 0, 0o100600, Some(&masked), AS_TOKEND), None);
    }

    #[test]
    fn mode_bits_alone() {
        assert_eq!(readers(TOKEND, 1, 0o100600, None, AS_TOKEND), None);
        assert_eq!(readers(0, 1, 0o100400, None, AS_TOKEND), None);
        assert_eq!(
            readers(TOKEND, 1, 0o100640, None, AS_TOKEND),
            Some(Exposure::Group { mode: 0o640 })
        );
        assert_eq!(
            readers(TOKEND, 1, 0o100604, None, AS_TOKEND),
            Some(Exposure::Others { mode: 0o604 })
        );
        // Write access for others is refused as well: they could swap the
        // secret.
        assert_eq!(
            readers(TOKEND, 1, 0o100620, None, AS_TOKEND),
            Some(Exposure::Group { mode: 0o620 })
        );
    }

    #[test]
    fn the_owner_must_be_root_or_tokend() {
        assert_eq!(
            readers(1234, 1, 0o100600, None, AS_TOKEND),
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

    #[test]
    fn write_access_alone_is_what_makes_a_file_changeable() {
        assert_eq!(writers(0, 1, 0o100644, None, AS_TOKEND), None);
        assert_eq!(writers(TOKEND, 1, 0o100444, None, AS_TOKEND), None);
        assert_eq!(
            writers(0, 1, 0o100664, None, AS_TOKEND),
            Some(Exposure::Group { mode: 0o664 })
        );
        assert_eq!(
            writers(0, 1, 0o100646, None, AS_TOKEND),
            Some(Exposure::Others { mode: 0o646 })
        );
        assert_eq!(
            writers(1234, 1, 0o100600, None, AS_TOKEND),
            Some(Exposure::Owner { uid: 1234 })
        );
        let acl = |user_perm: u16, mask: u16| {
            decode_acl(&encode(&[
                (0x01, 6, NONE),
                (0x02, user_perm, 1234),
                (0x04, 4, NONE),
                (0x10, mask, NONE),
                (0x20, 4, NONE),
            ]))
            .unwrap()
        };
        // Readable by user 1234 and by others: fine for a CA file.
        assert_eq!(writers(0, 0, 0o100644, Some(&acl(4, 4)), AS_TOKEND), None);
        assert_eq!(
            writers(0, 0, 0o100664, Some(&acl(6, 6)), AS_TOKEND),
            Some(Exposure::AclUser { uid: 1234 })
        );
        // The mask takes write away from the named entry.
        assert_eq!(writers(0, 0, 0o100644, Some(&acl(6, 4)), AS_TOKEND), None);
        // tokend's own user may write it.
        let own = decode_acl(&encode(&[
            (0x01, 6, NONE),
            (0x02, 6, TOKEND),
            (0x04, 4, NONE),
            (0x10, 6, NONE),
            (0x20, 4, NONE),
        ]))
        .unwrap();
        assert_eq!(writers(0, 0, 0o100664, Some(&own), AS_TOKEND), None);
    }

    fn mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A private file at `path`, as tokend's own user writes one.
    fn private(path: &Path) {
        std::fs::write(path, "x").unwrap();
        mode(path, 0o600);
    }

    fn tampering(path: &Path) -> Option<Tampering> {
        match read(path, 1024) {
            Ok(_) => None,
            Err(FileError::Tampered { tampering, .. }) => Some(tampering),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_directory_others_may_write_lets_them_replace_the_file_unless_sticky() {
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        mode(&open, 0o777);
        let file = open.join("tokend.toml");
        private(&file);
        assert_eq!(
            tampering(&file),
            Some(Tampering::Directory {
                dir: open.clone(),
                by: Exposure::Others { mode: 0o777 },
            })
        );
        mode(&open, 0o775);
        assert!(matches!(
            tampering(&file),
            Some(Tampering::Directory {
                by: Exposure::Group { .. },
                ..
            })
        ));
        // Sticky, as /tmp: others may not replace what is tokend's.
        mode(&open, 0o1777);
        assert_eq!(tampering(&file), None);
        mode(&open, 0o755);
        assert_eq!(tampering(&file), None);
    }

    #[test]
    fn the_walk_follows_symlinks_and_dot_dot_as_the_kernel_does() {
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        let safe = base.path().join("safe");
        std::fs::create_dir(&open).unwrap();
        std::fs::create_dir(&safe).unwrap();
        mode(&open, 0o777);
        let inside_open = open.join("tokend.toml");
        private(&inside_open);
        // A symlink in a safe directory to a file in an open one: the
        // open one could swap the file.
        let link = safe.join("link.toml");
        std::os::unix::fs::symlink("../open/tokend.toml", &link).unwrap();
        assert!(matches!(
            tampering(&link),
            Some(Tampering::Directory { dir, .. }) if dir == open
        ));
        // `..` out of an open directory leads back to a safe one: only
        // the directories actually gone through count, not the text.
        let file = safe.join("tokend.toml");
        private(&file);
        let round = safe.join("sub");
        std::fs::create_dir(&round).unwrap();
        assert_eq!(tampering(&round.join("../tokend.toml")), None);
        // A symlink in the open directory is itself replaceable.
        let swapped = open.join("swap.toml");
        std::os::unix::fs::symlink(&file, &swapped).unwrap();
        assert!(matches!(
            tampering(&swapped),
            Some(Tampering::Directory { dir, .. }) if dir == open
        ));
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_a_hang() {
        let base = tempfile::tempdir().unwrap();
        let a = base.path().join("a");
        let b = base.path().join("b");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        assert!(matches!(
            walk(&a, &own_users()),
            Err(Walked::Io { cause, .. }) if cause.raw_os_error() == Some(libc::ELOOP)
        ));
    }

    #[test]
    fn messages_name_the_place_and_the_fix() {
        let file = Path::new("/etc/tokend/tokend.toml");
        let at = |tampering| FileError::Tampered {
            path: file.to_owned(),
            tampering,
        };
        assert_eq!(
            at(Tampering::File(Exposure::Others { mode: 0o666 })).to_string(),
            "/etc/tokend/tokend.toml is writable by others (mode 0666); \
             chmod go-w /etc/tokend/tokend.toml"
        );
        assert_eq!(
            at(Tampering::Directory {
                dir: "/etc/tokend".into(),
                by: Exposure::Group { mode: 0o775 },
            })
            .to_string(),
            "/etc/tokend/tokend.toml can be replaced by others: directory /etc/tokend is \
             writable by its group (mode 0775) without the sticky bit; chmod go-w /etc/tokend"
        );
        let entry = at(Tampering::Entry {
            entry: "/tmp/t.toml".into(),
            dir: "/tmp".into(),
            uid: 4_000_000,
        })
        .to_string();
        assert!(
            entry.ends_with(
                "is owned by uid 4000000, in the sticky directory /tmp, where its owner may \
                 replace it; chown -h root /tmp/t.toml"
            ),
            "{entry}"
        );
    }
}
