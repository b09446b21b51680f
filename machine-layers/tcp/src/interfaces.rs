//! The address a [`TcpLayer`](crate::TcpLayer) listens on and publishes: chosen by the user
//! (an address, or a network interface by name), else loopback for a job on one host, else the
//! first network interface that is up and not loopback.
//!
//! # Invariants
//!
//! * [`listen_address`] never returns an unspecified address (`0.0.0.0`, `::`): peers dial what
//!   is published.
//! * Interfaces are read with `getifaddrs(3)`; only IPv4 and IPv6 addresses are considered, and
//!   IPv6 link-local ones are skipped (they need a scope id to be dialled).

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one network interface of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The interface's name (`eth0`, `ib0`, `hsn0`, `lo` …).
    pub name: String,
    /// One of its addresses.
    pub address: IpAddr,
    /// The interface is up.
    pub up: bool,
    /// It is a loopback interface.
    pub loopback: bool,
}

/// Every IPv4 and (not link-local) IPv6 address of this host's interfaces, in the order the
/// kernel lists them.
///
/// # Errors
///
/// The OS error of `getifaddrs`, as text.
pub fn host_interfaces() -> Result<Vec<InterfaceAddress>, String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`, which we own until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(format!("getifaddrs: {}", std::io::Error::last_os_error()));
    }
    let mut found = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and points to a sockaddr whose family field is valid;
        // the family tells which larger struct it is, read only then.
        let address = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        if let IpAddr::V6(v6) = address {
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
        }
        // SAFETY: `ifa_name` is a non-null NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let flags = ifa.ifa_flags;
        found.push(InterfaceAddress {
            name,
            address,
            up: flags & libc::IFF_UP as u32 != 0,
            loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
        });
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once; nothing borrowed from
    // it outlives this call (names were copied).
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// What a process of a job should listen on, from the user's choice and where the job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenChoice {
    /// This address (`CHARMRS_TCP_ADDR`).
    Address(String),
    /// The first IPv4 address (else IPv6) of this interface (`CHARMRS_TCP_IFACE`).
    Interface(String),
    /// Nothing chosen: loopback if `one_host`, else the first interface that is up and not
    /// loopback (IPv4 first).
    Automatic {
        /// Every process of the job runs on this host.
        one_host: bool,
    },
}

impl ListenChoice {
    /// The choice the environment makes: `CHARMRS_TCP_ADDR`, else `CHARMRS_TCP_IFACE`, else
    /// [`Automatic`](ListenChoice::Automatic) with `one_host`.
    pub fn from_env(one_host: bool) -> ListenChoice {
        let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        match (set("CHARMRS_TCP_ADDR"), set("CHARMRS_TCP_IFACE")) {
            (Some(address), _) => ListenChoice::Address(address),
            (None, Some(name)) => ListenChoice::Interface(name.trim().to_string()),
            (None, None) => ListenChoice::Automatic { one_host },
        }
    }

    /// [`listen_address`] on this host, reading its interfaces only if the choice needs them.
    ///
    /// # Errors
    ///
    /// As [`listen_address`] and [`host_interfaces`].
    pub fn resolve(&self) -> Result<IpAddr, String> {
        let interfaces = match self {
            ListenChoice::Address(_) | ListenChoice::Automatic { one_host: true } => Vec::new(),
            _ => host_interfaces()?,
        };
        listen_address(self, &interfaces)
    }
}

/// The address to listen on and publish for `choice`, given this host's `interfaces` (see
/// [`host_interfaces`]).
///
/// # Errors
///
/// A text naming what is wrong: an address that does not parse or is unspecified, an interface
/// that does not exist or has no address (listing those that do), or a host with no interface
/// but loopback in a job that spans hosts.
pub fn listen_address(
    choice: &ListenChoice,
    interfaces: &[InterfaceAddress],
) -> Result<IpAddr, String> {
    let names = || {
        let mut n: Vec<&str> = Vec::new();
        for i in interfaces {
            if !n.contains(&i.name.as_str()) {
                n.push(&i.name);
            }
        }
        n.join(", ")
    };
    let ipv4_first = |list: Vec<&InterfaceAddress>| {
        list.iter()
            .find(|i| i.address.is_ipv4())
            .or(list.first())
            .map(|i| i.address)
    };
    match choice {
        ListenChoice::Address(text) => {
            let address: IpAddr = text
                .trim()
                .parse()
                .map_err(|_| format!("CHARMRS_TCP_ADDR={text:?} is not an IP address"))?;
            if address.is_unspecified() {
                return Err(format!(
                    "CHARMRS_TCP_ADDR={text}: peers cannot dial an unspecified address; give \
                     this host's address on the network the job uses"
                ));
            }
            Ok(address)
        }
        ListenChoice::Interface(name) => {
            ipv4_first(interfaces.iter().filter(|i| &i.name == name).collect()).ok_or_else(|| {
                format!(
                    "CHARMRS_TCP_IFACE={name}: no such interface with an address on this host \
                     (interfaces: {})",
                    names()
                )
            })
        }
        ListenChoice::Automatic { one_host: true } => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ListenChoice::Automatic { one_host: false } => ipv4_first(
            interfaces
                .iter()
                .filter(|i| i.up && !i.loopback && !i.address.is_loopback())
                .collect(),
        )
        .ok_or_else(|| {
            format!(
                "the job spans hosts but this one has no network interface up besides loopback \
                 (interfaces: {}); set CHARMRS_TCP_IFACE or CHARMRS_TCP_ADDR",
                names()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, address: &str, up: bool) -> InterfaceAddress {
        let address: IpAddr = address.parse().unwrap();
        InterfaceAddress {
            name: name.into(),
            address,
            up,
            loopback: address.is_loopback(),
        }
    }

    fn host() -> Vec<InterfaceAddress> {
        vec![
            iface("lo", "127.0.0.1", true),
            iface("eth0", "2001:db8::5", true),
            iface("eth0", "192.0.2.5", true),
            iface("ib0", "10.1.0.5", false),
            iface("hsn0", "10.2.0.5", true),
        ]
    }

    #[test]
    fn the_host_lists_its_loopback() {
        let all = host_interfaces().unwrap();
        assert!(
            all.iter()
                .any(|i| i.loopback && i.address == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{all:?}"
        );
    }

    #[test]
    fn an_address_or_an_interface_is_taken_as_given() {
        let h = host();
        let addr = |c| listen_address(&c, &h);
        assert_eq!(
            addr(ListenChoice::Address("10.9.8.7".into())).unwrap(),
            "10.9.8.7".parse::<IpAddr>().unwrap()
        );
        // IPv4 before IPv6 on one interface; a down interface is still the user's choice.
        assert_eq!(
            addr(ListenChoice::Interface("eth0".into())).unwrap(),
            "192.0.2.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            addr(ListenChoice::Interface("ib0".into())).unwrap(),
            "10.1.0.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn automatic_is_loopback_on_one_host_else_the_first_external_interface_up() {
        let h = host();
        assert_eq!(
            listen_address(&ListenChoice::Automatic { one_host: true }, &h).unwrap(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            listen_address(&ListenChoice::Automatic { one_host: false }, &h).unwrap(),
            "192.0.2.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bad_choices_are_named() {
        let h = host();
        let err = |c| listen_address(&c, &h).unwrap_err();
        let e = err(ListenChoice::Address("eth0".into()));
        assert!(e.contains("CHARMRS_TCP_ADDR") && e.contains("eth0"), "{e}");
        let e = err(ListenChoice::Address("0.0.0.0".into()));
        assert!(e.contains("unspecified"), "{e}");
        let e = err(ListenChoice::Interface("wlan7".into()));
        assert!(
            e.contains("wlan7") && e.contains("eth0") && e.contains("hsn0"),
            "{e}"
        );
        let only_lo = vec![iface("lo", "127.0.0.1", true)];
        let e = listen_address(&ListenChoice::Automatic { one_host: false }, &only_lo).unwrap_err();
        assert!(e.contains("CHARMRS_TCP_IFACE") && e.contains("lo"), "{e}");
    }
}
