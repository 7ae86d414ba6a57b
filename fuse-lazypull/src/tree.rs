//! The merged image: layers applied bottom first, as overlayfs would show them.
//!
//! - A whiteout `.wh.NAME` deletes NAME (and everything under it) of the layers below.
//! - An opaque marker hides everything the layers below put in its directory; the marker is
//!   applied before the rest of its layer, so that layer's own entries there stay.
//! - A later entry replaces an earlier one at its path: a file over a directory drops the
//!   directory's subtree, a directory over a file replaces the file, a directory over a directory
//!   only takes the new attributes and keeps the contents.
//! - Parent directories implied by deep entries are created (0755, root, mtime 0), replacing a
//!   non-directory in the way.
//! - A hard link names the same node as its target, which must exist and not be a directory.
//! - An entry below a symlink (of any layer), or below a non-directory its own layer put there,
//!   is refused: unpacking for overlayfs refuses both (it never follows a symlink, and cannot
//!   make a directory through a file), and other tools would follow the symlink, so such an
//!   image has no one meaning. The mount fails at once instead of at the handoff.
//!
//! Inode numbers are dense: after the build, every node reachable from the root gets one,
//! [`ROOT`] first, so `1..=len()` are exactly the nodes.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::layer::{EntryKind, FileData, LayerError, LayerIndex, Limits};

/// FUSE inode number; 1 is the root.
pub type Ino = u64;
pub const ROOT: Ino = 1;

pub struct Tree {
    /// Indexed by inode number; slot 0 is unused.
    nodes: Vec<Node>,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits with setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// Bytes of a regular file, length of a symlink's target, 0 otherwise.
    pub size: u64,
    pub nlink: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Clone, Debug)]
pub enum NodeKind {
    Dir {
        parent: Ino,
        children: BTreeMap<OsString, Ino>,
    },
    /// `layer` indexes the slice given to [`Tree::build`].
    File {
        layer: usize,
        data: FileData,
    },
    Symlink(PathBuf),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

impl Tree {
    /// Applies `layers` bottom first: whiteouts delete, opaque markers hide lower contents, hard
    /// links share one node. Within the default limits.
    pub fn build(layers: &[LayerIndex]) -> Result<Tree, LayerError> {
        Tree::build_within(layers, &Limits::DEFAULT)
    }

    /// [`Tree::build`] with at most [`Limits::max_image_entries`] nodes, implied directories
    /// included (nodes replaced by later layers count until the end of the build).
    pub fn build_within(layers: &[LayerIndex], limits: &Limits) -> Result<Tree, LayerError> {
        let mut b = Builder {
            nodes: vec![implied_dir(0), implied_dir(ROOT)],
            this_layer: HashSet::new(),
            max_nodes: limits.max_image_entries,
        };
        for (layer, index) in layers.iter().enumerate() {
            b.this_layer.clear();
            for e in index.entries.iter().filter(|e| matches!(e.kind, EntryKind::Opaque)) {
                b.check_parents(&e.path)?;
                let dir = b.make_dir_path(&e.path)?;
                if let NodeKind::Dir { children, .. } = &mut b.nodes[dir as usize].kind {
                    children.clear();
                }
            }
            for e in &index.entries {
                b.apply(layer, e)?;
            }
        }
        Ok(b.compact())
    }

    pub fn node(&self, ino: Ino) -> Option<&Node> {
        if ino == 0 {
            return None;
        }
        self.nodes.get(ino as usize)
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        match &self.node(parent)?.kind {
            NodeKind::Dir { children, .. } => children.get(name).copied(),
            _ => None,
        }
    }

    /// Every node, for walking the tree: inode numbers are `1..=len()`.
    pub fn len(&self) -> usize {
        self.nodes.len() - 1
    }

    /// Never true: the root is always there.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The node at a relative path (empty is the root).
    pub fn resolve(&self, path: &std::path::Path) -> Option<Ino> {
        let mut ino = ROOT;
        for c in path.components() {
            ino = self.lookup(ino, c.as_os_str())?;
        }
        Some(ino)
    }
}

fn implied_dir(parent: Ino) -> Node {
    Node {
        kind: NodeKind::Dir { parent, children: BTreeMap::new() },
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        nlink: 0,
        xattrs: Vec::new(),
    }
}

/// The tree while layers are applied: nodes are never freed, names are moved around.
struct Builder {
    nodes: Vec<Node>,
    /// Paths where the layer being applied put a non-directory (whiteouts included).
    this_layer: HashSet<PathBuf>,
    max_nodes: u64,
}

impl Builder {
    fn children(&mut self, dir: Ino) -> &mut BTreeMap<OsString, Ino> {
        match &mut self.nodes[dir as usize].kind {
            NodeKind::Dir { children, .. } => children,
            // Only called with directories.
            _ => unreachable!("children of a non-directory"),
        }
    }

    /// Adds a node to directory `parent` under `name`; refused past the node limit.
    fn add(&mut self, parent: Ino, name: OsString, node: Node) -> Result<Ino, LayerError> {
        // Slot 0 is not a node.
        if self.nodes.len() as u64 > self.max_nodes {
            return Err(LayerError::Malicious {
                path: Path::new(&name).display().to_string(),
                why: format!("more than {} nodes in the image", self.max_nodes),
            });
        }
        let ino = self.nodes.len() as Ino;
        self.nodes.push(node);
        self.children(parent).insert(name, ino);
        Ok(ino)
    }

    fn is_dir(&self, ino: Ino) -> bool {
        matches!(self.nodes[ino as usize].kind, NodeKind::Dir { .. })
    }

    /// The directory at `path`, creating implied directories (replacing non-directories).
    fn make_dir_path(&mut self, path: &std::path::Path) -> Result<Ino, LayerError> {
        let mut dir = ROOT;
        for c in path.components() {
            let name = c.as_os_str().to_os_string();
            dir = match self.children(dir).get(&name).copied() {
                Some(ino) if self.is_dir(ino) => ino,
                _ => self.add(dir, name, implied_dir(dir))?,
            };
        }
        Ok(dir)
    }

    /// Refuses `path` if a parent of it is a symlink, or a non-directory (or a whiteout) this
    /// layer put there; a lower layer's non-directory is replaced by a directory, as overlayfs
    /// shows it.
    fn check_parents(&self, path: &Path) -> Result<(), LayerError> {
        let refuse = |at: &Path, what: &str| LayerError::Malicious {
            path: path.display().to_string(),
            why: format!("its parent {} is {what}", at.display()),
        };
        let mut ino = ROOT;
        let mut at = PathBuf::new();
        for c in path.parent().unwrap_or(Path::new("")).components() {
            at.push(c);
            let NodeKind::Dir { children, .. } = &self.nodes[ino as usize].kind else { return Ok(()) };
            let Some(&child) = children.get(c.as_os_str()) else {
                if self.this_layer.contains(&at) {
                    return Err(refuse(&at, "whited out in the same layer"));
                }
                return Ok(());
            };
            match &self.nodes[child as usize].kind {
                NodeKind::Dir { .. } => ino = child,
                NodeKind::Symlink(_) => return Err(refuse(&at, "a symlink")),
                _ if self.this_layer.contains(&at) => return Err(refuse(&at, "not a directory")),
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// The node at `path`, if every component exists.
    fn find(&self, path: &std::path::Path) -> Option<Ino> {
        let mut ino = ROOT;
        for c in path.components() {
            ino = match &self.nodes[ino as usize].kind {
                NodeKind::Dir { children, .. } => *children.get(c.as_os_str())?,
                _ => return None,
            };
        }
        Some(ino)
    }

    fn apply(&mut self, layer: usize, e: &crate::layer::Entry) -> Result<(), LayerError> {
        let refuse = |why: String| LayerError::Malicious { path: e.path.display().to_string(), why };
        let node = |kind: NodeKind, size: u64| Node {
            kind,
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size,
            nlink: 0,
            xattrs: e.xattrs.clone(),
        };
        let Some(name) = e.path.file_name().map(OsStr::to_os_string) else {
            // The root itself: a directory entry sets its attributes.
            if let EntryKind::Dir = e.kind {
                let root = &mut self.nodes[ROOT as usize];
                root.mode = e.mode & 0o7777;
                root.uid = e.uid;
                root.gid = e.gid;
                root.mtime = e.mtime;
                root.xattrs = e.xattrs.clone();
            }
            return Ok(());
        };
        let parent_path = e.path.parent().unwrap_or(std::path::Path::new(""));
        match e.kind {
            // Checked in the first pass over the layer.
            EntryKind::Opaque => return Ok(()),
            EntryKind::Dir => {
                self.check_parents(&e.path)?;
                self.this_layer.remove(&e.path);
            }
            _ => {
                self.check_parents(&e.path)?;
                self.this_layer.insert(e.path.clone());
            }
        }
        let new = match &e.kind {
            EntryKind::Opaque => return Ok(()),
            EntryKind::Whiteout => {
                if let Some(parent) = self.find(parent_path).filter(|&p| self.is_dir(p)) {
                    self.children(parent).remove(&name);
                }
                return Ok(());
            }
            EntryKind::HardLink(target) => {
                let t =
                    self.find(target).ok_or_else(|| refuse(format!("hard link to missing {}", target.display())))?;
                if self.is_dir(t) {
                    return Err(refuse(format!("hard link to directory {}", target.display())));
                }
                let parent = self.make_dir_path(parent_path)?;
                self.children(parent).insert(name, t);
                return Ok(());
            }
            EntryKind::Dir => {
                let parent = self.make_dir_path(parent_path)?;
                if let Some(existing) = self.children(parent).get(&name).copied().filter(|&i| self.is_dir(i)) {
                    let children = std::mem::take(self.children(existing));
                    self.nodes[existing as usize] = node(NodeKind::Dir { parent, children }, 0);
                    return Ok(());
                }
                node(NodeKind::Dir { parent, children: BTreeMap::new() }, 0)
            }
            EntryKind::File(data) => node(NodeKind::File { layer, data: data.clone() }, data.size()),
            EntryKind::Symlink(t) => node(NodeKind::Symlink(t.clone()), t.as_os_str().len() as u64),
            EntryKind::CharDev { major, minor } => node(NodeKind::CharDev { major: *major, minor: *minor }, 0),
            EntryKind::BlockDev { major, minor } => node(NodeKind::BlockDev { major: *major, minor: *minor }, 0),
            EntryKind::Fifo => node(NodeKind::Fifo, 0),
        };
        let parent = self.make_dir_path(parent_path)?;
        self.add(parent, name, new)?;
        Ok(())
    }

    /// Renumbers the nodes reachable from the root densely (root first, breadth first), sets
    /// each directory's parent and every node's link count.
    fn compact(self) -> Tree {
        let mut old = self.nodes;
        let mut new_ino: Vec<Ino> = vec![0; old.len()];
        let mut order: Vec<Ino> = vec![ROOT];
        new_ino[ROOT as usize] = ROOT;
        let mut links: Vec<u32> = vec![0; old.len()];
        let mut i = 0;
        while i < order.len() {
            let at = order[i];
            if let NodeKind::Dir { children, .. } = &old[at as usize].kind {
                for &child in children.values() {
                    links[child as usize] += 1;
                    if new_ino[child as usize] == 0 {
                        order.push(child);
                        new_ino[child as usize] = order.len() as Ino;
                    }
                }
            }
            i += 1;
        }
        let mut nodes = Vec::with_capacity(order.len() + 1);
        nodes.push(implied_dir(0));
        for &o in &order {
            let mut n = std::mem::replace(&mut old[o as usize], implied_dir(0));
            n.nlink = links[o as usize].max(1);
            if let NodeKind::Dir { parent, children } = &mut n.kind {
                for c in children.values_mut() {
                    *c = new_ino[*c as usize];
                }
                *parent = if o == ROOT { ROOT } else { new_ino[*parent as usize] };
            }
            nodes.push(n);
        }
        // A directory's link count: its name in the parent, its `.`, and each subdirectory's `..`.
        for i in 1..nodes.len() {
            if let NodeKind::Dir { children, .. } = &nodes[i].kind {
                let subdirs =
                    children.values().filter(|&&c| matches!(nodes[c as usize].kind, NodeKind::Dir { .. })).count();
                nodes[i].nlink = 2 + subdirs as u32;
            }
        }
        Tree { nodes }
    }
}
