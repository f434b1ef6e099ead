//! Where webhook deliveries may go. An endpoint URL is a request, by whoever created the
//! webhook, to make the platform send HTTP requests: without a policy it could reach the
//! cluster's internal services or a cloud metadata endpoint. Loopback, private,
//! link-local, shared (CGNAT), unspecified, multicast and cloud-metadata addresses are
//! refused unless the platform config's allow-list names them. The check applies to every
//! address a host name resolves to, and the sender connects only to checked addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The allow-list of the platform config.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicy {
    /// Networks deliveries may reach although they are not public.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_cidrs: Vec<IpNet>,
}

/// Addresses that serve instance metadata (and credentials) on the major clouds.
const METADATA: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

impl DestinationPolicy {
    /// Parses CIDRs (`10.0.0.0/8`) or single addresses (`127.0.0.1`).
    pub fn parse<'a>(cidrs: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let allowed_cidrs = cidrs
            .into_iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{text:?} is not a CIDR (like 10.0.0.0/8) or an IP address"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allowed_cidrs })
    }

    /// `Ok` when a delivery may connect to `addr`; otherwise why not.
    pub fn check(&self, addr: IpAddr) -> Result<(), String> {
        let addr = canonical(addr);
        if self.allowed_cidrs.iter().any(|net| net.contains(&addr)) {
            return Ok(());
        }
        match forbidden_kind(addr) {
            Some(kind) => Err(format!("{addr} is a {kind} address, which webhook deliveries may not reach")),
            None => Ok(()),
        }
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address it carries.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

fn forbidden_kind(addr: IpAddr) -> Option<&'static str> {
    if METADATA.contains(&addr) {
        return Some("cloud metadata");
    }
    match addr {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared (carrier-grade NAT)")
            } else if v4.is_unspecified() || a == 0 {
                Some("unspecified")
            } else if v4.is_multicast() || v4.is_broadcast() || a >= 240 {
                Some("multicast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if first == 0x64 && v6.segments()[1] == 0xff9b {
                // NAT64 could reach any IPv4 address, private ones included.
                Some("NAT64")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused_by_default() {
        let policy = DestinationPolicy::default();
        for (addr, kind) in [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("fd12::1", "private"),
            ("100.64.0.1", "shared"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("fd00:ec2::254", "cloud metadata"),
        ] {
            let err = policy.check(ip(addr)).unwrap_err();
            assert!(err.contains(kind), "{addr}: {err}");
        }
        for public in ["93.184.215.14", "1.1.1.1", "2606:4700::1111"] {
            assert!(policy.check(ip(public)).is_ok(), "{public}");
        }
    }

    #[test]
    fn the_allow_list_admits_exactly_what_it_names() {
        let policy = DestinationPolicy::parse(["127.0.0.0/8", "10.0.0.5"]).unwrap();
        assert!(policy.check(ip("127.0.0.2")).is_ok());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_ok(), "mapped addresses are their IPv4 address");
        assert!(policy.check(ip("10.0.0.5")).is_ok());
        assert!(policy.check(ip("10.0.0.6")).is_err());
        assert!(policy.check(ip("::1")).is_err(), "IPv6 loopback is not in 127.0.0.0/8");
    }

    #[test]
    fn bad_cidrs_are_named() {
        let err = DestinationPolicy::parse(["10.0.0.0/33"]).unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
    }
}
