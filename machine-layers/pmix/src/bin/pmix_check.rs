//! `pmix_check`: checks the PMIx bootstrap and the TCP machine layer over
//! it, across the real processes of a PMIx launcher. Start it with, e.g.
//!
//! ```text
//! mpirun --allow-run-as-root --oversubscribe -n 4 \
//!        --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo pmix_check
//! ```
//!
//! or `srun --mpi=pmix -n 4 pmix_check`. Each rank:
//!
//! 1. initialises [`PmixBootstrap`] and checks rank/size;
//! 2. exercises the key-value store directly: puts a per-rank value, an
//!    empty one and a 256 KiB one, fences, reads every rank's and checks
//!    them; reads a key nobody wrote and expects a prompt error;
//! 3. agrees on the job secret ([`PmixBootstrap::job_secret`]) and checks
//!    that every rank holds the same one (by publishing a digest);
//! 4. starts a [`TcpLayer`] (loopback) with it and sends one message to
//!    every rank (itself included), then receives one from every rank and
//!    checks header and contents;
//! 5. meets the others in a barrier and prints `ok rank R of N`.
//!
//! Before that it prints `info rank R: namespace=… size=… local_rank=…
//! local_size=… ppn=… pmix=…` (what PMIx and `CHARMRS_PES` said).
//!
//! Any failure prints `pmix_check: rank R: …` on stderr and exits 1.
//!
//! `pmix_check layer` sets the layer up in one call
//! ([`charmrs_pmix::tcp_layer_from_env`]) and does step 4 and 5 only.
//!
//! `pmix_check abort` instead has the last rank abort the job through
//! [`Bootstrap::abort`] (`PMIx_Abort`, or under OpenMPI's `mpirun` its
//! non-zero exit) while the others wait in a fence: the launcher must stop
//! them all. `pmix_check abort-linger` has the aborting rank sleep 30 s
//! after the call instead of exiting (under `srun`: `PMIx_Abort` alone must
//! end the job).
//! `pmix_check fence-abort` enters a fence; if it fails (a process of the
//! job died before it, and the fence timed out), it aborts the job through
//! [`Bootstrap::abort`], as the runtime does when its start-up fails, and
//! sleeps 30 s: only the launcher acting on the abort ends the job quickly.
//! Outside a PMIx launcher it says so and exits 2.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_pmix::PmixBootstrap;
use charmrs_tcp::{TcpConfig, TcpLayer};
use charmrs_transport::{Bootstrap, Header, MachineLayer, Message, ProcessId};

/// Message kind used by the exchange (opaque to the layer).
const KIND: u8 = 7;

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Deterministic payload byte `i` of the message from `src` to `dst`.
fn pat(src: u32, dst: u32, i: usize) -> u8 {
    (u64::from(src) * 131 + u64::from(dst) * 17 + i as u64 * 7) as u8
}

/// The payload `src` sends `dst`.
fn payload(src: u32, dst: u32) -> Vec<u8> {
    let len = 1000 + 4096 * (src as usize + 1) + dst as usize;
    (0..len).map(|i| pat(src, dst, i)).collect()
}

/// A cheap digest of the secret (FNV-1a), so ranks can compare secrets
/// without publishing them.
fn digest(s: &[u8]) -> u64 {
    s.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn run(mut boot: PmixBootstrap) -> Result<(u32, u32), String> {
    let me = boot.rank();
    let n = boot.size();
    if me >= n || n == 0 {
        return Err(format!("rank {me} out of size {n}"));
    }
    // Short timeout for the missing-key check; values that exist after a
    // fence are found at once.
    boot.set_get_timeout(Duration::from_secs(2));

    // 2. The key-value store on its own.
    let mine = format!("hello from {me} of {n}");
    let big: Vec<u8> = (0..256 * 1024).map(|i| pat(me, 0, i)).collect();
    boot.put("check.hello", mine.as_bytes())
        .and_then(|()| boot.put("check.empty", b""))
        .and_then(|()| boot.put("check.big", &big))
        .map_err(|e| format!("put: {e}"))?;
    boot.fence().map_err(|e| format!("fence: {e}"))?;
    for r in 0..n {
        let got = boot
            .get(r, "check.hello")
            .map_err(|e| format!("get hello from {r}: {e}"))?;
        if got != format!("hello from {r} of {n}").as_bytes() {
            return Err(format!(
                "rank {r}'s hello is {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        let empty = boot
            .get(r, "check.empty")
            .map_err(|e| format!("get empty from {r}: {e}"))?;
        if !empty.is_empty() {
            return Err(format!("rank {r}'s empty value has {} bytes", empty.len()));
        }
        let got = boot
            .get(r, "check.big")
            .map_err(|e| format!("get big from {r}: {e}"))?;
        if got.len() != big.len() || got.iter().enumerate().any(|(i, &b)| b != pat(r, 0, i)) {
            return Err(format!(
                "rank {r}'s 256 KiB value differs ({} bytes)",
                got.len()
            ));
        }
    }
    if boot.get(me, "nobody.wrote.this").is_ok() || boot.get(n, "check.hello").is_ok() {
        return Err("a get of a missing key or rank succeeded".to_owned());
    }
    let t = Instant::now();
    match boot.get((me + 1) % n, "nobody.wrote.this") {
        Ok(_) => return Err("a get of a missing remote key succeeded".to_owned()),
        Err(e) if !e.to_string().contains("PMIx_Get") => {
            return Err(format!("the error does not name PMIx_Get: {e}"))
        }
        Err(_) if t.elapsed() > Duration::from_secs(10) => {
            return Err(format!("a missing key took {:?} to fail", t.elapsed()))
        }
        Err(_) => {}
    }

    // 3. The job secret.
    let secret = boot.job_secret().map_err(|e| format!("job secret: {e}"))?;
    if boot.job_secret().map_err(|e| e.to_string())? != secret {
        return Err("job_secret changed between calls".to_owned());
    }
    boot.put("check.digest", &digest(&secret).to_le_bytes())
        .and_then(|()| boot.fence())
        .map_err(|e| format!("digest exchange: {e}"))?;
    for r in 0..n {
        let d = boot
            .get(r, "check.digest")
            .map_err(|e| format!("get digest from {r}: {e}"))?;
        if d != digest(&secret).to_le_bytes() {
            return Err(format!("rank {r} holds another job secret"));
        }
    }

    // 4. The TCP layer over this bootstrap: rank-to-all.
    let boot: Arc<dyn Bootstrap> = Arc::new(boot);
    let layer = TcpLayer::with_config(Arc::clone(&boot), secret, TcpConfig::default())
        .map_err(|e| format!("tcp layer: {e}"))?;
    if layer.rank() != me || layer.size() != n {
        return Err("the layer disagrees on rank/size".to_owned());
    }
    rank_to_all(&layer)?;
    drop(layer);
    Ok((me, n))
}

/// Every rank sends one message to every rank (itself included) and
/// checks the one it gets from each; then all meet in a barrier, so
/// nobody leaves before everyone has everything.
fn rank_to_all(layer: &TcpLayer) -> Result<(), String> {
    let me = layer.rank();
    let n = layer.size();
    for dst in 0..n {
        let msg = Message::with_segments(
            Header::new(KIND, me, dst, u64::from(me) << 32 | u64::from(dst)),
            vec![
                Bytes::from(format!("from {me} to {dst}")),
                Bytes::from(payload(me, dst)),
            ],
        )
        .map_err(|e| e.to_string())?;
        layer
            .send(dst, msg)
            .map_err(|e| format!("send to {dst}: {e}"))?;
    }
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut bad: Option<String> = None;
    while seen.len() < n as usize && bad.is_none() {
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} messages arrived", seen.len()));
        }
        layer
            .progress_wait(
                &mut |src: ProcessId, m: Message| {
                    let h = m.header();
                    let ok = h.kind == KIND
                        && h.tag == (u64::from(src) << 32 | u64::from(me))
                        && m.segments().len() == 2
                        && m.segments()[0] == format!("from {src} to {me}").as_bytes()
                        && m.segments()[1] == payload(src, me);
                    if !ok {
                        bad = Some(format!("the message from {src} differs"));
                    } else if !seen.insert(src) {
                        bad = Some(format!("two messages from {src}"));
                    }
                },
                Duration::from_millis(100),
            )
            .map_err(|e| format!("progress: {e}"))?;
    }
    if let Some(b) = bad {
        return Err(b);
    }
    layer.barrier().map_err(|e| format!("barrier: {e}"))
}

/// `pmix_check abort`: the last rank aborts the job through the
/// bootstrap while the others wait in a fence; the launcher must stop
/// them all.
/// With `linger` the aborting rank then sleeps 30 s instead of exiting: only the launcher acting
/// on `PMIx_Abort` can end the job quickly (not under OpenMPI's `mpirun`, where the abort is the
/// exit).
fn abort_mode(boot: &PmixBootstrap, linger: bool) -> ! {
    let me = boot.rank();
    if me + 1 == boot.size() {
        boot.abort(&format!("pmix_check: rank {me} aborts the job on purpose"));
        if linger {
            std::thread::sleep(Duration::from_secs(30));
        }
        // As the runtime does: exit at once (under OpenMPI's mpirun that exit is what ends the
        // job; elsewhere PMIx_Abort may return before the launcher kills us).
        std::process::exit(5);
    }
    match boot.fence() {
        // A fence a member left cannot complete: failing is right, if mpirun is not quicker.
        Err(e) => eprintln!("pmix_check: rank {me}: the fence failed after the abort: {e}"),
        Ok(()) => eprintln!("pmix_check: rank {me}: the fence returned Ok despite the abort"),
    }
    std::process::exit(6);
}

/// `pmix_check fence-abort`: a fence; if it fails, [`Bootstrap::abort`]
/// and 30 s of sleep (the launcher must end the job).
fn fence_abort_mode(boot: &PmixBootstrap) -> ! {
    let me = boot.rank();
    let t = Instant::now();
    if let Err(e) = boot.fence() {
        eprintln!(
            "pmix_check: rank {me}: the fence failed after {:.1} s: {e}",
            t.elapsed().as_secs_f64()
        );
        boot.abort(&format!(
            "pmix_check: rank {me} aborts after its fence failed"
        ));
        eprintln!("pmix_check: rank {me}: the abort returned");
        std::thread::sleep(Duration::from_secs(30));
        std::process::exit(7);
    }
    out(&format!("ok fence rank {me}"));
    std::process::exit(0);
}

/// `pmix_check layer`: the one-call set-up
/// ([`charmrs_pmix::tcp_layer_from_env`]), then rank-to-all.
fn layer_mode() -> ! {
    let layer = match charmrs_pmix::tcp_layer_from_env(TcpConfig::default()) {
        Ok(Some(l)) => l,
        Ok(None) => {
            eprintln!("pmix_check: not started by a PMIx launcher");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("pmix_check: {e}");
            std::process::exit(1);
        }
    };
    let (me, n) = (layer.rank(), layer.size());
    if let Err(e) = rank_to_all(&layer) {
        eprintln!("pmix_check: rank {me}: {e}");
        std::process::exit(1);
    }
    drop(layer);
    out(&format!("ok rank {me} of {n}"));
    std::process::exit(0);
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "layer" {
        layer_mode();
    }
    let boot = match PmixBootstrap::from_env() {
        Ok(Some(b)) => b,
        Ok(None) => {
            eprintln!(
                "pmix_check: not started by a PMIx launcher (no PMIX_NAMESPACE/PMIX_RANK/PMIX_SERVER_URI* in the environment)"
            );
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("pmix_check: {e}");
            std::process::exit(1);
        }
    };
    let rank = boot.rank();
    out(&format!(
        "info rank {rank}: namespace={} size={} local_rank={:?} local_size={:?} ppn={:?} pmix={:?}",
        boot.namespace(),
        boot.size(),
        boot.local_rank(),
        boot.local_size(),
        boot.ppn(),
        charmrs_pmix::library_version(),
    ));
    match mode.as_str() {
        "" => {}
        "abort" => abort_mode(&boot, false),
        "abort-linger" => abort_mode(&boot, true),
        "fence-abort" => fence_abort_mode(&boot),
        other => {
            eprintln!(
                "pmix_check: unknown mode {other:?} (none, `layer`, `abort`, `abort-linger` or \
                 `fence-abort`)"
            );
            std::process::exit(2);
        }
    }
    match run(boot) {
        Ok((me, n)) => out(&format!("ok rank {me} of {n}")),
        Err(e) => {
            eprintln!("pmix_check: rank {rank}: {e}");
            std::process::exit(1);
        }
    }
}
