//! An image's file tree, in memory: what the layers add up to.
//!
//! Layers are applied to this model, never to the host's file system, so
//! no entry of a layer can touch anything outside the image. Paths are
//! resolved beneath the root the way a container runtime resolves them:
//! symbolic links in parent components are followed, but within the tree
//! (an absolute target starts again at the image root, `..` stops there),
//! and the last component is never followed.
//!
//! Nodes are numbered in creation order, so the first layers' nodes come
//! first. Nodes that later layers delete or replace are kept (dead) so that
//! every node keeps its number and its place on the disk whatever the
//! layers above do: the ext4 builder lays the disk out in this order.
//! A directory keeps removed entries as tombstones for the same reason.

use std::collections::{BTreeMap, HashMap};

pub type NodeId = u32;
pub const ROOT: NodeId = 0;
/// Symbolic links followed while resolving one path (Linux's limit).
const MAX_SYMLINKS: u32 = 40;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits with setuid, setgid and sticky (the low 12 bits).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    /// Extended attributes by full name (`security.capability`, ...).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Meta {
    pub fn dir_default() -> Meta {
        Meta {
            mode: 0o755,
            ..Meta::default()
        }
    }
}

#[derive(Debug)]
pub enum Kind {
    Dir(Dir),
    /// Bytes `offset..offset + len` of the content spool.
    File {
        offset: u64,
        len: u64,
    },
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Default)]
pub struct Dir {
    /// In insertion order; removed entries stay as tombstones.
    pub entries: Vec<DirEntry>,
    index: HashMap<Vec<u8>, usize>,
    pub parent: NodeId,
    /// Entries that existed when the layer that created this directory
    /// ended (a prefix of `entries`).
    pub first_layer_len: usize,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub node: NodeId,
    /// The layer that added the entry.
    pub layer: u16,
    /// The layer that removed it, if any.
    pub removed_in: Option<u16>,
}

impl DirEntry {
    pub fn live(&self) -> bool {
        self.removed_in.is_none()
    }
}

#[derive(Debug)]
pub struct Node {
    pub kind: Kind,
    pub meta: Meta,
    /// The layer that created the node.
    pub layer: u16,
    /// Directory entries naming this node.
    pub links: u32,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }
}

enum Walk {
    Found(NodeId),
    Missing {
        dir: NodeId,
        name: Vec<u8>,
        rest: Vec<Vec<u8>>,
    },
}

/// The tree: `nodes[0]` is the root directory.
#[derive(Debug)]
pub struct Tree {
    pub nodes: Vec<Node>,
    /// Directories created in the layer being applied.
    new_dirs: Vec<NodeId>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node {
                kind: Kind::Dir(Dir::default()),
                meta: Meta::dir_default(),
                layer: 0,
                links: 1,
            }],
            new_dirs: vec![ROOT],
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    pub fn dir(&self, id: NodeId) -> Option<&Dir> {
        match &self.node(id).kind {
            Kind::Dir(d) => Some(d),
            _ => None,
        }
    }

    fn dir_mut(&mut self, id: NodeId) -> &mut Dir {
        match &mut self.node_mut(id).kind {
            Kind::Dir(d) => d,
            _ => unreachable!("callers check that {id} is a directory"),
        }
    }

    pub fn add(&mut self, kind: Kind, meta: Meta, layer: u16) -> NodeId {
        let id = NodeId::try_from(self.nodes.len()).expect("entry count is capped far below u32");
        if matches!(kind, Kind::Dir(_)) {
            self.new_dirs.push(id);
        }
        self.nodes.push(Node {
            kind,
            meta,
            layer,
            links: 0,
        });
        id
    }

    /// The live entry `name` of directory `dir`.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<&DirEntry> {
        let d = self.dir(dir)?;
        d.index.get(name).map(|&i| &d.entries[i])
    }

    /// Adds entry `name` → `node` to `dir` (no live entry of that name may exist).
    pub fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId, layer: u16) {
        if let Kind::Dir(d) = &mut self.node_mut(node).kind {
            d.parent = dir;
        }
        self.node_mut(node).links += 1;
        let d = self.dir_mut(dir);
        debug_assert!(!d.index.contains_key(name));
        d.index.insert(name.to_vec(), d.entries.len());
        d.entries.push(DirEntry {
            name: name.to_vec(),
            node,
            layer,
            removed_in: None,
        });
    }

    /// Removes the live entry `name` of `dir`, and everything beneath it
    /// that nothing else links to. Returns whether there was one.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8], layer: u16) -> bool {
        let d = self.dir_mut(dir);
        let Some(i) = d.index.remove(name) else {
            return false;
        };
        d.entries[i].removed_in = Some(layer);
        let node = d.entries[i].node;
        self.drop_link(node, layer);
        true
    }

    fn drop_link(&mut self, node: NodeId, layer: u16) {
        let n = self.node_mut(node);
        n.links -= 1;
        if n.links > 0 {
            return;
        }
        let children: Vec<NodeId> = match &mut n.kind {
            Kind::Dir(d) => {
                d.index.clear();
                d.entries
                    .iter_mut()
                    .filter(|e| e.live())
                    .map(|e| {
                        e.removed_in = Some(layer);
                        e.node
                    })
                    .collect()
            }
            _ => return,
        };
        for c in children {
            self.drop_link(c, layer);
        }
    }

    /// Removes every live entry of `dir` added before `layer` (an opaque
    /// directory hides only the layers below it).
    pub fn clear_lower(&mut self, dir: NodeId, layer: u16) {
        let names: Vec<Vec<u8>> = self
            .dir(dir)
            .map(|d| {
                d.entries
                    .iter()
                    .filter(|e| e.live() && e.layer < layer)
                    .map(|e| e.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        for n in names {
            self.unlink(dir, &n, layer);
        }
    }

    /// Walks `todo` (components, last first) from `cur`, following
    /// symbolic links within the tree; stops at the first missing one.
    fn walk(
        &self,
        mut cur: NodeId,
        mut todo: Vec<Vec<u8>>,
        links: &mut u32,
    ) -> Result<Walk, String> {
        while let Some(comp) = todo.pop() {
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    cur = self.dir(cur).map_or(ROOT, |d| d.parent);
                    continue;
                }
                _ => {}
            }
            let Some(next) = self.lookup(cur, &comp).map(|e| e.node) else {
                return Ok(Walk::Missing {
                    dir: cur,
                    name: comp,
                    rest: todo,
                });
            };
            match &self.node(next).kind {
                Kind::Dir(_) => cur = next,
                Kind::Symlink(target) => {
                    *links += 1;
                    if *links > MAX_SYMLINKS {
                        return Err(format!(
                            "more than {MAX_SYMLINKS} symbolic links while resolving it"
                        ));
                    }
                    if target.first() == Some(&b'/') {
                        cur = ROOT;
                    }
                    todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                _ => {
                    return Err(format!(
                        "`{}` is not a directory",
                        String::from_utf8_lossy(&comp)
                    ))
                }
            }
        }
        Ok(Walk::Found(cur))
    }

    /// The directory `comps` names (split, without `..`), following
    /// symbolic links within the tree.
    pub fn find_dir(&self, comps: &[&[u8]]) -> Result<NodeId, String> {
        let todo = comps.iter().rev().map(|c| c.to_vec()).collect();
        match self.walk(ROOT, todo, &mut 0)? {
            Walk::Found(id) => Ok(id),
            Walk::Missing { name, .. } => Err(format!(
                "`{}` does not exist",
                String::from_utf8_lossy(&name)
            )),
        }
    }

    /// Like [`Tree::find_dir`], creating missing directories (with `meta`,
    /// in layer `layer`) when `create` is set.
    pub fn resolve_dir(
        &mut self,
        comps: &[&[u8]],
        create: Option<(&Meta, u16)>,
    ) -> Result<NodeId, String> {
        let Some((meta, layer)) = create else {
            return self.find_dir(comps);
        };
        let mut links = 0;
        let mut at = (
            ROOT,
            comps.iter().rev().map(|c| c.to_vec()).collect::<Vec<_>>(),
        );
        loop {
            match self.walk(at.0, at.1, &mut links)? {
                Walk::Found(id) => return Ok(id),
                Walk::Missing { dir, name, rest } => {
                    let d = self.add(Kind::Dir(Dir::default()), meta.clone(), layer);
                    self.link(dir, &name, d, layer);
                    at = (d, rest);
                }
            }
        }
    }

    /// Records where the layer that just ended left the directories it
    /// created (their entries then decide the blocks they are given).
    pub fn end_layer(&mut self) {
        for id in std::mem::take(&mut self.new_dirs) {
            if let Kind::Dir(d) = &mut self.nodes[id as usize].kind {
                d.first_layer_len = d.entries.len();
            }
        }
    }

    /// Nodes some directory entry still names (and the root).
    pub fn live_nodes(&self) -> usize {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i == 0 || n.links > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(t: &mut Tree, dir: NodeId, name: &str, layer: u16) -> NodeId {
        let n = t.add(Kind::File { offset: 0, len: 0 }, Meta::default(), layer);
        t.link(dir, name.as_bytes(), n, layer);
        n
    }

    #[test]
    fn symlinks_resolve_beneath_the_root() {
        let mut t = Tree::new();
        let etc = t
            .resolve_dir(&[b"etc"], Some((&Meta::dir_default(), 0)))
            .unwrap();
        for (name, target) in [("up", "../../../etc"), ("abs", "/etc"), ("dot", ".")] {
            let l = t.add(
                Kind::Symlink(target.as_bytes().to_vec()),
                Meta::default(),
                0,
            );
            t.link(ROOT, name.as_bytes(), l, 0);
        }
        assert_eq!(t.resolve_dir(&[b"up"], None).unwrap(), etc);
        assert_eq!(t.resolve_dir(&[b"abs"], None).unwrap(), etc);
        assert_eq!(t.resolve_dir(&[b"dot", b"dot", b"etc"], None).unwrap(), etc);
        let lp = t.add(Kind::Symlink(b"loop".to_vec()), Meta::default(), 0);
        t.link(ROOT, b"loop", lp, 0);
        assert!(t.resolve_dir(&[b"loop"], None).unwrap_err().contains("40"));
        file(&mut t, ROOT, "f", 0);
        assert!(t.resolve_dir(&[b"f", b"x"], None).is_err());
    }

    #[test]
    fn unlink_drops_subtrees_but_keeps_hard_links() {
        let mut t = Tree::new();
        let d = t
            .resolve_dir(&[b"d", b"e"], Some((&Meta::dir_default(), 0)))
            .unwrap();
        let f = file(&mut t, d, "f", 0);
        t.link(ROOT, b"hard", f, 0);
        assert!(t.unlink(ROOT, b"d", 1));
        assert_eq!(t.node(d).links, 0);
        assert_eq!(t.node(f).links, 1);
        assert_eq!(t.live_nodes(), 2);
    }

    #[test]
    fn opaque_clears_only_lower_layers() {
        let mut t = Tree::new();
        file(&mut t, ROOT, "old", 0);
        t.end_layer();
        file(&mut t, ROOT, "new", 1);
        t.clear_lower(ROOT, 1);
        assert!(t.lookup(ROOT, b"old").is_none());
        assert!(t.lookup(ROOT, b"new").is_some());
    }
}
