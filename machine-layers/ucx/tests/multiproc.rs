//! UcxLayer across real processes: the `charmrs-ucx-check` binary started
//! as every process of a job, with a real key-value bootstrap server (the
//! one `charmrun` runs) and the launcher's environment contract, over UCX's
//! shared-memory transports (`UCX_TLS=shm,self`) and its TCP transport on
//! loopback (`UCX_TLS=tcp,self`, `UCX_NET_DEVICES=lo`). Every test has a
//! deadline after which the processes are killed and the test fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use charmrs_transport::kv::{
    random_secret, secret_to_hex, KvServer, ENV_JOB_SECRET, ENV_KV_ADDR, ENV_NPROCS, ENV_RANK,
};

const CHECK: &str = env!("CARGO_BIN_EXE_charmrs-ucx-check");

/// UCX transport selections the tests run over (loopback only).
const SHM: &[(&str, &str)] = &[("UCX_TLS", "shm,self"), ("UCX_NET_DEVICES", "lo")];
const TCP: &[(&str, &str)] = &[("UCX_TLS", "tcp,self"), ("UCX_NET_DEVICES", "lo")];
/// Same, with UCX's peer error handling on same-host endpoints (UCX itself
/// reports the failure instead of the layer's liveness check).
const TCP_PEER: &[(&str, &str)] = &[
    ("UCX_TLS", "tcp,self"),
    ("UCX_NET_DEVICES", "lo"),
    ("CHARMRS_UCX_CHECK_PEER_ERRORS", "1"),
];
const SHM_PEER: &[(&str, &str)] = &[
    ("UCX_TLS", "shm,self"),
    ("CHARMRS_UCX_CHECK_PEER_ERRORS", "1"),
];

struct Job {
    _server: KvServer,
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, String)>,
    /// Lines received but not yet matched.
    seen: Vec<(usize, String)>,
}

impl Job {
    fn start(n: u32, args: &[&str], env: &[(&str, &str)]) -> Job {
        let secret = random_secret().unwrap();
        let (server, addr) = KvServer::start(n, secret).unwrap();
        let (tx, lines) = mpsc::channel();
        let children = (0..n)
            .map(|r| {
                let mut c = Command::new(CHECK);
                c.args(args)
                    .env(ENV_RANK, r.to_string())
                    .env(ENV_NPROCS, n.to_string())
                    .env(ENV_KV_ADDR, addr.to_string())
                    .env(ENV_JOB_SECRET, secret_to_hex(&secret))
                    .env("UCX_WARN_UNUSED_ENV_VARS", "n")
                    .stdout(Stdio::piped());
                for (k, v) in env {
                    c.env(k, v);
                }
                let mut child = c.spawn().unwrap();
                let out = child.stdout.take().unwrap();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        eprintln!("[rank {r}] {line}");
                        let _ = tx.send((r as usize, line));
                    }
                });
                child
            })
            .collect();
        Job {
            _server: server,
            children,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line from `rank` starting with `prefix`.
    fn expect_line(&mut self, rank: usize, prefix: &str, within: Duration) -> String {
        if let Some(i) = self
            .seen
            .iter()
            .position(|(r, l)| *r == rank && l.starts_with(prefix))
        {
            return self.seen.remove(i).1;
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((r, l)) if r == rank && l.starts_with(prefix) => return l,
                Ok(other) => self.seen.push(other),
                Err(_) => panic!("rank {rank} printed no {prefix:?} line within {within:?}"),
            }
        }
    }

    /// Waits for every process to exit successfully within `secs`.
    fn wait_all(mut self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut done = vec![false; self.children.len()];
        while done.iter().any(|d| !d) {
            for (r, c) in self.children.iter_mut().enumerate() {
                if !done[r] {
                    if let Some(st) = c.try_wait().unwrap() {
                        assert!(st.success(), "rank {r} failed: {st}");
                        done[r] = true;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!("job did not finish within {secs} s (exited: {done:?})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn ordered_exactly_once_mixed_sizes_from_several_threads_shm() {
    Job::start(3, &["order", "24", "3"], SHM).wait_all(120);
}

#[test]
fn ordered_exactly_once_mixed_sizes_from_several_threads_tcp() {
    Job::start(2, &["order", "16", "2"], TCP).wait_all(120);
}

#[test]
fn per_pe_workers_deliver_to_each_pe_in_order_shm() {
    let env = [SHM, &[("CHARMRS_UCX_CHECK_WORKERS", "2")]].concat();
    Job::start(2, &["lanes", "12"], &env).wait_all(120);
}

#[test]
fn per_pe_workers_deliver_to_each_pe_in_order_tcp() {
    let env = [TCP, &[("CHARMRS_UCX_CHECK_WORKERS", "3")]].concat();
    Job::start(2, &["lanes", "6"], &env).wait_all(120);
}

#[test]
fn per_pe_workers_need_as_many_in_every_process() {
    let mut job = Job::start(2, &["mismatch"], SHM);
    for r in 0..2 {
        let line = job.expect_line(r, "OK mismatch", Duration::from_secs(60));
        assert!(line.contains("UCX workers"), "{line}");
    }
    job.wait_all(60);
}

#[test]
fn messages_kept_past_the_layer_stay_intact_shm() {
    Job::start(2, &["outlive"], SHM).wait_all(60);
}

#[test]
fn messages_kept_past_the_layer_stay_intact_tcp() {
    Job::start(2, &["outlive"], TCP).wait_all(60);
}

#[test]
fn remote_reads_through_registered_memory_shm() {
    Job::start(3, &["rma"], SHM).wait_all(60);
}

#[test]
fn remote_reads_through_registered_memory_tcp() {
    Job::start(2, &["rma"], TCP).wait_all(60);
}

#[test]
fn progress_wait_sleeps_and_the_hook_wakes_shm() {
    Job::start(2, &["wake"], SHM).wait_all(60);
}

#[test]
fn progress_wait_sleeps_and_the_hook_wakes_tcp() {
    Job::start(2, &["wake"], TCP).wait_all(60);
}

fn lost_peer(env: &[(&str, &str)]) {
    let mut job = Job::start(2, &["lost"], env);
    job.expect_line(0, "READY", Duration::from_secs(30));
    job.expect_line(1, "READY", Duration::from_secs(30));
    let killed = Instant::now();
    job.children[1].kill().unwrap();
    let line = job.expect_line(0, "LOST 1", Duration::from_secs(5));
    eprintln!(
        "rank 0 reported the loss {:?} after the kill: {line}",
        killed.elapsed()
    );
    job.expect_line(0, "OK lost", Duration::from_secs(5));
}

#[test]
fn a_killed_peer_is_reported_lost_within_5s_shm() {
    lost_peer(SHM);
}

#[test]
fn a_killed_peer_is_reported_lost_within_5s_tcp() {
    lost_peer(TCP);
}

#[test]
fn a_killed_peer_is_reported_lost_by_ucx_error_handling_tcp() {
    lost_peer(TCP_PEER);
}

#[test]
fn ordered_exactly_once_with_peer_error_handling_shm() {
    Job::start(2, &["order", "16", "2"], SHM_PEER).wait_all(120);
}

#[test]
fn a_parked_network_thread_is_woken_for_every_message_shm() {
    Job::start(2, &["park", "1500"], SHM).wait_all(120);
}

#[test]
fn a_network_thread_parked_without_arming_is_still_woken_shm() {
    let env = [SHM, &[("CHARMRS_UCX_CHECK_PARK_UNARMED", "1")]].concat();
    Job::start(2, &["park", "300"], &env).wait_all(120);
}

#[test]
fn a_message_over_max_message_is_refused_naming_its_sender_shm() {
    let env = [SHM, &[("CHARMRS_UCX_CHECK_MAX_MESSAGE", "1048576")]].concat();
    Job::start(2, &["toolarge"], &env).wait_all(60);
}

#[test]
fn a_parked_network_thread_is_woken_for_every_message_tcp() {
    Job::start(2, &["park", "1000"], TCP).wait_all(120);
}

/// Rank 0 is killed with a 4 MiB rendezvous from rank 1 announced to it and never fetched:
/// once rank 1 reports the loss, nothing waits for that send any more (flush, parking, drop).
fn lost_receiver_of_a_send(env: &[(&str, &str)]) {
    let mut job = Job::start(2, &["lostsend"], env);
    job.expect_line(0, "READY", Duration::from_secs(30));
    job.expect_line(1, "SENT", Duration::from_secs(30));
    job.children[0].kill().unwrap();
    job.expect_line(1, "LOST 0", Duration::from_secs(10));
    job.expect_line(1, "OK lostsend", Duration::from_secs(10));
    job.children.remove(0).wait().unwrap();
    job.wait_all(10);
}

#[test]
fn a_send_to_a_killed_peer_is_not_waited_for_once_it_is_lost_shm() {
    lost_receiver_of_a_send(SHM);
}

#[test]
fn a_send_to_a_killed_peer_is_not_waited_for_once_it_is_lost_tcp() {
    lost_receiver_of_a_send(TCP);
}

#[test]
fn a_send_to_a_killed_peer_is_not_waited_for_once_it_is_lost_peer_errors_shm() {
    lost_receiver_of_a_send(SHM_PEER);
}

/// Rank 1 is killed while rank 2 streams to rank 0 without pause: rank 0 notices within 3 s
/// (the liveness check runs on a busy worker too).
#[test]
fn a_killed_peer_is_reported_lost_while_another_streams_shm() {
    let mut job = Job::start(3, &["lostbusy"], SHM);
    job.expect_line(0, "STREAMING", Duration::from_secs(30));
    let killed = Instant::now();
    job.children[1].kill().unwrap();
    let line = job.expect_line(0, "LOST 1", Duration::from_secs(3));
    eprintln!(
        "rank 0 reported the loss {:?} after the kill: {line}",
        killed.elapsed()
    );
    job.expect_line(0, "OK lostbusy", Duration::from_secs(5));
}

/// Rank 1 sends `messages` of 4 MiB that rank 0 does not fetch before rank 1 drops its layer
/// (saying goodbye after a short linger) and exits: rank 0 reports the loss of the messages.
/// (With one, rank 0 sees the goodbye before the failure: the case a goodbye hid.)
fn messages_lost_after_goodbye(env: &[(&str, &str)], messages: &str) {
    let env = [env, &[("CHARMRS_UCX_CHECK_LINGER_MS", "100")]].concat();
    let mut job = Job::start(2, &["byelost", messages], &env);
    job.expect_line(1, "GONE", Duration::from_secs(30));
    let line = job.expect_line(0, "ERROR", Duration::from_secs(15));
    assert!(line.contains("lost contact with process 1"), "{line}");
    job.wait_all(20);
}

#[test]
fn a_message_not_fetched_before_its_sender_said_goodbye_is_reported_tcp_peer_errors() {
    messages_lost_after_goodbye(TCP_PEER, "1");
}

#[test]
fn messages_waiting_for_a_fetch_when_their_sender_left_are_reported_tcp_peer_errors() {
    messages_lost_after_goodbye(TCP_PEER, "4");
}

#[test]
fn a_message_not_fetched_before_its_sender_said_goodbye_is_reported_shm() {
    messages_lost_after_goodbye(SHM, "1");
}

#[test]
fn a_message_not_fetched_before_its_sender_said_goodbye_is_reported_tcp() {
    messages_lost_after_goodbye(TCP, "1");
}

/// Transport segments of 1 KiB leave UCX room for an AM header of ~900 bytes: a message of more
/// segments than its header can list is refused as too large (UCX ended the process: "RTS is too
/// big"), and the messages around it arrive.
#[test]
fn a_message_of_more_segments_than_the_am_header_carries_is_refused_shm() {
    let env = [
        SHM,
        &[("UCX_MM_SEG_SIZE", "1024"), ("UCX_SELF_SEG_SIZE", "1024")],
    ]
    .concat();
    let mut job = Job::start(2, &["manysegs"], &env);
    let line = job.expect_line(0, "REFUSED", Duration::from_secs(30));
    assert!(line.contains("256 segments"), "{line}");
    job.wait_all(60);
}
