//! Thin safe wrappers over the Linux socket calls the layer needs beyond
//! `std`: `epoll` and `eventfd`, the readiness primitives of the receive
//! side ([`crate::recv`]), non-blocking vectored sends, and the keepalive
//! options that find a silent peer ([`keep_alive`]).
//!
//! # Invariants
//!
//! * Every descriptor is owned ([`OwnedFd`]) and close-on-exec; nothing
//!   here closes a descriptor it does not own.
//! * An [`Epoll`] registration is keyed by a caller-chosen `u64` token, never
//!   by the descriptor number, so a reused descriptor number cannot be
//!   mistaken for an older connection. Callers remove a registration
//!   ([`Epoll::delete`]) before closing the descriptor (a `dup` of it may
//!   keep the open file, and so the registration, alive).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Readiness interest of a registration.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Trigger {
    /// Reported while the descriptor is readable (level-triggered).
    Level,
    /// Reported once per arrival of new input (edge-triggered).
    Edge,
}

/// An epoll instance.
#[derive(Debug)]
pub(crate) struct Epoll {
    fd: OwnedFd,
}

/// Converts a `-1` return into the thread's `errno`.
pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Epoll {
    /// A new, empty epoll instance.
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a
        // fresh descriptor that nothing else owns, so `OwnedFd` may take it.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by the kernel and is owned by no one.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// Watches `fd` for input (and hang-up) under `token`.
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: u64, trigger: Trigger) -> io::Result<()> {
        let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if matches!(trigger, Trigger::Edge) {
            events |= libc::EPOLLET as u32;
        }
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are open for the duration of the call
        // (borrowed), and `ev` is a valid, initialised epoll_event the kernel
        // only reads.
        check(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        })?;
        Ok(())
    }

    /// Stops watching `fd`.
    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add`; the event argument is ignored for DEL but must
        // be non-null on old kernels, so a valid one is passed.
        check(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                &mut ev,
            )
        })?;
        Ok(())
    }

    /// Waits up to `timeout` (`None`: forever; rounded up to whole
    /// milliseconds; `Some(ZERO)`: does not block) and appends the tokens of
    /// ready registrations to `ready` (which it clears first). An
    /// interrupted wait returns no tokens.
    pub(crate) fn wait(&self, ready: &mut Vec<u64>, timeout: Option<Duration>) -> io::Result<()> {
        const MAX: usize = 64;
        ready.clear();
        let ms = match timeout {
            None => -1,
            Some(t) => {
                let ms = t.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        // SAFETY: `events` is a writable array of MAX epoll_events that
        // outlives the call, and MAX is passed as its length.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                MAX as libc::c_int,
                ms,
            )
        };
        match check(n) {
            Ok(n) => {
                // `{ e.u64 }` copies the field out: epoll_event is packed on
                // x86-64, so it must not be borrowed.
                ready.extend(events[..n as usize].iter().map(|e| e.u64));
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Sends as much of `bufs` as the socket `fd` takes now, without blocking
/// and without raising `SIGPIPE` (one `sendmsg`); the descriptor's own
/// blocking mode is left alone (a `dup` of it may block in `read`).
/// `WouldBlock` when the socket buffer is full.
pub(crate) fn send_nowait(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix; the
    // kernel only reads the buffers.
    msg.msg_iov = bufs.as_ptr().cast_mut().cast();
    msg.msg_iovlen = bufs.len().min(IOV_MAX) as _;
    // SAFETY: `msg` points at `bufs`, which outlives the call; the
    // descriptor is open (borrowed).
    let n = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Most buffers one `sendmsg` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Sleeps until `fd` can take more output, `input` (if any) is readable,
/// or `timeout` passes (rounded up to whole milliseconds). Interruptions
/// count as a wake-up.
pub(crate) fn wait_writable(
    fd: BorrowedFd<'_>,
    input: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        },
        libc::pollfd {
            fd: input.map_or(-1, |i| i.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms =
        libc::c_int::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a writable array of 2 pollfds that outlives the
    // call (a negative fd is ignored by the kernel); both descriptors are
    // open (borrowed).
    match check(unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) }) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(e),
    }
}

/// A non-blocking eventfd: a doorbell that makes an [`Epoll`] wait return.
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new doorbell, not rung.
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a fresh
        // descriptor owned by no one.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by the kernel and is owned by no one.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Rings: the descriptor becomes readable until [`EventFd::drain`].
    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which outlives the call, to a
        // descriptor we own. A full counter (EAGAIN) means it is already
        // rung, so the result can be ignored.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Un-rings (resets the counter; does not block).
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into `v`, which outlives the call,
        // from a descriptor we own. EAGAIN (not rung) is fine to ignore.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                std::ptr::addr_of_mut!(v).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn level_reports_until_read_edge_once_per_arrival() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        let (level, edge) = (Epoll::new().unwrap(), Epoll::new().unwrap());
        level.add(rx.as_fd(), 7, Trigger::Level).unwrap();
        edge.add(rx.as_fd(), 9, Trigger::Edge).unwrap();
        let mut ready = Vec::new();
        level.wait(&mut ready, Some(Duration::ZERO)).unwrap();
        assert!(ready.is_empty());
        tx.write_all(b"x").unwrap();
        let t = Some(Duration::from_secs(5));
        edge.wait(&mut ready, t).unwrap();
        assert_eq!(ready, [9]);
        edge.wait(&mut ready, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(ready.is_empty(), "edge-triggered: reported once");
        for _ in 0..2 {
            level.wait(&mut ready, t).unwrap();
            assert_eq!(ready, [7], "level-triggered: reported while unread");
        }
        tx.write_all(b"y").unwrap();
        edge.wait(&mut ready, t).unwrap();
        assert_eq!(ready, [9], "a new arrival is a new edge");
        level.delete(rx.as_fd()).unwrap();
        level.wait(&mut ready, Some(Duration::ZERO)).unwrap();
        assert!(ready.is_empty());
    }

    #[test]
    fn input_state_tells_quiet_unread_and_ended_apart() {
        use std::io::Read;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(input_state(rx.as_fd()), InputState::Quiet);
        tx.write_all(b"xy").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while input_state(rx.as_fd()) != InputState::Unread {
            assert!(std::time::Instant::now() < deadline, "input never seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut b = [0u8; 2];
        rx.read_exact(&mut b).unwrap();
        assert_eq!(input_state(rx.as_fd()), InputState::Quiet);
        // Our own side shut for writing is not the peer's end.
        rx.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(input_state(rx.as_fd()), InputState::Quiet);
        // The peer's end, even behind unread input, is.
        tx.write_all(b"z").unwrap();
        tx.shutdown(std::net::Shutdown::Write).unwrap();
        while input_state(rx.as_fd()) != InputState::Ended {
            assert!(std::time::Instant::now() < deadline, "end never seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut rest = Vec::new();
        rx.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"z");
    }

    #[test]
    fn doorbell_rings_and_drains() {
        let (ep, bell) = (Epoll::new().unwrap(), EventFd::new().unwrap());
        ep.add(bell.as_fd(), 1, Trigger::Level).unwrap();
        let mut ready = Vec::new();
        ep.wait(&mut ready, Some(Duration::ZERO)).unwrap();
        assert!(ready.is_empty());
        bell.ring();
        bell.ring();
        ep.wait(&mut ready, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ready, [1]);
        bell.drain();
        ep.wait(&mut ready, Some(Duration::ZERO)).unwrap();
        assert!(ready.is_empty());
    }
}

/// Seconds a connection stays idle before the kernel probes its peer ([`keep_alive`]).
pub(crate) const KEEPALIVE_IDLE_SECS: libc::c_int = 2;
/// Seconds between two unanswered probes.
pub(crate) const KEEPALIVE_INTERVAL_SECS: libc::c_int = 1;
/// Unanswered probes after which the connection fails (`ETIMEDOUT`).
pub(crate) const KEEPALIVE_PROBES: libc::c_int = 3;
/// How long after its last traffic an idle connection to a silent host
/// fails ([`keep_alive`]): 5 s. Also the default of
/// [`TcpConfig::loss_wait`](crate::TcpConfig::loss_wait).
pub(crate) const KEEPALIVE_DETECTION: Duration =
    Duration::from_secs((KEEPALIVE_IDLE_SECS + KEEPALIVE_INTERVAL_SECS * KEEPALIVE_PROBES) as u64);

/// Makes the kernel probe the peer of an idle connection and fail the
/// connection when the peer's host stops answering (a crash, a power loss,
/// a cut network: no FIN or RST ever comes), ~5 s after the last traffic
/// ([`KEEPALIVE_DETECTION`]), so the layer reports the peer lost instead of
/// waiting for it forever. A peer process that is merely busy is answered
/// for by its kernel.
///
/// Linux sends no keepalive probe while the connection has unacknowledged
/// data (or FIN): such a connection fails only at the retransmission limit
/// (`net.ipv4.tcp_retries2`, ~15 minutes). `TCP_USER_TIMEOUT` would bound
/// that, but it is deliberately not set: Linux also applies it to
/// zero-window probing, so it would kill the connection to a live peer that
/// merely does not read for that long (a busy process, back-pressure).
/// The watcher of each outgoing connection bounds it instead, from what the
/// kernel says of the connection's acknowledgements (see `crate::acks`), and
/// the layer bounds the one wait of its own that a silent host affects (a
/// held loss report, see `Shared::report_loss`) with
/// [`TcpConfig::loss_wait`](crate::TcpConfig::loss_wait).
pub(crate) fn keep_alive(s: &impl AsFd) -> io::Result<()> {
    let fd = s.as_fd().as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: `fd` is an open socket borrowed for the call; the option
        // value is a live c_int whose size is passed with it.
        check(unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(|_| ())
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        KEEPALIVE_INTERVAL_SECS,
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES)
}

/// What a connected socket's receive side holds right now ([`input_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputState {
    /// Nothing to read, and the peer has not closed its side.
    Quiet,
    /// Unread input (and no end yet).
    Unread,
    /// The peer's end of stream (FIN), a reset or an error has arrived:
    /// reading reaches the stream's end (after any input before it).
    Ended,
}

/// Looks, without blocking or reading, whether `fd` (a connected stream
/// socket) has input waiting or its peer's end has arrived. An error of
/// the look itself counts as `Ended` (reading will find out).
pub(crate) fn input_state(fd: BorrowedFd<'_>) -> InputState {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one writable pollfd that outlives the call; the
        // descriptor is open (borrowed); timeout 0 does not block.
        match check(unsafe { libc::poll(&mut pfd, 1, 0) }) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return InputState::Ended,
        }
    }
    if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        InputState::Ended
    } else if pfd.revents & libc::POLLIN != 0 {
        InputState::Unread
    } else {
        InputState::Quiet
    }
}

/// Reads a socket option of type `c_int` (for tests).
#[cfg(test)]
pub(crate) fn socket_option(
    s: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the socket is borrowed for the call; `value` and `len` are live
    // and `len` holds the size of `value`.
    check(unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

#[cfg(test)]
mod keep_alive_tests {
    use super::*;

    #[test]
    fn keep_alive_sets_the_probe_timers_on_both_ends() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (inc, _) = listener.accept().unwrap();
        for s in [&out, &inc] {
            keep_alive(s).unwrap();
            assert_eq!(
                socket_option(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE).unwrap(),
                1
            );
            let idle = socket_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE).unwrap();
            let interval = socket_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL).unwrap();
            let probes = socket_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT).unwrap();
            assert_eq!(
                (idle, interval, probes),
                (
                    KEEPALIVE_IDLE_SECS,
                    KEEPALIVE_INTERVAL_SECS,
                    KEEPALIVE_PROBES
                )
            );
        }
    }
}
