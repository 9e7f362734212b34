//! A vhost-user-blk socket: its listener and the VMM connected to it, run
//! by the shared pool ([`super::reactor`]). One VMM at a time; the next
//! waits in the listener's backlog until the connection ends.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vhost::vhost_user::BackendReqHandler;

use super::backend::{BlkBackend, ReadCounts};
use super::lock;
use super::reactor::{Reactor, Source, Token, Watch};
use super::session::Session;

/// What the listener and the connection share.
struct Shared {
    socket: PathBuf,
    backend: Arc<BlkBackend>,
    reactor: Arc<Reactor>,
    listener: UnixListener,
    listening: Mutex<Option<Token>>,
    stopped: AtomicBool,
    /// The connected VMM's registration, if one is connected.
    conn: Mutex<Option<Token>>,
    ended: Condvar,
}

struct Listening(Arc<Shared>);

impl Source for Listening {
    fn ready(&self) -> Watch {
        let shared = &self.0;
        if shared.stopped.load(Ordering::Acquire) {
            return Watch::Pause;
        }
        let stream = match shared.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Watch::Again,
            Err(e) => {
                tracing::warn!("cannot accept a VMM on {}: {e}", shared.socket.display());
                return Watch::Again;
            }
        };
        match Connection::start(shared, stream) {
            // The next VMM waits until this one goes.
            Ok(()) => Watch::Pause,
            Err(e) => {
                tracing::warn!("cannot serve a VMM on {}: {e}", shared.socket.display());
                Watch::Again
            }
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    handler: Mutex<BackendReqHandler<Mutex<Session>>>,
    session: Arc<Mutex<Session>>,
}

impl Connection {
    fn start(shared: &Arc<Shared>, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let cut = stream.try_clone()?;
        let fd = stream.as_raw_fd();
        let session = Arc::new(Mutex::new(Session::new(
            shared.backend.clone(),
            shared.reactor.clone(),
        )?));
        let conn = Arc::new(Connection {
            shared: shared.clone(),
            handler: Mutex::new(BackendReqHandler::from_stream(stream, session.clone())),
            session,
        });
        let mut slot = lock(&shared.conn);
        shared.backend.connected(Some(cut));
        *slot = Some(shared.reactor.add(fd, conn)?);
        tracing::info!("VMM connected");
        Ok(())
    }

    fn end(&self, why: String) {
        tracing::info!("VMM connection ended: {why}");
        lock(&self.session).close();
        let shared = &self.shared;
        shared.backend.connected(None);
        shared.backend.fence();
        let token = lock(&shared.conn).take();
        if let Some(token) = token {
            shared.reactor.remove(token);
        }
        shared.ended.notify_all();
        if !shared.stopped.load(Ordering::Acquire) {
            if let Some(token) = *lock(&shared.listening) {
                shared.reactor.rearm(token);
            }
        }
    }
}

impl Source for Connection {
    fn ready(&self) -> Watch {
        let result = lock(&self.handler).handle_request();
        match result {
            Ok(()) => Watch::Again,
            Err(e) => {
                self.end(e.to_string());
                Watch::Pause
            }
        }
    }
}

/// A vhost-user-blk socket served by the shared pool until stopped.
pub struct BlkServer {
    shared: Arc<Shared>,
}

impl BlkServer {
    /// Starts serving `backend` on `socket`; returns once the socket
    /// accepts connections.
    pub fn start(socket: &Path, backend: Arc<BlkBackend>) -> io::Result<BlkServer> {
        BlkServer::start_on(socket, None, backend)
    }

    /// [`BlkServer::start`] on `listener` if given, already bound at
    /// `socket` (connections waiting in its backlog are served).
    pub fn start_on(
        socket: &Path,
        listener: Option<UnixListener>,
        backend: Arc<BlkBackend>,
    ) -> io::Result<BlkServer> {
        // Bound here, not by `vhost::Listener`, whose drop removes the
        // path: a parked server's path may be another's by then.
        let listener = match listener {
            Some(l) => l,
            None => {
                let _ = std::fs::remove_file(socket);
                UnixListener::bind(socket)?
            }
        };
        listener.set_nonblocking(true)?;
        let reactor = Reactor::global().clone();
        let shared = Arc::new(Shared {
            socket: socket.to_owned(),
            backend,
            reactor: reactor.clone(),
            listener,
            listening: Mutex::new(None),
            stopped: AtomicBool::new(false),
            conn: Mutex::new(None),
            ended: Condvar::new(),
        });
        let mut listening = lock(&shared.listening);
        *listening = Some(reactor.add(
            shared.listener.as_raw_fd(),
            Arc::new(Listening(shared.clone())),
        )?);
        drop(listening);
        Ok(BlkServer { shared })
    }

    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// How long since its disk was last asked for anything.
    pub fn idle_for(&self) -> Duration {
        self.shared.backend.idle_for()
    }

    /// Bytes its guest read, by source.
    pub fn read_counts(&self) -> ReadCounts {
        self.shared.backend.read_counts()
    }

    /// Whether a VMM is connected now.
    pub fn vmm_connected(&self) -> bool {
        lock(&self.shared.conn).is_some()
    }

    /// Stops taking connections; returns at once if no VMM is connected,
    /// else when it disconnects.
    pub fn stop(self) -> io::Result<()> {
        self.stop_listening();
        let shared = &self.shared;
        let mut conn = lock(&shared.conn);
        while conn.is_some() {
            conn = shared.ended.wait(conn).unwrap_or_else(|p| p.into_inner());
        }
        drop(conn);
        if !shared.backend.is_parked() {
            let _ = std::fs::remove_file(&shared.socket);
        }
        Ok(())
    }

    /// Stops serving at once, for a disk that another backend serves
    /// next: requests in flight are answered, every completed write is
    /// durable, and none is served after this returns; the socket's path
    /// is removed. A connected VMM keeps its connection until its next
    /// request (a paused one's comes after it resumes), which cuts it: it
    /// then reconnects, by its path, to the next backend, where that
    /// request and those after it are served (as after any backend
    /// restart).
    pub fn park_and_stop(self) -> io::Result<()> {
        self.stop_listening();
        self.shared.backend.park();
        let _ = std::fs::remove_file(&self.shared.socket);
        Ok(())
    }

    fn stop_listening(&self) {
        let shared = &self.shared;
        shared.stopped.store(true, Ordering::Release);
        if let Some(token) = lock(&shared.listening).take() {
            shared.reactor.remove(token);
        }
    }
}

/// Listens on `socket` and serves one VMM connection after another until
/// the process ends; `ready` runs once the socket accepts connections.
pub fn serve(socket: &Path, backend: Arc<BlkBackend>, ready: impl FnOnce()) -> io::Result<()> {
    let _server = BlkServer::start(socket, backend)?;
    ready();
    loop {
        std::thread::park();
    }
}

/// How many threads serve every vhost-user-blk socket of the process.
pub fn pool_threads() -> usize {
    Reactor::global().threads()
}
