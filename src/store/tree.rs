//! Tree blobs: one per directory, holding every entry's metadata.
//!
//! A [`Tree`] lists a directory's entries sorted by their raw-byte name. Each [`Node`] carries
//! all the metadata a restore or a mount gives back (kind, mode, owners, ns times, size,
//! hard-link identity, symlink target, device numbers, xattrs) and either the ids of its content
//! chunks (files) or the id of its subtree (directories). Trees are serialised with postcard and
//! stored as blobs, so an unchanged directory has the same id in every snapshot and is stored
//! once.

use serde::{Deserialize, Serialize};

use super::crypto::BlobId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

impl NodeKind {
    /// The `S_IFMT` bits of this kind.
    pub fn ifmt(self) -> u32 {
        match self {
            NodeKind::File => libc::S_IFREG,
            NodeKind::Dir => libc::S_IFDIR,
            NodeKind::Symlink => libc::S_IFLNK,
            NodeKind::Fifo => libc::S_IFIFO,
            NodeKind::CharDevice => libc::S_IFCHR,
            NodeKind::BlockDevice => libc::S_IFBLK,
            NodeKind::Socket => libc::S_IFSOCK,
        }
    }

    pub fn from_mode(mode: u32) -> Option<NodeKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => NodeKind::File,
            libc::S_IFDIR => NodeKind::Dir,
            libc::S_IFLNK => NodeKind::Symlink,
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFCHR => NodeKind::CharDevice,
            libc::S_IFBLK => NodeKind::BlockDevice,
            libc::S_IFSOCK => NodeKind::Socket,
            _ => return None,
        })
    }

    /// The type letter `ls -l` shows.
    pub fn letter(self) -> char {
        match self {
            NodeKind::File => '-',
            NodeKind::Dir => 'd',
            NodeKind::Symlink => 'l',
            NodeKind::Fifo => 'p',
            NodeKind::CharDevice => 'c',
            NodeKind::BlockDevice => 'b',
            NodeKind::Socket => 's',
        }
    }
}

/// A point in time: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// One directory entry with all its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Raw bytes of the name; never contains `/` or NUL.
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Owner and group names, empty when unknown.
    pub user: String,
    pub group: String,
    pub mtime: Time,
    pub ctime: Time,
    /// Size in bytes (files: content length; symlinks: target length).
    pub size: u64,
    /// Device and inode on the source: with `nlink > 1` they identify hard links.
    pub dev: u64,
    pub inode: u64,
    pub nlink: u64,
    /// Device number of character and block devices.
    pub rdev: u64,
    /// Target of a symlink.
    pub target: Vec<u8>,
    pub xattrs: Vec<Xattr>,
    /// Content chunks of a file, in order.
    pub content: Vec<BlobId>,
    /// The tree of a directory.
    pub subtree: Option<BlobId>,
    /// 512-byte blocks allocated on the source (`st_blocks`), so mounts report sparse files
    /// as sparse.
    pub blocks: u64,
}

impl Node {
    /// A node with this name and kind and zeroed metadata.
    pub fn new(name: Vec<u8>, kind: NodeKind) -> Node {
        Node {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            user: String::new(),
            group: String::new(),
            mtime: Time::default(),
            ctime: Time::default(),
            size: 0,
            dev: 0,
            inode: 0,
            nlink: 1,
            rdev: 0,
            target: Vec::new(),
            xattrs: Vec::new(),
            content: Vec::new(),
            subtree: None,
            blocks: 0,
        }
    }

    /// `ls -l` style mode string, e.g. `-rw-r--r--`.
    pub fn mode_string(&self) -> String {
        let m = self.mode;
        let mut s = String::with_capacity(10);
        s.push(self.kind.letter());
        let bit = |b: u32, c: char| if m & b != 0 { c } else { '-' };
        s.push(bit(0o400, 'r'));
        s.push(bit(0o200, 'w'));
        s.push(match (m & 0o100 != 0, m & 0o4000 != 0) {
            (true, true) => 's',
            (false, true) => 'S',
            (true, false) => 'x',
            _ => '-',
        });
        s.push(bit(0o040, 'r'));
        s.push(bit(0o020, 'w'));
        s.push(match (m & 0o010 != 0, m & 0o2000 != 0) {
            (true, true) => 's',
            (false, true) => 'S',
            (true, false) => 'x',
            _ => '-',
        });
        s.push(bit(0o004, 'r'));
        s.push(bit(0o002, 'w'));
        s.push(match (m & 0o001 != 0, m & 0o1000 != 0) {
            (true, true) => 't',
            (false, true) => 'T',
            (true, false) => 'x',
            _ => '-',
        });
        s
    }

    /// Is this one of several hard links to the same file?
    pub fn is_hardlink(&self) -> bool {
        self.kind == NodeKind::File && self.nlink > 1
    }
}

/// Longest entry name accepted from a tree or a source (Linux's `NAME_MAX`).
pub const MAX_NAME: usize = 255;

/// Why a name from a tree or a source cannot be used as a directory entry, or `None` when it
/// can. This is the one place that decides: every reader (backup walkers, restore, mount, `ls`,
/// `sync`, `check`) goes through it, directly or through [`Tree::sanitize`], so a name is never
/// joined onto a path before it has passed.
pub fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name == b"." || name == b".." {
        Some("name is `.` or `..`")
    } else if name.contains(&b'/') {
        Some("name contains `/`")
    } else if name.contains(&0) {
        Some("name contains a NUL byte")
    } else if name.len() > MAX_NAME {
        Some("name is longer than 255 bytes")
    } else {
        None
    }
}

/// For each name of a listing or a tree, in the order given: why an entry of that name must not
/// be acted on ([`name_problem`], or a second entry of a name already accepted: a directory
/// `d`, then a symlink `d` to anywhere), or `None`. The first entry of a name is the one kept.
/// Used by [`Tree::sanitize`] and by the backup's walk of a source's listings.
pub fn screen<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> Vec<Option<&'static str>> {
    let mut seen = std::collections::HashSet::new();
    names
        .into_iter()
        .map(|n| {
            name_problem(n)
                .or_else(|| (!seen.insert(n)).then_some("a second entry with the same name"))
        })
        .collect()
}

/// An entry left out of a tree by [`Tree::sanitize`]: its raw name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub name: Vec<u8>,
    pub why: &'static str,
}

/// The entries of one directory, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
    /// Entries [`Tree::sanitize`] left out (never stored: trees are written sanitized).
    #[serde(skip)]
    pub rejected: Vec<Rejected>,
}

impl Tree {
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }

    pub fn sort(&mut self) {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    }

    /// Make the tree safe to act on: entries with a name [`name_problem`] refuses, and every
    /// entry after the first of a name that occurs twice (a directory `d`, then a symlink `d`
    /// pointing elsewhere, would otherwise let a restore build `d/…` and then write through
    /// the link), are moved to [`Tree::rejected`]; the rest is sorted, so lookups by name
    /// work whatever order the tree came in. Returns whether anything was rejected.
    pub fn sanitize(&mut self) -> bool {
        let sorted = self.nodes.windows(2).all(|w| w[0].name < w[1].name);
        if sorted && self.nodes.iter().all(|n| name_problem(&n.name).is_none()) {
            return false;
        }
        let verdicts = screen(self.nodes.iter().map(|n| &n.name[..]));
        let mut kept: Vec<Node> = Vec::with_capacity(self.nodes.len());
        for (n, why) in std::mem::take(&mut self.nodes).into_iter().zip(verdicts) {
            match why {
                Some(why) => self.rejected.push(Rejected { name: n.name, why }),
                None => kept.push(n),
            }
        }
        // A stable sort: equal names cannot remain, but the order is the tree's.
        kept.sort_by(|a, b| a.name.cmp(&b.name));
        self.nodes = kept;
        !self.rejected.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("serialising a tree cannot fail")
    }

    pub fn decode(b: &[u8]) -> Option<Tree> {
        postcard::from_bytes(b).ok()
    }
}

/// Split an absolute or relative path into its non-empty components.
pub fn components(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect()
}

/// Join path components with `/`.
pub fn join(base: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = base.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings() {
        let mut n = Node::new(b"a".to_vec(), NodeKind::File);
        n.mode = 0o644;
        assert_eq!(n.mode_string(), "-rw-r--r--");
        n.mode = 0o4755;
        assert_eq!(n.mode_string(), "-rwsr-xr-x");
        n.kind = NodeKind::Dir;
        n.mode = 0o1777;
        assert_eq!(n.mode_string(), "drwxrwxrwt");
    }

    #[test]
    fn tree_roundtrip_with_hostile_names() {
        let mut t = Tree::default();
        t.nodes
            .push(Node::new(vec![0xff, b'\n', 0x80], NodeKind::File));
        t.nodes.push(Node::new(vec![b'x'; 255], NodeKind::Dir));
        t.sort();
        let back = Tree::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        assert!(back.find(&[0xff, b'\n', 0x80]).is_some());
    }

    #[test]
    fn names_that_could_leave_a_directory_are_refused() {
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"/etc",
            b"a/b",
            b"../x",
            b"a\0b",
            &[b'x'; 256],
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
        for good in [&b"..."[..], b".a", b"a..b", b"\xff\n\x1b[31m", &[b'x'; 255]] {
            assert_eq!(name_problem(good), None, "{good:?}");
        }
    }

    #[test]
    fn sanitize_drops_bad_names_and_later_duplicates_and_sorts() {
        let mut dir = Node::new(b"d".to_vec(), NodeKind::Dir);
        dir.mode = 0o755;
        let mut link = Node::new(b"d".to_vec(), NodeKind::Symlink);
        link.target = b"/etc".to_vec();
        let mut t = Tree {
            nodes: vec![
                Node::new(b"z".to_vec(), NodeKind::File),
                dir.clone(),
                Node::new(b"/abs".to_vec(), NodeKind::File),
                link,
                Node::new(b"..".to_vec(), NodeKind::Dir),
            ],
            ..Tree::default()
        };
        assert!(t.sanitize());
        let names: Vec<&[u8]> = t.nodes.iter().map(|n| &n.name[..]).collect();
        assert_eq!(names, vec![&b"d"[..], b"z"]);
        assert_eq!(t.nodes[0], dir, "the first entry of a name is the one kept");
        let mut why: Vec<_> = t.rejected.iter().map(|r| (&r.name[..], r.why)).collect();
        why.sort();
        assert_eq!(
            why,
            vec![
                (&b".."[..], "name is `.` or `..`"),
                (b"/abs", "name contains `/`"),
                (b"d", "a second entry with the same name"),
            ]
        );
        let mut clean = t.clone();
        clean.rejected.clear();
        assert!(!clean.sanitize());
    }

    #[test]
    fn path_components() {
        assert_eq!(
            components(b"/var//www/./x"),
            vec![&b"var"[..], b"www", b"x"]
        );
        assert!(components(b"/").is_empty());
        assert_eq!(join(b"/", b"a"), b"/a");
        assert_eq!(join(b"/a", b"b"), b"/a/b");
    }
}
