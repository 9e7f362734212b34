//! A fault injector for the S3 path: a tiny HTTP/1.1 proxy on loopback in
//! front of the real S3 server. Each request is forwarded unchanged (SigV4
//! signs the Host header the client sent, which the server checks as
//! received, so signatures stay valid) unless the test's script says to
//! stall it, cut its answer short or answer it with a canned status. The
//! real aws-sdk-s3 client, its timeouts and cairn's retry policy thus meet
//! faults a real server cannot be made to produce on demand: a server that
//! hangs before or in the middle of an answer, or a 409.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the proxy does with one request.
pub enum Answer {
    /// Forward it and relay the server's answer.
    Forward,
    /// Read it and never answer (the connection stays open).
    Stall,
    /// Forward it, relay the answer's head and half its body, then stall.
    StallMidBody,
    /// Answer it without the server: status, S3 error code, message.
    Error {
        status: u16,
        code: &'static str,
        message: &'static str,
    },
}

/// A request as the script sees it.
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
}

type Script = dyn Fn(&Request) -> Answer + Send + Sync;

pub struct FaultProxy {
    pub endpoint: String,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`) on a free port.
    pub fn start(
        upstream: &str,
        script: impl Fn(&Request) -> Answer + Send + Sync + 'static,
    ) -> FaultProxy {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("an http:// upstream")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let (seen2, stop2) = (seen.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (upstream, script, seen, stop) = (
                    upstream.clone(),
                    script.clone(),
                    seen2.clone(),
                    stop2.clone(),
                );
                thread::spawn(move || {
                    let _ = serve(conn, &upstream, script.as_ref(), &seen, &stop);
                });
            }
        });
        FaultProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            seen,
            stop,
            port,
        }
    }

    /// Every request so far, as `METHOD target`.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests so far matched `f`.
    pub fn count(&self, f: impl Fn(&str) -> bool) -> usize {
        self.requests().iter().filter(|r| f(r)).count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// An HTTP message head (request or response) and its body's framing.
struct Head {
    raw: Vec<u8>,
    first_line: String,
    content_length: Option<usize>,
    chunked: bool,
}

fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let (mut first_line, mut content_length, mut chunked) = (None, None, false);
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.is_empty() {
            break;
        }
        if first_line.is_none() {
            first_line = Some(text);
            continue;
        }
        if let Some((name, value)) = text.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                content_length = value.parse().ok();
            } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    Ok(Some(Head {
        raw,
        first_line: first_line.unwrap_or_default(),
        content_length,
        chunked,
    }))
}

/// Reads the body `head` announces, raw (chunked framing kept).
fn read_body(r: &mut impl BufRead, head: &Head) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.chunked {
        loop {
            let mut size_line = Vec::new();
            r.read_until(b'\n', &mut size_line)?;
            body.extend_from_slice(&size_line);
            let text = String::from_utf8_lossy(&size_line);
            let hex = text.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, then an empty line.
                loop {
                    let mut line = Vec::new();
                    r.read_until(b'\n', &mut line)?;
                    body.extend_from_slice(&line);
                    if line == b"\r\n" || line.is_empty() {
                        return Ok(body);
                    }
                }
            }
            let at = body.len();
            body.resize(at + size + 2, 0);
            r.read_exact(&mut body[at..])?;
        }
    }
    let mut buf = vec![0u8; head.content_length.unwrap_or(0)];
    r.read_exact(&mut buf)?;
    body.extend_from_slice(&buf);
    Ok(body)
}

fn stall(stop: &AtomicBool) -> io::Result<()> {
    while !stop.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn serve(
    client: TcpStream,
    upstream: &str,
    script: &Script,
    seen: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut to_client = client.try_clone()?;
    let mut from_client = BufReader::new(client);
    let mut server: Option<(TcpStream, BufReader<TcpStream>)> = None;
    while let Some(head) = read_head(&mut from_client)? {
        let body = read_body(&mut from_client, &head)?;
        let mut parts = head.first_line.split(' ');
        let request = Request {
            method: parts.next().unwrap_or("").to_owned(),
            target: parts.next().unwrap_or("").to_owned(),
        };
        seen.lock()
            .unwrap()
            .push(format!("{} {}", request.method, request.target));
        let answer = script(&request);
        if let Answer::Error {
            status,
            code,
            message,
        } = answer
        {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
            );
            write!(
                to_client,
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                xml.len()
            )?;
            continue;
        }
        if matches!(answer, Answer::Stall) {
            return stall(stop);
        }
        if server.is_none() {
            let s = TcpStream::connect(upstream)?;
            server = Some((s.try_clone()?, BufReader::new(s)));
        }
        let (to_server, from_server) = server.as_mut().expect("connected above");
        to_server.write_all(&head.raw)?;
        to_server.write_all(&body)?;
        let reply = loop {
            let reply = read_head(from_server)?.ok_or(io::ErrorKind::UnexpectedEof)?;
            // Relay interim answers (100 Continue) as they are.
            if reply
                .first_line
                .split(' ')
                .nth(1)
                .is_some_and(|s| s.starts_with('1'))
            {
                to_client.write_all(&reply.raw)?;
                continue;
            }
            break reply;
        };
        let reply_body = if request.method == "HEAD" {
            Vec::new()
        } else {
            read_body(from_server, &reply)?
        };
        to_client.write_all(&reply.raw)?;
        if matches!(answer, Answer::StallMidBody) {
            to_client.write_all(&reply_body[..reply_body.len() / 2])?;
            to_client.flush()?;
            return stall(stop);
        }
        to_client.write_all(&reply_body)?;
    }
    Ok(())
}
