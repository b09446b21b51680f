//! UcxLayer across real processes: the `charmrs-ucx-check` binary started
//! as every process of a job, with a real key-value bootstrap server (the
//! one `charmrun` runs) and the launcher's environment contract, over UCX's
//! shared-memory transports (`UCX_TLS=shm,self`) and its TCP transport on
//! loopback (`UCX_TLS=tcp,self`, `UCX_NET_DEVICES=lo`). Every test has a
//! deadline after which the processes are killed and the test fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
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

/// What the line of a dropped layer that gave up on sends it had accepted says.
const GAVE_UP: &str = "sent before the layer was dropped";

struct Job {
    _server: KvServer,
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, String)>,
    /// Lines received but not yet matched.
    seen: Vec<(usize, String)>,
    /// Every process's stderr, by rank, line by line (also copied to the test's stderr).
    stderr: Arc<Mutex<Vec<Vec<String>>>>,
    /// The threads reading the processes' stdout and stderr (they end with the processes).
    readers: Vec<JoinHandle<()>>,
}

impl Job {
    fn start(n: u32, args: &[&str], env: &[(&str, &str)]) -> Job {
        let secret = random_secret().unwrap();
        let (server, addr) = KvServer::start(n, secret).unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(vec![Vec::new(); n as usize]));
        let mut readers = Vec::new();
        let children = (0..n)
            .map(|r| {
                let mut c = Command::new(CHECK);
                c.args(args)
                    .env(ENV_RANK, r.to_string())
                    .env(ENV_NPROCS, n.to_string())
                    .env(ENV_KV_ADDR, addr.to_string())
                    .env(ENV_JOB_SECRET, secret_to_hex(&secret))
                    .env("UCX_WARN_UNUSED_ENV_VARS", "n")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                for (k, v) in env {
                    c.env(k, v);
                }
                let mut child = c.spawn().unwrap();
                let out = child.stdout.take().unwrap();
                let tx = tx.clone();
                readers.push(std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        eprintln!("[rank {r}] {line}");
                        let _ = tx.send((r as usize, line));
                    }
                }));
                let err = child.stderr.take().unwrap();
                let lines = Arc::clone(&stderr);
                readers.push(std::thread::spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        eprintln!("[rank {r} stderr] {line}");
                        lines.lock().unwrap()[r as usize].push(line);
                    }
                }));
                child
            })
            .collect();
        Job {
            _server: server,
            children,
            lines,
            seen: Vec::new(),
            stderr,
            readers,
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

    /// Waits for every process to exit successfully within `secs`; none may have given up on
    /// sends at its layer's shutdown (the normal case: everything delivered).
    fn wait_all(self, secs: u64) {
        for (r, lines) in self.wait_all_stderr(secs).iter().enumerate() {
            assert!(
                !lines.iter().any(|l| l.contains(GAVE_UP)),
                "rank {r} gave up on sends at its shutdown: {lines:#?}"
            );
        }
    }

    /// [`wait_all`](Self::wait_all), returning every process's stderr lines (by rank)
    /// unchecked.
    fn wait_all_stderr(mut self, secs: u64) -> Vec<Vec<String>> {
        self.wait_exits(secs);
        // The processes ended: so do the readers of their output, once they read it all.
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.join();
        }
        std::mem::take(&mut *self.stderr.lock().unwrap())
    }

    /// Waits for every process to exit successfully within `secs`.
    fn wait_exits(&mut self, secs: u64) {
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
    // Rank 1 bounds each stage itself (flush 2 s, parking 5 s, the drop 0.9 s) and fails
    // naming the one that took longer; these waits only catch a hang, and leave room for a
    // loaded host (a CI run once saw no line for 10 s after the loss).
    job.expect_line(1, "FLUSHED", Duration::from_secs(30));
    job.expect_line(1, "PARKABLE", Duration::from_secs(30));
    job.expect_line(1, "OK lostsend", Duration::from_secs(30));
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
/// (With one, rank 0 sees the goodbye before the failure: the case a goodbye hid.) Rank 1's
/// drop gives up on the sends and says so, in one line on stderr, whatever its workers.
fn messages_lost_after_goodbye(env: &[(&str, &str)], messages: &str) {
    let env = [env, &[("CHARMRS_UCX_CHECK_LINGER_MS", "100")]].concat();
    let mut job = Job::start(2, &["byelost", messages], &env);
    job.expect_line(1, "GONE", Duration::from_secs(30));
    let line = job.expect_line(0, "ERROR", Duration::from_secs(15));
    assert!(line.contains("lost contact with process 1"), "{line}");
    let stderr = job.wait_all_stderr(20);
    let (count, verb) = match messages {
        "1" => ("1 message".to_owned(), "is"),
        n => (format!("{n} messages"), "are"),
    };
    let want = format!(
        "charmrs-ucx: process 1: {count} sent before the layer was dropped {verb} not known \
         delivered: process 0 ({count}) did not take them before the linger of 100 ms ran out"
    );
    let gave_up =
        |r: usize| -> Vec<&String> { stderr[r].iter().filter(|l| l.contains(GAVE_UP)).collect() };
    assert_eq!(gave_up(1), [&want], "rank 1's stderr: {:#?}", stderr[1]);
    assert!(gave_up(0).is_empty(), "rank 0's stderr: {:#?}", stderr[0]);
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

#[test]
fn sends_a_live_peer_never_fetched_are_reported_when_the_linger_runs_out_shm() {
    messages_lost_after_goodbye(SHM, "3");
}

#[test]
fn sends_a_live_peer_never_fetched_are_reported_when_the_linger_runs_out_tcp() {
    messages_lost_after_goodbye(TCP, "3");
}

/// With a worker per PE, rank 1 sends from both of its workers: each gives up on its own sends,
/// and the drop prints one line for all of them.
#[test]
fn sends_given_up_on_by_several_workers_are_reported_in_one_line_shm() {
    let env = [SHM, &[("CHARMRS_UCX_CHECK_WORKERS", "2")]].concat();
    messages_lost_after_goodbye(&env, "4");
}

/// Rank 0 dies (SIGKILL) before rank 1 sends it 3 messages of 4 MiB, without progressing, and
/// drops its layer: nothing told rank 1's runtime of the loss, so its drop names rank 0 as lost
/// during the shutdown, with why.
fn sends_to_a_peer_that_died_unnoticed(env: &[(&str, &str)]) {
    let env = [env, &[("CHARMRS_UCX_CHECK_LINGER_MS", "100")]].concat();
    let mut job = Job::start(2, &["byelost", "3", "killed"], &env);
    job.expect_line(1, "GONE", Duration::from_secs(30));
    job.children.remove(0).wait().unwrap();
    let stderr = job.wait_all_stderr(20);
    let lines: Vec<&String> = stderr[1].iter().filter(|l| l.contains(GAVE_UP)).collect();
    assert!(
        lines.len() == 1
            && lines[0].starts_with(
                "charmrs-ucx: process 1: 3 messages sent before the layer was dropped are not \
                 known delivered: process 0 (3 messages; "
            )
            && lines[0].ends_with(") was lost during the shutdown"),
        "rank 1's stderr: {:#?}",
        stderr[1]
    );
}

#[test]
fn sends_to_a_peer_that_died_unnoticed_are_reported_as_lost_with_it_shm() {
    sends_to_a_peer_that_died_unnoticed(SHM);
}

#[test]
fn sends_to_a_peer_that_died_unnoticed_are_reported_as_lost_with_it_tcp() {
    sends_to_a_peer_that_died_unnoticed(TCP);
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
