//! LB dump files and the `lbsim` binary.

use charmrs_lb::dump::{load_dump, read_dump, save_dump, write_dump, DumpError};
use charmrs_lb::synth::{Dist, Initial, SynthConfig};
use std::path::PathBuf;
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("charmrs-lb-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn sample() -> charmrs_lb::LbStats {
    let mut c = SynthConfig::new(13, 500, Dist::Exponential, 77);
    c.initial = Initial::Random;
    c.background = 0.3;
    c.non_migratable = 0.25;
    c.unavailable = 2;
    let mut s = c.generate();
    s.objects[0].id = u64::MAX;
    s.objects[1].load = 1e-300;
    s.objects[2].load = 0.1 + 0.2; // not exactly representable in decimal
    s
}

#[test]
fn round_trip_is_exact() {
    let stats = sample();
    let mut buf = Vec::new();
    write_dump(&stats, &mut buf).unwrap();
    assert!(buf.starts_with(b"charmrs-lbdump 1\npes 13\npe 0 "));
    assert_eq!(read_dump(&buf[..]).unwrap(), stats);

    let path = tmp("roundtrip.lbdump");
    save_dump(&stats, &path).unwrap();
    assert_eq!(load_dump(&path).unwrap(), stats);
}

#[test]
fn file_errors_name_the_file_and_line() {
    let missing = tmp("does-not-exist.lbdump");
    let e = load_dump(&missing).unwrap_err();
    assert!(matches!(e, DumpError::Io { .. }));
    assert!(e.to_string().contains("does-not-exist.lbdump"), "{e}");

    let path = tmp("bad.lbdump");
    std::fs::write(&path, "charmrs-lbdump 1\npes 2\npe 0 0 1\npe 1 zero 1\n").unwrap();
    let e = load_dump(&path).unwrap_err().to_string();
    assert!(e.contains("bad.lbdump:4:"), "{e}");
    assert!(e.contains("background load 'zero'"), "{e}");

    std::fs::write(&path, [0xff, 0xfe, b'\n']).unwrap();
    let e = load_dump(&path).unwrap_err().to_string();
    assert!(e.contains(":1: not valid UTF-8"), "{e}");
}

fn lbsim(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lbsim"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn lbsim_compares_all_strategies() {
    let (ok, out, err) = lbsim(&[
        "--pes",
        "32",
        "--objects",
        "800",
        "--dist",
        "normal",
        "--strategy",
        "all",
    ]);
    assert!(ok, "{err}");
    for name in charmrs_lb::STRATEGY_NAMES {
        assert!(out.contains(name), "{name} missing:\n{out}");
    }
    assert!(out.contains("max/avg"), "{out}");
}

#[test]
fn lbsim_replays_its_dump() {
    let path = tmp("lbsim.lbdump");
    let p = path.to_str().unwrap();
    let args = [
        "--pes",
        "20",
        "--objects",
        "300",
        "--dist",
        "pareto",
        "--initial",
        "random",
    ];
    let (ok, first, err) =
        lbsim(&[&args[..], &["--strategy", "GreedyRefine", "--dump", p]].concat());
    assert!(ok, "{err}");
    let (ok, second, err) = lbsim(&["--load", p, "--strategy", "GreedyRefine"]);
    assert!(ok, "{err}");
    // The result rows (without the timing column) agree.
    let row = |s: &str| {
        let l = s
            .lines()
            .find(|l| l.starts_with("GreedyRefineLB"))
            .unwrap()
            .to_string();
        l.rsplit_once(' ').unwrap().0.to_string()
    };
    assert_eq!(row(&first), row(&second));
}

#[test]
fn lbsim_simulates_the_stencil_run() {
    let (ok, out, err) = lbsim(&[
        "--pes",
        "100",
        "--objects",
        "400",
        "--stencil-run",
        "120",
        "--strategy",
        "Dummy,GreedyRefine",
    ]);
    assert!(ok, "{err}");
    let speedup = |name: &str| -> f64 {
        let row = out.lines().find(|l| l.starts_with(name)).unwrap();
        row.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    assert_eq!(speedup("DummyLB"), 1.0, "{out}");
    assert!(speedup("GreedyRefineLB") > 1.6, "{out}");
    assert!(out.contains("perfect balance"), "{out}");
}

#[test]
fn lbsim_reports_bad_input_clearly() {
    let (ok, _, err) = lbsim(&["--strategy", "FooLB"]);
    assert!(!ok);
    assert!(
        err.contains("unknown load balancer 'FooLB'") && err.contains("GreedyRefineLB"),
        "{err}"
    );

    let (ok, _, err) = lbsim(&["--load", "/nonexistent/dir/x.lbdump"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/dir/x.lbdump"), "{err}");

    let (ok, _, err) = lbsim(&["--dist", "gauss"]);
    assert!(!ok);
    assert!(err.contains("unknown distribution 'gauss'"), "{err}");

    let (ok, _, err) = lbsim(&["--pes"]);
    assert!(!ok);
    assert!(err.contains("--pes needs a value"), "{err}");

    let (ok, _, err) = lbsim(&["--frobnicate"]);
    assert!(!ok);
    assert!(err.contains("unknown option '--frobnicate'"), "{err}");

    let (ok, _, err) = lbsim(&["--load", "x", "--stencil-run", "10"]);
    assert!(!ok);
    assert!(err.contains("cannot be used with --load"), "{err}");

    for (args, needle) in [
        (
            &["--background", "nan"][..],
            "--background must be a load of at least 0, not NaN",
        ),
        (
            &["--background", "-1"][..],
            "--background must be a load of at least 0",
        ),
        (
            &["--non-migratable", "2"][..],
            "--non-migratable is a fraction between 0 and 1",
        ),
        (&["--objects", "0"][..], "--objects must be at least 1"),
    ] {
        let (ok, _, err) = lbsim(args);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }

    let (ok, out, _) = lbsim(&["--help"]);
    assert!(ok && out.contains("--strategy"), "{out}");
}
