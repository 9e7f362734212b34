//! A private s3s-fs process, for tests that must stop and restart the
//! store's server (the tools tests include this file too).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private s3s-fs process, for tests that must stop and restart it.
pub struct PrivateS3 {
    pub endpoint: String,
    pub port: u16,
    pub root: PathBuf,
    child: Option<Child>,
}

pub const PRIVATE_KEY: &str = "cairnprivate";
pub const PRIVATE_SECRET: &str = "cairnprivatesecret";

impl PrivateS3 {
    pub fn start(root: &Path) -> PrivateS3 {
        std::fs::create_dir_all(root).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = PrivateS3 {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            root: root.to_owned(),
            child: None,
        };
        s.restart();
        s
    }

    pub fn restart(&mut self) {
        let bin = std::env::var("CAIRN_TEST_S3S_FS").unwrap_or_else(|_| "s3s-fs".to_owned());
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", PRIVATE_KEY, "--secret-key", PRIVATE_SECRET])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.root.with_extension("log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{bin}` (install: cargo install s3s-fs@0.14.1 --locked --features binary): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start listening: {}",
                std::fs::read_to_string(self.root.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        self.kill();
    }
}
