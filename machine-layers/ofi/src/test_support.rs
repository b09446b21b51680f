//! Support for the unit tests that open libfabric endpoints in the test process.
//!
//! libfabric reads its environment once, when first used: `FI_PROVIDER` limits the providers it
//! loads (a test run with `FI_PROVIDER="tcp;ofi_rxm"` has no `shm`), and `tcp` must be kept on
//! the loopback interface (`FI_TCP_IFACE=lo`). So such a test runs its body in a child process
//! of the test binary, once per provider, with that environment set, under a watchdog (as the
//! crate's process tests do): [`per_provider`].

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The providers every such test runs over.
pub(crate) const PROVIDERS: &[&str] = &["shm", "tcp;ofi_rxm"];

/// Set in the child: the provider its body runs over.
const CHILD: &str = "CHARMRS_OFI_UNIT_TEST_PROVIDER";

/// How long one child may run.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs `body` with each of [`PROVIDERS`], each in a child process of this test binary that runs
/// only the test `test` (its path without the crate name, e.g. `engine::tests::name`); fails
/// with the child's output if it fails or outlives [`WATCHDOG`]. In the child, runs `body` with
/// its provider.
pub(crate) fn per_provider(test: &str, body: impl FnOnce(&str)) {
    if let Ok(provider) = std::env::var(CHILD) {
        body(&provider);
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    for provider in PROVIDERS {
        let mut child = Command::new(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, provider)
            .env("FI_PROVIDER", provider)
            .env("FI_TCP_IFACE", "lo")
            .env("FI_SOCKETS_IFACE", "lo")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the test binary");
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + WATCHDOG;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (out, err) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        let ran = out.contains("1 passed");
        assert!(
            status.is_some_and(|s| s.success()) && ran,
            "{test} over {provider}: {}\n--- stdout\n{out}--- stderr\n{err}",
            match status {
                None => format!("killed after {WATCHDOG:?} (watchdog)"),
                Some(s) if s.success() => "the test did not run".to_owned(),
                Some(s) => format!("failed ({s})"),
            }
        );
    }
}
