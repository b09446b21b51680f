//! Whether the host of a peer still acknowledges the data this process sent it: how the layer
//! finds a peer whose host fell silent (a crash, a power loss, a cut network: no FIN or RST ever
//! comes) while data to it is in flight, which keepalive cannot (see [`keep_alive`]).
//!
//! # What this module owns
//!
//! [`AckState`], what the kernel reports of one connection's outgoing data (`TCP_INFO` and
//! `TIOCOUTQ`), the rule that reads a silent host from one such state
//! ([`AckState::silent_host`]), and [`SilenceWatch`], which takes successive states of one
//! connection and decides: one look, or one lost packet, never does.
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
use std::time::{Duration, Instant};

use crate::poll::check;

/// Probes of a closed receive window sent since the peer's host last answered anything, from
/// which it counts as silent: the kernel counts a probe when it sends it, so this is two
/// unanswered and one perhaps in flight (and as many as keepalive, the kernel's other probing,
/// allows an idle connection: `poll::KEEPALIVE_PROBES`).
const SILENT_WINDOW_PROBES: u8 = 3;

/// How long data sent after the peer's host last answered must have gone unanswered before it
/// counts: far above a round trip and a delayed acknowledgement on any network a job runs on,
/// so that a transmission just made (a retransmission that probes a closed window, the first
/// write after an idle spell) is never read as silence.
pub(crate) const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// The shortest acknowledgement limit the layer takes ([`TcpConfig::ack_timeout`]: a shorter one
/// is raised to it): twice the second for which a transmission must have gone unanswered.
///
/// [`TcpConfig::ack_timeout`]: crate::TcpConfig::ack_timeout
pub const MIN_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Two readings of one transmission's time, at two looks, differ by at most this (the kernel
/// keeps it in jiffies; the looks' own clock reads add their jitter).
const SAME_TRANSMISSION: Duration = Duration::from_millis(50);

/// What one state says of the peer's host ([`AckState::silent_host`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reading {
    /// Nothing says it is silent: nothing outstanding, or it answered recently, or after the
    /// last transmission.
    Answering,
    /// Silent for the limit, but the last transmission is under [`ANSWER_GRACE`] old: its answer
    /// may be on the way.
    Asked,
    /// Silent.
    Silent(Silence),
}

/// Why a host counts as silent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Silence {
    /// Why, for the loss report.
    pub(crate) why: String,
    /// Found by the data rule: how long ago the unanswered transmission was made. `None` for the
    /// window probes.
    pub(crate) unanswered_sent: Option<Duration>,
}

/// What the kernel reports of a connection's outgoing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckState {
    /// Bytes written and not yet acknowledged by the peer's host, sent or not (`TIOCOUTQ`).
    pub(crate) outstanding: usize,
    /// Segments sent and not yet acknowledged (`tcpi_unacked`): usually none while the peer's
    /// window is closed (nothing may be sent then but probes), but segments sent before it
    /// closed stay counted, and the kernel retransmits them as its probes.
    pub(crate) unacked: u32,
    /// Probes sent since the peer's host last answered anything (`tcpi_probes`; the kernel
    /// counts a probe when it sends it, so the last may still be on its way): window probes
    /// while its window is closed (keepalive probes, the kernel's other kind, are sent only with
    /// nothing outstanding).
    pub(crate) unanswered_probes: u8,
    /// Time since the peer's host last acknowledged anything (`tcpi_last_ack_recv`).
    pub(crate) since_ack: Duration,
    /// Time since data was last transmitted, a retransmission included (`tcpi_last_data_sent`).
    pub(crate) since_data: Duration,
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
        check(unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        })?;
        let mut outstanding: libc::c_int = 0;
        // SAFETY: as above; TIOCOUTQ writes one c_int into the live `outstanding`.
        check(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outstanding) })?;
        Ok(AckState {
            outstanding: usize::try_from(outstanding).unwrap_or(0),
            unacked: info.tcpi_unacked,
            unanswered_probes: info.tcpi_probes,
            since_ack: Duration::from_millis(u64::from(info.tcpi_last_ack_recv)),
            since_data: Duration::from_millis(u64::from(info.tcpi_last_data_sent)),
        })
    }

    /// Why the peer's host counts as silent, if it does. Either it has acknowledged nothing for
    /// `limit` (at least [`MIN_ACK_TIMEOUT`]) with segments outstanding, and data was sent to it
    /// after its last acknowledgement, [`ANSWER_GRACE`] or more ago, that it has not answered (a
    /// live host answers every transmission within a round trip, the retransmissions that probe
    /// a closed window included; the kernel's retransmissions of unanswered data back off, so
    /// with no transmission since its last answer the host may simply not have been asked).
    /// Or it left the probes of its closed window unanswered ([`SILENT_WINDOW_PROBES`]). `None`
    /// with nothing outstanding. One state decides nothing: see [`SilenceWatch`].
    pub(crate) fn silent_host(&self, limit: Duration) -> Reading {
        if self.outstanding == 0 {
            return Reading::Answering;
        }
        if self.unacked > 0
            && self.since_ack >= limit.max(MIN_ACK_TIMEOUT)
            && self.since_data < self.since_ack
        {
            if self.since_data < ANSWER_GRACE {
                return Reading::Asked;
            }
            return Reading::Silent(Silence {
                why: format!(
                    "its host acknowledged nothing for {:.1} s with {} bytes outstanding (down, \
                     or cut off from this host)",
                    self.since_ack.as_secs_f64(),
                    self.outstanding
                ),
                unanswered_sent: Some(self.since_data),
            });
        }
        if self.unanswered_probes >= SILENT_WINDOW_PROBES {
            return Reading::Silent(Silence {
                why: format!(
                    "its host answered none of the last {} probes of its closed receive window, \
                     with {} bytes outstanding (down, or cut off from this host)",
                    self.unanswered_probes - 1,
                    self.outstanding
                ),
                unanswered_sent: None,
            });
        }
        Reading::Answering
    }
}

/// Decides, from successive states of one connection (looks a second or so apart), whether its
/// peer's host is silent: when [`AckState::silent_host`] finds it so at two looks in a row, and,
/// by the data rule, about two distinct transmissions (the first one unanswered, then a later
/// one too: a live host that misses one retransmission answers the next, which the kernel makes
/// anyway). A look that finds a transmission too fresh to judge ([`Reading::Asked`]) changes
/// nothing; any other look that does not find the host silent starts over.
#[derive(Debug)]
pub(crate) struct SilenceWatch {
    limit: Duration,
    /// What the previous look found: nothing, the window probes' silence (`Some(None)`), or the
    /// data rule's, with the instant of the first transmission found unanswered.
    previous: Option<Option<Instant>>,
}

impl SilenceWatch {
    /// A watch with acknowledgement limit `limit` (`TcpConfig::ack_timeout`).
    pub(crate) fn new(limit: Duration) -> SilenceWatch {
        SilenceWatch {
            limit,
            previous: None,
        }
    }

    /// Takes the state read at `now`; says why the host is silent once it is decided.
    pub(crate) fn look(&mut self, state: &AckState, now: Instant) -> Option<String> {
        let silence = match state.silent_host(self.limit) {
            Reading::Silent(silence) => silence,
            Reading::Asked => return None,
            Reading::Answering => {
                self.previous = None;
                return None;
            }
        };
        // When the unanswered transmission was made (a reading too old for the clock counts as
        // no transmission).
        let sent = silence.unanswered_sent.map(|ago| now.checked_sub(ago));
        match (self.previous, sent) {
            (Some(None), None) => return Some(silence.why),
            (Some(Some(first)), Some(Some(sent))) if sent > first + SAME_TRANSMISSION => {
                return Some(silence.why)
            }
            // The same transmission, still unanswered: wait for the next.
            (Some(Some(_)), Some(Some(_))) => {}
            (_, None) => self.previous = Some(None),
            (_, Some(sent)) => self.previous = sent.map(Some),
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

    /// Why `s` reads as silent under `limit`, if it does.
    fn silent(s: &AckState, limit: Duration) -> Option<String> {
        match s.silent_host(limit) {
            Reading::Silent(silence) => Some(silence.why),
            _ => None,
        }
    }

    /// A state with data last sent 3 s ago.
    fn state(outstanding: usize, unacked: u32, probes: u8, since_ack_ms: u64) -> AckState {
        AckState {
            outstanding,
            unacked,
            unanswered_probes: probes,
            since_ack: Duration::from_millis(since_ack_ms),
            since_data: Duration::from_secs(3),
        }
    }

    #[test]
    fn only_a_host_that_stops_acknowledging_outstanding_data_is_silent() {
        let limit = Duration::from_secs(10);
        // Idle (keepalive's), however long since the last acknowledgement.
        assert_eq!(silent(&state(0, 0, 0, 600_000), limit), None);
        assert_eq!(silent(&state(0, 0, 3, 600_000), limit), None);
        // Data in flight, acknowledged recently.
        assert_eq!(silent(&state(1 << 20, 40, 0, 9_999), limit), None);
        // Data in flight, nothing acknowledged for the limit: the host is gone.
        let why = silent(&state(1 << 20, 40, 0, 10_000), limit).unwrap();
        assert!(why.contains("acknowledged nothing for 10.0 s"), "{why}");
        assert!(why.contains("1048576 bytes outstanding"), "{why}");
        // A window kept closed by a peer that reads nothing: its probes are answered (the count
        // is reset), so however long since the last answer, it is alive.
        assert_eq!(silent(&state(4 << 20, 0, 0, 110_000), limit), None);
        assert_eq!(silent(&state(4 << 20, 0, 1, 110_000), limit), None);
        // Two probes in a row unanswered (and a third sent).
        assert_eq!(silent(&state(4 << 20, 0, 2, 3_000), limit), None);
        let why = silent(&state(4 << 20, 0, 3, 3_000), limit).unwrap();
        assert!(why.contains("none of the last 2 probes"), "{why}");
        // Segments outstanding behind a closed window, retransmitted as probes two minutes apart
        // and answered: the last transmission came before the last answer.
        let answered = AckState {
            since_data: Duration::from_secs(61),
            ..state(4 << 20, 3, 0, 60_000)
        };
        assert_eq!(silent(&answered, limit), None);
        // The same with a transmission just made after a long silence (its answer on the way),
        // or half a second ago: not yet unanswered.
        for sent_ms in [0, 500] {
            let asked = AckState {
                since_data: Duration::from_millis(sent_ms),
                ..state(4 << 20, 3, 0, 60_000)
            };
            assert_eq!(asked.silent_host(limit), Reading::Asked);
        }
        // A limit under the minimum is raised to it.
        assert_eq!(
            silent(&state(1 << 20, 40, 0, 1_900), Duration::from_millis(100)),
            None
        );
        assert!(silent(&state(1 << 20, 40, 0, 4_000), Duration::from_millis(100)).is_some());
    }

    #[test]
    fn the_watch_decides_on_two_looks_and_two_unanswered_transmissions() {
        let limit = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(100 + s);
        // Data outstanding, nothing acknowledged for `ack` s, the last transmission `data` s ago.
        let data = |ack: u64, data: u64| AckState {
            since_data: Duration::from_secs(data),
            ..state(1 << 20, 40, 0, ack * 1000)
        };
        // A cut link: retransmissions at 12 s and 18 s after the last answer, never answered.
        let mut w = SilenceWatch::new(limit);
        assert_eq!(w.look(&data(13, 1), at(13)), None); // first unanswered transmission
        assert_eq!(w.look(&data(14, 2), at(14)), None); // the same one, still unanswered
        assert_eq!(w.look(&data(18, 0), at(18)), None); // a new one, just made
        let why = w
            .look(&data(19, 1), at(19))
            .expect("two transmissions unanswered");
        assert!(why.contains("acknowledged nothing for 19.0 s"), "{why}");
        // A live host behind a closed window that missed one retransmission: the next is
        // answered (the answer comes after it: `since_ack` < `since_data`), which starts over.
        let mut w = SilenceWatch::new(limit);
        assert_eq!(w.look(&data(40, 2), at(40)), None);
        let answered = AckState {
            since_data: Duration::from_millis(1500),
            ..state(1 << 20, 40, 0, 1400)
        };
        assert_eq!(w.look(&answered, at(41)), None);
        assert_eq!(w.look(&data(11, 3), at(51)), None);
        // Window probes unanswered: two looks in a row.
        let mut w = SilenceWatch::new(limit);
        let probes = state(4 << 20, 0, 3, 5_000);
        assert_eq!(w.look(&probes, at(5)), None);
        assert!(w.look(&probes, at(6)).is_some());
        // ... and not when a look in between found nothing.
        let mut w = SilenceWatch::new(limit);
        assert_eq!(w.look(&probes, at(5)), None);
        assert_eq!(w.look(&state(4 << 20, 0, 0, 100), at(6)), None);
        assert_eq!(w.look(&probes, at(7)), None);
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
        let limit = MIN_ACK_TIMEOUT;
        let start = std::time::Instant::now();
        let mut written = 0usize;
        let (mut full, mut longest_silence) = (false, Duration::ZERO);
        // The kernel's probes of the closed window back off (0.2 s, 0.4 s, … apart): within 7 s
        // two of them are more than the limit apart.
        while start.elapsed() < Duration::from_secs(7) {
            match out.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    full = true;
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("write: {e}"),
            }
            let s = AckState::of(out.as_fd()).unwrap();
            if s.outstanding > 0 {
                longest_silence = longest_silence.max(s.since_ack);
            }
            assert_eq!(silent(&s, limit), None, "{s:?}");
        }
        assert!(full, "the socket never filled");
        assert!(
            longest_silence >= limit,
            "the reader's host was never silent as long as the limit ({longest_silence:?})"
        );
        // Everything written arrives once the reader reads.
        out.set_nonblocking(false).unwrap();
        drop(out);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), written);
    }
}
