//! Applying one layer (a tar stream, gzip, zstd or plain) to the tree.
//!
//! OCI semantics: entries replace what is at their path (a directory
//! over a directory only updates its attributes); `.wh.NAME` removes NAME
//! and `.wh..wh..opq` empties its directory, both only of what lower
//! layers put there; hard links may name files of lower layers. Paths
//! with `..` or a leading `/` are refused, parent components are resolved
//! beneath the root ([`Tree::resolve_dir`]), the last is never followed.
//!
//! Everything is bounded: the blob's bytes (exactly its descriptor's
//! size), the bytes it decompresses to, entries, path lengths and the
//! bytes of extension headers (PAX records, GNU long names), which the tar
//! crate would otherwise read into memory whatever their size.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::rc::Rc;

use super::digest::{Digest, Verify};
use super::error::OciError;
use super::tree::{Dir, Kind, Meta, NodeId, Time, Tree, ROOT};

/// Caps on what one image may make cairn read and hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Uncompressed tar bytes of all layers together.
    pub max_bytes: u64,
    /// Tar entries of all layers together.
    pub max_entries: u64,
    /// Bytes of extension headers before one entry (PAX, GNU long names).
    pub max_header: u64,
    /// Bytes of one path.
    pub max_path: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 4 << 20,
            max_header: 1 << 20,
            max_path: 4096,
        }
    }
}

/// What the image's layers used of the limits so far.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub bytes: u64,
    pub entries: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// Unknown: decided from the first bytes (docker archives).
    Sniff,
}

impl Compression {
    pub fn of_media_type(mt: &str) -> Result<Compression, OciError> {
        Ok(match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
            "" => Compression::Sniff,
            other => {
                return Err(OciError::Unsupported(format!(
                    "layer media type `{}` is not a layer cairn reads (tar, tar+gzip, tar+zstd)",
                    other.chars().take(200).collect::<String>()
                )))
            }
        })
    }
}

/// One layer to apply.
pub struct LayerInput<'a> {
    /// 1 for the lowest layer.
    pub number: u16,
    /// How messages name the layer (its digest, or its path in an archive).
    pub name: String,
    /// The blob's digest and size from its descriptor, when there is one.
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    pub compression: Compression,
    /// The uncompressed digest the image config lists (`rootfs.diff_ids`).
    pub diff_id: Option<Digest>,
    pub blob: Box<dyn Read + 'a>,
}

#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub entries: u64,
    pub compressed_bytes: u64,
    pub bytes: u64,
}

/// Where file contents go while layers are applied: one file, appended.
pub struct Spool {
    out: io::BufWriter<std::fs::File>,
    pub len: u64,
}

impl Spool {
    pub fn new(file: std::fs::File) -> Spool {
        Spool {
            out: io::BufWriter::with_capacity(1 << 20, file),
            len: 0,
        }
    }

    /// Appends to a spool that already holds bytes.
    pub fn resume(mut file: std::fs::File) -> io::Result<Spool> {
        use std::io::Seek;
        let len = file.seek(io::SeekFrom::End(0))?;
        Ok(Spool {
            out: io::BufWriter::with_capacity(1 << 20, file),
            len,
        })
    }

    fn append(&mut self, r: &mut impl Read) -> io::Result<(u64, u64)> {
        let at = self.len;
        let n = io::copy(r, &mut self.out)?;
        self.len += n;
        Ok((at, n))
    }

    /// The spool's file, all written.
    pub fn finish(self) -> io::Result<std::fs::File> {
        self.out.into_inner().map_err(|e| e.into_error())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Counts the decompressed bytes and caps what the tar parser may read
/// on its own between entries (extension headers).
struct MeterState {
    total: Cell<u64>,
    max_total: u64,
    in_header: Cell<bool>,
    header: Cell<u64>,
    max_header: u64,
    tripped: Cell<Option<&'static str>>,
}

struct Meter<R> {
    inner: R,
    state: Rc<MeterState>,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = &self.state;
        let n = self.inner.read(buf)?;
        s.total.set(s.total.get() + n as u64);
        if s.total.get() > s.max_total {
            s.tripped.set(Some("bytes"));
            return Err(io::Error::other("over the byte limit"));
        }
        if s.in_header.get() {
            s.header.set(s.header.get() + n as u64);
            if s.header.get() > s.max_header {
                s.tripped.set(Some("header"));
                return Err(io::Error::other("over the header limit"));
            }
        }
        Ok(n)
    }
}

/// Reports progress every MiB of blob read.
struct Progress<'p, R> {
    inner: R,
    done: u64,
    shown: u64,
    report: &'p dyn Fn(u64),
}

impl<R: Read> Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.shown >= 1 << 20 || n == 0 {
            self.shown = self.done;
            (self.report)(self.done);
        }
        Ok(n)
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}

/// Applies `input` to `tree`, file bytes to `spool`.
pub fn apply(
    tree: &mut Tree,
    spool: &mut Spool,
    input: LayerInput<'_>,
    limits: &Limits,
    totals: &mut Totals,
    progress: &dyn Fn(u64),
) -> Result<Applied, OciError> {
    let layer_err = |reason: String| OciError::Layer {
        layer: input.name.clone(),
        reason,
    };
    let blob_limit = input.size.unwrap_or(u64::MAX);
    let blob = Verify::new(
        Progress {
            inner: input.blob,
            done: 0,
            shown: 0,
            report: progress,
        },
        blob_limit,
    );
    let mut blob = BufReader::with_capacity(1 << 20, blob);
    let compression = match input.compression {
        Compression::Sniff => {
            let head = blob
                .fill_buf()
                .map_err(|e| layer_err(format!("reading it: {e}")))?;
            if head.starts_with(&[0x1f, 0x8b]) {
                Compression::Gzip
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Compression::Zstd
            } else {
                Compression::None
            }
        }
        c => c,
    };
    let state = Rc::new(MeterState {
        total: Cell::new(totals.bytes),
        max_total: limits.max_bytes,
        in_header: Cell::new(true),
        header: Cell::new(0),
        max_header: limits.max_header + 2048,
        tripped: Cell::new(None),
    });
    let mut entries = 0u64;
    let result = {
        let decoded: Box<dyn Read + '_> = match compression {
            Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(&mut blob)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(&mut blob)
                    .map_err(|e| layer_err(format!("zstd: {e}")))?,
            ),
            _ => Box::new(&mut blob),
        };
        let tar_in = Verify::new(
            Meter {
                inner: decoded,
                state: state.clone(),
            },
            u64::MAX,
        );
        let mut archive = tar::Archive::new(tar_in);
        let r = apply_entries(
            tree,
            spool,
            &mut archive,
            input.number,
            &state,
            limits,
            totals,
            &mut entries,
        );
        let tar_in = archive.into_inner();
        r.and_then(|()| {
            // The rest of the stream (the tar's end, padding) is part of the digest.
            state.in_header.set(false);
            tar_in
                .finish()
                .map_err(|e| Reason::Other(format!("reading the layer: {e}")))
        })
    };
    let (diff_id, bytes) = match result {
        Ok(v) => v,
        Err(reason) => {
            // A blob that fails to parse may simply be damaged: say so
            // when its digest shows it (the rest of it is bounded by its size).
            if let (Some(want), None) = (&input.digest, state.tripped.get()) {
                if let Ok((got, _)) = blob.into_inner().finish() {
                    if got != *want {
                        return Err(OciError::Digest {
                            what: format!("layer blob {}", input.name),
                            expected: want.to_string(),
                            actual: got.to_string(),
                        });
                    }
                }
            }
            return Err(match state.tripped.get() {
                Some("bytes") => OciError::Limit {
                    what: format!("layer {} uncompressed (with the layers below)", input.name),
                    limit: limits.max_bytes,
                    detail: "a decompression bomb, or an image too big for this limit".into(),
                },
                Some(_) => OciError::Limit {
                    what: format!(
                        "an extension header (PAX or GNU long name) in layer {}",
                        input.name
                    ),
                    limit: limits.max_header,
                    detail: "tar headers that big are not legitimate".into(),
                },
                None => match reason {
                    Reason::Entry(entry, why) => OciError::Entry {
                        layer: input.name.clone(),
                        entry,
                        reason: why,
                    },
                    Reason::Other(why) => layer_err(why),
                    Reason::Limit(e) => e,
                },
            });
        }
    };
    let (digest, compressed) = blob.into_inner().finish().map_err(|e| {
        layer_err(format!(
            "reading the blob: {e} (its descriptor says {blob_limit} bytes)"
        ))
    })?;
    if let Some(size) = input.size {
        if compressed != size {
            return Err(layer_err(format!(
                "the blob is {compressed} bytes, its descriptor says {size}: truncated or damaged"
            )));
        }
    }
    if let Some(want) = &input.digest {
        if *want != digest {
            return Err(OciError::Digest {
                what: format!("layer blob {}", input.name),
                expected: want.to_string(),
                actual: digest.to_string(),
            });
        }
    }
    if let Some(want) = &input.diff_id {
        if *want != diff_id {
            return Err(OciError::Digest {
                what: format!("uncompressed layer {} (config diff_id)", input.name),
                expected: want.to_string(),
                actual: diff_id.to_string(),
            });
        }
    }
    totals.bytes += bytes;
    tree.end_layer();
    Ok(Applied {
        entries,
        compressed_bytes: compressed,
        bytes,
    })
}

enum Reason {
    Entry(String, String),
    Other(String),
    Limit(OciError),
}

impl From<String> for Reason {
    fn from(s: String) -> Reason {
        Reason::Other(s)
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_entries<R: Read>(
    tree: &mut Tree,
    spool: &mut Spool,
    archive: &mut tar::Archive<R>,
    layer: u16,
    state: &MeterState,
    limits: &Limits,
    totals: &mut Totals,
    count: &mut u64,
) -> Result<(), Reason> {
    let entries = archive
        .entries()
        .map_err(|e| Reason::Other(format!("not a tar archive: {e}")))?;
    state.in_header.set(true);
    for entry in entries {
        let mut entry = entry.map_err(|e| Reason::Other(format!("tar: {e}")))?;
        state.in_header.set(false);
        state.header.set(0);
        *count += 1;
        totals.entries += 1;
        if totals.entries > limits.max_entries {
            return Err(Reason::Limit(OciError::Limit {
                what: "the image's entries".into(),
                limit: limits.max_entries,
                detail: format!("layer {layer} reached it"),
            }));
        }
        let path = entry.path_bytes().into_owned();
        // Refused before a byte of it is read.
        if state.total.get().saturating_add(entry.size()) > limits.max_bytes {
            return Err(Reason::Limit(OciError::Limit {
                what: format!("entry `{}` of layer {layer}", show(&path)),
                limit: limits.max_bytes,
                detail: format!(
                    "its header says {} bytes: a decompression bomb, or an image too big for this limit",
                    entry.size()
                ),
            }));
        }
        apply_entry(tree, spool, &mut entry, &path, layer, limits)
            .map_err(|why| Reason::Entry(show(&path), why))?;
        // Whatever the entry held and was not read is part of the stream.
        io::copy(&mut entry, &mut io::sink()).map_err(|e| Reason::Other(format!("tar: {e}")))?;
        state.in_header.set(true);
    }
    Ok(())
}

/// Splits a tar path into components, refusing what could leave the root.
fn components<'p>(path: &'p [u8], limits: &Limits) -> Result<Vec<&'p [u8]>, String> {
    if path.len() > limits.max_path {
        return Err(format!("the path is longer than {} bytes", limits.max_path));
    }
    if path.first() == Some(&b'/') {
        return Err("absolute path: layer entries must be relative to the image root".into());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("`..` in the path: it could leave the image root".into()),
            _ if c.len() > 255 => return Err("a path component is longer than 255 bytes".into()),
            _ => out.push(c),
        }
    }
    Ok(out)
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let h = entry.header();
    let bad = |what: &str, e: io::Error| format!("bad {what} field: {e}");
    let uid = h.uid().map_err(|e| bad("uid", e))?;
    let gid = h.gid().map_err(|e| bad("gid", e))?;
    let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} does not fit in 32 bits"))?;
    let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} does not fit in 32 bits"))?;
    let mode = (h.mode().map_err(|e| bad("mode", e))? & 0o7777) as u16;
    let mut mtime = Time {
        sec: h.mtime().map_err(|e| bad("mtime", e))? as i64,
        nsec: 0,
    };
    let mut xattrs = std::collections::BTreeMap::new();
    if let Some(pax) = entry.pax_extensions().map_err(|e| bad("PAX", e))? {
        for ext in pax {
            let ext = ext.map_err(|e| bad("PAX", e))?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                // An empty PAX value deletes the key (POSIX pax; Go's tar
                // and so Docker and umoci read it so).
                if ext.value_bytes().is_empty() {
                    xattrs.remove(name);
                } else {
                    xattrs.insert(name.to_vec(), ext.value_bytes().to_vec());
                }
            } else if key == b"mtime" {
                if let Some(t) = parse_pax_time(ext.value_bytes()) {
                    mtime = t;
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// `seconds[.fraction]`, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = int.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nsec = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    if sec < 0 && nsec > 0 {
        return Some(Time {
            sec: sec - 1,
            nsec: 1_000_000_000 - nsec,
        });
    }
    Some(Time { sec, nsec })
}

fn apply_entry<R: Read>(
    tree: &mut Tree,
    spool: &mut Spool,
    entry: &mut tar::Entry<'_, R>,
    path: &[u8],
    layer: u16,
    limits: &Limits,
) -> Result<(), String> {
    use tar::EntryType as T;
    let etype = entry.header().entry_type();
    if etype == T::XGlobalHeader {
        return Ok(());
    }
    let comps = components(path, limits)?;
    let dir_meta = Meta::dir_default();
    let Some((&name, parents)) = comps.split_last() else {
        // The root itself.
        if etype != T::Directory {
            return Err("only a directory may stand for the image root".into());
        }
        let meta = meta_of(entry)?;
        tree.node_mut(ROOT).meta = meta;
        return Ok(());
    };

    if name.starts_with(WHITEOUT) {
        let parent = match tree.resolve_dir(parents, None) {
            Ok(p) => p,
            Err(_) => return Ok(()), // nothing below to hide
        };
        if name == OPAQUE {
            tree.clear_lower(parent, layer);
            return Ok(());
        }
        if name.starts_with(b".wh..wh.") {
            tracing::warn!(path = %show(path), "skipping an AUFS metadata entry");
            return Ok(());
        }
        let target = &name[WHITEOUT.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err("a whiteout must name an entry of its directory".into());
        }
        if tree.lookup(parent, target).is_some_and(|e| e.layer < layer) {
            tree.unlink(parent, target, layer);
        }
        return Ok(());
    }

    let parent = tree.resolve_dir(parents, Some((&dir_meta, layer)))?;
    let meta = meta_of(entry)?;
    let existing = tree.lookup(parent, name).map(|e| e.node);

    let kind = match etype {
        T::Directory => {
            if let Some(id) = existing.filter(|&id| tree.node(id).is_dir()) {
                tree.node_mut(id).meta = meta;
                return Ok(());
            }
            Kind::Dir(Dir::default())
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            let want = entry.size();
            let (offset, len) = spool
                .append(entry)
                .map_err(|e| format!("reading its {want} bytes: {e}"))?;
            if len != want {
                return Err(format!("holds {len} of its {want} bytes"));
            }
            Kind::File { offset, len }
        }
        T::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or("a symbolic link without a target")?
                .into_owned();
            if target.is_empty() || target.len() >= super::ext4::BLOCK as usize {
                return Err(format!(
                    "symbolic link target of {} bytes (1 to 4095 allowed)",
                    target.len()
                ));
            }
            Kind::Symlink(target)
        }
        T::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or("a hard link without a target")?
                .into_owned();
            let tcomps = components(&target, limits)
                .map_err(|why| format!("hard link target `{}`: {why}", show(&target)))?;
            let Some((&tname, tparents)) = tcomps.split_last() else {
                return Err("a hard link to the root directory".into());
            };
            let node = tree
                .resolve_dir(tparents, None)
                .ok()
                .and_then(|d| tree.lookup(d, tname))
                .map(|e| e.node)
                .ok_or_else(|| format!("hard link target `{}` does not exist", show(&target)))?;
            if tree.node(node).is_dir() {
                return Err(format!("hard link to the directory `{}`", show(&target)));
            }
            if existing == Some(node) {
                return Ok(());
            }
            if existing.is_some() {
                tree.unlink(parent, name, layer);
            }
            tree.link(parent, name, node, layer);
            return Ok(());
        }
        T::Char | T::Block => {
            let h = entry.header();
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            if etype == T::Char {
                Kind::Char(major, minor)
            } else {
                Kind::Block(major, minor)
            }
        }
        T::Fifo => Kind::Fifo,
        other => {
            return Err(format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            ))
        }
    };
    if existing.is_some() {
        tree.unlink(parent, name, layer);
    }
    let id: NodeId = tree.add(kind, meta, layer);
    tree.link(parent, name, id, layer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"12.5"),
            Some(Time {
                sec: 12,
                nsec: 500_000_000
            })
        );
        assert_eq!(parse_pax_time(b"7"), Some(Time { sec: 7, nsec: 0 }));
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(Time {
                sec: -2,
                nsec: 750_000_000
            })
        );
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn hostile_paths_are_refused() {
        let l = Limits::default();
        assert!(components(b"../etc/passwd", &l).is_err());
        assert!(components(b"a/../../b", &l).is_err());
        assert!(components(b"/etc/passwd", &l).is_err());
        assert_eq!(components(b"./a//b/", &l).unwrap(), vec![&b"a"[..], b"b"]);
    }
}
