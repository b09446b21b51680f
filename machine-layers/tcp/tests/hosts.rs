//! TcpLayer between two emulated hosts: what only a real second host shows, here a host that
//! falls silent (its link cut: no FIN, no RST, no acknowledgement ever again).
//!
//! The hosts are network namespaces made by `ci/netns-hosts start` (root); the tests run when
//! `CHARMRS_NETNS_HOSTS` names that script, and are skipped with a note otherwise (set without
//! the hosts up, they fail naming the missing namespace). Each "process"
//! is a thread entered into a host's namespace (`setns` moves the calling thread only, and the
//! threads it starts, the layer's own, inherit it). Every test runs under a watchdog.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_tcp::{TcpConfig, TcpLayer};
use charmrs_transport::kv::{random_secret, KvBootstrap, KvServer};
use charmrs_transport::{Header, MachineLayer, Message, TransportError};

/// Runs `f` on a thread; fails if it takes longer than `secs` (or panics).
fn watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("test timed out (watchdog)"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the test's thread panicked (above)")
        }
    }
}

/// The hosts script, if the emulated hosts are up.
fn hosts_script() -> Option<String> {
    let script = std::env::var("CHARMRS_NETNS_HOSTS").ok();
    if script.is_none() {
        eprintln!(
            "note: CHARMRS_NETNS_HOSTS is not set: the tests between emulated hosts are skipped"
        );
    }
    script
}

/// Moves the calling thread into emulated host `host`'s network namespace.
fn enter(host: &str) {
    let path = format!("/var/run/netns/charmrs-{host}");
    let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: `ns` is an open namespace file for the duration of the call; CLONE_NEWNET moves
    // only the calling thread, which owns no socket yet.
    let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        entered,
        0,
        "setns {path}: {}",
        std::io::Error::last_os_error()
    );
}

/// The address of emulated host `k` (`nodek`).
fn address(k: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([10, 231, 0, k + 1])
}

/// Runs `ci/netns-hosts VERB HOST`.
fn hosts(script: &str, verb: &str, host: &str) {
    let status = Command::new(script).args([verb, host]).status().unwrap();
    assert!(status.success(), "{script} {verb} {host}: {status}");
}

/// Process 0 on node0 streams 1 MiB messages to process 1 on node1, which reads them and sends
/// nothing back (so process 0 has no connection from it, whose keepalive probes would find the
/// silence; only the acknowledgements of its own data can). node1's link is cut while data is
/// in flight: process 0's sends, then its `progress`, report process 1 lost, naming its
/// silence, within the acknowledgement limit and a retransmission interval or two (the kernel
/// alone would go on retransmitting for ~15 minutes).
#[test]
fn a_host_that_falls_silent_with_data_in_flight_is_reported_lost() {
    let Some(script) = hosts_script() else {
        return;
    };
    // Whatever happens, node1 is mended.
    struct Mend(String);
    impl Drop for Mend {
        fn drop(&mut self) {
            let _ = Command::new(&self.0).args(["mend", "node1"]).status();
        }
    }
    let _mend = Mend(script.clone());
    let limit = Duration::from_secs(3);
    let took = watchdog(90, move || {
        let secret = random_secret().unwrap();
        let cfg = |k: u8| TcpConfig {
            bind: address(k),
            ack_timeout: limit,
            ..TcpConfig::default()
        };
        // This thread is process 0, on node0, with the bootstrap's server (a layer's outgoing
        // sockets are made by the thread that sends first).
        enter("node0");
        let (_server, addr) = KvServer::start_on((address(0), 0).into(), 2, secret).unwrap();
        // Process 1, on node1: reads whatever comes until its host is cut off.
        let one = {
            let cfg = cfg(1);
            std::thread::spawn(move || {
                enter("node1");
                let b = Arc::new(KvBootstrap::connect(addr, 1, 2, secret).unwrap());
                let layer = TcpLayer::with_config(b, secret, cfg).unwrap();
                let mut got = 0usize;
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(60) {
                    match layer.progress_wait(&mut |_, _| got += 1, Duration::from_millis(50)) {
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                // Left to the end of the process: dropping it would say goodbye into a cut link.
                std::mem::forget(layer);
                got
            })
        };
        let b = Arc::new(KvBootstrap::connect(addr, 0, 2, secret).unwrap());
        let layer = TcpLayer::with_config(b, secret, cfg(0)).unwrap();
        let payload = Bytes::from(vec![5u8; 1 << 20]);
        let send = |tag: u64| {
            let m =
                Message::with_segments(Header::new(1, 0, 0, tag), vec![payload.clone()]).unwrap();
            layer.send(1, m)
        };
        // Data flows first (the connection is up and process 1 reads).
        for tag in 0..64 {
            send(tag).unwrap();
        }
        hosts(&script, "cut", "node1");
        let cut = Instant::now();
        // Sends block once the socket is full, then fail when the loss is found.
        let mut tag = 64;
        let failure = loop {
            match send(tag) {
                Ok(()) => tag += 1,
                Err(e) => break e,
            }
            assert!(
                cut.elapsed() < Duration::from_secs(60),
                "sends never failed"
            );
        };
        let took = cut.elapsed();
        let TransportError::PeerLost { process, reason } = &failure else {
            panic!("not a lost peer: {failure}");
        };
        assert_eq!(*process, 1, "{failure}");
        // By the data rule, or by the window probes' if node1's window happened to be closed.
        assert!(
            reason.contains("(down, or cut off from this host)"),
            "the loss does not name the host's silence: {failure}"
        );
        // `progress` reports it too.
        let deadline = Instant::now() + Duration::from_secs(20);
        let reported = loop {
            match layer.progress_wait(&mut |_, _| {}, Duration::from_millis(100)) {
                Err(e) => break e,
                Ok(_) => assert!(
                    Instant::now() < deadline,
                    "progress never reported the loss"
                ),
            }
        };
        assert!(
            matches!(reported, TransportError::PeerLost { process: 1, .. }),
            "{reported}"
        );
        drop(one);
        took
    });
    eprintln!("sends to the silent host failed {took:?} after the cut (limit {limit:?})");
    assert!(
        took < limit + Duration::from_secs(10),
        "found {took:?} after the cut, limit {limit:?}"
    );
}
