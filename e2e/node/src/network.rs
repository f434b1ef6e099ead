//! Pod addresses: the node hands each pod an address of its pod range (`A.B.0.0/16`, routed
//! to the loopback of the cluster's network namespace), and takes it back when the pod goes.
//! A released address is reused only after every other one was handed out, so that a
//! client still holding an old pod's address does not reach a new pod by mistake.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Addresses per range: `A.B.0.1` … `A.B.255.254`.
const SIZE: u32 = 256 * 254;

#[derive(Debug)]
pub struct Network {
    /// The first two octets of every address.
    prefix: [u8; 2],
    next: AtomicU32,
    /// Addresses handed out and still in use, so that a wrapped counter skips them.
    used: Mutex<HashSet<Ipv4Addr>>,
}

impl Network {
    /// Addresses in `A.B.0.0/16`.
    pub fn within(prefix: [u8; 2]) -> Self {
        Self { prefix, next: AtomicU32::new(0), used: Mutex::new(HashSet::new()) }
    }

    fn address(&self, n: u32) -> Ipv4Addr {
        let third = u8::try_from(n / 254).unwrap_or(0);
        let fourth = u8::try_from(n % 254 + 1).unwrap_or(1);
        Ipv4Addr::new(self.prefix[0], self.prefix[1], third, fourth)
    }

    /// A new pod's address.
    pub fn pod_ip(&self) -> Ipv4Addr {
        let mut used = self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for _ in 0..SIZE {
            let ip = self.address(self.next.fetch_add(1, Ordering::Relaxed) % SIZE);
            if used.insert(ip) {
                return ip;
            }
        }
        // Every address is in use: share one rather than fail the pod.
        self.address(0)
    }

    /// Hands an address back.
    pub fn release(&self, ip: Ipv4Addr) {
        self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_range_and_are_reused_last() {
        let net = Network::within([10, 88]);
        let (a, b) = (net.pod_ip(), net.pod_ip());
        assert_eq!(a, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(b, Ipv4Addr::new(10, 88, 0, 2));
        net.release(a);
        assert_ne!(net.pod_ip(), a, "a released address is reused only after the others");
        assert_eq!(net.address(254), Ipv4Addr::new(10, 88, 1, 1));
    }
}
