//! The `sftp` source and sink against the real OpenSSH server on loopback (`scripts/services.sh`).
//! The server is on this machine, so the suite plays the other party straight on the server's
//! filesystem: it drops files into the polled directory (written under a hidden name, then
//! renamed, as a careful uploader does) and reads what the sink uploaded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::conformance::{Capabilities, Connector, Msg};

struct Sftp {
    root: PathBuf,
}

impl Sftp {
    fn new() -> Sftp {
        let root = PathBuf::from("/tmp").join(sluice_testkit::unique("sluice_sftp_conf"));
        std::fs::create_dir_all(&root).unwrap();
        Sftp { root }
    }

    fn keys() -> PathBuf {
        PathBuf::from(
            std::env::var("SLUICE_SERVICES_DIR").unwrap_or_else(|_| "/tmp/sluice-services".into()),
        )
        .join("sshd")
    }

    fn login(addr: SocketAddr) -> String {
        let host_key =
            std::fs::read_to_string(Self::keys().join("host_ed25519.pub")).unwrap_or_default();
        format!(
            "host: 127.0.0.1, port: {}, user: root, private_key_file: \"{}\", host_key: \"{}\"",
            addr.port(),
            Self::keys().join("client_ed25519").display(),
            host_key.trim()
        )
    }

    /// The files in `name`, by name, skipping hidden ones (uploads in progress, claim folders).
    fn files(&self, name: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.root.join(name))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

impl Drop for Sftp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[async_trait::async_trait]
impl Connector for Sftp {
    fn service(&self) -> &'static str {
        "OpenSSH (SFTP)"
    }
    fn address(&self) -> SocketAddr {
        "127.0.0.1:2222".parse().unwrap()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Files have a name and a body, no headers.
            headers: false,
            ..Capabilities::default()
        }
    }
    async fn create(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{sftp: {{{}, path: \"{}\", pattern: \"*.json\", poll_interval: 100ms}}}}",
            Self::login(addr),
            self.root.join(name).display()
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{sftp: {{{}, path: \"{}\", name: \"{{id}}.json\"}}}}",
            Self::login(addr),
            self.root.join(name).display()
        )
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
        let dir = self.root.join(name);
        for m in msgs {
            // Numbered names keep the order the source reads them in (name order).
            let file = format!("{:06}.json", m.n().unwrap_or_default());
            let hidden = dir.join(format!(".{file}.part"));
            std::fs::write(&hidden, m.body.to_string()).unwrap();
            std::fs::rename(&hidden, dir.join(file)).unwrap();
        }
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let deadline = Instant::now() + timeout;
        while self.files(name).len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Uploaded files are named by message id (UUID v7: in creation order).
        self.files(name)
            .into_iter()
            .take(n)
            .map(|path| {
                let body = std::fs::read(&path).unwrap();
                std::fs::remove_file(&path).unwrap();
                Msg {
                    body: serde_json::from_slice(&body)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
                    headers: Default::default(),
                }
            })
            .collect()
    }
}

crate::conformance_tests!(Sftp::new());
