//! A sandbox's page server: its memory snapshot served over userfaultfd
//! on a Unix socket (Firecracker's protocol, as `cairn mem serve`), on
//! its own thread, for every VMM that connects until it is stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context as _, Result};
use cairn_engine::chunkstore::ChunkStore;
use cairn_engine::ManifestId;
use cairn_vmm_glue::activity::Activity;
use cairn_vmm_glue::uffd::{self, DisplayChain, ResumeReport, ServeConfig, ServedSnapshot, Stop};

/// How the daemon's page servers run.
#[derive(Clone)]
pub struct PageConfig {
    /// Kill a VMM whose resume is cut short (its sandbox removed, the
    /// daemon stopped): without its page server its next fault would
    /// never be answered.
    pub kill_vmm: bool,
    /// Called with each resume's report when it ends (the metrics).
    pub on_resume: Arc<dyn Fn(&ResumeReport) + Send + Sync>,
}

pub struct PageServer {
    pub socket: PathBuf,
    /// Its last page fault.
    activity: Arc<Activity>,
    stop: Stop,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Serves memory image `id` on `socket`; returns once it listens.
    pub fn start(
        store: &ChunkStore,
        id: ManifestId,
        socket: &Path,
        config: &PageConfig,
    ) -> Result<PageServer> {
        let served = ServedSnapshot::open(store, id)
            .map_err(|e| anyhow!("{}", DisplayChain(&e)))
            .with_context(|| format!("opening memory image {}", id.short()))?;
        let stop = Stop::new().context("creating a page server's stop signal")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let (sock, halt) = (socket.to_owned(), stop.clone());
        let on_resume = config.on_resume.clone();
        let activity = Arc::new(Activity::default());
        let cfg = ServeConfig {
            kill_vmm: config.kill_vmm,
            activity: Some(activity.clone()),
            ..ServeConfig::default()
        };
        let thread = std::thread::Builder::new()
            .name("cairn-pages".into())
            .spawn(move || {
                let ready = ready_tx.clone();
                let served_out = uffd::serve(
                    &sock,
                    &served,
                    &cfg,
                    &halt,
                    move || {
                        let _ = ready.send(Ok(()));
                    },
                    |outcome| {
                        match outcome {
                            Ok(r) => on_resume(&r),
                            Err(e) => {
                                tracing::warn!(socket = %sock.display(), error = %DisplayChain(&e), "a resume failed")
                            }
                        }
                        true
                    },
                );
                if let Err(e) = served_out {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("starting a page server thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(PageServer {
                socket: socket.to_owned(),
                activity,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e).with_context(|| format!("serving memory on {}", socket.display()))
            }
            Err(_) => {
                let _ = thread.join();
                Err(anyhow!(
                    "the page server for {} ended before it listened",
                    socket.display()
                ))
            }
        }
    }

    /// How long since its last page fault (or its start).
    pub fn idle_for(&self) -> std::time::Duration {
        self.activity.idle_for()
    }

    /// Stops serving: a resume under way ends (its VMM is killed, as with
    /// `mem serve --kill-vmm`), the socket goes.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.request();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.halt();
    }
}
