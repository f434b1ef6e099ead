//! The way back to the host: the node runs inside the cluster's network namespace, and a
//! few servers its pods use (Postgres, NATS, the S3 server) listen on the host's loopback.
//! One thread stays in the host's namespace and opens connections there; a port mirrored
//! with [`mirror`] is listened on at the namespace's own `127.0.0.1` and each connection is
//! joined to the same port on the host's, so pods reach them at the addresses they are
//! configured with.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

type Connect = (SocketAddr, oneshot::Sender<std::io::Result<TcpStream>>);

/// Opens connections in the host's network namespace; cheap to clone.
#[derive(Clone, Debug)]
pub struct Host {
    requests: mpsc::Sender<Connect>,
}

impl Host {
    /// A thread in the namespace `host` (a handle to `/proc/self/ns/net` opened before the
    /// process moved into the cluster's).
    pub fn start(host: OwnedFd) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Connect>();
        let (ready, entered) = mpsc::channel();
        std::thread::Builder::new().name("host-network".into()).spawn(move || {
            let joined = nix::sched::setns(host, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from);
            let failed = joined.is_err();
            let _ = ready.send(joined);
            if failed {
                return;
            }
            while let Ok((addr, reply)) = incoming.recv() {
                let _ = reply.send(TcpStream::connect_timeout(&addr, Duration::from_secs(5)));
            }
        })?;
        entered.recv().map_err(std::io::Error::other)??;
        Ok(Self { requests })
    }

    /// A connection to `addr` as seen from the host.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let (reply, answer) = oneshot::channel();
        self.requests.send((addr, reply)).map_err(|_| std::io::Error::other("the host thread stopped"))?;
        let stream = answer.await.map_err(|_| std::io::Error::other("the host thread stopped"))??;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
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
