//! Every program across processes (`charmrun +pN ++ppn M`, the TCP machine layer), and the
//! faults: a panic in one process, a process killed mid-run.

mod common;

use std::cell::Cell;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `charmrun` launcher next to this package's binaries (built on demand).
fn charmrun() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_hello"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join("charmrun");
    if !path.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "charmrs-launcher", "--bin", "charmrun"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "could not build charmrun");
    }
    path
}

/// Runs charmrun with `args`, failing the test (with its output) if it takes more than `limit`.
fn run(args: &[&str], limit: Duration) -> (Output, Duration) {
    let mut cmd = Command::new(charmrun());
    cmd.args(args).env_remove("CHARMRS_PES");
    let done = common::run(cmd, limit, |_| false);
    let took = done.took;
    let out = done.into_output();
    // Whatever a job's end leaves in flight is discarded by design (the runtime tells the
    // layer the job is ending): a layer must not report it as messages given up on.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("sent before the layer was dropped"),
        "{args:?}: a layer reported messages given up on at the job's end: {stderr}"
    );
    (out, took)
}

/// Runs charmrun with `args` (60 s limit), asserts a zero exit status, returns stdout's lines.
fn lines_ok(args: &[&str]) -> Vec<String> {
    let (out, _) = run(args, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines(&out)
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn every_program_prints_the_same_lines_across_processes() {
    let programs: [(&str, Vec<String>); 7] = [
        (env!("CARGO_BIN_EXE_hello"), vec!["Hello".into()]),
        (
            env!("CARGO_BIN_EXE_group_hello"),
            (0..4)
                .map(|i| format!("Hi[{}] from element {i}", 17 + i))
                .chain(["All done".into()])
                .collect(),
        ),
        (
            env!("CARGO_BIN_EXE_array_hello"),
            (0..8)
                .map(|p| {
                    format!(
                        "Hi[{}] from element ({}, {}, {}) on PE {}",
                        17 + p,
                        p / 4,
                        (p / 2) % 2,
                        p % 2,
                        p / 2
                    )
                })
                .chain(["All done".into()])
                .collect(),
        ),
        (
            env!("CARGO_BIN_EXE_reduction"),
            vec![format!(
                "Reduction result is [{}]",
                (0..20)
                    .map(|x| (x * 100).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        ),
        (
            env!("CARGO_BIN_EXE_futures"),
            vec![
                "Reduction result is 4950".into(),
                "Value of future 1 is 1".into(),
                "Value of future 2 is 2".into(),
            ],
        ),
        (
            env!("CARGO_BIN_EXE_wait_loop"),
            vec!["Done after 10 iterations".into()],
        ),
        (
            env!("CARGO_BIN_EXE_pmap"),
            vec!["Final results are [1, 4, 9, 16, 25] [1, 9, 25, 49, 81]".into()],
        ),
    ];
    // Two processes of two PEs, then four of one (array_hello's placement is per PE, so
    // unchanged).
    for (ppn, processes) in [("2", 2), ("1", 4)] {
        for (bin, want) in &programs {
            let got = lines_ok(&["++quiet", "+p4", "++ppn", ppn, bin]);
            assert_eq!(&got, want, "{bin} with {processes} processes");
        }
    }
}

/// Runs `mpcheck MODE` on 4 PEs in 2 processes and checks that the job fails within 10 s with
/// every one of `needles` in its error output.
fn assert_mpcheck_aborts(mode: &str, needles: &[&str]) {
    let (out, took) = run(
        &[
            "++quiet",
            "+p4",
            "++ppn",
            "2",
            env!("CARGO_BIN_EXE_mpcheck"),
            mode,
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// A process running another build of the program (same entry table, another build id: here a
/// copy of `hello` with one byte of its build id changed, run by rank 1 only) is refused at
/// start, naming it, before any entry runs.
#[test]
fn a_process_of_another_build_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("charmrs-build-id-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let original = env!("CARGO_BIN_EXE_hello");
    let mut bytes = std::fs::read(original).unwrap();
    // The note: name size 4, descriptor size 20, type 3 (NT_GNU_BUILD_ID), "GNU\0", the id.
    let note: [u8; 16] = [4, 0, 0, 0, 20, 0, 0, 0, 3, 0, 0, 0, b'G', b'N', b'U', 0];
    let at = bytes
        .windows(16)
        .position(|w| w == note)
        .expect("hello has a GNU build id note");
    bytes[at + 16] ^= 0xff;
    let other = dir.join("hello-other-build");
    std::fs::write(&other, &bytes).unwrap();
    let script = dir.join("rank1-other.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$CHARMRS_RANK\" = 1 ]; then exec {} \"$@\"; else exec {original} \"$@\"; fi\n",
            other.display()
        ),
    )
    .unwrap();
    for file in [&other, &script] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = script.to_string_lossy().into_owned();
    let (out, _) = run(
        &["++quiet", "+p2", "++ppn", "1", &script],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("process 1 runs another build of this program"),
        "{stderr}"
    );
    // (A machine layer may log to standard output as the job is torn down: UCX does.)
    let printed = lines(&out);
    assert!(
        !printed.iter().any(|l| l.contains("Hello")),
        "an entry ran: {printed:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_panic_in_one_process_aborts_the_job_naming_it() {
    assert_mpcheck_aborts("panic", &["Victim::fail", "PE 3", "injected failure"]);
}

#[test]
fn an_argument_that_panics_when_decoded_aborts_the_job_naming_the_sender() {
    assert_mpcheck_aborts(
        "baddecode",
        &["from process 0", "Fragile refuses to be deserialized"],
    );
}

/// Contributions to one reduction naming different targets meet across processes (one partial
/// arrives encoded, with its target's digest): the job aborts naming the mismatch, instead of
/// the second target waiting for ever.
#[test]
fn contributions_naming_different_targets_across_processes_abort_the_job() {
    assert_mpcheck_aborts(
        "badtarget",
        &["reduction #0 over group", "must name the same target"],
    );
}

/// The pid of the job's process of rank `rank`: a child of the launcher `launcher` whose
/// environment says so.
fn rank_pid(launcher: u32, rank: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).ok()?;
    let want = format!("CHARMRS_RANK={rank}");
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid: &u32| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            env.split(|&b| b == 0).any(|kv| kv == want.as_bytes())
        })
}

#[test]
fn a_killed_process_brings_the_job_down_within_5_seconds() {
    let mut cmd = Command::new(charmrun());
    cmd.args([
        "++quiet",
        "+p4",
        "++ppn",
        "2",
        env!("CARGO_BIN_EXE_mpcheck"),
        "hang",
    ])
    .env_remove("CHARMRS_PES");
    // Every PE's `hang` entry marks it runs in `running`: the job is then past its start-up
    // (a kill during the start-up fence is another path, reported by the bootstrap).
    let running = std::env::temp_dir().join(format!("charmrs-killed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&running);
    std::fs::create_dir_all(&running).unwrap();
    cmd.env("MPCHECK_RUNNING_DIR", &running);
    let all_running = || (0..4).all(|pe| running.join(format!("pe{pe}")).exists());
    // Once the job runs (every PE marked, then 300 ms), kill process 1 (a child of charmrun)
    // and go on until the job ends. common::run kills the whole job if it outlives its limit,
    // or if the test fails while it runs.
    let seen: Cell<Option<(u32, Instant)>> = Cell::new(None);
    let killed: Cell<Option<(u32, Instant)>> = Cell::new(None);
    let done = common::run(cmd, Duration::from_secs(30), |launcher| {
        if killed.get().is_some() {
            return false;
        }
        match seen.get() {
            None if all_running() => {
                seen.set(rank_pid(launcher, 1).map(|pid| (pid, Instant::now())))
            }
            None => {}
            Some((pid, at)) if at.elapsed() >= Duration::from_millis(300) => {
                common::signal(pid as i32, libc::SIGKILL);
                killed.set(Some((pid, Instant::now())));
            }
            Some(_) => {}
        }
        false
    });
    let took_from = Instant::now();
    let (victim, killed_at) = killed.get().unwrap_or_else(|| {
        panic!(
            "the job ended before process 1 was killed: {:?}\n{}",
            done.status, done.stderr
        )
    });
    let took = took_from.duration_since(killed_at);
    // Over libfabric's shm provider the killed process could not unlink its
    // region (`/dev/shm/<pid>:<uid>:<n>`): remove it for it.
    if let Ok(dir) = std::fs::read_dir("/dev/shm") {
        let prefix = format!("{victim}:");
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&running);
    let stderr = &done.stderr;
    assert!(took < Duration::from_secs(5), "took {took:?}: {stderr}");
    // Charmrun names the first failure it sees: process 1's death, or process 0 aborting the job
    // because it lost contact with process 1 (when that reaches charmrun first).
    let first = stderr
        .lines()
        .find(|l| l.starts_with("charmrun: process rank "))
        .unwrap_or_else(|| panic!("charmrun named no failed process: {stderr}"));
    let code = done.status.and_then(|s| s.code());
    if first.starts_with(&format!(
        "charmrun: process rank 1 (pid {victim}) was killed by signal 9 (SIGKILL); "
    )) {
        assert_eq!(code, Some(128 + 9), "{stderr}");
    } else {
        assert!(
            first.starts_with("charmrun: process rank 0 (pid ")
                && first.contains(") aborted the job: ")
                && first.contains("lost contact with process 1: "),
            "names the lost process: {stderr}"
        );
        assert!(code.is_some_and(|c| c != 0), "{:?}: {stderr}", done.status);
    }
}

#[test]
fn an_idle_job_across_processes_uses_almost_no_cpu() {
    // 600 ms of nothing to do, measured in the last PE's process (100 clock ticks a second): a
    // network PE spinning would use ~60 ticks. Over libfabric's shm, which cannot wake a PE,
    // the network PE naps instead of parking: a few ticks.
    let got = lines_ok(&[
        "++quiet",
        "+p2",
        "++ppn",
        "1",
        env!("CARGO_BIN_EXE_mpcheck"),
        "idle",
    ]);
    let ticks: u64 = got
        .iter()
        .find_map(|l| l.strip_prefix("idle cpu "))
        .and_then(|l| l.strip_suffix(" ticks"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no `idle cpu` line in {got:?}"));
    assert!(
        ticks < 15,
        "an idle process used {ticks} ticks of CPU in 0.6 s"
    );
}

#[test]
fn results_reductions_when_quiescence_the_pool_and_large_buffers_work_across_processes() {
    for args in [
        ["+p4", "++ppn", "2"],
        ["+p6", "++ppn", "1"],
        ["+p3", "++ppn", "3"],
    ] {
        let mut all = vec!["++quiet"];
        all.extend(args);
        all.extend([env!("CARGO_BIN_EXE_mpcheck"), "features"]);
        let got = lines_ok(&all);
        assert!(got[0].starts_with("ok placement"), "{got:?}");
        assert_eq!(&got[1..], &common::MPCHECK_FEATURES, "{args:?}");
    }
}

/// leanmd across processes (atoms and forces cross them every step; sections multicast to
/// computes in other processes; every chare moves every 5 ms, across processes too) ends where
/// the serial reference does.
#[test]
fn leanmd_across_processes_matches_the_serial_reference() {
    let got = lines_ok(&[
        "++quiet",
        "+p4",
        "++ppn",
        "2",
        env!("CARGO_BIN_EXE_leanmd"),
        "--steps",
        "24",
        "--migrate-every",
        "3",
        "--speed",
        "300",
        "--verify",
        "+balancer",
        "Rotate",
        "+LBPeriod",
        "0.005",
    ]);
    assert!(
        got.iter()
            .any(|l| l.starts_with("verified against the serial reference")),
        "{got:?}"
    );
    let energy = got.iter().find(|l| l.starts_with("energy:")).unwrap();
    assert!(
        !energy.ends_with("729 atoms, 0 changed cells") && energy.contains("; 729 atoms, "),
        "atoms changed cells across processes, none lost: {energy}"
    );
}

/// `+trace` across processes: one timeline per process, each with its own PEs, and a summary
/// per process that counts the messages it exchanged.
#[test]
fn a_trace_across_processes_writes_one_timeline_per_process() {
    let dir = std::env::temp_dir().join(format!("charmrs-mp-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.json");
    let (out, _) = run(
        &[
            "++quiet",
            "+p4",
            "++ppn",
            "2",
            env!("CARGO_BIN_EXE_array_hello"),
            "+trace",
            file.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(lines(&out).last().map(String::as_str), Some("All done"));
    for (rank, pes) in [(0, ["PE 0", "PE 1"]), (1, ["PE 2", "PE 3"])] {
        let path = dir.join(format!("t.{rank}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let events = json["traceEvents"].as_array().unwrap();
        let threads: Vec<_> = events
            .iter()
            .filter(|e| e["name"] == "thread_name")
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(threads, pes, "process {rank}");
        let hellos = events
            .iter()
            .filter(|e| e["name"] == "Hello::say_hi" && e["pid"] == rank)
            .count();
        assert_eq!(hellos, 4, "process {rank}: one say_hi per element");
        assert!(
            stderr.contains(&format!("charmrs trace: process {rank} (PEs ")),
            "{stderr}"
        );
    }
    // Every message counted as sent by one process is counted as received by the other.
    let counts: Vec<(u64, u64)> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("network: "))
        .map(|l| {
            let n: Vec<u64> = l
                .split(' ')
                .filter_map(|w| w.trim_start_matches('(').parse().ok())
                .collect();
            (n[0], n[2])
        })
        .collect();
    assert_eq!(counts.len(), 2, "{stderr}");
    let sent: u64 = counts.iter().map(|c| c.0).sum();
    let received: u64 = counts.iter().map(|c| c.1).sum();
    assert!(sent > 0 && sent == received, "{counts:?}\n{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn migration_sparse_arrays_and_load_balancing_work_across_processes() {
    for args in [["+p4", "++ppn", "2"], ["+p3", "++ppn", "1"]] {
        let mut all = vec!["++quiet"];
        all.extend(args);
        all.extend([
            env!("CARGO_BIN_EXE_mpcheck"),
            "mobility",
            "+balancer",
            "Rotate",
        ]);
        assert_eq!(lines_ok(&all), common::MPCHECK_MOBILITY, "{args:?}");
    }
}

#[test]
fn a_job_restarted_from_its_checkpoint_on_other_processes_ends_as_the_uninterrupted_one() {
    let heat = env!("CARGO_BIN_EXE_heat2d");
    let dir = std::env::temp_dir().join(format!("charmrs-heat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().unwrap();
    let common = [
        "--blocks", "3", "--edge", "8", "--steps", "40", "--every", "10",
    ];
    let job = |layout: &[&str], extra: &[&str]| {
        let mut all = vec!["++quiet"];
        all.extend(layout);
        all.push(heat);
        all.extend(common);
        all.extend(extra);
        lines_ok(&all)
    };
    let whole = job(&["+p4", "++ppn", "2"], &[]);
    let whole = common::heat_figures(whole);
    assert_eq!(whole.len(), 5, "{whole:?}");

    // Periodic balancing with `Rotate` moves every block every 2 ms: the checkpoints must hold it
    // off, or a block could be saved twice or not at all.
    let moving = ["+balancer", "Rotate", "+LBPeriod", "0.002"];
    let mut first_args = vec!["--checkpoint", dir_arg, "--stop-after", "20"];
    first_args.extend(moving);
    let first = job(&["+p4", "++ppn", "2"], &first_args);
    assert!(
        first
            .iter()
            .any(|l| l == "heat2d: stopping after step 20 (as if out of time)"),
        "{first:?}"
    );
    assert_eq!(common::heat_figures(first.clone()), whole[..2]);

    // Three processes of one PE, then one process of two PEs: each goes on from the last
    // checkpoint (the first restart writes its own at steps 30 and 40).
    let mut second_args = vec!["--restart", dir_arg, "--stop-after", "30"];
    second_args.extend(moving);
    let second = job(&["+p3", "++ppn", "1"], &second_args);
    assert!(
        second
            .iter()
            .any(|l| l.starts_with("heat2d: restarted from") && l.contains("at step 20")),
        "{second:?}"
    );
    assert_eq!(common::heat_figures(second.clone()), whole[2..3]);
    let third = job(&["+p2", "++ppn", "2"], &["--restart", dir_arg]);
    assert!(
        third
            .iter()
            .any(|l| l.contains("at step 30 (written by a job of 3 PEs)")),
        "{third:?}"
    );
    assert_eq!(common::heat_figures(third.clone()), whole[3..]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// stencil3d with blocks moving between processes computes the field it computes in one
/// process without load balancing: the same `field checksum` line, to the last digit.
#[test]
fn stencil3d_balances_across_processes() {
    let stencil = env!("CARGO_BIN_EXE_stencil3d");
    let size = ["--iters", "12", "--edge", "6"];
    // 4 × 2 × 2 blocks (PEs × blocks per PE along x): 2 PEs of 8 blocks in one process, no
    // balancing.
    let mut args = vec!["++quiet", "+p2", stencil, "--blocks-per-pe", "8"];
    args.extend(["--lb-warmup", "0", "--lb-period", "0"]);
    args.extend(size);
    let reference = lines_ok(&args);
    let want = common::field_checksum(&reference);

    let mut args = vec!["++quiet", "+p4", "++ppn", "2", stencil, "--imbalance"];
    args.extend(size);
    args.extend(["--lb-period", "5", "+balancer", "GreedyRefine", "+LBDebug"]);
    let got = lines_ok(&args);
    assert_eq!(
        got.iter().filter(|l| l.starts_with("[LB] step")).count(),
        3,
        "{got:?}"
    );
    assert_eq!(common::field_checksum(&got), want, "GreedyRefine: {got:?}");
    assert!(got.last().unwrap().starts_with("Total time: "), "{got:?}");

    // Four processes, every block moving to the next PE (another process) after iterations 2, 3,
    // 6 and 9.
    let mut args = vec!["++quiet", "+p4", "++ppn", "1", stencil];
    args.extend(size);
    args.extend(["--lb-period", "3", "+balancer", "Rotate", "+LBDebug"]);
    let got = lines_ok(&args);
    let moves: Vec<&String> = got.iter().filter(|l| l.starts_with("[LB] step")).collect();
    assert_eq!(moves.len(), 4, "{got:?}");
    assert!(
        moves.iter().all(|l| l.contains(" 16 migrations")),
        "{moves:?}"
    );
    assert_eq!(common::field_checksum(&got), want, "Rotate: {got:?}");
}

#[test]
fn the_tcp_layer_listens_on_the_address_or_interface_it_is_given() {
    let job = |var: &str, value: &str| {
        let mut cmd = Command::new(charmrun());
        cmd.args(["++quiet", "+p2", "++ppn", "1"])
            .arg(env!("CARGO_BIN_EXE_reduction"))
            .args(["+machine", "tcp"])
            .env_remove("CHARMRS_PES")
            .env(var, value);
        common::run(cmd, Duration::from_secs(60), |_| false)
    };
    let sums: Vec<String> = (0..20).map(|x| (x * 100).to_string()).collect();
    let want = vec![format!("Reduction result is [{}]", sums.join(", "))];
    // 127.0.0.2 is loopback too (all of 127/8); `lo` is loopback's interface.
    for (var, value) in [
        ("CHARMRS_TCP_ADDR", "127.0.0.2"),
        ("CHARMRS_TCP_IFACE", "lo"),
    ] {
        let done = job(var, value);
        assert!(done.success(), "{var}={value}: {}", done.stderr);
        assert_eq!(done.lines(), want, "{var}={value}");
    }
    // An address this host does not have (TEST-NET-1: the bind fails, nothing is sent), and
    // an interface it does not have, are refused naming them.
    let done = job("CHARMRS_TCP_ADDR", "192.0.2.1");
    assert!(!done.success());
    assert!(
        done.stderr.contains("cannot listen on 192.0.2.1"),
        "{}",
        done.stderr
    );
    let done = job("CHARMRS_TCP_IFACE", "nosuchif0");
    assert!(!done.success());
    assert!(
        done.stderr.contains("CHARMRS_TCP_IFACE=nosuchif0") && done.stderr.contains("lo"),
        "{}",
        done.stderr
    );
}

/// Every process ends the job at once (each element of a group calls `exit`): the end-of-job
/// handshake completes promptly. Before, two processes that both ended it each waited 10 s for
/// the other's acknowledgement (2 runs in 10 took 10 s); and over libfabric `tcp;ofi_rxm` one
/// in five did when an acknowledgement overtook its sender's own end-of-job message (another
/// lane), so that the receiver left unaware of it.
#[test]
fn processes_that_end_the_job_together_leave_promptly() {
    let limit = Duration::from_secs(5);
    for _ in 0..4 {
        let args = [
            "++quiet",
            "+p8",
            "++ppn",
            "2",
            env!("CARGO_BIN_EXE_mpcheck"),
            "exit-everywhere",
        ];
        let (out, took) = run(&args, Duration::from_secs(60));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(took < limit, "the job took {took:?} to end");
    }
}

/// The job ends while another PE of a process is still in a 3 s entry method: that process
/// waits for the entry before the end-of-job handshake, and the job ends with status 0.
#[test]
fn a_job_ended_while_an_entry_runs_elsewhere_ends_well() {
    let args = [
        "++quiet",
        "+p4",
        "++ppn",
        "2",
        env!("CARGO_BIN_EXE_mpcheck"),
        "exit-while-busy",
    ];
    let (out, took) = run(&args, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "exiting");
    assert!(
        took >= Duration::from_secs(3),
        "the busy entry ran to its end: {took:?}"
    );
}

/// A `+p` given to the program that differs from charmrun's `++ppn` is refused by every process
/// (before, the job silently ran another number of PEs than charmrun announced).
#[test]
fn a_pe_count_given_to_the_program_must_match_charmrun() {
    let args = [
        "++quiet",
        "+p4",
        "++ppn",
        "2",
        "--",
        env!("CARGO_BIN_EXE_hello"),
        "+p3",
    ];
    let (out, _) = run(&args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("give the PE counts to charmrun only"),
        "{stderr}"
    );
}

/// Hosts (charm4py's `myHost`, `numHosts`, `getHostPes`, `getPeHost`): every process of a
/// charmrun job is on this machine, one host; with `CHARMRS_HOSTNAME` set per process by a
/// wrapper script, the same machine looks like several, numbered by their first process, with
/// PEs listed in order however the processes interleave.
#[test]
fn hosts_are_numbered_by_first_process_and_list_their_pes() {
    let mpcheck = env!("CARGO_BIN_EXE_mpcheck");
    let got = lines_ok(&["++quiet", "+p4", "++ppn", "2", mpcheck, "hosts"]);
    assert_eq!(got, ["hosts 1", "host 0: [0, 1, 2, 3]", "ok hosts"]);

    let dir = std::env::temp_dir().join(format!("charmrs-hosts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, [&str; 2], Vec<&str>); 2] = [
        (
            "$((CHARMRS_RANK / 2))",
            ["+p6", "1"],
            vec![
                "hosts 3",
                "host 0: [0, 1]",
                "host 1: [2, 3]",
                "host 2: [4, 5]",
                "ok hosts",
            ],
        ),
        (
            "$((1 - CHARMRS_RANK % 2))",
            ["+p6", "2"],
            vec![
                "hosts 2",
                "host 0: [0, 1, 4, 5]",
                "host 1: [2, 3]",
                "ok hosts",
            ],
        ),
    ];
    for (i, (host, [p, ppn], want)) in cases.into_iter().enumerate() {
        let wrapper = dir.join(format!("as-hosts-{i}.sh"));
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nCHARMRS_HOSTNAME=h{host} exec {mpcheck} \"$@\"\n"),
        )
        .unwrap();
        let mut perms = std::fs::metadata(&wrapper).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&wrapper, perms).unwrap();
        let w = wrapper.to_str().unwrap();
        assert_eq!(lines_ok(&["++quiet", p, "++ppn", ppn, w, "hosts"]), want);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An unknown machine layer is refused naming it and where it came from: the flag, or the
/// environment variable when no flag was given.
#[test]
fn an_unknown_machine_layer_is_named_with_where_it_came_from() {
    let job = |flag: Option<&str>, env: Option<&str>| {
        let mut cmd = Command::new(charmrun());
        cmd.args(["++quiet", "+p2", "++ppn", "1"])
            .arg(env!("CARGO_BIN_EXE_hello"))
            .env_remove("CHARMRS_PES")
            .env_remove("CHARMRS_MACHINE");
        if let Some(name) = flag {
            cmd.args(["+machine", name]);
        }
        if let Some(name) = env {
            cmd.env("CHARMRS_MACHINE", name);
        }
        common::run(cmd, Duration::from_secs(60), |_| false)
    };
    let done = job(Some("bogus"), Some("tcp"));
    assert!(!done.success(), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("+machine: unknown machine layer `bogus`; valid: "),
        "{}",
        done.stderr
    );
    let done = job(None, Some("warp"));
    assert!(!done.success(), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("CHARMRS_MACHINE=warp: unknown machine layer `warp`; valid: "),
        "{}",
        done.stderr
    );
}
