//! Detecting the death of peer processes on the same host.
//!
//! # What this module owns
//!
//! [`Identity`]: which host, PID namespace and process a layer runs in
//! (published through the bootstrap), and [`Identity::alive`], the check
//! of a peer's `/proc` entry.
//!
//! Shared-memory transports notice a dead peer late or never (UCX 1.13's
//! keep-alive does not fire reliably for them; libfabric's `shm` has no
//! connection to break), so the UCX and libfabric layers also check, now and
//! then, that the peers on their host still exist. A PID alone names a
//! process only within its PID namespace, and a reused PID names another:
//! containers on one host share the kernel's boot id, so the identity also
//! carries the PID namespace and the process's start time.
//!
//! # Invariants
//!
//! * A process is only checked when it runs in the same boot of the same
//!   kernel and the same PID namespace (otherwise its PID means nothing
//!   here).
//! * "Dead" means: no `/proc/<pid>` entry, a zombie, or a different start
//!   time (the PID was reused).

/// Where a process runs: its host (kernel boot and PID namespace), PID and
/// start time; see the module docs.
///
/// ```
/// use charmrs_transport::liveness::Identity;
/// let me = Identity::current();
/// assert!(me.comparable(&me) && me.alive());
/// assert_eq!(Identity::decode(&me.encode()), Some(me));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Kernel boot id and PID-namespace inode: equal means PIDs compare.
    host: String,
    pid: i32,
    start: u64,
}

/// Reads `/proc/<pid>/stat` and returns (state, start time in clock ticks).
fn stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after the last ')' are plain.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    // After the state come fields 4..; the start time is field 22.
    let start = f.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

impl Identity {
    /// This process's identity.
    pub fn current() -> Identity {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let pid = std::process::id() as i32;
        let start = stat(pid).map_or(0, |(_, s)| s);
        Identity {
            host: format!("{}|{ns}", boot.trim()),
            pid,
            start,
        }
    }

    /// Serialized for the bootstrap.
    pub fn encode(&self) -> Vec<u8> {
        format!("{} {} {}", self.pid, self.start, self.host).into_bytes()
    }

    /// Parses [`encode`](Identity::encode)'s output; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<Identity> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.splitn(3, ' ');
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        let host = it.next()?.to_owned();
        Some(Identity { host, pid, start })
    }

    /// Whether `other`'s liveness can be checked from this process.
    pub fn comparable(&self, other: &Identity) -> bool {
        !self.host.starts_with('|') && self.host == other.host && other.pid > 0
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process still exists (see the module docs).
    pub fn alive(&self) -> bool {
        match stat(self.pid) {
            Some((state, start)) => !matches!(state, 'Z' | 'X' | 'x') && start == self.start,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_child_is_not() {
        let me = Identity::current();
        assert!(me.comparable(&me));
        assert!(me.alive());
        assert_eq!(Identity::decode(&me.encode()), Some(me.clone()));
        assert_eq!(Identity::decode(b"garbage"), None);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let them = Identity {
            pid: child.id() as i32,
            start: stat(child.id() as i32).unwrap().1,
            ..me.clone()
        };
        assert!(them.alive());
        child.kill().unwrap();
        // A zombie until reaped: already dead.
        let t = std::time::Instant::now();
        while them.alive() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(!them.alive());
        let reused = Identity {
            start: them.start + 1,
            ..Identity::current()
        };
        assert!(!reused.alive());
    }
}
