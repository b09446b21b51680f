//! Whether the host of a peer still acknowledges the data this process sent it: how the layer
//! finds a peer whose host fell silent (a crash, a power loss, a cut network: no FIN or RST ever
//! comes) while data to it is in flight, which keepalive cannot (see [`keep_alive`]).
//!
//! # What this module owns
//!
//! [`AckState`], what the kernel reports of one connection's outgoing data (`TCP_INFO` and
//! `TIOCOUTQ`), and the rule that reads a silent host from it ([`AckState::silent_host`]).
//!
//! # Invariants
//!
//! * A connection with nothing outgoing is never judged here: an idle connection is keepalive's.
//! * Only the *kernel's* silence counts, never the peer process's: a peer that reads nothing
//!   (busy, or holding the sender back) keeps its receive window closed, and its kernel answers
//!   the window probes; that is never a silent host, however long it lasts. This is why the layer
//!   does not set `TCP_USER_TIMEOUT`, which Linux also applies to answered window probes (a live
//!   peer that does not read for that long would be cut off: measured on this machine's kernel,
//!   6.18).
//!
//! [`keep_alive`]: crate::poll::keep_alive

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Unanswered probes of a closed receive window after which the peer's host counts as silent
/// (a probe answered resets the kernel's count; one lost probe on a sound network is rare, two
/// in a row are a host that is gone).
const SILENT_WINDOW_PROBES: u8 = 2;

/// What the kernel reports of a connection's outgoing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckState {
    /// Bytes written and not yet acknowledged by the peer's host, sent or not (`TIOCOUTQ`).
    pub(crate) outstanding: usize,
    /// Segments sent and not yet acknowledged (`tcpi_unacked`): none while the peer's window is
    /// closed (nothing may be sent then but probes).
    pub(crate) unacked: u32,
    /// Probes the peer's host has not answered since it last answered anything
    /// (`tcpi_probes`): window probes while its window is closed (keepalive probes, the
    /// kernel's other kind, are sent only with nothing outstanding).
    pub(crate) unanswered_probes: u8,
    /// Time since the peer's host last acknowledged anything (`tcpi_last_ack_recv`).
    pub(crate) since_ack: Duration,
}

impl AckState {
    /// Reads the state of `fd`, a connected TCP socket.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> io::Result<AckState> {
        let fd = fd.as_raw_fd();
        // SAFETY: `tcp_info` is a plain C struct of integers, valid when zeroed.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `fd` is an open socket borrowed for the call; `info` is writable for `len`
        // bytes, and the kernel writes at most `len` (and says how many in `len`).
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if got != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut outstanding: libc::c_int = 0;
        // SAFETY: as above; TIOCOUTQ writes one c_int into the live `outstanding`.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outstanding) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AckState {
            outstanding: usize::try_from(outstanding).unwrap_or(0),
            unacked: info.tcpi_unacked,
            unanswered_probes: info.tcpi_probes,
            since_ack: Duration::from_millis(u64::from(info.tcpi_last_ack_recv)),
        })
    }

    /// Why the peer's host counts as silent, if it does: data sent to it has waited `limit` or
    /// longer without the host acknowledging anything, or it left [`SILENT_WINDOW_PROBES`]
    /// probes of its closed window unanswered in a row. `None` with nothing outstanding.
    pub(crate) fn silent_host(&self, limit: Duration) -> Option<String> {
        if self.outstanding == 0 {
            return None;
        }
        if self.unacked > 0 && self.since_ack >= limit {
            return Some(format!(
                "its host acknowledged nothing for {:.1} s with {} bytes outstanding (down, or \
                 cut off from this host)",
                self.since_ack.as_secs_f64(),
                self.outstanding
            ));
        }
        if self.unanswered_probes >= SILENT_WINDOW_PROBES {
            return Some(format!(
                "its host answered none of the last {} probes of its closed receive window, \
                 with {} bytes outstanding (down, or cut off from this host)",
                self.unanswered_probes, self.outstanding
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn state(outstanding: usize, unacked: u32, probes: u8, since_ack_ms: u64) -> AckState {
        AckState {
            outstanding,
            unacked,
            unanswered_probes: probes,
            since_ack: Duration::from_millis(since_ack_ms),
        }
    }

    #[test]
    fn only_a_host_that_stops_acknowledging_outstanding_data_is_silent() {
        let limit = Duration::from_secs(10);
        // Idle (keepalive's), however long since the last acknowledgement.
        assert_eq!(state(0, 0, 0, 600_000).silent_host(limit), None);
        assert_eq!(state(0, 0, 3, 600_000).silent_host(limit), None);
        // Data in flight, acknowledged recently.
        assert_eq!(state(1 << 20, 40, 0, 9_999).silent_host(limit), None);
        // Data in flight, nothing acknowledged for the limit: the host is gone.
        let why = state(1 << 20, 40, 0, 10_000).silent_host(limit).unwrap();
        assert!(why.contains("acknowledged nothing for 10.0 s"), "{why}");
        assert!(why.contains("1048576 bytes outstanding"), "{why}");
        // A window kept closed by a peer that reads nothing: its probes are answered (the count
        // is reset), so however long since the last answer, it is alive.
        assert_eq!(state(4 << 20, 0, 0, 110_000).silent_host(limit), None);
        assert_eq!(state(4 << 20, 0, 1, 110_000).silent_host(limit), None);
        // Two probes in a row unanswered.
        let why = state(4 << 20, 0, 2, 3_000).silent_host(limit).unwrap();
        assert!(why.contains("none of the last 2 probes"), "{why}");
    }

    /// A live peer that reads nothing, its window closed for longer than the limit, is not a
    /// silent host (the kernel answers the window probes), and the state is read from a real
    /// socket.
    #[test]
    fn a_peer_that_reads_nothing_is_not_a_silent_host() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut out = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut reader, _) = listener.accept().unwrap();
        out.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let limit = Duration::from_millis(1500);
        let start = std::time::Instant::now();
        let mut written = 0usize;
        let mut seen_closed = false;
        while start.elapsed() < Duration::from_secs(4) {
            match out.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("write: {e}"),
            }
            let s = AckState::of(out.as_fd()).unwrap();
            seen_closed |= s.outstanding > 0 && s.unacked == 0;
            assert_eq!(s.silent_host(limit), None, "{s:?}");
        }
        assert!(seen_closed, "the reader's window never closed");
        // Everything written arrives once the reader reads.
        out.set_nonblocking(false).unwrap();
        drop(out);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), written);
    }
}
