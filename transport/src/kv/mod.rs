//! Launcher bootstrap: the key-value rendezvous that `charmrun` runs on
//! loopback, and the [`Bootstrap`](crate::Bootstrap) client its processes use
//! to reach it.
//!
//! # What this module owns
//!
//! * [`KvServer`]: the launcher side. Started with the number of processes
//!   and the job secret; one thread per connection; reports aborts to the
//!   launcher as [`KvEvent`]s.
//! * [`KvBootstrap`]: the process side, configured from the environment
//!   `charmrun` sets ([`KvBootstrap::from_env`]).
//! * The job secret ([`JobSecret`]) helpers: generation from the OS
//!   ([`random_secret`]), hex encoding, constant-time comparison ([`ct_eq`]).
//!
//! # Environment contract (set by `charmrun` for every process)
//!
//! | variable             | meaning                                                    |
//! |----------------------|------------------------------------------------------------|
//! | [`ENV_RANK`]         | this process's rank, `0..nprocs`                           |
//! | [`ENV_NPROCS`]       | number of processes in the job                             |
//! | [`ENV_KV_ADDR`]      | `host:port` of the launcher's key-value server             |
//! | [`ENV_JOB_SECRET`]   | the job secret, 64 hex digits (32 bytes)                   |
//! | [`ENV_PPN`]          | PEs per process (passed through, not used by the bootstrap) |
//! | [`ENV_PES`]          | PEs of this process (= `CHARMRS_PPN`), for the runtime     |
//! | [`ENV_TOTAL_PES`]    | PEs of the whole job (`+p`), for the runtime               |
//!
//! [`ENV_KV_FENCE_TIMEOUT`], when the user sets it, reaches the processes
//! with the rest of charmrun's environment.
//!
//! # Invariants
//!
//! * Every request carries the job secret; the server drops (and logs, with
//!   the peer address) any connection whose request is malformed or carries
//!   another secret, and keeps serving the others.
//! * A connection claims exactly one rank with its first request; a rank is
//!   claimed at most once per job; a process can only `put` its own keys.
//! * `fence` completes for everyone once all `nprocs` ranks called it; if a
//!   rank's connection closes before it arrives, every pending and future
//!   fence fails with [`TransportError::Bootstrap`] naming that rank (no
//!   hang).
//! * A fence is bounded: if not every rank arrived within the server's fence
//!   timeout ([`DEFAULT_FENCE_TIMEOUT`], or [`ENV_KV_FENCE_TIMEOUT`] seconds
//!   through charmrun) of the first arrival, it fails for the ranks waiting
//!   in it, and every later fence fails too, with a message naming the
//!   ranks that never arrived (and whether each joined the job at all); the
//!   launcher hears of it ([`KvEvent::FenceTimedOut`]). A client waits for
//!   any answer at most its own fence timeout plus [`FENCE_CLIENT_GRACE`],
//!   so a server that stopped answering cannot hang it either.
//! * All lengths are bounded (key 1 KiB, value 1 MiB, store 64 MiB) and
//!   checked before allocation. The store's bound counts 64 bytes per
//!   entry besides its key and value, so many tiny entries cannot take more
//!   memory than a few large ones.

mod client;
mod proto;
mod server;

pub use client::KvBootstrap;
pub use server::{KvEvent, KvServer};

use std::io::Read;
use std::time::Duration;

use crate::error::TransportError;

/// Environment variable: this process's rank.
pub const ENV_RANK: &str = "CHARMRS_RANK";
/// Environment variable: number of processes in the job.
pub const ENV_NPROCS: &str = "CHARMRS_NPROCS";
/// Environment variable: `host:port` of the launcher's key-value server.
pub const ENV_KV_ADDR: &str = "CHARMRS_KV_ADDR";
/// Environment variable: the job secret as 64 hex digits.
pub const ENV_JOB_SECRET: &str = "CHARMRS_JOB_SECRET";
/// Environment variable: PEs per process (`++ppn`).
pub const ENV_PPN: &str = "CHARMRS_PPN";
/// Environment variable: PEs of this process (equal to [`ENV_PPN`]); the
/// runtime's usual PE-count variable.
pub const ENV_PES: &str = "CHARMRS_PES";
/// Environment variable: PEs of the whole job (`+p`).
pub const ENV_TOTAL_PES: &str = "CHARMRS_TOTAL_PES";

/// Environment variable: how long a fence may wait for every process, in
/// seconds (a positive whole number, e.g. `CHARMRS_KV_FENCE_TIMEOUT=600` for
/// a job whose processes start far apart). Read by charmrun for its server
/// and by [`KvBootstrap::from_env`] for the client's own bound. Unset or
/// empty: [`DEFAULT_FENCE_TIMEOUT`].
pub const ENV_KV_FENCE_TIMEOUT: &str = "CHARMRS_KV_FENCE_TIMEOUT";

/// Default fence timeout: two minutes, as for PMIx fences. At start-up the
/// processes reach the fence within seconds of each other; this leaves room
/// for slow starts on a loaded host while a process that hangs before its
/// fence costs the others two minutes rather than the job for ever.
pub const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_secs(120);

/// How much longer than its fence timeout a [`KvBootstrap`] waits for an
/// answer before failing on its own (the server's timeout, which names the
/// missing ranks, comes first).
pub const FENCE_CLIENT_GRACE: Duration = Duration::from_secs(5);

/// The fence timeout [`ENV_KV_FENCE_TIMEOUT`] asks for: its value in
/// seconds, [`DEFAULT_FENCE_TIMEOUT`] if it is unset or empty.
///
/// # Errors
///
/// [`TransportError::Bootstrap`] naming the variable if its value is not a
/// positive whole number of seconds.
pub fn fence_timeout_from_env() -> Result<Duration, TransportError> {
    fence_timeout_from(std::env::var_os(ENV_KV_FENCE_TIMEOUT).as_deref())
}

fn fence_timeout_from(value: Option<&std::ffi::OsStr>) -> Result<Duration, TransportError> {
    let Some(value) = value else {
        return Ok(DEFAULT_FENCE_TIMEOUT);
    };
    let v = value.to_string_lossy();
    match v.trim() {
        "" => Ok(DEFAULT_FENCE_TIMEOUT),
        t => match t.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Duration::from_secs(u64::from(n))),
            _ => Err(TransportError::Bootstrap(format!(
                "{ENV_KV_FENCE_TIMEOUT}={v:?} is not a positive whole number of seconds"
            ))),
        },
    }
}

/// Length of a job secret in bytes.
pub const SECRET_LEN: usize = 32;

/// The per-job secret that authenticates every bootstrap request and every
/// machine-layer connection.
pub type JobSecret = [u8; SECRET_LEN];

/// A fresh secret: [`SECRET_LEN`] bytes from `/dev/urandom`.
///
/// # Errors
///
/// [`TransportError::Io`] if `/dev/urandom` cannot be read.
pub fn random_secret() -> Result<JobSecret, TransportError> {
    let mut s = [0u8; SECRET_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut s)?;
    Ok(s)
}

/// Lower-case hex encoding of a secret (64 characters).
pub fn secret_to_hex(secret: &JobSecret) -> String {
    use std::fmt::Write;
    secret.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses a secret from exactly 64 hex digits (either case).
///
/// # Errors
///
/// [`TransportError::Bootstrap`] if `hex` is not 64 hex digits. The message
/// never echoes the input, which may be a real secret.
pub fn parse_secret_hex(hex: &str) -> Result<JobSecret, TransportError> {
    let bytes = hex.as_bytes();
    if bytes.len() != 2 * SECRET_LEN {
        return Err(TransportError::Bootstrap(format!(
            "job secret must be {} hex digits, got {} characters",
            2 * SECRET_LEN,
            bytes.len()
        )));
    }
    let digit = |c: u8| -> Result<u8, TransportError> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(TransportError::Bootstrap(
                "job secret contains a non-hex character".to_owned(),
            )),
        }
    };
    let mut out = [0u8; SECRET_LEN];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Ok(out)
}

/// Compares two byte strings in time independent of their contents (only
/// of their lengths), for checking secrets.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // `black_box` keeps the optimiser from turning the fold into an early
    // exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_hex_round_trips() {
        let s = random_secret().unwrap();
        let hex = secret_to_hex(&s);
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_secret_hex(&hex).unwrap(), s);
        assert_eq!(parse_secret_hex(&hex.to_uppercase()).unwrap(), s);
        assert!(parse_secret_hex("abc").is_err());
        let bad = format!("{}zz", &hex[..62]);
        let err = parse_secret_hex(&bad).unwrap_err().to_string();
        assert!(!err.contains(&hex[..62]), "error must not echo the secret");
        assert_ne!(random_secret().unwrap(), s);
    }

    #[test]
    fn fence_timeout_comes_from_its_variable() {
        use std::ffi::OsStr;
        let t = |v: &str| fence_timeout_from(Some(OsStr::new(v)));
        assert_eq!(fence_timeout_from(None).unwrap(), DEFAULT_FENCE_TIMEOUT);
        assert_eq!(t(" ").unwrap(), DEFAULT_FENCE_TIMEOUT);
        assert_eq!(t("7").unwrap(), Duration::from_secs(7));
        assert_eq!(t(" 600\n").unwrap(), Duration::from_secs(600));
        for bad in ["0", "-1", "1.5", "2m", "99999999999"] {
            let e = t(bad).unwrap_err().to_string();
            assert!(
                e.contains(ENV_KV_FENCE_TIMEOUT) && e.contains(bad) && e.contains("positive"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn ct_eq_compares() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}

#[cfg(test)]
mod server_tests {
    //! The server and client over real loopback sockets, one thread per
    //! process.

    use super::*;
    use crate::Bootstrap;
    use std::io::Write;
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Runs `f` on a thread and fails the test if it takes longer than
    /// `secs` (a hang fails fast instead of stalling the suite).
    fn watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(secs))
            .expect("test timed out (watchdog)")
    }

    #[test]
    fn put_fence_get_across_ranks() {
        watchdog(20, || {
            let secret = random_secret().unwrap();
            let (server, addr) = KvServer::start(3, secret).unwrap();
            let handles: Vec<_> = (0..3u32)
                .map(|r| {
                    std::thread::spawn(move || {
                        let b = KvBootstrap::connect(addr, r, 3, secret).unwrap();
                        assert_eq!((b.rank(), b.size()), (r, 3));
                        b.put("addr", format!("value-of-{r}").as_bytes()).unwrap();
                        b.fence().unwrap();
                        for o in 0..3 {
                            assert_eq!(
                                b.get(o, "addr").unwrap(),
                                format!("value-of-{o}").as_bytes()
                            );
                        }
                        assert!(matches!(
                            b.get(0, "missing"),
                            Err(TransportError::Bootstrap(_))
                        ));
                        assert!(matches!(
                            b.get(3, "addr"),
                            Err(TransportError::UnknownProcess { dst: 3, size: 3 })
                        ));
                        // Fences are reusable.
                        for _ in 0..5 {
                            b.fence().unwrap();
                        }
                        b
                    })
                })
                .collect();
            let bs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            drop(bs);
            drop(server);
        });
    }

    #[test]
    fn wrong_secret_garbage_and_duplicate_rank_are_refused() {
        watchdog(20, || {
            let secret = random_secret().unwrap();
            let (server, addr) = KvServer::start(2, secret).unwrap();
            // Wrong secret.
            let mut other = secret;
            other[0] ^= 1;
            let err = KvBootstrap::connect(addr, 0, 2, other).unwrap_err();
            assert!(matches!(err, TransportError::Bootstrap(_)), "{err}");
            // Garbage and a hostile length prefix.
            for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &u32::MAX.to_le_bytes()[..]] {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(junk).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 16];
                // The server closes the connection without answering.
                assert!(matches!(
                    std::io::Read::read(&mut s, &mut buf),
                    Ok(0) | Err(_)
                ));
            }
            // Out-of-range rank.
            assert!(KvBootstrap::connect(addr, 5, 6, secret).is_err());
            // The server still works, and a rank is claimed once.
            let b0 = KvBootstrap::connect(addr, 0, 2, secret).unwrap();
            let err = KvBootstrap::connect(addr, 0, 2, secret).unwrap_err();
            assert!(err.to_string().contains("already connected"), "{err}");
            let b1 = KvBootstrap::connect(addr, 1, 2, secret).unwrap();
            b1.put("k", b"v").unwrap();
            assert_eq!(b0.get(1, "k").unwrap(), b"v");
            drop((b0, b1, server));
        });
    }

    #[test]
    fn fence_fails_when_a_rank_leaves_instead_of_hanging() {
        watchdog(20, || {
            let secret = random_secret().unwrap();
            let (server, addr) = KvServer::start(3, secret).unwrap();
            let b0 = Arc::new(KvBootstrap::connect(addr, 0, 3, secret).unwrap());
            let b1 = KvBootstrap::connect(addr, 1, 3, secret).unwrap();
            let _b2 = KvBootstrap::connect(addr, 2, 3, secret).unwrap();
            let waiter = {
                let b0 = Arc::clone(&b0);
                std::thread::spawn(move || {
                    let t = Instant::now();
                    (b0.fence(), t.elapsed())
                })
            };
            std::thread::sleep(Duration::from_millis(100));
            drop(b1); // rank 1 leaves before arriving
            let (res, took) = waiter.join().unwrap();
            let err = res.unwrap_err().to_string();
            assert!(err.contains("process 1 left"), "{err}");
            assert!(took < Duration::from_secs(5));
            assert_eq!(
                next_but_joins(&server),
                Some(KvEvent::Disconnected { rank: 1 })
            );
        });
    }

    /// A fence that not every rank reaches fails at the server's fence timeout for the ranks
    /// waiting in it, naming the missing ranks and whether each joined; the launcher hears of
    /// it first; a late arrival fails at once.
    #[test]
    fn a_fence_times_out_naming_the_ranks_that_never_arrived() {
        watchdog(20, || {
            let secret = random_secret().unwrap();
            let (server, addr) = KvServer::start(4, secret).unwrap();
            assert_eq!(server.fence_timeout(), DEFAULT_FENCE_TIMEOUT);
            let timeout = Duration::from_secs(1);
            server.set_fence_timeout(timeout);
            let b2 = KvBootstrap::connect(addr, 2, 4, secret).unwrap(); // never fences
            let fencers: Vec<_> = (0..2u32)
                .map(|r| {
                    std::thread::spawn(move || {
                        let b = KvBootstrap::connect(addr, r, 4, secret).unwrap();
                        let t = Instant::now();
                        let res = b.fence();
                        (res, t.elapsed(), b)
                    })
                })
                .collect();
            // Rank 3 never connects.
            let mut kept = Vec::new();
            for f in fencers {
                let (res, took, b) = f.join().unwrap();
                let err = res.unwrap_err().to_string();
                assert!(
                    err.contains("fence timed out after 1s")
                        && err.contains("rank 2 (joined the job but did not reach the fence)")
                        && err.contains("rank 3 (never joined the job)")
                        && !err.contains("rank 0")
                        && !err.contains("rank 1"),
                    "{err}"
                );
                assert!(
                    took >= timeout - Duration::from_millis(50) && took < Duration::from_secs(4),
                    "{took:?}"
                );
                kept.push(b);
            }
            assert_eq!(
                next_but_joins(&server),
                Some(KvEvent::FenceTimedOut {
                    missing: vec![2, 3],
                    after: timeout
                })
            );
            let t = Instant::now();
            let err = b2.fence().unwrap_err().to_string();
            assert!(err.contains("rank 3 (never joined the job)"), "{err}");
            assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
            drop((kept, b2, server));
        });
    }

    /// A server that takes a request and never answers (stopped, or a bug) fails the request
    /// at the client's fence timeout plus its grace, and the connection serves no more.
    #[test]
    fn a_request_never_answered_fails_at_the_clients_bound() {
        watchdog(30, || {
            let secret = random_secret().unwrap();
            let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
            let addr = listener.local_addr().unwrap();
            let silent = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let hello = proto::read_body(&mut s, proto::MAX_REQUEST).unwrap();
                assert!(hello.is_some());
                proto::write_response(&mut s, proto::Status::Ok, b"").unwrap();
                // Takes the fence, answers nothing, keeps the connection open until the client
                // closes it.
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(&mut s, &mut sink);
            });
            let mut b = KvBootstrap::connect(addr, 0, 1, secret).unwrap();
            assert_eq!(b.fence_timeout(), DEFAULT_FENCE_TIMEOUT);
            b.set_fence_timeout(Duration::from_millis(500));
            let t = Instant::now();
            let err = b.fence().unwrap_err().to_string();
            let took = t.elapsed();
            let bound = Duration::from_millis(500) + FENCE_CLIENT_GRACE;
            assert!(
                took >= bound - Duration::from_millis(50) && took < bound + Duration::from_secs(3),
                "{took:?}"
            );
            assert!(err.contains("no answer to a Fence request"), "{err}");
            let t = Instant::now();
            let err = b.put("k", b"v").unwrap_err().to_string();
            assert!(err.contains("no answer to a Fence request"), "{err}");
            assert!(t.elapsed() < Duration::from_secs(1));
            drop(b);
            silent.join().unwrap();
        });
    }

    /// The server's next event that is not a process joining.
    fn next_but_joins(server: &KvServer) -> Option<KvEvent> {
        loop {
            match server.next_event(Duration::from_secs(5)) {
                Some(KvEvent::Joined { .. }) => continue,
                other => return other,
            }
        }
    }

    #[test]
    fn a_trickling_first_request_is_dropped_at_its_deadline() {
        watchdog(30, || {
            let secret = random_secret().unwrap();
            let (_server, addr) = KvServer::start(1, secret).unwrap();
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(900)))
                .unwrap();
            let t = Instant::now();
            // A 100-byte request announced, then a byte a second: each read alone would be in
            // time; the request as a whole is not.
            s.write_all(&[100, 0, 0, 0]).unwrap();
            let dropped_after = loop {
                let mut buf = [0u8; 1];
                match std::io::Read::read(&mut s, &mut buf) {
                    Ok(0) => break t.elapsed(),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    other => panic!("unexpected {other:?}"),
                }
                assert!(t.elapsed() < Duration::from_secs(12), "still connected");
                if s.write_all(&[7]).is_err() {
                    break t.elapsed();
                }
            };
            assert!(
                dropped_after >= Duration::from_secs(4) && dropped_after < Duration::from_secs(9),
                "{dropped_after:?}"
            );
        });
    }

    #[test]
    fn abort_reaches_the_launcher_even_during_a_fence() {
        watchdog(20, || {
            let secret = random_secret().unwrap();
            let (server, addr) = KvServer::start(2, secret).unwrap();
            let b0 = Arc::new(KvBootstrap::connect(addr, 0, 2, secret).unwrap());
            let _b1 = KvBootstrap::connect(addr, 1, 2, secret).unwrap();
            let fencer = {
                let b0 = Arc::clone(&b0);
                std::thread::spawn(move || b0.fence())
            };
            std::thread::sleep(Duration::from_millis(50));
            b0.abort("PE 3 panicked");
            assert_eq!(
                next_but_joins(&server),
                Some(KvEvent::Abort {
                    rank: 0,
                    reason: "PE 3 panicked".into()
                })
            );
            drop(server); // unblocks the fence with an error
            assert!(fencer.join().unwrap().is_err());
        });
    }

    #[test]
    fn more_simultaneous_clients_than_the_pending_cap_all_get_in() {
        watchdog(30, || {
            let n = 80u32;
            let secret = random_secret().unwrap();
            let (_server, addr) = KvServer::start(n, secret).unwrap();
            let handles: Vec<_> = (0..n)
                .map(|r| {
                    std::thread::spawn(move || {
                        let b = KvBootstrap::connect(addr, r, n, secret).unwrap();
                        b.put("k", &r.to_le_bytes()).unwrap();
                        b.fence().unwrap();
                        assert_eq!(
                            b.get((r + 1) % n, "k").unwrap(),
                            ((r + 1) % n).to_le_bytes()
                        );
                        b.fence().unwrap();
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
    }

    #[test]
    fn from_env_is_none_outside_charmrun() {
        if std::env::var_os(ENV_KV_ADDR).is_none() {
            assert!(KvBootstrap::from_env().unwrap().is_none());
        }
    }
}
