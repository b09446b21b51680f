//! `charmrs-tcp-check`: exercises the TCP machine layer across real
//! processes. Start it with charmrun, e.g.
//! `charmrun +p4 charmrs-tcp-check alltoall 200`.
//!
//! Modes (first argument):
//!
//! * `env [ARGS…]` — prints the charmrun environment and arguments.
//! * `pingpong N` — ranks pair up (0↔1, 2↔3, …); N round trips of
//!   three-segment messages, contents and segment layout checked.
//! * `alltoall N` — every rank sends N messages to every rank (itself
//!   included); per-source order and contents checked.
//! * `get` — each rank registers 1 MiB, ships the key to the next rank,
//!   which reads it remotely and checks it.
//! * `exit RANK CODE` — RANK exits with CODE after set-up; the others wait
//!   forever (charmrun must stop them).
//! * `peerlost VICTIM` — after an all-to-all warm-up VICTIM prints its pid
//!   and sleeps (the test kills it); the others print the `PeerLost` they
//!   get and exit.
//! * `badsecret` — rank 1 tries rank 0 with a wrong secret, then talks
//!   properly.
//! * `garbage` — rank 1 connects to rank 0 with a valid handshake and
//!   sends garbage; rank 0 must report it and keep working.
//! * `abort RANK` — RANK aborts the job through the layer and exits 5.
//! * `abort-linger RANK` — RANK aborts the job through the layer and then
//!   sleeps (charmrun must kill it).
//! * `stall RANK` — RANK joins the job (claims its rank at charmrun's
//!   key-value server), prints its pid and sleeps without reaching the
//!   start-up fence; the others wait in that fence (it must time out).
//!
//! Success lines start with `OK`; any failure exits non-zero with a message.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_tcp::wire::{self, HELLO_LEN, HELLO_MAGIC};
use charmrs_tcp::{TcpConfig, TcpLayer};
use charmrs_transport::kv::JobSecret;
use charmrs_transport::{
    Bootstrap, Header, KvBootstrap, MachineLayer, Message, ProcessId, RemoteKey, TransportError,
};

type Res<T> = Result<T, String>;

/// Fails the process with `msg`.
fn fail(msg: String) -> ! {
    eprintln!("charmrs-tcp-check: {msg}");
    std::process::exit(1);
}

fn out(line: String) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

struct Job {
    boot: Arc<KvBootstrap>,
    secret: JobSecret,
    layer: TcpLayer,
}

impl Job {
    fn rank(&self) -> ProcessId {
        self.layer.rank()
    }
    fn size(&self) -> u32 {
        self.layer.size()
    }
}

fn setup() -> Job {
    let boot = match KvBootstrap::from_env() {
        Ok(Some(b)) => Arc::new(b),
        Ok(None) => fail("not started by charmrun (CHARMRS_KV_ADDR unset)".into()),
        Err(e) => fail(format!("bootstrap: {e}")),
    };
    let secret = *boot.secret();
    let dynboot: Arc<dyn Bootstrap> = boot.clone();
    let layer = TcpLayer::with_config(dynboot, secret, TcpConfig::default())
        .unwrap_or_else(|e| fail(format!("tcp layer: {e}")));
    Job {
        boot,
        secret,
        layer,
    }
}

/// Progress until `n` messages arrived (errors are fatal).
fn collect(layer: &TcpLayer, n: usize, secs: u64) -> Res<Vec<(ProcessId, Message)>> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} messages arrived", got.len()));
        }
        layer
            .progress_wait(&mut |s, m| got.push((s, m)), Duration::from_millis(100))
            .map_err(|e| format!("progress: {e}"))?;
    }
    Ok(got)
}

/// Deterministic payload byte.
fn pat(a: u64, i: usize) -> u8 {
    (a.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8
}

fn pingpong(job: &Job, iters: u64) -> Res<()> {
    let me = job.rank();
    let partner = me ^ 1;
    if partner >= job.size() {
        return Ok(()); // odd one out
    }
    let l = &job.layer;
    for i in 0..iters {
        if me.is_multiple_of(2) {
            let len = (i as usize * 7919) % 200_000;
            let payload: Vec<u8> = (0..len).map(|k| pat(i, k)).collect();
            let segs = vec![
                Bytes::from(format!("ping {i}")),
                Bytes::from(payload),
                Bytes::from_static(b"tail"),
            ];
            let msg = Message::with_segments(Header::new(3, me, partner, i), segs.clone())
                .map_err(|e| e.to_string())?;
            l.send(partner, msg).map_err(|e| e.to_string())?;
            let (src, back) = collect(l, 1, 20)?.remove(0);
            if src != partner || back.header().tag != i || back.segments() != &segs[..] {
                return Err(format!("round trip {i}: reply differs"));
            }
            check_layout(&back)?;
        } else {
            let (src, m) = collect(l, 1, 20)?.remove(0);
            if src != partner || m.header().tag != i || m.segments().len() != 3 {
                return Err(format!("ping {i}: bad header or segment count"));
            }
            if m.segments()[0] != format!("ping {i}").as_bytes()
                || m.segments()[1]
                    .iter()
                    .enumerate()
                    .any(|(k, &b)| b != pat(i, k))
                || &m.segments()[2][..] != b"tail"
            {
                return Err(format!("ping {i}: contents differ"));
            }
            check_layout(&m)?;
            // Echo the very same buffers back (zero-copy send).
            l.send(partner, m).map_err(|e| e.to_string())?;
        }
    }
    out(format!("OK pingpong rank {me} iters {iters} segments 3"));
    Ok(())
}

/// Received segments are consecutive views of one frame buffer.
fn check_layout(m: &Message) -> Res<()> {
    for w in m.segments().windows(2) {
        if !w[1].is_empty() && w[0].as_ptr() as usize + w[0].len() != w[1].as_ptr() as usize {
            return Err("received segments are not views of one buffer".into());
        }
    }
    Ok(())
}

fn alltoall(job: &Job, iters: u64) -> Res<()> {
    let (me, n) = (job.rank(), job.size());
    let l = &job.layer;
    for i in 0..iters {
        for d in 0..n {
            let payload: Vec<u8> = (0..(i as usize % 4096))
                .map(|k| pat(u64::from(me) + i, k))
                .collect();
            let m = Message::with_segments(
                Header::new(4, me, d, i),
                vec![Bytes::from(format!("{me}->{d}#{i}")), Bytes::from(payload)],
            )
            .map_err(|e| e.to_string())?;
            l.send(d, m).map_err(|e| e.to_string())?;
        }
    }
    let got = collect(l, (iters * u64::from(n)) as usize, 30)?;
    let mut next = vec![0u64; n as usize];
    for (src, m) in got {
        let i = next[src as usize];
        let want = format!("{src}->{me}#{i}");
        if m.header().tag != i || m.segments().len() != 2 || m.segments()[0] != want.as_bytes() {
            return Err(format!(
                "from {src}: expected message {i}, got tag {}",
                m.header().tag
            ));
        }
        let seg = &m.segments()[1];
        if seg.len() != i as usize % 4096
            || seg
                .iter()
                .enumerate()
                .any(|(k, &b)| b != pat(u64::from(src) + i, k))
        {
            return Err(format!("from {src}: payload of message {i} differs"));
        }
        next[src as usize] += 1;
    }
    l.barrier().map_err(|e| e.to_string())?;
    let st = l.stats();
    out(format!(
        "OK alltoall rank {me} received {} sent {} connections {}",
        st.messages_received + iters,
        st.messages_sent,
        st.connections_opened
    ));
    Ok(())
}

fn get(job: &Job) -> Res<()> {
    let (me, n) = (job.rank(), job.size());
    let l = &job.layer;
    let data: Vec<u8> = (0..(1 << 20)).map(|k| pat(u64::from(me), k)).collect();
    let region = l.register(Bytes::from(data)).map_err(|e| e.to_string())?;
    let key = region.key();
    let mut blob = Vec::new();
    blob.extend_from_slice(&key.addr.to_le_bytes());
    blob.extend_from_slice(&key.len.to_le_bytes());
    blob.extend_from_slice(&key.rkey);
    let next = (me + 1) % n;
    let m = Message::with_segments(Header::new(1, me, next, 0), vec![Bytes::from(blob)])
        .map_err(|e| e.to_string())?;
    l.send(next, m).map_err(|e| e.to_string())?;
    let (src, m) = collect(l, 1, 20)?.remove(0);
    let b = &m.segments()[0];
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let key = RemoteKey {
        addr: word(0),
        len: word(1),
        rkey: b[16..].to_vec(),
    };
    l.get(src, &key, 9, u64::from(src))
        .map_err(|e| e.to_string())?;
    let (from, c) = collect(l, 1, 20)?.remove(0);
    if from != src || c.header().kind != 9 || c.header().tag != u64::from(src) {
        return Err("completion has the wrong source, kind or tag".into());
    }
    let bytes = &c.segments()[0];
    if bytes.len() != 1 << 20
        || bytes
            .iter()
            .enumerate()
            .any(|(k, &v)| v != pat(u64::from(src), k))
    {
        return Err("remote read returned the wrong bytes".into());
    }
    l.barrier().map_err(|e| e.to_string())?; // keep regions alive until all read
    drop(region);
    out(format!("OK get rank {me} read 1048576 bytes from {src}"));
    Ok(())
}

fn wait_forever(job: &Job) -> ! {
    loop {
        let _ = job
            .layer
            .progress_wait(&mut |_, _| {}, Duration::from_millis(200));
    }
}

fn warm_up(job: &Job) -> Res<()> {
    let (me, n) = (job.rank(), job.size());
    for d in 0..n {
        job.layer
            .send(d, Message::new(Header::new(0, me, d, 0)))
            .map_err(|e| e.to_string())?;
    }
    collect(&job.layer, n as usize, 20)?;
    job.layer.barrier().map_err(|e| e.to_string())
}

fn peerlost(job: &Job, victim: u32) -> Res<()> {
    warm_up(job)?;
    let me = job.rank();
    if me == victim {
        out(format!("VICTIM rank {me} pid {}", std::process::id()));
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match job
            .layer
            .progress_wait(&mut |_, _| {}, Duration::from_millis(100))
        {
            Ok(_) => {}
            Err(TransportError::PeerLost { process, reason }) if process == victim => {
                out(format!(
                    "PEERLOST rank {me} process {process} reason {reason}"
                ));
                return Ok(());
            }
            Err(e) => return Err(format!("unexpected error: {e}")),
        }
    }
    Err("no PeerLost within 20 s".into())
}

/// Rank 0's published address.
fn addr0(job: &Job) -> Res<std::net::SocketAddr> {
    let raw = job.boot.get(0, wire::ADDR_KEY).map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&raw)
        .parse()
        .map_err(|e| format!("address of rank 0: {e}"))
}

/// Reads until the peer closes; `Err` if it answers.
fn expect_closed(mut s: TcpStream) -> Res<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(format!("waiting for the close: {e}")),
        Ok(_) => Err("rank 0 answered an unauthenticated connection".into()),
    }
}

/// Rank 1 exchanges one real message with rank 0 after its attack.
fn exchange_after(job: &Job, tag: u64) -> Res<()> {
    let l = &job.layer;
    match job.rank() {
        1 => {
            l.send(0, Message::new(Header::new(1, 1, 0, tag)))
                .map_err(|e| e.to_string())?;
            let (src, m) = collect(l, 1, 20)?.remove(0);
            if src != 0 || m.header().tag != tag + 1 {
                return Err("bad reply from rank 0".into());
            }
        }
        0 => {
            let (src, m) = collect(l, 1, 20)?.remove(0);
            if src != 1 || m.header().tag != tag {
                return Err("bad message from rank 1".into());
            }
            l.send(1, Message::new(Header::new(1, 0, 1, tag + 1)))
                .map_err(|e| e.to_string())?;
        }
        _ => {}
    }
    Ok(())
}

fn badsecret(job: &Job) -> Res<()> {
    if job.size() < 2 {
        return Err("needs 2 processes".into());
    }
    if job.rank() == 1 {
        let mut wrong = job.secret;
        wrong[0] ^= 0xFF;
        let mut s = TcpStream::connect(addr0(job)?).map_err(|e| e.to_string())?;
        s.write_all(&wire::encode_hello(HELLO_MAGIC, 1, job.size(), &wrong))
            .map_err(|e| e.to_string())?;
        expect_closed(s)?;
    }
    exchange_after(job, 10)?;
    if job.rank() == 0 && job.layer.stats().connections_refused != 1 {
        return Err(format!(
            "refused {} connections, expected 1",
            job.layer.stats().connections_refused
        ));
    }
    job.layer.barrier().map_err(|e| e.to_string())?;
    out(format!("OK badsecret rank {}", job.rank()));
    Ok(())
}

fn garbage(job: &Job) -> Res<()> {
    if job.size() < 2 {
        return Err("needs 2 processes".into());
    }
    match job.rank() {
        1 => {
            let mut s = TcpStream::connect(addr0(job)?).map_err(|e| e.to_string())?;
            s.write_all(&wire::encode_hello(HELLO_MAGIC, 1, job.size(), &job.secret))
                .map_err(|e| e.to_string())?;
            let mut ack = [0u8; HELLO_LEN];
            s.read_exact(&mut ack)
                .map_err(|e| format!("no handshake answer: {e}"))?;
            // A data packet whose frame has a bad magic, then noise.
            let mut junk = vec![wire::PKT_DATA];
            junk.extend_from_slice(b"JUNKJUNKJUNKJUNKJUNKJUNKJUNKJUNKJUNK");
            s.write_all(&junk).map_err(|e| e.to_string())?;
            expect_closed(s)?;
        }
        0 => {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut early = Vec::new();
            loop {
                if Instant::now() > deadline {
                    return Err("garbage was not reported".into());
                }
                let res = job
                    .layer
                    .progress_wait(&mut |s, m| early.push((s, m)), Duration::from_millis(100));
                if !early.is_empty() {
                    // The error is reported before the connection closes, so
                    // nothing (not even rank 1's real message, sent after
                    // the close) can overtake it.
                    return Err("a message was delivered before the garbage report".into());
                }
                match res {
                    Ok(_) => {}
                    Err(TransportError::Malformed(m)) if m.contains("process 1") => {
                        out(format!("MALFORMED rank 0: {m}"));
                        break;
                    }
                    Err(e) => return Err(format!("unexpected error: {e}")),
                }
            }
        }
        _ => {}
    }
    exchange_after(job, 20)?;
    job.layer.barrier().map_err(|e| e.to_string())?;
    out(format!("OK garbage rank {}", job.rank()));
    Ok(())
}

fn abort(job: &Job, who: u32, linger: bool) -> Res<()> {
    warm_up(job)?;
    let me = job.rank();
    if me == who {
        job.layer.abort(&format!("check abort from rank {me}"));
        if linger {
            std::thread::sleep(Duration::from_secs(60));
        }
        std::process::exit(5);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match job
            .layer
            .progress_wait(&mut |_, _| {}, Duration::from_millis(100))
        {
            Err(TransportError::PeerLost { process, reason }) if process == who => {
                out(format!("ABORT-SEEN rank {me}: {reason}"));
                wait_forever(job);
            }
            Err(e) => return Err(format!("unexpected error: {e}")),
            Ok(_) => {}
        }
    }
    Err("abort notice never arrived".into())
}

fn num(args: &[String], i: usize, what: &str) -> u64 {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail(format!("missing or bad {what}")))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    if mode == "env" {
        for var in [
            "CHARMRS_RANK",
            "CHARMRS_NPROCS",
            "CHARMRS_KV_ADDR",
            "CHARMRS_JOB_SECRET",
            "CHARMRS_PPN",
            "CHARMRS_PES",
            "CHARMRS_TOTAL_PES",
        ] {
            out(format!(
                "ENV rank={} {var}={}",
                std::env::var("CHARMRS_RANK").unwrap_or_default(),
                std::env::var(var).unwrap_or_default()
            ));
        }
        out(format!(
            "ARGS rank={} {}",
            std::env::var("CHARMRS_RANK").unwrap_or_default(),
            args[1..].join(" ")
        ));
        return;
    }
    if mode == "stall" {
        let who = num(&args, 1, "rank");
        let me = std::env::var("CHARMRS_RANK")
            .ok()
            .and_then(|r| r.parse().ok());
        if me == Some(who) {
            let _boot = match KvBootstrap::from_env() {
                Ok(Some(b)) => b,
                Ok(None) => fail("not started by charmrun (CHARMRS_KV_ADDR unset)".into()),
                Err(e) => fail(format!("bootstrap: {e}")),
            };
            out(format!("STALLING rank {who} pid {}", std::process::id()));
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
    let job = setup();
    let res = match mode {
        "pingpong" => pingpong(&job, num(&args, 1, "iteration count")),
        "alltoall" => alltoall(&job, num(&args, 1, "iteration count")),
        "get" => get(&job),
        "exit" => {
            let (who, code) = (num(&args, 1, "rank"), num(&args, 2, "exit code"));
            job.layer.barrier().unwrap_or_else(|e| fail(e.to_string()));
            if u64::from(job.rank()) == who {
                std::process::exit(code as i32);
            }
            out(format!(
                "WAITING rank {} pid {}",
                job.rank(),
                std::process::id()
            ));
            wait_forever(&job)
        }
        "peerlost" => peerlost(&job, num(&args, 1, "victim rank") as u32),
        "badsecret" => badsecret(&job),
        "garbage" => garbage(&job),
        "abort" => abort(&job, num(&args, 1, "rank") as u32, false),
        "abort-linger" => abort(&job, num(&args, 1, "rank") as u32, true),
        "stall" => Err("the start-up fence completed without the stalled rank".into()),
        other => Err(format!("unknown mode {other:?}")),
    };
    if let Err(e) = res {
        fail(format!("rank {}: {mode}: {e}", job.rank()));
    }
    // Leave together, so nobody sees a peer vanish mid-test.
    let _ = job.layer.barrier();
}
