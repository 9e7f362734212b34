//! Command-line grammar. These names are the interface; keep them.

use std::num::NonZeroU64;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::size;

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
    #[arg(long, global = true, env = "CAIRN_CACHE_SIZE", default_value = "10G",
          value_parser = size::bytes)]
    pub cache_size: u64,
    /// Bytes that read-ahead of sequential disk reads may have in flight
    /// from the store (0 turns it off).
    #[arg(long, global = true, env = "CAIRN_READAHEAD", default_value = "4M",
          value_parser = size::bytes)]
    pub readahead: u64,
    /// The project whose images, snapshots and sandboxes a command sees.
    #[arg(long, global = true, env = "CAIRN_PROJECT", default_value = cairn_engine::catalog::DEFAULT_PROJECT)]
    pub project: String,
    /// Print one JSON object on stdout instead of text (errors too: an
    /// object with `error`, `kind` and `detail`); no progress bars.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log lines on stderr: -v cairn's info, -vv its debug, -vvv
    /// everything's (CAIRN_LOG, a tracing filter, overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr, no warnings.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// The daemon's socket, for the sandbox commands (default: under the
    /// user's runtime directory).
    #[arg(long, global = true, env = "CAIRN_DAEMON")]
    pub daemon: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Images: import, register, export, list, describe, remove.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Snapshots: list, describe, remove.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
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
    /// The daemon: serves every sandbox of this host, with an HTTP API on
    /// a Unix socket and Prometheus metrics.
    Daemon(DaemonArgs),
    /// Sandboxes, through the daemon: create, clone, list, describe, remove.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Garbage collection: condemn what nothing references, delete what
    /// was condemned at least --grace ago and still is, rewrite packs that
    /// are mostly dead. Safe while other hosts write (docs/gc.md).
    Gc(GcArgs),
    /// Check that every chunk of every manifest is in the store.
    Verify {
        /// Also re-read every pack and re-hash every chunk.
        #[arg(long)]
        deep: bool,
    },
    /// Print a completion script for SHELL on stdout, e.g.
    /// `cairn completions bash > /etc/bash_completion.d/cairn`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff) on stdout, e.g. `cairn man | man -l -`.
    Man,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Report what would be condemned, deleted and rewritten; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long an unreferenced object stays condemned before a run may
    /// delete it (e.g. 30m, 1h, 2d). Every import and upload must finish
    /// within it; one that does not checks its chunks and fails if some
    /// were collected.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub grace: std::time::Duration,
    /// Rewrite packs whose live bytes are less than this share of them
    /// (0 to 1; 0 rewrites none).
    #[arg(long, default_value_t = 0.5, value_parser = crate::size::share)]
    pub rewrite_below: f64,
    /// Delete the roots of HOST, a daemon gone for good (its unnamed
    /// sandboxes' data then goes like any unreferenced data; its named
    /// ones are in the catalog and stay). Refused while HOST published its
    /// roots within --host-timeout. Repeatable. The report's `hosts` lists
    /// every host with roots and when it last published them.
    #[arg(long, value_name = "HOST")]
    pub forget_host: Vec<String>,
    /// How long a host must have been silent to be forgotten (a running
    /// daemon republishes every 10 minutes).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub host_timeout: std::time::Duration,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import a raw disk image file.
    ImportRaw(ImportRawArgs),
    /// Import an OCI image as a bootable image: an ext4 root disk with the
    /// image's config beside it. REF is docker://HOST[:PORT]/REPO[:TAG|@DIGEST],
    /// oci:DIR[:TAG] or docker-archive:FILE[:REPO:TAG].
    Import(ImportArgs),
    /// Build an image from a Dockerfile (RUN steps in a bubblewrap sandbox,
    /// every step cached). The context is the Dockerfile's folder.
    Build(BuildArgs),
    /// Write an image back to a raw file, byte for byte.
    Export(ExportArgs),
    /// List the project's images and the public ones.
    Ls,
    /// Show an image: its record (project, size, unique bytes, parent,
    /// how it was made) and its manifest's chunks and storage.
    Describe {
        /// Image name or manifest id.
        image: String,
    },
    /// Remove an image name (its data goes at the next garbage collection).
    Rm { name: String },
    /// Name a completed snapshot's disk as an image.
    Register(RegisterArgs),
}

#[derive(Args, Debug)]
pub struct ImportRawArgs {
    pub file: PathBuf,
    /// Name to give the image.
    #[arg(long)]
    pub name: String,
    /// Chunk size, a power of two from 4K to 16M.
    #[arg(long, default_value = DEFAULT_CHUNK_SIZE_ARG, value_parser = size::chunk_size)]
    pub chunk_size: u32,
    /// zstd level for new chunks (1 fastest).
    #[arg(long, default_value_t = cairn_engine::import::DEFAULT_ZSTD_LEVEL,
          value_parser = clap::value_parser!(i32).range(-7..=22))]
    pub zstd_level: i32,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    pub reference: String,
    /// Name to give the image (default: the repository's last element).
    #[arg(long)]
    pub name: Option<String>,
    /// The platform to pick from a multi-platform image (default: this machine's).
    #[arg(long)]
    pub platform: Option<String>,
    /// The root disk's size, e.g. 4G (default: the content plus headroom).
    #[arg(long, value_parser = size::bytes)]
    pub disk_size: Option<u64>,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    pub insecure: bool,
    /// Move the name if it names another image (a re-import of a moved tag).
    #[arg(long)]
    pub replace: bool,
    /// Chunk size, a power of two from 4K to 16M.
    #[arg(long, default_value = DEFAULT_CHUNK_SIZE_ARG, value_parser = size::chunk_size)]
    pub chunk_size: u32,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The build context (default: the Dockerfile's folder, else `.`).
    pub dir: Option<PathBuf>,
    /// The Dockerfile (default: DIR/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Name to give the image (default: the context folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// A build argument, K=V (repeatable).
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// The platform of the base images.
    #[arg(long)]
    pub platform: Option<String>,
    /// Talk plain HTTP to registries FROM names.
    #[arg(long)]
    pub insecure: bool,
    /// Move the name if it names another image (a rebuild).
    #[arg(long)]
    pub replace: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Name or manifest id.
    pub image: String,
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The snapshot's URI, as `cairn snapshot describe` prints it.
    pub snapshot_uri: String,
    #[arg(long)]
    pub name: String,
    /// Resolve the name from every project (public names are unique in the store).
    #[arg(long)]
    pub public: bool,
    /// The Dockerfile the image was built with, kept with its record.
    #[arg(long)]
    pub dockerfile: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// List the project's snapshots and their states.
    Ls(SnapshotLsArgs),
    /// Show a snapshot's record.
    Describe { id: String },
    /// Remove a completed or failed snapshot (its data goes at the next
    /// garbage collection).
    Rm {
        id: String,
        /// Also one still pending or uploading (its host is gone for good).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
pub struct SnapshotLsArgs {
    /// Most snapshots to list.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// List those after this id (the last of a previous page).
    #[arg(long)]
    pub after: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Serve IMAGE over vhost-user-blk with a private, writable overlay.
    /// Prints a line when ready; SIGINT/SIGTERM flush and exit.
    Serve(DiskServeArgs),
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

#[derive(Args, Debug)]
pub struct DiskServeArgs {
    /// Image name or manifest id.
    pub image: String,
    /// The vhost-user socket to listen on.
    #[arg(long)]
    pub socket: PathBuf,
    /// The overlay directory (created if new; reused if it is this image's).
    #[arg(long)]
    pub overlay: PathBuf,
    /// Refuse writes and offer the disk read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Virtqueues (all served by the process's thread pool).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// The longest, in microseconds, a queue's worker keeps watching its
    /// ring after it drains (adaptive: only while requests come back
    /// that soon, and not while the host's CPUs are contended); 0 turns
    /// polling off.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub poll_us: u64,
}

#[derive(Subcommand, Debug)]
pub enum MemCommand {
    /// Import a VMM memory file: a full one, or (with --parent) a sparse
    /// diff over an earlier snapshot, as Firecracker writes them.
    Import(MemImportArgs),
    /// Write a memory snapshot back to a file, byte for byte.
    Export(ExportArgs),
    /// Serve SNAPSHOT to VMMs resuming from it, over Firecracker's
    /// page-fault handler protocol. Prints a ready line, then one report
    /// per resume (a resume ends when the VMM process exits); SIGINT or
    /// SIGTERM ends the resume under way, prints its report and exits.
    Serve(MemServeArgs),
}

#[derive(Args, Debug)]
pub struct MemImportArgs {
    pub file: PathBuf,
    /// Name to give the snapshot.
    #[arg(long)]
    pub name: String,
    /// The snapshot a diff file was taken over (name or id).
    #[arg(long)]
    pub parent: Option<String>,
    /// Guest page size the file was written with (4K, or 2M for huge pages).
    #[arg(long, default_value = "4K", value_parser = size::page_size)]
    pub page_size: u64,
    /// Chunk size, a power of two from 4K to 16M (a diff takes its parent's).
    #[arg(long, default_value = DEFAULT_CHUNK_SIZE_ARG, value_parser = size::chunk_size)]
    pub chunk_size: u32,
}

#[derive(Args, Debug)]
pub struct MemServeArgs {
    /// Snapshot name or manifest id.
    pub snapshot: String,
    /// The Unix socket the VMM connects to.
    #[arg(long)]
    pub socket: PathBuf,
    /// Do not install the recorded working set ahead of the guest.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Record the pages this resume touches, in order, and store them
    /// as the snapshot's working set (faults then resolve one page each
    /// unless --fault-size is given).
    #[arg(long)]
    pub record: bool,
    /// Bytes one fault resolves: the aligned run around the page (a power
    /// of two from 4K to 16M; default 64K).
    #[arg(long, value_parser = size::fault_size)]
    pub fault_size: Option<u64>,
    /// Cap prefetch at this many bytes a second (e.g. 500M; not 0:
    /// use --no-prefetch).
    #[arg(long, value_parser = parse_rate)]
    pub prefetch_rate: Option<NonZeroU64>,
    /// Threads installing the working set side by side.
    #[arg(long, default_value_t = cairn_vmm_glue::uffd::DEFAULT_PREFETCH_WORKERS as u16,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub prefetch_workers: u16,
    /// Do not kill the VMM when a resume ends while it runs (the
    /// server failed or was stopped).
    #[arg(long)]
    pub no_kill_vmm: bool,
    /// Seconds a connected VMM has to send its handshake.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Exit after the first resume ends.
    #[arg(long)]
    pub once: bool,
}

/// A `--prefetch-rate`: a size a second, not zero.
fn parse_rate(text: &str) -> Result<NonZeroU64, String> {
    let rate = size::bytes(text)?;
    NonZeroU64::new(rate)
        .ok_or_else(|| "a rate of 0 would never prefetch; use --no-prefetch instead".to_owned())
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The API's Unix socket (default: `--daemon`, CAIRN_DAEMON, or under
    /// the user's runtime directory).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where the daemon keeps its sandboxes' layers and records (default:
    /// under the user's data directory).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Where the sandboxes' disk and memory sockets go (default: beside
    /// the API socket, in `SOCKET.d`; a runtime directory such as /run is
    /// a memory file system, where making a socket costs no disk work).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// Also serve /metrics over TCP here, e.g. 127.0.0.1:9464.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Leave a VMM running when its memory stops being served mid-resume
    /// (its sandbox removed, the daemon stopped); by default it is killed,
    /// since its next page fault would never be answered.
    #[arg(long)]
    pub no_kill_vmm: bool,
    /// Seconds a snapshot upload is tried again while the store does not
    /// answer (the snapshot stays uploading meanwhile); then it is marked
    /// failed, with the reason.
    #[arg(long, env = "CAIRN_UPLOAD_TIMEOUT", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub upload_timeout: u64,
    /// A shell command run before a sandbox is suspended for idling (see
    /// `sandbox create --idle-suspend`), with CAIRN_SANDBOX, CAIRN_PROJECT,
    /// CAIRN_DISK_SOCKET (and CAIRN_MEMORY_SOCKET) set: it may pause the
    /// VMM and have it write its memory and state, and print
    /// `{"memory": PATH, "vm_state": PATH}` for the suspend to take them.
    /// If it fails, the sandbox runs on (tried again 30 s later).
    #[arg(long, env = "CAIRN_IDLE_HOOK")]
    pub idle_hook: Option<String>,
}

/// A VMM's memory file and VM-state blob, taken with a snapshot, clone or
/// suspend (pause the VM, have the VMM write them, then call).
#[derive(clap::Args, Debug, Clone)]
pub struct MachineArgs {
    /// The VM's memory file (full, or a diff with --memory-diff).
    #[arg(long)]
    pub memory: Option<PathBuf>,
    /// The memory file is a sparse diff over the memory the sandbox was
    /// started from (holes unchanged), as Firecracker's diff snapshots.
    #[arg(long, requires = "memory")]
    pub memory_diff: bool,
    /// An opaque VM-state blob (e.g. Firecracker's vmstate file).
    #[arg(long)]
    pub vm_state: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox from an image; prints its disk socket.
    Create {
        /// A name makes the sandbox durable across daemon restarts; unnamed
        /// sandboxes go when their daemon stops.
        name: Option<String>,
        /// The image (name or id).
        #[arg(
            long,
            required_unless_present = "snapshot",
            conflicts_with = "snapshot"
        )]
        image: Option<String>,
        /// A completed snapshot (its id) to start from instead of an image.
        #[arg(long)]
        snapshot: Option<String>,
        /// Queues of its virtio-blk device.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        queues: u16,
        /// Suspend it after this long without a disk request (e.g. 5m; the
        /// daemon's --idle-hook runs first); the next request for it (an
        /// API call naming it, or a VMM connecting to its disk socket)
        /// resumes it there. Named sandboxes only.
        #[arg(long, value_parser = humantime::parse_duration, requires = "name")]
        idle_suspend: Option<std::time::Duration>,
    },
    /// Snapshot a running sandbox's disk as it is now (one FLUSH); the
    /// upload runs in the background: `cairn snapshot describe ID` shows
    /// when it is completed.
    Snapshot {
        sandbox: String,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Sandboxes from a completed snapshot: NAME, or NAME-1..NAME-N with
    /// --count N (unnamed without NAME).
    Fork {
        snapshot: String,
        name: Option<String>,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: u32,
        /// Queues of each one's virtio-blk device.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        queues: u16,
    },
    /// Suspend a named sandbox (stop its VM first): its disk is snapshotted
    /// and uploaded, the catalog records it as suspended, its local state
    /// is freed. Returns when the snapshot is completed.
    Suspend {
        sandbox: String,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Resume a suspended sandbox on this daemon's host (any host that
    /// shares the store).
    Resume {
        name: String,
        /// Queues of its virtio-blk device.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        queues: u16,
    },
    /// Move a running named sandbox to another daemon sharing the store:
    /// what it writes is uploaded while it runs (pre-copy rounds), then
    /// this daemon stops serving it (a VMM still connected is cut off: pause
    /// it first, and point it at the new disk socket), uploads the last
    /// delta, and the other daemon takes it over (this one is fenced) and
    /// serves it. Prints the new disk socket and the time it was unserved.
    Migrate {
        sandbox: String,
        /// The other daemon's API socket.
        #[arg(long)]
        to: PathBuf,
        /// Pre-copy rounds at most (0: switch at once); rounds stop early
        /// once one takes under a second.
        #[arg(long, default_value_t = 4)]
        max_rounds: u32,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// A second sandbox with the disk of a running one as it is now (and
    /// the memory and VM state given, served at once).
    Clone {
        sandbox: String,
        name: Option<String>,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// The sandboxes this daemon serves.
    Ls,
    /// One sandbox: state, image, layers, bytes written, sockets.
    Describe { sandbox: String },
    /// Stop serving a sandbox and delete it (stop its VM first).
    Rm { sandbox: String },
}
