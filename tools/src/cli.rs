//! Command-line grammar. These names are the interface; keep them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// `cairn_engine::import::DEFAULT_CHUNK_SIZE` as the CLI spells it.
pub const DEFAULT_CHUNK_SIZE_ARG: &str = "64K";

#[derive(Parser, Debug)]
#[command(
    name = "cairn",
    version,
    about = "Content-addressed snapshot and block storage for microVM sandboxes"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Where images live: file:///DIR or s3://BUCKET/PREFIX[?endpoint=URL&path_style=true&region=R].
    /// Default: a file:// store under the user's data directory.
    #[arg(long, global = true, env = "CAIRN_STORE")]
    pub store: Option<String>,
    /// Local cache of chunks fetched from the store (default: under the user's cache directory).
    #[arg(long, global = true, env = "CAIRN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bound on the local cache's size on disk, e.g. 512M, 10G.
    #[arg(long, global = true, env = "CAIRN_CACHE_SIZE", default_value = "10G")]
    pub cache_size: String,
    /// Bytes that read-ahead of sequential disk reads may have in flight
    /// from the store (0 turns it off).
    #[arg(long, global = true, env = "CAIRN_READAHEAD", default_value = "4M")]
    pub readahead: String,
    /// Print one JSON object on stdout instead of text; no progress bars.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Images: import, export, list, describe.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Disks: serve an image lazily to a VMM.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Memory snapshots: import, export, serve over userfaultfd.
    #[command(subcommand)]
    Mem(MemCommand),
    /// Benchmarks: `cairn bench NAME [ARGS]` runs the `NAME-bench` program
    /// built beside cairn (benches/), e.g. `cairn bench sqlite --help`.
    /// `--store` is passed on when given.
    Bench {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check that every chunk of every manifest is in the store.
    Verify {
        /// Also re-read every pack and re-hash every chunk.
        #[arg(long)]
        deep: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import a raw disk image file.
    ImportRaw {
        file: PathBuf,
        /// Name to give the image.
        #[arg(long)]
        name: String,
        /// Chunk size, a power of two from 4K to 16M.
        #[arg(long, default_value = DEFAULT_CHUNK_SIZE_ARG)]
        chunk_size: String,
        /// zstd level for new chunks (1 fastest).
        #[arg(long, default_value_t = cairn_engine::import::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
    },
    /// Import an OCI image as a bootable image: an ext4 root disk with the
    /// image's config beside it. REF is docker://HOST[:PORT]/REPO[:TAG|@DIGEST],
    /// oci:DIR[:TAG] or docker-archive:FILE[:REPO:TAG].
    Import {
        reference: String,
        /// Name to give the image (default: the repository's last element).
        #[arg(long)]
        name: Option<String>,
        /// The platform to pick from a multi-platform image (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// The root disk's size, e.g. 4G (default: the content plus headroom).
        #[arg(long)]
        disk_size: Option<String>,
        /// Talk plain HTTP to the registry.
        #[arg(long)]
        insecure: bool,
        /// Chunk size, a power of two from 4K to 16M.
        #[arg(long, default_value = DEFAULT_CHUNK_SIZE_ARG)]
        chunk_size: String,
    },
    /// Build an image from a Dockerfile (RUN steps in a bubblewrap sandbox,
    /// every step cached). The context is the Dockerfile's folder.
    Build {
        /// The build context (default: the Dockerfile's folder, else `.`).
        dir: Option<PathBuf>,
        /// The Dockerfile (default: DIR/Dockerfile).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Name to give the image (default: the context folder's name).
        #[arg(long)]
        name: Option<String>,
        /// A build argument, K=V (repeatable).
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
        /// The platform of the base images.
        #[arg(long)]
        platform: Option<String>,
        /// Talk plain HTTP to registries FROM names.
        #[arg(long)]
        insecure: bool,
    },
    /// Write an image back to a raw file, byte for byte.
    Export {
        /// Image name or manifest id.
        image: String,
        file: PathBuf,
    },
    /// List named images.
    Ls,
    /// Show an image's manifest: sizes, chunks, storage.
    Describe {
        /// Image name or manifest id.
        image: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Serve IMAGE over vhost-user-blk with a private, writable overlay.
    /// Prints a line when ready; SIGINT/SIGTERM flush and exit.
    Serve {
        /// Image name or manifest id.
        image: String,
        /// The vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// The overlay directory (created if new; reused if it is this image's).
        #[arg(long)]
        overlay: PathBuf,
        /// Refuse writes and offer the disk read-only.
        #[arg(long)]
        read_only: bool,
        /// Virtqueues, one worker thread each.
        #[arg(long, default_value_t = 1)]
        queues: u16,
    },
    /// Fold a stopped overlay into a new image that shares every unchanged
    /// chunk with its parent.
    Snapshot {
        /// The overlay directory (`cairn disk serve` must not be using it).
        #[arg(long)]
        overlay: PathBuf,
        /// Name to give the new image.
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum MemCommand {
    /// Import a VMM memory file: a full one, or (with --parent) a sparse
    /// diff over an earlier snapshot, as Firecracker writes them.
    Import {
        file: PathBuf,
        /// Name to give the snapshot.
        #[arg(long)]
        name: String,
        /// The snapshot a diff file was taken over (name or id).
        #[arg(long)]
        parent: Option<String>,
        /// Guest page size the file was written with (4K, or 2M for huge pages).
        #[arg(long, default_value = "4K")]
        page_size: String,
        /// Chunk size, a power of two from 4K to 16M (a diff takes its parent's).
        #[arg(long, default_value = DEFAULT_CHUNK_SIZE_ARG)]
        chunk_size: String,
    },
    /// Write a memory snapshot back to a file, byte for byte.
    Export {
        /// Snapshot name or manifest id.
        snapshot: String,
        file: PathBuf,
    },
    /// Serve SNAPSHOT to VMMs resuming from it, over Firecracker's
    /// page-fault handler protocol. Prints a ready line, then one report
    /// per resume; SIGINT/SIGTERM exit.
    Serve {
        /// Snapshot name or manifest id.
        snapshot: String,
        /// The Unix socket the VMM connects to.
        #[arg(long)]
        socket: PathBuf,
        /// Do not install the recorded working set ahead of the guest.
        #[arg(long)]
        no_prefetch: bool,
        /// Record the pages this resume touches, in order, and store them
        /// as the snapshot's working set (faults then resolve one page each
        /// unless --fault-size is given).
        #[arg(long)]
        record: bool,
        /// Bytes one fault resolves: the aligned run around the page.
        #[arg(long)]
        fault_size: Option<String>,
        /// Cap prefetch at this many bytes a second (e.g. 500M).
        #[arg(long)]
        prefetch_rate: Option<String>,
        /// Threads installing the working set side by side.
        #[arg(long, default_value_t = cairn_vmm_glue::uffd::DEFAULT_PREFETCH_WORKERS as u16,
              value_parser = clap::value_parser!(u16).range(1..=16))]
        prefetch_workers: u16,
        /// Do not kill the VMM when the server cannot go on.
        #[arg(long)]
        no_kill_vmm: bool,
        /// Seconds a connected VMM has to send its handshake.
        #[arg(long, default_value_t = 10)]
        handshake_timeout: u64,
        /// Exit after the first resume ends.
        #[arg(long)]
        once: bool,
    },
}
