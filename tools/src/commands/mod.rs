//! One function per command; each returns the process exit code.

mod bench;
mod disk;
mod gc;
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
        return bench::run(name, args, cli.global.store.as_deref(), cli.global.json);
    }
    if let Command::Sandbox(cmd) = &cli.command {
        return sandbox::run(&cli.global, cmd);
    }
    if let Command::Completions { shell } = &cli.command {
        return completions(*shell);
    }
    if let Command::Man = &cli.command {
        return man();
    }
    let ctx = Context::new(&cli.global)?;
    match cli.command {
        Command::Image(ImageCommand::ImportRaw(args)) => image::import_raw(&ctx, &args),
        Command::Image(ImageCommand::Import(args)) => oci::import(&ctx, &args),
        Command::Image(ImageCommand::Build(args)) => oci::build(&ctx, &args),
        Command::Image(ImageCommand::Export(args)) | Command::Mem(MemCommand::Export(args)) => {
            image::export(&ctx, &args.image, &args.file)
        }
        Command::Image(ImageCommand::Ls) => image::ls(&ctx),
        Command::Image(ImageCommand::Describe { image }) => image::describe(&ctx, &image),
        Command::Image(ImageCommand::Rm { name }) => image::rm(&ctx, &name),
        Command::Image(ImageCommand::Register(args)) => image::register(&ctx, &args),
        Command::Snapshot(SnapshotCommand::Ls(args)) => snapshot::ls(&ctx, &args),
        Command::Snapshot(SnapshotCommand::Describe { id }) => snapshot::describe(&ctx, &id),
        Command::Snapshot(SnapshotCommand::Rm { id, force }) => snapshot::rm(&ctx, &id, force),
        Command::Disk(DiskCommand::Serve(args)) => disk::serve(&ctx, &args),
        Command::Disk(DiskCommand::Snapshot { overlay, name }) => {
            disk::snapshot(&ctx, &overlay, &name)
        }
        Command::Mem(MemCommand::Import(args)) => mem::import(&ctx, &args),
        Command::Mem(MemCommand::Serve(args)) => mem::serve(&ctx, &args),
        Command::Verify { deep } => verify::verify(&ctx, deep),
        Command::Gc(args) => gc::gc(&ctx, &args),
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
                    idle_hook: args.idle_hook.clone(),
                },
            )
        }
        Command::Sandbox(_)
        | Command::Bench { .. }
        | Command::Completions { .. }
        | Command::Man => {
            unreachable!("handled before the store is opened")
        }
    }
}

/// `cairn completions SHELL`: the script clap_complete writes.
fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "cairn", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// `cairn man`: the manual page clap_mangen renders from the same
/// definitions.
fn man() -> Result<ExitCode> {
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}
