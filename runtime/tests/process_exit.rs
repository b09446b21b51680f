//! `charmrs::start` as a real program: exit status of `exit(code)`, of a panic in an entry
//! method (non-zero, with chare, index, entry and PE on stderr) and of a bad command line (2).
//!
//! Each case re-runs this test binary as a child process with `CHARMRS_TEST_CHILD` set; the child
//! calls `charmrs::start`, which exits the process.

use charmrs::prelude::*;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Panics in `fail` on element 3 of a group.
struct Crasher;

#[chare]
impl Crasher {
    fn new() -> Self {
        Crasher
    }

    #[entry]
    fn fail(&mut self, ctx: &Ctx<Self>) {
        if ctx.index::<usize>() == 3 {
            panic!("deliberate failure");
        }
    }
}

fn child_main(case: &str) -> ! {
    match case {
        "exit7" => charmrs::start(|_| async { charmrs::exit(7) }),
        "panic" => charmrs::start(|_| async {
            Group::<Crasher>::new(()).fail();
        }),
        "args" => charmrs::start(|args| async move {
            println!("args={:?} pes={}", &args[1..], charmrs::num_pes());
            charmrs::exit(0)
        }),
        other => panic!("unknown child case {other}"),
    }
}

/// Runs the child case with `args`, failing the test if it takes more than 60 s.
fn run_child(case: &str, args: &[&str], env_pes: Option<&str>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .args(args)
        .env("CHARMRS_TEST_CHILD", case)
        .env_remove("CHARMRS_PES")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = env_pes {
        cmd.env("CHARMRS_PES", p);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("child {case} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The child process's body (a no-op when run as an ordinary test).
#[test]
fn child_entry() {
    if let Ok(case) = std::env::var("CHARMRS_TEST_CHILD") {
        child_main(&case);
    }
}

#[test]
fn exit_code_is_the_process_status() {
    let out = run_child("exit7", &["+p2"], None);
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn panic_in_entry_exits_non_zero_naming_everything() {
    let out = run_child("panic", &["+p4"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    for needle in ["Crasher::fail", "index (3,)", "PE 3", "deliberate failure"] {
        assert!(
            stderr.contains(needle),
            "`{needle}` missing from stderr: {stderr}"
        );
    }
}

#[test]
fn runtime_options_are_stripped_and_env_pes_is_used() {
    let out = run_child("args", &["+p3", "a", "+noaffinity", "b"], None);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The test harness's own flags come first; the runtime removed only its own options.
    assert!(
        stdout.contains(r#"--test-threads=1", "a", "b"] pes=3"#),
        "{stdout}"
    );
    let out = run_child("args", &[], Some("5"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pes=5"));
}

#[test]
fn bad_options_exit_2_listing_valid_ones() {
    for (args, env, needle) in [
        (&["+p0"][..], None, "at least 1"),
        (&["+px"][..], None, "`x` is not a number of PEs"),
        (
            &["+frobnicate"][..],
            None,
            "unknown runtime option `+frobnicate`",
        ),
        (&[][..], Some("many"), "CHARMRS_PES"),
    ] {
        let out = run_child("args", args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert!(stderr.contains("valid runtime options"), "{stderr}");
    }
}
