//! Addresses: every simulator takes a /16 of the loopback network for itself, its pods get
//! addresses in the lower half and its Services in the upper half, so that two replicas
//! listening on the same container port never collide, and neither do two simulators run
//! side by side (tests run many at once). The /16 is held by a lock file for the
//! simulator's lifetime; the lock goes with the process, however it ends.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Pod addresses: `127.N.0.1` … `127.N.127.254`; Service addresses: `127.N.128.1` ….
const HALF: u32 = 128 * 254;

#[derive(Debug)]
pub struct Network {
    /// The first two octets of every address.
    prefix: [u8; 2],
    _lock: Option<File>,
    next_pod: AtomicU32,
    next_service: AtomicU32,
    /// Addresses handed out and still in use, so that a wrapped counter skips them.
    used: Mutex<std::collections::HashSet<Ipv4Addr>>,
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("kube-sim-networks")
}

impl Network {
    /// Takes a free `127.N.0.0/16` (N from 16 to 254) for this simulator.
    pub fn reserve() -> std::io::Result<Self> {
        let dir = lock_dir();
        std::fs::create_dir_all(&dir)?;
        // Start at a different place in each process so that simulators rarely race.
        let start = u8::try_from(std::process::id() % 239).unwrap_or(0);
        for i in 0..239u8 {
            let octet = 16 + (start + i) % 239;
            let file =
                File::options().create(true).truncate(false).write(true).open(dir.join(format!("{octet}.lock")))?;
            if file.try_lock().is_ok() {
                return Ok(Self::with(octet, Some(file)));
            }
        }
        Err(std::io::Error::other("every loopback /16 from 127.16.0.0 to 127.254.0.0 is held by another simulator"))
    }

    /// A network without a reservation (for tests that never bind an address).
    pub fn unreserved(octet: u8) -> Self {
        Self::with(octet, None)
    }

    /// Addresses in `A.B.0.0/16` (a node's pod range in a network namespace of its own).
    pub fn within(prefix: [u8; 2]) -> Self {
        Self { prefix, ..Self::with(0, None) }
    }

    fn with(octet: u8, lock: Option<File>) -> Self {
        Self {
            prefix: [127, octet],
            _lock: lock,
            next_pod: AtomicU32::new(0),
            next_service: AtomicU32::new(0),
            used: Mutex::new(std::collections::HashSet::new()),
        }
    }

    fn address(&self, n: u32, upper: bool) -> Ipv4Addr {
        let third = u8::try_from(n / 254).unwrap_or(0) + if upper { 128 } else { 0 };
        let fourth = u8::try_from(n % 254 + 1).unwrap_or(1);
        Ipv4Addr::new(self.prefix[0], self.prefix[1], third, fourth)
    }

    fn next(&self, counter: &AtomicU32, upper: bool) -> Ipv4Addr {
        let mut used = self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for _ in 0..HALF {
            let ip = self.address(counter.fetch_add(1, Ordering::Relaxed) % HALF, upper);
            if used.insert(ip) {
                return ip;
            }
        }
        // Every address is in use: share one rather than fail the pod.
        self.address(0, upper)
    }

    /// A new pod's address.
    pub fn pod_ip(&self) -> Ipv4Addr {
        self.next(&self.next_pod, false)
    }

    /// A new Service's cluster IP.
    pub fn service_ip(&self) -> Ipv4Addr {
        self.next(&self.next_service, true)
    }

    /// Hands an address back.
    pub fn release(&self, ip: Ipv4Addr) {
        self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&ip);
    }

    /// Takes an address given by a client (a Service created with its `clusterIP`).
    pub fn claim(&self, ip: Ipv4Addr) {
        self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulators_side_by_side_get_networks_of_their_own() {
        let a = Network::reserve().unwrap();
        let b = Network::reserve().unwrap();
        assert_ne!(a.prefix, b.prefix);
        let (p1, p2, s1) = (a.pod_ip(), a.pod_ip(), a.service_ip());
        assert_ne!(p1, p2);
        assert_eq!(p1.octets()[..2], a.prefix);
        assert!(s1.octets()[2] >= 128 && p1.octets()[2] < 128);
        a.release(p1);
        assert_ne!(a.pod_ip(), p1, "a released address is reused only after the others");
    }
}
