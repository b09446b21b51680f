//! Jobs that span hosts: OpenMPI's `mpirun` starts 2 processes of 2 PEs on each of two emulated
//! hosts (`ci/netns-hosts`: a network namespace each, with its own address, host name and PID
//! namespace), so the machine layers carry the job over a real Ethernet interface between
//! different addresses, the TCP layer chooses that interface by itself, and nothing that compares
//! host names or PIDs may treat the two hosts as one.
//!
//! Runs only where `CHARMRS_NETNS_HOSTS` names the `ci/netns-hosts` script whose hosts `node0`
//! and `node1` are up (`ci/test` does this when it can create network namespaces); otherwise
//! each test prints `SKIPPED` and passes. Built only with `--features pmix,ucx,ofi`.

#![cfg(all(feature = "pmix", feature = "ucx", feature = "ofi"))]

mod common;

use std::process::Command;
use std::time::Duration;

/// The layers a multi-host job can run on, with the settings that keep each on the hosts'
/// Ethernet (`eth0`) between hosts: the TCP layer chooses it unaided; UCX picks its transports
/// itself, as on a cluster (shared memory within a host, since the processes of a host share a
/// PID namespace, and TCP between hosts, which do not); libfabric uses `tcp;ofi_rxm`, the
/// provider of a cluster without a high-speed fabric.
const LAYERS: [(&str, &[&str]); 3] = [
    ("tcp", &[]),
    ("ucx", &["UCX_NET_DEVICES=eth0"]),
    ("ofi", &["FI_PROVIDER=tcp;ofi_rxm", "FI_TCP_IFACE=eth0"]),
];

/// The `ci/netns-hosts` script, if the emulated hosts are up; else `None` (with a note).
fn hosts_script() -> Option<String> {
    match std::env::var("CHARMRS_NETNS_HOSTS") {
        Ok(script) if !script.is_empty() => Some(script),
        _ => {
            eprintln!(
                "SKIPPED: CHARMRS_NETNS_HOSTS is not set (run `ci/netns-hosts start` as root and \
                 set it to that script's path)"
            );
            None
        }
    }
}

/// Quotes `word` for the shell line the hosts' `rsh` runs.
fn quoted(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Runs `args` (a program and its arguments) as 4 processes of 2 PEs, 2 on each emulated host,
/// over `layer` with `env` (`VAR=value` words) set in every process. Fails the test if it takes
/// more than 120 s; returns what the job printed.
fn across_hosts(script: &str, layer: &str, env: &[&str], args: &[&str]) -> common::Finished {
    // One job at a time: the tests share the two hosts, and this 2-core machine.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = format!("{script}-rsh");
    let mut line = vec![
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "--host",
        "node0:2,node1:2",
        "-np",
        "4",
        "--mca",
        "plm_rsh_agent",
        &agent,
        // OpenMPI's own traffic between the hosts, over their Ethernet (not loopback).
        "--mca",
        "oob_tcp_if_include",
        "eth0",
        "--mca",
        "btl_tcp_if_include",
        "eth0",
        "-x",
        "CHARMRS_PES=2",
        "-x",
        "CHARMRS_MACHINE",
    ];
    let machine = format!("CHARMRS_MACHINE={layer}");
    let mut exported = vec![machine.as_str()];
    exported.extend(env);
    for var in &env
        .iter()
        .map(|e| e.split('=').next().unwrap())
        .collect::<Vec<_>>()
    {
        line.extend(["-x", var]);
    }
    line.extend(args);
    // Set for mpirun on node0 (which passes them on with -x): `env VAR=value … mpirun …`.
    let command: Vec<String> = ["env"]
        .iter()
        .chain(&exported)
        .chain(&line)
        .map(|w| quoted(w))
        .collect();
    let mut cmd = Command::new(script);
    cmd.args(["rsh", "node0", &command.join(" ")]);
    // Nothing from the test's own environment that pins a layer or OpenMPI to loopback (ci/test
    // sets such variables for the single-host tests) or picks a layer.
    for (var, _) in std::env::vars() {
        if ["UCX_", "FI_", "OMPI_MCA_", "CHARMRS_", "PMIX_", "SLURM_"]
            .iter()
            .any(|p| var.starts_with(p))
        {
            cmd.env_remove(&var);
        }
    }
    let programs: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| a.starts_with('/'))
        .collect();
    common::run(
        cmd,
        Duration::from_secs(120),
        common::launcher_lingers(&programs),
    )
}

/// `across_hosts`, asserting success; the lines printed.
fn lines_across_hosts(script: &str, layer: &str, env: &[&str], args: &[&str]) -> Vec<String> {
    let out = across_hosts(script, layer, env, args);
    assert!(
        out.success(),
        "{args:?} over {layer} across two hosts failed ({:?}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.lines()
}

#[test]
fn the_hosts_are_told_apart_and_list_their_pes() {
    let Some(script) = hosts_script() else { return };
    for (layer, env) in LAYERS {
        assert_eq!(
            lines_across_hosts(
                &script,
                layer,
                env,
                &[env!("CARGO_BIN_EXE_mpcheck"), "hosts"]
            ),
            [
                "hosts 2",
                "host 0: [0, 1, 2, 3]",
                "host 1: [4, 5, 6, 7]",
                "ok hosts"
            ],
            "over {layer}"
        );
    }
}

#[test]
fn every_program_prints_its_lines_across_hosts() {
    let Some(script) = hosts_script() else { return };
    let group_hello: Vec<String> = (0..8)
        .map(|i| format!("Hi[{}] from element {i}", 17 + i))
        .collect();
    for (layer, env) in LAYERS {
        let got = lines_across_hosts(&script, layer, env, &[env!("CARGO_BIN_EXE_hello")]);
        assert_eq!(got, ["Hello"], "hello over {layer}");
        // mpirun forwards each process's output through a pipe of its own: lines of different
        // processes may come in any order, so compare them as sets.
        let mut got = lines_across_hosts(&script, layer, env, &[env!("CARGO_BIN_EXE_group_hello")]);
        got.sort();
        let mut want = group_hello.clone();
        want.push("All done".into());
        want.sort();
        assert_eq!(got, want, "group_hello over {layer}");
        let got = lines_across_hosts(&script, layer, env, &[env!("CARGO_BIN_EXE_pmap")]);
        assert_eq!(
            got,
            ["Final results are [1, 4, 9, 16, 25] [1, 9, 25, 49, 81]"],
            "pmap over {layer}"
        );
    }
}

#[test]
fn the_runtime_features_work_across_hosts() {
    let Some(script) = hosts_script() else { return };
    let want = [
        "ok reduction",
        "ok multi-value future",
        "ok readonly",
        "ok allreduce",
        "ok when",
        "ok quiescence",
        "ok pool",
        "ok large buffers",
    ];
    for (layer, env) in LAYERS {
        let got = lines_across_hosts(
            &script,
            layer,
            env,
            &[env!("CARGO_BIN_EXE_mpcheck"), "features"],
        );
        assert!(got[0].starts_with("ok placement"), "over {layer}: {got:?}");
        assert_eq!(&got[1..], &want, "over {layer}");
    }
}

#[test]
fn migration_and_load_balancing_work_across_hosts() {
    let Some(script) = hosts_script() else { return };
    for (layer, env) in LAYERS {
        let got = lines_across_hosts(
            &script,
            layer,
            env,
            &[
                env!("CARGO_BIN_EXE_mpcheck"),
                "mobility",
                "+balancer",
                "Rotate",
            ],
        );
        assert_eq!(got.len(), 14, "over {layer}: {got:?}");
        assert!(
            got.iter().all(|l| l.starts_with("ok ")),
            "over {layer}: {got:?}"
        );
    }
}

/// stencil3d across hosts ends with the field it computes in one process; leanmd (its chares
/// moving between processes, and so between hosts, every few steps) ends where its serial
/// reference does.
#[test]
fn the_mini_apps_across_hosts_compute_what_one_process_does() {
    let Some(script) = hosts_script() else { return };
    let stencil = [
        env!("CARGO_BIN_EXE_stencil3d"),
        "--edge",
        "24",
        "--iters",
        "20",
    ];
    let mut cmd = Command::new(stencil[0]);
    cmd.args(&stencil[1..])
        .arg("+p8")
        .env_remove("CHARMRS_PES")
        .env_remove("CHARMRS_MACHINE");
    let alone = common::run(cmd, Duration::from_secs(120), |_| false);
    assert!(
        alone.success(),
        "stencil3d in one process: {}",
        alone.stderr
    );
    let want = common::field_checksum(&alone.lines()).to_owned();
    let leanmd = [
        env!("CARGO_BIN_EXE_leanmd"),
        "--steps",
        "12",
        "--migrate-every",
        "3",
        "--verify",
        "+balancer",
        "Rotate",
        "+LBPeriod",
        "0.005",
    ];
    for (layer, env) in LAYERS {
        let got = lines_across_hosts(&script, layer, env, &stencil);
        assert_eq!(common::field_checksum(&got), want, "stencil3d over {layer}");
        let got = lines_across_hosts(&script, layer, env, &leanmd);
        assert!(
            got.iter()
                .any(|l| l.starts_with("verified against the serial reference")),
            "leanmd over {layer}: {got:?}"
        );
    }
}

/// A panic in an entry method on one host ends the job on both, every process naming the entry,
/// the element and the PE, within 15 s (over TCP between the hosts: no shared-memory shortcut
/// carries the abort).
#[test]
fn a_panic_on_one_host_aborts_the_job_on_both_naming_it() {
    let Some(script) = hosts_script() else { return };
    for (layer, env) in LAYERS {
        let out = across_hosts(
            &script,
            layer,
            env,
            &[env!("CARGO_BIN_EXE_mpcheck"), "panic"],
        );
        assert!(!out.success(), "over {layer}: {}", out.stderr);
        let told = "panic in entry method `Victim::fail` of chare Victim index (7,) on PE 7: \
                    injected failure";
        // PE 7 is on node1; the processes of node0 say it too.
        let telling = out.stderr.lines().filter(|l| l.contains(told)).count();
        assert!(
            telling >= 4,
            "over {layer}, {telling} lines: {}",
            out.stderr
        );
        assert!(
            out.took < Duration::from_secs(15),
            "over {layer}: took {:?}",
            out.took
        );
    }
}
