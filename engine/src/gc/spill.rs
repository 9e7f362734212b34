//! Fixed-size records sorted on disk, so that a mark over millions of
//! chunks holds a bounded buffer, not a set: records are buffered up to a
//! bound, each full buffer is sorted and written as a run, and the runs
//! are merged into one sorted file without duplicates, which can be read
//! as many times as a pass needs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// A new directory for spills under `parent` (made if missing), removed
/// with the value.
pub fn scratch_dir(parent: &Path, prefix: &str) -> io::Result<tempfile::TempDir> {
    std::fs::create_dir_all(parent)?;
    tempfile::Builder::new().prefix(prefix).tempdir_in(parent)
}

/// Bytes of records one spill buffers before it writes a run.
pub const BUFFER_BYTES: usize = 8 << 20;

/// Records of `N` bytes, ordered as byte strings.
pub struct Spill<const N: usize> {
    dir: PathBuf,
    name: String,
    buf: Vec<[u8; N]>,
    cap: usize,
    runs: Vec<PathBuf>,
}

impl<const N: usize> Spill<N> {
    /// A spill writing its files as `dir/name.*`.
    pub fn new(dir: &Path, name: &str) -> Spill<N> {
        Spill::with_buffer(dir, name, BUFFER_BYTES)
    }

    pub fn with_buffer(dir: &Path, name: &str, bytes: usize) -> Spill<N> {
        let cap = (bytes / N).max(1);
        Spill {
            dir: dir.to_owned(),
            name: name.to_owned(),
            buf: Vec::with_capacity(cap.min(1 << 16)),
            cap,
            runs: Vec::new(),
        }
    }

    pub fn push(&mut self, rec: [u8; N]) -> io::Result<()> {
        self.buf.push(rec);
        if self.buf.len() >= self.cap {
            self.write_run()?;
        }
        Ok(())
    }

    fn write_run(&mut self) -> io::Result<()> {
        self.buf.sort_unstable();
        self.buf.dedup();
        let path = self
            .dir
            .join(format!("{}.run{}", self.name, self.runs.len()));
        let mut w = BufWriter::new(File::create(&path)?);
        for rec in &self.buf {
            w.write_all(rec)?;
        }
        w.flush()?;
        self.buf.clear();
        self.runs.push(path);
        Ok(())
    }

    /// Merges everything pushed into one sorted file without duplicates.
    pub fn finish(mut self) -> io::Result<Sorted<N>> {
        if !self.buf.is_empty() || self.runs.is_empty() {
            self.write_run()?;
        }
        let path = self.dir.join(format!("{}.sorted", self.name));
        let mut readers = self
            .runs
            .iter()
            .map(|p| Ok(Records::<N>::new(BufReader::new(File::open(p)?))))
            .collect::<io::Result<Vec<_>>>()?;
        let mut heap = BinaryHeap::new();
        for (i, r) in readers.iter_mut().enumerate() {
            if let Some(rec) = r.next().transpose()? {
                heap.push(Reverse((rec, i)));
            }
        }
        let mut w = BufWriter::new(File::create(&path)?);
        let mut last: Option<[u8; N]> = None;
        let mut len = 0u64;
        while let Some(Reverse((rec, i))) = heap.pop() {
            if last != Some(rec) {
                w.write_all(&rec)?;
                len += 1;
                last = Some(rec);
            }
            if let Some(next) = readers[i].next().transpose()? {
                heap.push(Reverse((next, i)));
            }
        }
        w.flush()?;
        for run in &self.runs {
            let _ = std::fs::remove_file(run);
        }
        Ok(Sorted { path, len })
    }
}

/// A merged spill: its records in order, each once.
pub struct Sorted<const N: usize> {
    path: PathBuf,
    len: u64,
}

impl<const N: usize> Sorted<N> {
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Reads the records from the start.
    pub fn iter(&self) -> io::Result<Records<N>> {
        Ok(Records::new(BufReader::new(File::open(&self.path)?)))
    }
}

impl<const N: usize> Drop for Sorted<N> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Records read one after another from a file.
pub struct Records<const N: usize> {
    r: BufReader<File>,
}

impl<const N: usize> Records<N> {
    fn new(r: BufReader<File>) -> Records<N> {
        Records { r }
    }
}

impl<const N: usize> Iterator for Records<N> {
    type Item = io::Result<[u8; N]>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut rec = [0u8; N];
        match self.r.read_exact(&mut rec) {
            Ok(()) => Some(Ok(rec)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// The bytes records are grouped by in [`join`]: a chunk id.
pub const KEY: usize = 32;

/// Reads two sorted spills side by side, grouping the records of each by
/// their first [`KEY`] bytes, and calls `f` with every group of `left`
/// and the records of `right` with the same key (perhaps none).
pub fn join<const A: usize, const B: usize>(
    left: &Sorted<A>,
    right: &Sorted<B>,
    mut f: impl FnMut(&[[u8; A]], &[[u8; B]]),
) -> io::Result<()> {
    let mut l = left.iter()?.peekable();
    let mut r = right.iter()?;
    let mut r_next = r.next().transpose()?;
    let (mut lg, mut rg) = (Vec::new(), Vec::new());
    while let Some(first) = l.next().transpose()? {
        lg.clear();
        lg.push(first);
        while let Some(Ok(rec)) = l.peek() {
            if rec[..KEY] != first[..KEY] {
                break;
            }
            lg.push(*rec);
            l.next();
        }
        rg.clear();
        while let Some(rec) = r_next {
            match rec[..KEY].cmp(&first[..KEY]) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => rg.push(rec),
                std::cmp::Ordering::Greater => break,
            }
            r_next = r.next().transpose()?;
        }
        f(&lg, &rg);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_sorted_and_once_across_many_runs() {
        let dir = tempfile::tempdir().unwrap();
        // A buffer of 10 records: 1,000 pushes make 100 runs.
        let mut s = Spill::<4>::with_buffer(dir.path(), "t", 40);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut model = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let v = rng.u32(..300).to_be_bytes();
            model.insert(v);
            s.push(v).unwrap();
        }
        let sorted = s.finish().unwrap();
        assert_eq!(sorted.len(), model.len() as u64);
        for _ in 0..2 {
            let got: Vec<[u8; 4]> = sorted.iter().unwrap().map(Result::unwrap).collect();
            assert_eq!(got, model.iter().copied().collect::<Vec<_>>());
        }
        // Only the merged file is left, and it goes with the value.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(sorted);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_join_pairs_each_key_of_the_left_with_the_right_records_of_that_key() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |key: u8, tail: u8| {
            let mut r = [0u8; KEY + 1];
            r[0] = key;
            r[KEY] = tail;
            r
        };
        let mut left = Spill::<{ KEY + 1 }>::with_buffer(dir.path(), "l", 2 * (KEY + 1));
        let mut right = Spill::<{ KEY + 1 }>::with_buffer(dir.path(), "r", 2 * (KEY + 1));
        for (k, t) in [(5, 1), (1, 1), (5, 2), (9, 1)] {
            left.push(rec(k, t)).unwrap();
        }
        for (k, t) in [(0, 7), (5, 8), (5, 9), (7, 7)] {
            right.push(rec(k, t)).unwrap();
        }
        let (left, right) = (left.finish().unwrap(), right.finish().unwrap());
        let mut seen = Vec::new();
        join(&left, &right, |l, r| {
            let tails = |g: &[[u8; KEY + 1]]| g.iter().map(|x| x[KEY]).collect::<Vec<_>>();
            seen.push((l[0][0], tails(l), tails(r)));
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (1, vec![1], vec![]),
                (5, vec![1, 2], vec![8, 9]),
                (9, vec![1], vec![]),
            ]
        );
    }

    #[test]
    fn an_empty_spill_reads_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sorted = Spill::<8>::new(dir.path(), "e").finish().unwrap();
        assert_eq!(sorted.len(), 0);
        assert_eq!(sorted.iter().unwrap().count(), 0);
    }
}
