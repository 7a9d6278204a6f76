//! A loopback TCP proxy that a test can take down and bring back.
//!
//! A connector under test connects to the proxy's address; the proxy forwards to the real
//! service. [`TcpProxy::down`] closes every open connection and the port itself (a service that
//! stopped); [`TcpProxy::refuse`] keeps the port open but closes each connection as soon as it is
//! accepted, counting them (a service that is restarting; the count shows whether a client
//! backs off or storms); [`TcpProxy::up`] forwards again on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Refuse,
    Down,
}

#[derive(Default)]
struct Shared {
    connections: Mutex<Vec<AbortHandle>>,
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

impl Shared {
    fn close_all(&self) {
        for handle in self.connections.lock().unwrap().drain(..) {
            handle.abort();
        }
    }
}

/// See the [module documentation](self).
pub struct TcpProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// A proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Forward);
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(run(listener, addr, target, rx, Arc::clone(&shared)));
        TcpProxy {
            addr,
            mode,
            shared,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and the port (as a stopped service).
    pub async fn down(&self) {
        self.mode.send_replace(Mode::Down);
        self.settle().await;
    }

    /// Closes every connection; keeps accepting, but closes each new connection at once.
    pub async fn refuse(&self) {
        self.mode.send_replace(Mode::Refuse);
        self.settle().await;
    }

    /// Forwards again (reopening the port if it was down).
    pub async fn up(&self) {
        self.mode.send_replace(Mode::Forward);
        self.settle().await;
    }

    /// Connections forwarded since the start.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at once while refusing, since the start.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    async fn settle(&self) {
        // The proxy task applies a mode change at its next await point; give it that moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.close_all();
    }
}

async fn run(
    first: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    shared: Arc<Shared>,
) {
    let mut listener = Some(first);
    loop {
        let current = *mode.borrow_and_update();
        if current != Mode::Forward {
            shared.close_all();
        }
        if current == Mode::Down {
            listener = None;
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        let active = match listener.take() {
            Some(l) => l,
            None => rebind(addr).await,
        };
        loop {
            tokio::select! {
                changed = mode.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                accepted = active.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    if *mode.borrow() == Mode::Refuse {
                        shared.refused.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                        continue;
                    }
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    let pipe = tokio::spawn(forward(client, target));
                    shared.connections.lock().unwrap().push(pipe.abort_handle());
                }
            }
        }
        listener = Some(active);
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    // The old socket may linger for a moment after it is dropped.
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the proxy could not listen on {addr} again");
}

async fn forward(mut client: TcpStream, target: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo_through(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn forwards_goes_down_refuses_and_comes_back() {
        let proxy = TcpProxy::start(echo_server().await).await;
        assert_eq!(echo_through(proxy.addr()).await.unwrap(), b"ping");

        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).await.unwrap();

        proxy.down().await;
        let mut rest = Vec::new();
        assert_eq!(
            open.read_to_end(&mut rest).await.unwrap_or(0),
            0,
            "open connection closed"
        );
        assert!(
            TcpStream::connect(proxy.addr()).await.is_err(),
            "port closed"
        );

        proxy.refuse().await;
        assert!(echo_through(proxy.addr()).await.is_err());
        assert_eq!(proxy.refused(), 1);

        proxy.up().await;
        assert_eq!(echo_through(proxy.addr()).await.unwrap(), b"ping");
        assert_eq!(proxy.accepted(), 3);
    }
}
