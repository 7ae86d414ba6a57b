//! The merged tree against a simple model: a map path -> entry, layers applied in order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fuse_lazypull::layer::{LayerIndex, Limits};
use fuse_lazypull::tree::{Ino, NodeKind, Tree, ROOT};
use layer_support::{descriptor, gzip, MemSource, Tar, E};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    File(String, u32, usize),
    Dir(String, u32),
    Symlink(String, String),
    Whiteout(String),
    Opaque(String),
    HardLink(String, String),
}

fn layer(ops: &[Op]) -> Result<LayerIndex, String> {
    let mut tar = Tar::default();
    let contents: Vec<Vec<u8>> = ops
        .iter()
        .map(|op| match op {
            Op::File(p, _, len) => p.as_bytes().iter().cycle().take(*len).copied().collect(),
            _ => Vec::new(),
        })
        .collect();
    for (op, data) in ops.iter().zip(&contents) {
        let wh_name;
        let e = match op {
            Op::File(p, mode, _) => E { mode: *mode, ..E::file(p, data) },
            Op::Dir(p, mode) => E { mode: *mode, ..E::dir(p) },
            Op::Symlink(p, t) => E::symlink(p, t),
            Op::Whiteout(p) => {
                let path = Path::new(p);
                let parent = path.parent().unwrap_or(Path::new(""));
                wh_name = parent.join(format!(".wh.{}", path.file_name().unwrap().to_str().unwrap()));
                E::file(wh_name.to_str().unwrap(), b"")
            }
            Op::Opaque(p) => {
                wh_name = Path::new(p).join(".wh..wh..opq");
                E::file(wh_name.to_str().unwrap(), b"")
            }
            Op::HardLink(p, t) => E::hardlink(p, t),
        };
        tar.add(e);
    }
    let blob = gzip(&tar.finish());
    let source = MemSource::new(blob.clone());
    LayerIndex::build(&descriptor(&blob, &[]), &source, &Limits::DEFAULT).map_err(|e| e.to_string())
}

#[derive(Clone, Debug, PartialEq)]
enum M {
    Dir(u32),
    File { id: usize, mode: u32, size: u64 },
    Symlink(String),
}

#[derive(Default)]
struct Model {
    map: BTreeMap<PathBuf, M>,
    next_id: usize,
}

impl Model {
    fn remove_under(&mut self, p: &Path, including: bool) {
        self.map.retain(|k, _| !(k.starts_with(p) && (including || k != p)));
    }
    fn ensure_dirs(&mut self, p: &Path) {
        let mut at = PathBuf::new();
        for c in p.components() {
            at.push(c);
            if !matches!(self.map.get(&at), Some(M::Dir(_))) {
                self.remove_under(&at, true);
                self.map.insert(at.clone(), M::Dir(0o755));
            }
        }
    }
    /// Refuses `p` below a symlink, or below a non-directory or whiteout of this layer.
    fn check_parents(&self, p: &Path, this_layer: &BTreeSet<PathBuf>) -> Result<(), String> {
        let mut at = PathBuf::new();
        for c in p.parent().unwrap_or(Path::new("")).components() {
            at.push(c);
            match self.map.get(&at) {
                Some(M::Dir(_)) => {}
                Some(M::Symlink(_)) => return Err("symlinked parent".into()),
                Some(_) if this_layer.contains(&at) => return Err("parent not a directory".into()),
                None if this_layer.contains(&at) => return Err("parent whited out".into()),
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), String> {
        let mut this_layer = BTreeSet::new();
        for op in ops {
            if let Op::Opaque(p) = op {
                self.check_parents(Path::new(p), &this_layer)?;
                self.ensure_dirs(Path::new(p));
                self.remove_under(Path::new(p), false);
            }
        }
        for op in ops {
            let path = |p: &String| PathBuf::from(p);
            let parent = |p: &String| Path::new(p).parent().unwrap_or(Path::new("")).to_path_buf();
            match op {
                Op::Opaque(_) => {}
                Op::Dir(p, _) => {
                    self.check_parents(Path::new(p), &this_layer)?;
                    this_layer.remove(Path::new(p));
                }
                Op::File(p, ..) | Op::Symlink(p, _) | Op::Whiteout(p) | Op::HardLink(p, _) => {
                    self.check_parents(Path::new(p), &this_layer)?;
                    this_layer.insert(path(p));
                }
            }
            match op {
                Op::Opaque(_) => {}
                Op::Whiteout(p) => {
                    let par = parent(p);
                    if par.as_os_str().is_empty() || matches!(self.map.get(&par), Some(M::Dir(_))) {
                        self.remove_under(&path(p), true);
                    }
                }
                Op::HardLink(p, t) => {
                    let target = self.map.get(Path::new(t)).cloned();
                    match target {
                        Some(m @ M::File { .. }) | Some(m @ M::Symlink(_)) => {
                            self.ensure_dirs(&parent(p));
                            self.remove_under(&path(p), true);
                            self.map.insert(path(p), m);
                        }
                        _ => return Err("bad hard link".into()),
                    }
                }
                Op::Dir(p, mode) => {
                    self.ensure_dirs(&parent(p));
                    if matches!(self.map.get(&path(p)), Some(M::Dir(_))) {
                        self.map.insert(path(p), M::Dir(*mode));
                    } else {
                        self.remove_under(&path(p), true);
                        self.map.insert(path(p), M::Dir(*mode));
                    }
                }
                Op::File(p, mode, len) => {
                    self.ensure_dirs(&parent(p));
                    self.remove_under(&path(p), true);
                    self.next_id += 1;
                    self.map.insert(path(p), M::File { id: self.next_id, mode: *mode, size: *len as u64 });
                }
                Op::Symlink(p, t) => {
                    self.ensure_dirs(&parent(p));
                    self.remove_under(&path(p), true);
                    self.map.insert(path(p), M::Symlink(t.clone()));
                }
            }
        }
        Ok(())
    }
}

/// The tree flattened: path -> (what, inode).
fn flatten(tree: &Tree) -> BTreeMap<PathBuf, (M, Ino)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(PathBuf::new(), ROOT)];
    while let Some((path, ino)) = stack.pop() {
        let node = tree.node(ino).unwrap();
        if let NodeKind::Dir { children, .. } = &node.kind {
            for (name, &child) in children {
                let p = path.join(name);
                let c = tree.node(child).unwrap();
                let m = match &c.kind {
                    NodeKind::Dir { parent, .. } => {
                        assert_eq!(*parent, ino, "parent of {}", p.display());
                        stack.push((p.clone(), child));
                        M::Dir(c.mode)
                    }
                    NodeKind::File { .. } => M::File { id: 0, mode: c.mode, size: c.size },
                    NodeKind::Symlink(t) => M::Symlink(t.to_str().unwrap().to_string()),
                    other => panic!("unexpected {other:?}"),
                };
                out.insert(p, (m, child));
            }
        }
    }
    out
}

fn check(layers: &[Vec<Op>]) -> Result<(), TestCaseError> {
    let mut indexes = Vec::new();
    for ops in layers {
        match layer(ops) {
            Ok(i) => indexes.push(i),
            // Hard links to later entries of the same layer are refused by the reader.
            Err(_) => return Err(TestCaseError::reject("layer refused")),
        }
    }
    let mut model = Model::default();
    let mut model_ok = Ok(());
    for ops in layers {
        model_ok = model.apply(ops);
        if model_ok.is_err() {
            break;
        }
    }
    let tree = Tree::build(&indexes);
    prop_assert_eq!(model_ok.is_ok(), tree.is_ok(), "model {:?}", model_ok);
    let Ok(tree) = tree else { return Ok(()) };
    let flat = flatten(&tree);
    prop_assert_eq!(flat.keys().collect::<Vec<_>>(), model.map.keys().collect::<Vec<_>>());
    prop_assert_eq!(tree.len(), 1 + flat.values().map(|(_, i)| *i).collect::<std::collections::BTreeSet<_>>().len());
    for (p, m) in &model.map {
        let (got, ino) = &flat[p];
        match (m, got) {
            (M::File { mode, size, .. }, M::File { mode: gm, size: gs, .. }) => {
                prop_assert_eq!((mode, size), (gm, gs), "{}", p.display());
            }
            _ => prop_assert_eq!(m, got, "{}", p.display()),
        }
        // Same model identity <=> same inode; link counts agree.
        for (q, n) in &model.map {
            if let (M::File { id: a, .. }, M::File { id: b, .. }) = (m, n) {
                prop_assert_eq!(a == b, *ino == flat[q].1, "{} vs {}", p.display(), q.display());
            }
        }
        if let M::File { id, .. } = m {
            let names = model.map.values().filter(|x| matches!(x, M::File { id: i, .. } if i == id)).count();
            prop_assert_eq!(tree.node(*ino).unwrap().nlink as usize, names);
        }
    }
    Ok(())
}

fn path_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..4).prop_map(|v| v.join("/"))
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![Just(0o600u32), Just(0o644), Just(0o755)];
    prop_oneof![
        3 => (path_strategy(), mode.clone(), 0usize..50).prop_map(|(p, m, l)| Op::File(p, m, l)),
        2 => (path_strategy(), mode).prop_map(|(p, m)| Op::Dir(p, m)),
        1 => (path_strategy(), path_strategy()).prop_map(|(p, t)| Op::Symlink(p, t)),
        2 => path_strategy().prop_map(Op::Whiteout),
        1 => path_strategy().prop_map(Op::Opaque),
        1 => (path_strategy(), path_strategy()).prop_map(|(p, t)| Op::HardLink(p, t)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, max_global_rejects: 2000, ..ProptestConfig::default() })]
    #[test]
    fn random_layer_stacks_match_the_model(layers in proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..10), 1..4)) {
        check(&layers)?;
    }
}

fn f(p: &str) -> Op {
    Op::File(p.into(), 0o644, 3)
}

#[test]
fn whiteouts_opaque_dirs_and_hard_links() {
    let l1 = layer(&[Op::Dir("etc".into(), 0o755), f("etc/a"), f("etc/b"), Op::Dir("usr".into(), 0o755), f("usr/x")])
        .unwrap();
    let l2 = layer(&[
        Op::Whiteout("etc/a".into()),
        Op::Opaque("usr".into()),
        f("usr/y"),
        Op::HardLink("usr/z".into(), "etc/b".into()),
    ])
    .unwrap();
    let tree = Tree::build(&[l1, l2]).unwrap();
    assert!(tree.resolve(Path::new("etc/a")).is_none());
    assert!(tree.resolve(Path::new("usr/x")).is_none());
    assert!(tree.resolve(Path::new("usr/y")).is_some());
    let b = tree.resolve(Path::new("etc/b")).unwrap();
    assert_eq!(tree.resolve(Path::new("usr/z")), Some(b));
    assert_eq!(tree.node(b).unwrap().nlink, 2);
    assert_eq!(tree.node(ROOT).unwrap().nlink, 4);
}

#[test]
fn a_file_replaces_a_directory_and_back() {
    let l1 = layer(&[Op::Dir("d".into(), 0o755), f("d/inner"), f("g")]).unwrap();
    let l2 = layer(&[f("d"), f("g/deep/file")]).unwrap();
    let tree = Tree::build(&[l1, l2]).unwrap();
    let d = tree.resolve(Path::new("d")).unwrap();
    assert!(matches!(tree.node(d).unwrap().kind, NodeKind::File { layer: 1, .. }));
    let g = tree.resolve(Path::new("g")).unwrap();
    assert!(matches!(tree.node(g).unwrap().kind, NodeKind::Dir { .. }));
    assert!(tree.resolve(Path::new("g/deep/file")).is_some());
}

/// `evil -> /x` then `evil/f`: unpacking would refuse it (it never follows a symlink), so the
/// tree refuses it, in the same layer or a later one; a file in the way is refused in its own
/// layer and replaced by a directory in a later one, as overlayfs shows it.
#[test]
fn entries_below_a_symlink_are_refused() {
    let evil = || Op::Symlink("evil".into(), "/x".into());
    let err = Tree::build(&[layer(&[evil(), f("evil/f")]).unwrap()]).err().expect("refused").to_string();
    assert!(err.contains("evil/f") && err.contains("parent evil is a symlink"), "{err}");
    let lower = layer(&[evil()]).unwrap();
    assert!(Tree::build(&[lower.clone(), layer(&[f("evil/f")]).unwrap()]).is_err());
    assert!(Tree::build(&[lower, layer(&[Op::Whiteout("evil/f".into())]).unwrap()]).is_err());
    let err = Tree::build(&[layer(&[f("a"), f("a/b")]).unwrap()]).err().expect("refused").to_string();
    assert!(err.contains("parent a is not a directory"), "{err}");
    let tree = Tree::build(&[layer(&[f("a")]).unwrap(), layer(&[f("a/b")]).unwrap()]).unwrap();
    assert!(tree.resolve(Path::new("a/b")).is_some());
}

#[test]
fn a_hard_link_to_a_missing_target_is_refused() {
    let l1 = layer(&[Op::HardLink("x".into(), "nowhere".into())]).unwrap();
    assert!(Tree::build(&[l1]).is_err());
}

/// Deep paths imply a directory node per component: the merged tree stops at the node limit,
/// implied directories included; 1000 entries 255 deep stay within the default.
#[test]
fn the_tree_stops_at_its_node_limit() {
    let deep = |i: usize| format!("top{i}/{}f", "d/".repeat(254));
    let ops: Vec<Op> = (0..10).map(|i| f(&deep(i))).collect();
    let small = Limits { max_image_entries: 1000, ..Limits::DEFAULT };
    let err = Tree::build_within(&[layer(&ops).unwrap()], &small).err().expect("refused").to_string();
    assert!(err.contains("more than 1000 nodes in the image"), "{err}");
    let ops: Vec<Op> = (0..1000).map(|i| f(&deep(i))).collect();
    let tree = Tree::build(&[layer(&ops).unwrap()]).unwrap();
    assert_eq!(tree.len(), 1 + 1000 * 256);
}
