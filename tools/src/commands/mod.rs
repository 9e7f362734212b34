//! One function per command; each returns the process exit code.

mod bench;
mod disk;
mod image;
mod mem;
mod oci;
mod sandbox;
mod snapshot;
mod verify;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command, DiskCommand, ImageCommand, MemCommand, SnapshotCommand};
use crate::context::Context;
use crate::daemon;

/// `cairn verify` found problems (distinct from failing to run).
pub const EXIT_PROBLEMS: u8 = 3;

pub fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Bench { name, args } = &cli.command {
        return bench::run(name, args, cli.global.store.as_deref());
    }
    if let Command::Sandbox(cmd) = &cli.command {
        return sandbox::run(&cli.global, cmd);
    }
    let ctx = Context::new(&cli.global)?;
    match cli.command {
        Command::Image(ImageCommand::ImportRaw {
            file,
            name,
            chunk_size,
            zstd_level,
        }) => image::import_raw(&ctx, &file, &name, &chunk_size, zstd_level),
        Command::Image(ImageCommand::Import {
            reference,
            name,
            platform,
            disk_size,
            insecure,
            replace,
            chunk_size,
        }) => oci::import(
            &ctx,
            &reference,
            &oci::ImportArgs {
                name,
                platform,
                disk_size,
                insecure,
                replace,
                chunk_size,
            },
        ),
        Command::Image(ImageCommand::Build {
            dir,
            file,
            name,
            build_args,
            platform,
            insecure,
            replace,
        }) => oci::build(
            &ctx,
            &oci::BuildArgs {
                dir,
                file,
                name,
                build_args,
                platform,
                insecure,
                replace,
            },
        ),
        Command::Image(ImageCommand::Export { image, file }) => image::export(&ctx, &image, &file),
        Command::Image(ImageCommand::Ls) => image::ls(&ctx),
        Command::Image(ImageCommand::Describe { image }) => image::describe(&ctx, &image),
        Command::Image(ImageCommand::Rm { name }) => image::rm(&ctx, &name),
        Command::Image(ImageCommand::Register {
            snapshot_uri,
            name,
            public,
            dockerfile,
        }) => image::register(&ctx, &snapshot_uri, &name, public, dockerfile.as_deref()),
        Command::Snapshot(SnapshotCommand::Ls { limit, after }) => {
            snapshot::ls(&ctx, limit, after.as_deref())
        }
        Command::Snapshot(SnapshotCommand::Describe { id }) => snapshot::describe(&ctx, &id),
        Command::Snapshot(SnapshotCommand::Rm { id, force }) => snapshot::rm(&ctx, &id, force),
        Command::Disk(DiskCommand::Serve {
            image,
            socket,
            overlay,
            read_only,
            queues,
            poll_us,
        }) => disk::serve(
            &ctx,
            &image,
            &socket,
            &overlay,
            read_only,
            queues,
            std::time::Duration::from_micros(poll_us),
        ),
        Command::Disk(DiskCommand::Snapshot { overlay, name }) => {
            disk::snapshot(&ctx, &overlay, &name)
        }
        Command::Mem(MemCommand::Import {
            file,
            name,
            parent,
            page_size,
            chunk_size,
        }) => mem::import(
            &ctx,
            &file,
            &name,
            parent.as_deref(),
            &page_size,
            &chunk_size,
        ),
        Command::Mem(MemCommand::Export { snapshot, file }) => {
            image::export(&ctx, &snapshot, &file)
        }
        Command::Mem(MemCommand::Serve {
            snapshot,
            socket,
            no_prefetch,
            record,
            fault_size,
            prefetch_rate,
            prefetch_workers,
            no_kill_vmm,
            handshake_timeout,
            once,
        }) => mem::serve(
            &ctx,
            &snapshot,
            &socket,
            mem::ServeArgs {
                prefetch: !no_prefetch,
                record,
                fault_size,
                prefetch_rate,
                prefetch_workers: usize::from(prefetch_workers),
                kill_vmm: !no_kill_vmm,
                handshake_timeout,
                once,
            },
        ),
        Command::Verify { deep } => verify::verify(&ctx, deep),
        Command::Daemon(args) => {
            let socket = match (args.socket, cli.global.daemon) {
                (Some(s), _) | (None, Some(s)) => s,
                (None, None) => daemon::default_socket()?,
            };
            let state_dir = match args.state_dir {
                Some(d) => d,
                None => daemon::default_state_dir()?,
            };
            let socket_dir = args
                .socket_dir
                .unwrap_or_else(|| daemon::default_socket_dir(&socket));
            daemon::run(
                &ctx,
                daemon::DaemonConfig {
                    socket,
                    socket_dir,
                    state_dir,
                    metrics_addr: args.metrics_addr,
                    kill_vmm: !args.no_kill_vmm,
                    upload_timeout: std::time::Duration::from_secs(args.upload_timeout),
                },
            )
        }
        Command::Sandbox(_) => unreachable!("handled before the store is opened"),
        Command::Bench { .. } => unreachable!("handled before the store is opened"),
    }
}
