//! Sockets in another network namespace. The node runs inside the cluster's namespace, and a
//! few servers its pods use (Postgres, NATS, the S3 server) listen on the host's loopback:
//! one thread stays in the host's namespace and opens connections there; a port mirrored
//! with [`mirror`] is listened on at the namespace's own `127.0.0.1` and each connection is
//! joined to the same port on the host's, so pods reach them at the addresses they are
//! configured with. Tests do the reverse: from the host, they reach Services and listen for
//! pods inside a cluster's namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

enum Ask {
    Connect(SocketAddr, oneshot::Sender<std::io::Result<TcpStream>>),
    Listen(SocketAddr, oneshot::Sender<std::io::Result<std::net::TcpListener>>),
}

/// Opens sockets in one network namespace, whichever the calling thread is in; cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Host {
    requests: mpsc::Sender<Ask>,
}

impl Host {
    /// A thread in the namespace `netns` (a handle to `/proc/self/ns/net` opened before the
    /// process moved into the cluster's, or to `/run/netns/NAME`).
    pub fn start(netns: OwnedFd) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Ask>();
        let (ready, entered) = mpsc::channel();
        std::thread::Builder::new().name("host-network".into()).spawn(move || {
            let joined = nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from);
            let failed = joined.is_err();
            let _ = ready.send(joined);
            if failed {
                return;
            }
            while let Ok(ask) = incoming.recv() {
                match ask {
                    Ask::Connect(addr, reply) => {
                        let _ = reply.send(TcpStream::connect_timeout(&addr, Duration::from_secs(5)));
                    }
                    Ask::Listen(addr, reply) => {
                        let _ = reply.send(std::net::TcpListener::bind(addr));
                    }
                }
            }
        })?;
        entered.recv().map_err(std::io::Error::other)??;
        Ok(Self { requests })
    }

    /// A connection to `addr` as seen from the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Ask::Connect(addr, reply))
            .map_err(|_| std::io::Error::other("the namespace's thread stopped"))?;
        let stream = answer.await.map_err(|_| std::io::Error::other("the namespace's thread stopped"))??;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    }

    /// A listener on `addr` in the namespace.
    pub async fn listen(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Ask::Listen(addr, reply))
            .map_err(|_| std::io::Error::other("the namespace's thread stopped"))?;
        let listener = answer.await.map_err(|_| std::io::Error::other("the namespace's thread stopped"))??;
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    }
}

/// Serves `127.0.0.1:port` of the cluster's namespace as the host's `127.0.0.1:port`.
pub async fn mirror(host: Host, port: u16) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut inbound, _) = listener.accept().await?;
        let host = host.clone();
        tokio::spawn(async move {
            match host.connect(addr).await {
                Ok(mut outbound) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Err(e) => tracing::debug!(port, error = %e, "host port"),
            }
        });
    }
}
