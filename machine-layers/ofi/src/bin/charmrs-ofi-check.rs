//! A process of a multi-process check of the libfabric layer, started by
//! the crate's tests (or `charmrun`) with the bootstrap variables set.
//! `charmrs-ofi-check SCENARIO` runs one scenario and prints `OK ...` on
//! success; any failure panics (non-zero exit status).
//!
//! Scenarios: `mixed` (many messages of 8 B to 4 MiB, multi-segment, from
//! several threads, to every process including itself, content and order
//! verified; remote reads through `register`/`get`; unknown ranks),
//! `flood` (a receiver that does not progress for a while), `wakeup`
//! (the wake-up hook or `progress_wait` wakes on an arrival), `lost`
//! (rank 1 kills itself; rank 0 must see `PeerLost` within 5 s; with
//! `send`, rank 0 keeps sending to it meanwhile; with `rndv`, rank 0 first sends it 20 large
//! messages, most of which wait for the rendezvous bound, and must find them all released once
//! the loss is reported), `rndvbound` (rank 0 sends rank 1 large messages of 20 kB to 1.5 MB,
//! some of several segments, and every third a 64-byte eager one, while rank 1 does not
//! progress for a second: the large messages registered for rank 1 and not acknowledged must
//! never exceed `--rndv-per-peer` nor, when more than one, `--rndv-bytes-per-peer`, must have
//! held some back, and must all be released at the end; rank 1 gets every message once, in
//! order, intact), `badkey` (a `get` through
//! the key of a dropped region fails as `Malformed`, the owner stays
//! reachable), `lanes` (with `--endpoints N`: a thread per endpoint, bound to it as a PE's
//! is, sends messages of every size to every PE of the job and reads a region another PE
//! registered; each PE checks that exactly its own messages reach its endpoint, in order and
//! intact), `mismatch` (process `r` asks for `r + 1` endpoints: the start must fail, naming
//! both counts), `goodbye` (with `--endpoints 2` or more: rank 0's second endpoint reads a
//! region of rank 1's second endpoint, whose key came another way, so only the reader has
//! talked with the owner; rank 1 then exits cleanly and rank 0, polling every endpoint, must
//! not report it lost), `bye` (rank 1 sends rank 0 two 1 MiB messages and an 8-byte one and
//! drops its layer at once: rank 0 must get all three, in order, within 10 s, and rank 1's drop
//! must end well within its 5 s linger; messages are read one at a time. With `--endpoints 2`
//! they go from rank 1's second endpoint to rank 0's second, to which rank 1's first endpoint
//! sent a small message before: its goodbye, which nothing holds back, comes right after
//! them; rank 0 does not poll while they come), `packetmax` (with `--packet-max N` above
//! 16 KiB: over `ofi_rxm` the start must fail, naming `CHARMRS_OFI_PACKET_MAX` and rxm's
//! eager limit; over other providers it must succeed), `recvbuffers` (the configuration from
//! the environment: with `refuse`, a `CHARMRS_OFI_RECV_BUFFERS` the provider cannot post must
//! stop the start with an error naming the variable, its value, the limit and the provider's
//! variable for it; with `start`, the layer must start with it), `lingerlost` (rank 1 sends
//! rank 0 three 1 MiB messages that rank 0 never reads — it does not call into its layer again
//! until rank 1's process is gone — and drops its layer with a linger of 200 ms: the drop gives
//! up on them and must say so on stderr, naming its rank, the three messages and their bytes,
//! rank 0 and the linger; the test checks the line; with `killed`, rank 0 kills itself after
//! the exchange and rank 1 sends once it is gone — the sends it accepted, which it prints: its
//! line says rank 0 was lost during the shutdown).
//!
//! Options: `--endpoints N` (endpoints per process), `--packet-max N`, `--recv-buffers N` (size of the receive pool, to force its
//! exhaustion, or beyond the provider's receive queue: `OfiLayer::new` must refuse it naming
//! `CHARMRS_OFI_RECV_BUFFERS`; scenario `recvbuffers` checks that), `--rndv-per-peer N` and
//! `--rndv-bytes-per-peer N` (the rendezvous bound), `--no-liveness` (no local process checks: only the
//! provider's completion errors can reveal a lost peer), `--stale-shm-names N`
//! (before starting, leave in `/dev/shm` what a killed process of `N`
//! endpoints with this process's id would have left there under libfabric
//! 1.17's `shm` naming: the start must get past it).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_ofi::{OfiConfig, OfiLayer};
use charmrs_transport::{Header, MachineLayer, Message, ProcessId, RemoteKey, TransportError};

/// Message kinds of the checks.
const K_DATA: u8 = 1;
const K_DONE: u8 = 2;
const K_KEY: u8 = 3;
const K_GOT: u8 = 4;
const K_READ: u8 = 5;

/// Sizes cycled through by the `mixed` scenario (eager and rendezvous).
const SIZES: &[usize] = &[8, 100, 4000, 16_000, 17_000, 70_000, 1 << 20, 4 << 20];

fn fail(what: &str, e: TransportError) -> ! {
    panic!("{what}: {e}")
}

/// Deterministic content: byte `i` of message (src, thread, seq).
fn fill(src: u32, thread: u32, seq: u32, len: usize) -> Vec<u8> {
    let seed = (u64::from(src) << 40) ^ (u64::from(thread) << 20) ^ u64::from(seq);
    let mut v = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = x.to_le_bytes();
        let n = (len - v.len()).min(8);
        v.extend_from_slice(&w[..n]);
    }
    v
}

/// Splits `data` into 1, 2, 3 or 12 segments (some empty; the split
/// depends on `seq`). Twelve is more than any provider's iovec limit, so
/// eager sends must coalesce and rendezvous must read many segments. One
/// shape is an entry call's: small arguments (carried inline by a
/// rendezvous) before a buffer that starts at an odd address.
fn segments(data: Vec<u8>, seq: u32) -> Vec<Bytes> {
    let b = Bytes::from(data);
    let n = b.len();
    if seq % 5 == 4 {
        let args = (37 + seq as usize % 29).min(n);
        return vec![b.slice(..args), b.slice(args..)];
    }
    match seq % 4 {
        0 => vec![b],
        1 => vec![b.slice(..n / 3), b.slice(n / 3..)],
        2 => vec![b.slice(..n / 2), Bytes::new(), b.slice(n / 2..)],
        _ => {
            let mut v: Vec<Bytes> = (0..11)
                .map(|i| b.slice(n * i / 11..n * (i + 1) / 11))
                .collect();
            v.insert(5, Bytes::new());
            v
        }
    }
}

struct Job {
    layer: Arc<OfiLayer>,
    me: ProcessId,
    n: u32,
    done_from: Vec<bool>,
}

impl Job {
    /// Progress until `pred` holds, feeding every message to `on`; fails
    /// after `secs`.
    fn pump(
        &mut self,
        secs: u64,
        what: &str,
        on: &mut dyn FnMut(&Job, ProcessId, Message),
        pred: &mut dyn FnMut(&Job) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !pred(self) {
            assert!(
                Instant::now() < deadline,
                "rank {}: timed out waiting for {what}",
                self.me
            );
            let mut got = Vec::new();
            if let Err(e) = self
                .layer
                .progress_wait(&mut |s, m| got.push((s, m)), Duration::from_millis(50))
            {
                fail(
                    &format!("rank {} progress while waiting for {what}", self.me),
                    e,
                );
            }
            for (s, m) in got {
                if m.header().kind == K_DONE {
                    self.done_from[s as usize] = true;
                } else {
                    on(self, s, m);
                }
            }
        }
    }

    /// Of a job of two: a message each way, so the pair is connected (`shm` and `ofi_rxm` need
    /// the peer's progress for that) and later descriptors reach the peer while it does not
    /// progress.
    fn warm_up(&mut self) {
        let (me, peer) = (self.me, 1 - self.me);
        self.layer
            .send(peer, Message::new(Header::new(K_GOT, me, peer, 0)))
            .unwrap_or_else(|e| fail("send", e));
        let warm = Cell::new(false);
        self.pump(
            30,
            "the warm-up message",
            &mut |_, _, m| warm.set(m.header().kind == K_GOT),
            &mut |_| warm.get(),
        );
    }

    /// Tells everyone this process received all it expects, and keeps
    /// progressing (serving their reads) until everyone said so.
    fn finish(&mut self) {
        for d in 0..self.n {
            self.layer
                .send(d, Message::new(Header::new(K_DONE, self.me, d, 0)))
                .unwrap_or_else(|e| fail("send DONE", e));
        }
        self.pump(
            60,
            "everyone's DONE",
            &mut |_, s, m| panic!("unexpected message kind {} from {s}", m.header().kind),
            &mut |j| j.done_from.iter().all(|&d| d),
        );
        self.layer.barrier().unwrap_or_else(|e| fail("barrier", e));
    }
}

fn mixed(job: &mut Job) {
    const THREADS: u32 = 3;
    const PER_DST: u32 = 12;
    let n = job.n;
    let me = job.me;
    let senders: Vec<_> = (0..THREADS)
        .map(|t| {
            let layer = Arc::clone(&job.layer);
            std::thread::spawn(move || {
                for seq in 0..PER_DST {
                    for d in 0..n {
                        let len = SIZES[((seq + t + d) as usize) % SIZES.len()];
                        let h = Header::new(K_DATA, me, d, (u64::from(t) << 32) | u64::from(seq));
                        let segs = segments(fill(me, t, seq, len), seq);
                        if segs.len() == 1 && t == 1 {
                            // One thread sends its one-segment messages from a borrowed buffer.
                            layer
                                .send_copy(d, h, &segs[0])
                                .unwrap_or_else(|e| fail("send_copy", e));
                            continue;
                        }
                        let m = Message::with_segments(h, segs).expect("message");
                        layer.send(d, m).unwrap_or_else(|e| fail("send", e));
                    }
                }
            })
        })
        .collect();
    let mut next: HashMap<(ProcessId, u32), u32> = HashMap::new();
    let received = Cell::new(0u32);
    let early = std::cell::RefCell::new(Vec::new());
    let bytes = Cell::new(0usize);
    let expect = n * THREADS * PER_DST;
    let t0 = Instant::now();
    job.pump(
        120,
        "the mixed messages",
        &mut |_, src, m| {
            let h = *m.header();
            if h.kind != K_DATA {
                // A faster process is already in the next phase.
                early.borrow_mut().push((src, m));
                return;
            }
            assert_eq!(h.src_pe, src, "src_pe carries the sender's rank");
            let t = (h.tag >> 32) as u32;
            let seq = h.tag as u32;
            let want = next.entry((src, t)).or_insert(0);
            assert_eq!(seq, *want, "order of messages from {src} thread {t}");
            *want += 1;
            let len = SIZES[((seq + t + me) as usize) % SIZES.len()];
            // Received segments are consecutive views of one buffer (eager:
            // the copy out of the receive buffer; rendezvous: the buffer the
            // reads landed in): no per-segment copies.
            for w in m.segments().windows(2) {
                if !w[0].is_empty() && !w[1].is_empty() {
                    assert_eq!(
                        w[0].as_ptr() as usize + w[0].len(),
                        w[1].as_ptr() as usize,
                        "segments of {src}/{t}/{seq} are not one buffer"
                    );
                }
            }
            let data: Vec<u8> = m
                .segments()
                .iter()
                .flat_map(|s| s.iter().copied())
                .collect();
            assert_eq!(data.len(), len, "length of {src}/{t}/{seq}");
            assert!(data == fill(src, t, seq, len), "content of {src}/{t}/{seq}");
            received.set(received.get() + 1);
            bytes.set(bytes.get() + len);
        },
        &mut |_| received.get() == expect,
    );
    for s in senders {
        s.join().expect("sender thread");
    }
    println!(
        "rank {me}: {} messages, {} bytes from {n} processes x {THREADS} threads in {:?}",
        received.get(),
        bytes.get(),
        t0.elapsed()
    );

    // Unknown ranks.
    match job.layer.send(n, Message::new(Header::default())) {
        Err(TransportError::UnknownProcess { dst, size }) if dst == n && size == n => {}
        other => panic!("send to rank {n}: {other:?}"),
    }
    let key = RemoteKey {
        addr: 0,
        len: 1,
        rkey: vec![0; 8],
    };
    assert!(matches!(
        job.layer.get(n + 3, &key, 0, 0),
        Err(TransportError::UnknownProcess { .. })
    ));

    // One-sided reads through register/get: a 3 MiB region read by the
    // next process and by this process itself.
    let region = job
        .layer
        .register(Bytes::from(fill(me, 99, 0, 3 << 20)))
        .unwrap_or_else(|e| fail("register", e));
    let k = region.key().clone();
    let mut enc = Vec::new();
    enc.extend_from_slice(&k.addr.to_le_bytes());
    enc.extend_from_slice(&k.len.to_le_bytes());
    enc.extend_from_slice(&k.rkey);
    let to = (me + 1) % n;
    job.layer
        .send(
            to,
            Message::with_segments(Header::new(K_KEY, me, to, 0), vec![Bytes::from(enc)]).unwrap(),
        )
        .unwrap_or_else(|e| fail("send key", e));
    job.layer
        .get(me, &k, K_READ, u64::from(me))
        .unwrap_or_else(|e| fail("self get", e));
    let reads = Cell::new(0);
    let acked = Cell::new(false);
    let from = (me + n - 1) % n;
    let on_read = |j: &Job, src: ProcessId, m: Message| match m.header().kind {
        K_KEY => {
            let b = &m.segments()[0];
            let k = RemoteKey {
                addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
                len: u64::from_le_bytes(b[8..16].try_into().unwrap()),
                rkey: b[16..].to_vec(),
            };
            j.layer
                .get(src, &k, K_READ, u64::from(src))
                .unwrap_or_else(|e| fail("get", e));
        }
        K_READ => {
            let owner = m.header().tag as u32;
            assert!(owner == from || owner == me);
            assert!(
                m.segments()[0] == fill(owner, 99, 0, 3 << 20)[..],
                "content read from {owner}"
            );
            reads.set(reads.get() + 1);
            if owner != me {
                j.layer
                    .send(owner, Message::new(Header::new(K_GOT, me, owner, 0)))
                    .unwrap_or_else(|e| fail("send GOT", e));
            }
        }
        K_GOT => acked.set(true),
        k => panic!("unexpected kind {k} from {src}"),
    };
    for (src, m) in early.take() {
        on_read(job, src, m);
    }
    job.pump(
        60,
        "remote reads",
        &mut |j, src, m| on_read(j, src, m),
        &mut |_| reads.get() == 2 && acked.get(),
    );
    drop(region);
    job.finish();
    println!("OK mixed rank {me}");
}

fn flood(job: &mut Job) {
    const COUNT: u32 = 20_000;
    let me = job.me;
    if me == 0 {
        let t0 = Instant::now();
        for i in 0..COUNT {
            let len = if i % 1000 == 999 { 100_000 } else { 64 };
            let h = Header::new(K_DATA, 0, 1, u64::from(i));
            if len == 64 && i % 2 == 0 {
                // Copied from a borrowed buffer: injected at once, or queued behind the
                // messages the busy receiver has not taken yet, in order either way.
                job.layer
                    .send_copy(1, h, &fill(0, 0, i, len))
                    .unwrap_or_else(|e| fail("flood send_copy", e));
                continue;
            }
            let m = Message::with_segments(h, vec![Bytes::from(fill(0, 0, i, len))]).unwrap();
            job.layer
                .send(1, m)
                .unwrap_or_else(|e| fail("flood send", e));
        }
        println!("rank 0 queued {COUNT} messages in {:?}", t0.elapsed());
    }
    if me == 1 {
        // Do not progress while the sender floods us.
        std::thread::sleep(Duration::from_millis(1500));
        let next = Cell::new(0u32);
        job.pump(
            120,
            "the flood",
            &mut |_, src, m| {
                assert_eq!(src, 0);
                let i = next.get();
                assert_eq!(m.header().tag, u64::from(i), "flood order");
                let len = if i % 1000 == 999 { 100_000 } else { 64 };
                assert!(
                    m.segments()[0] == fill(0, 0, i, len)[..],
                    "flood content {i}"
                );
                next.set(i + 1);
            },
            &mut |_| next.get() == COUNT,
        );
        println!("rank 1 received all {COUNT} flood messages in order");
    }
    job.finish();
    println!("OK flood rank {me}");
}

/// Sizes of the `rndvbound` scenario's large messages, in turn: runs of small ones that the
/// message bound (4 in the test) stops, and large ones that the byte bound (900 000) stops,
/// one larger than it.
const BOUND_SIZES: &[usize] = &[
    20_000, 30_000, 100_000, 40_000, 20_000, 300_000, 700_000, 1_500_000, 50_000, 60_000,
];

/// Length of message `i` of the `rndvbound` scenario: every third is 64 B (eager), the others
/// take [`BOUND_SIZES`] in turn.
fn bound_len(i: u32) -> usize {
    if i % 3 == 2 {
        64
    } else {
        BOUND_SIZES[(i as usize / 3 * 2 + i as usize % 3) % BOUND_SIZES.len()]
    }
}

/// See the module docs.
fn rndvbound(job: &mut Job) {
    const COUNT: u32 = 60;
    let me = job.me;
    let cfg = job.layer.config().clone();
    let (bound, bytes_bound) = (cfg.rndv_per_peer, cfg.rndv_bytes_per_peer);
    job.warm_up();
    job.layer.barrier().unwrap_or_else(|e| fail("barrier", e));
    if me == 0 {
        let largest = (0..COUNT).map(bound_len).max().unwrap_or(0);
        for i in 0..COUNT {
            let len = bound_len(i);
            let h = Header::new(K_DATA, 0, 1, u64::from(i));
            let data = fill(0, 5, i, len);
            if len == 64 && i % 2 == 0 {
                job.layer
                    .send_copy(1, h, &data)
                    .unwrap_or_else(|e| fail("send_copy", e));
                continue;
            }
            let m = Message::with_segments(h, segments(data, i)).expect("message");
            job.layer.send(1, m).unwrap_or_else(|e| fail("send", e));
        }
        // Rank 1 does not read for a second: the bound holds the rest back, in order.
        let most_queued = Cell::new(0usize);
        let check = |j: &Job| {
            let u = j.layer.rendezvous_usage(1);
            assert!(
                u.messages <= bound && (u.messages <= 1 || u.bytes <= bytes_bound),
                "rank 0: {u:?} registered for rank 1, beyond the bound of {bound} messages and \
                 {bytes_bound} bytes"
            );
            most_queued.set(most_queued.get().max(u.queued));
            u
        };
        let t0 = Instant::now();
        let mut u = check(job);
        println!("rank 0: right after sending: {u:?}");
        while t0.elapsed() < Duration::from_millis(500) {
            job.layer
                .progress_wait(
                    &mut |s, m| panic!("rank 0: unexpected {:?} from {s}", m.header()),
                    Duration::from_millis(10),
                )
                .unwrap_or_else(|e| fail("progress", e));
            u = check(job);
        }
        println!("rank 0: while rank 1 does not read: {u:?}");
        // Every registration is freed once rank 1 read everything.
        job.pump(
            60,
            "rank 1 to read everything",
            &mut |_, s, m| panic!("rank 0: unexpected {:?} from {s}", m.header()),
            &mut |j| {
                let u = check(j);
                u.messages == 0 && u.queued == 0
            },
        );
        let u = job.layer.rendezvous_usage(1);
        assert!(
            u.peak_messages <= bound && u.peak_bytes <= bytes_bound.max(largest),
            "rank 0: peak {u:?} beyond the bound of {bound} messages and {bytes_bound} bytes"
        );
        assert!(
            most_queued.get() > 0 && u.peak_messages == bound,
            "rank 0: the bound never held anything back ({u:?}, most queued {})",
            most_queued.get()
        );
        println!(
            "rank 0: {COUNT} messages sent, at most {} registered at once ({} bytes), at most \
             {} waiting",
            u.peak_messages,
            u.peak_bytes,
            most_queued.get()
        );
    }
    if me == 1 {
        std::thread::sleep(Duration::from_millis(1000));
        let next = Cell::new(0u32);
        job.pump(
            60,
            "the messages",
            &mut |_, src, m| {
                assert_eq!(src, 0);
                let i = next.get();
                assert_eq!(m.header().tag, u64::from(i), "rank 1: order");
                let data: Vec<u8> = m.segments().iter().flat_map(|s| s.to_vec()).collect();
                assert!(
                    data == fill(0, 5, i, bound_len(i)),
                    "rank 1: message {i} corrupted"
                );
                next.set(i + 1);
            },
            &mut |_| next.get() == COUNT,
        );
        println!("rank 1: all {COUNT} messages once, in order");
    }
    job.finish();
    println!("OK rndvbound rank {me}");
}

fn wakeup(job: &mut Job) {
    let me = job.me;
    if me == 1 {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let tx = std::sync::Mutex::new(tx);
        let hooked = job.layer.set_wakeup(Box::new(move || {
            let _ = tx.lock().map(|t| t.send(()));
        }));
        println!("rank 1: set_wakeup -> {hooked}");
        job.layer.barrier().unwrap_or_else(|e| fail("barrier", e));
        let t0 = Instant::now();
        let got: std::cell::RefCell<Option<(ProcessId, Message)>> = Default::default();
        let dones = std::cell::RefCell::new(Vec::new());
        let mut keep = |s: ProcessId, m: Message| {
            if m.header().kind == K_DONE {
                dones.borrow_mut().push(s);
            } else if got.borrow().is_none() {
                *got.borrow_mut() = Some((s, m));
            }
        };
        if hooked {
            // Arm, sleep until the hook fires, then progress.
            while got.borrow().is_none() {
                if job.layer.before_park() {
                    rx.recv_timeout(Duration::from_secs(5))
                        .expect("wake-up hook within 5 s");
                }
                job.layer
                    .progress(&mut keep)
                    .unwrap_or_else(|e| fail("progress", e));
            }
        } else {
            job.layer
                .progress_wait(&mut keep, Duration::from_secs(10))
                .unwrap_or_else(|e| fail("progress_wait", e));
        }
        for s in dones.take() {
            job.done_from[s as usize] = true;
        }
        let got = got.take();
        let waited = t0.elapsed();
        let (s, m) = got.expect("a message woke us");
        assert_eq!((s, m.header().tag), (0, 4242));
        // Rank 0 sends 300 ms after its barrier; the two barriers may end up to ~200 ms apart
        // on a loaded host, so the bound only shows that this rank slept.
        assert!(
            waited >= Duration::from_millis(100),
            "woke before the send: {waited:?}"
        );
        assert!(waited < Duration::from_secs(3), "woke late: {waited:?}");
        println!("rank 1 woken after {waited:?} (hook: {hooked})");
    } else if me == 0 {
        job.layer.barrier().unwrap_or_else(|e| fail("barrier", e));
        std::thread::sleep(Duration::from_millis(300));
        job.layer
            .send(1, Message::new(Header::new(K_DATA, 0, 1, 4242)))
            .unwrap_or_else(|e| fail("send", e));
    }
    job.finish();
    println!("OK wakeup rank {me}");
}

fn lost(job: &mut Job) {
    let me = job.me;
    let rndv = std::env::args().any(|a| a == "rndv");
    if rndv {
        job.warm_up();
    }
    job.layer.barrier().unwrap_or_else(|e| fail("barrier", e));
    if me == 1 {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: signalling our own process; never returns.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        unreachable!("SIGKILL");
    }
    if me != 0 {
        return;
    }
    let send_too = std::env::args().any(|a| a == "send");
    if rndv {
        // Large messages that rank 1 will never read: the bound holds most of them back.
        let bound = job.layer.config().rndv_per_peer;
        for i in 0..20u64 {
            let data = Bytes::from(vec![7u8; 200_000]);
            let m = Message::with_segments(Header::new(K_DATA, 0, 1, i), vec![data]).unwrap();
            job.layer.send(1, m).unwrap_or_else(|e| fail("send", e));
        }
        let t0 = Instant::now();
        while job.layer.rendezvous_usage(1).messages < bound
            && t0.elapsed() < Duration::from_millis(100)
        {
            job.layer
                .progress(&mut |_, _| {})
                .unwrap_or_else(|e| fail("progress", e));
        }
        let u = job.layer.rendezvous_usage(1);
        assert!(
            u.messages == bound && u.queued == 20 - bound,
            "rank 0: {u:?} for rank 1 (bound {bound})"
        );
        println!("rank 0: {u:?} for rank 1 before it dies");
    }
    let t0 = Instant::now();
    let mut i = 0u64;
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no PeerLost within 5 s"
        );
        if send_too {
            i += 1;
            let m = Message::with_segments(
                Header::new(K_DATA, 0, 1, i),
                vec![Bytes::from(vec![
                    0u8;
                    if i.is_multiple_of(10) {
                        100_000
                    } else {
                        100
                    }
                ])],
            )
            .unwrap();
            match job.layer.send(1, m) {
                Ok(()) => {}
                Err(TransportError::PeerLost { process: 1, reason }) => {
                    println!("rank 0: send refused after {:?}: {reason}", t0.elapsed());
                    break;
                }
                Err(e) => fail("send", e),
            }
        }
        match job
            .layer
            .progress_wait(&mut |_, _| {}, Duration::from_millis(10))
        {
            Ok(_) => {}
            Err(TransportError::PeerLost { process: 1, reason }) => {
                println!("rank 0: PeerLost after {:?}: {reason}", t0.elapsed());
                break;
            }
            Err(e) => fail("progress", e),
        }
    }
    let elapsed = t0.elapsed();
    assert!(matches!(
        job.layer.send(1, Message::new(Header::default())),
        Err(TransportError::PeerLost { process: 1, .. })
    ));
    // What waited for the lost peer was released, registrations included.
    let u = job.layer.rendezvous_usage(1);
    assert!(
        u.messages == 0 && u.bytes == 0 && u.queued == 0,
        "rank 0: {u:?} left for lost rank 1"
    );
    println!("OK lost rank 0 after {elapsed:?}");
}

/// A `get` through a key whose region was dropped never returns data and
/// never hangs. Over `shm` it fails (`Malformed`, or `Io` where the provider
/// cannot tie the error to the read) and the owner stays reachable; over
/// `tcp;ofi_rxm`, whose `tcp` provider drops the connection over it, the
/// owner is reported lost on the reader's side, and the reader (which then
/// leaves without a goodbye to it) on the owner's side.
fn badkey(job: &mut Job) {
    let me = job.me;
    let tcp = job.layer.provider().split(';').any(|p| p == "tcp");
    if me == 0 {
        let region = job
            .layer
            .register(Bytes::from(fill(0, 7, 7, 1 << 20)))
            .unwrap_or_else(|e| fail("register", e));
        let k = region.key().clone();
        drop(region);
        let mut enc = Vec::new();
        enc.extend_from_slice(&k.addr.to_le_bytes());
        enc.extend_from_slice(&k.len.to_le_bytes());
        enc.extend_from_slice(&k.rkey);
        job.layer
            .send(
                1,
                Message::with_segments(Header::new(K_KEY, 0, 1, 0), vec![Bytes::from(enc)])
                    .unwrap(),
            )
            .unwrap_or_else(|e| fail("send key", e));
    }
    if me == 1 {
        let key: std::cell::RefCell<Option<RemoteKey>> = Default::default();
        job.pump(
            30,
            "the stale key",
            &mut |_, _, m| {
                let b = &m.segments()[0];
                *key.borrow_mut() = Some(RemoteKey {
                    addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
                    len: u64::from_le_bytes(b[8..16].try_into().unwrap()),
                    rkey: b[16..].to_vec(),
                });
            },
            &mut |_| key.borrow().is_some(),
        );
        let key = key.take().expect("key");
        job.layer
            .get(0, &key, K_READ, 0)
            .unwrap_or_else(|e| fail("get", e));
        let t0 = Instant::now();
        let mut dones = Vec::new();
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "stale get neither failed nor completed"
            );
            match job.layer.progress_wait(
                &mut |s, m| {
                    if m.header().kind == K_DONE {
                        dones.push(s);
                    } else {
                        panic!("read through a dropped registration returned data");
                    }
                },
                Duration::from_millis(50),
            ) {
                Ok(_) => {}
                Err(e @ TransportError::PeerLost { process: 0, .. }) if tcp => {
                    println!(
                        "rank 1: stale get made the owner lost after {:?}: {e}",
                        t0.elapsed()
                    );
                    println!("OK badkey rank 1");
                    return;
                }
                Err(e @ (TransportError::Malformed(_) | TransportError::Io(_))) if !tcp => {
                    println!("rank 1: stale get refused after {:?}: {e}", t0.elapsed());
                    break;
                }
                Err(e) => fail("stale get", e),
            }
        }
        for s in dones {
            job.done_from[s as usize] = true;
        }
        // The owner is still reachable.
        job.layer
            .send(0, Message::new(Header::new(K_GOT, 1, 0, 0)))
            .unwrap_or_else(|e| fail("send after a refused get", e));
    }
    if me == 0 {
        if tcp {
            // Rank 1 leaves without a goodbye to us.
            let t0 = Instant::now();
            loop {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "rank 1 never reported lost"
                );
                match job
                    .layer
                    .progress_wait(&mut |_, _| {}, Duration::from_millis(50))
                {
                    Ok(_) => {}
                    Err(TransportError::PeerLost { process: 1, reason }) => {
                        println!("rank 0: reader lost after {:?}: {reason}", t0.elapsed());
                        println!("OK badkey rank 0");
                        return;
                    }
                    Err(e) => fail("waiting for the reader to go", e),
                }
            }
        }
        let got = Cell::new(false);
        job.pump(
            30,
            "rank 1's message after its refused get",
            &mut |_, s, m| {
                assert_eq!((s, m.header().kind), (1, K_GOT));
                got.set(true);
            },
            &mut |_| got.get(),
        );
    }
    job.finish();
    println!("OK badkey rank {me}");
}

/// Process `r` asks for `r + 1` endpoints: every process must fail to start, with an error
/// that names the counts.
fn mismatch(mut cfg: OfiConfig) {
    let rank: u32 = std::env::var(charmrs_transport::kv::ENV_RANK)
        .ok()
        .and_then(|r| r.parse().ok())
        .expect("a rank");
    cfg.endpoints = rank as usize + 1;
    match OfiLayer::from_env(cfg) {
        Ok(_) => panic!("rank {rank}: a job with different endpoint counts started"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("libfabric endpoints"), "rank {rank}: {text}");
            println!("OK mismatch rank {rank}: {text}");
        }
    }
}

/// See the module docs.
fn packetmax(cfg: OfiConfig) {
    let rank: u32 = std::env::var(charmrs_transport::kv::ENV_RANK)
        .ok()
        .and_then(|r| r.parse().ok())
        .expect("a rank");
    let rxm = std::env::var("CHARMRS_OFI_PROVIDER").is_ok_and(|p| p.contains("ofi_rxm"));
    let packet_max = cfg.packet_max;
    match OfiLayer::from_env(cfg) {
        Ok(Some(layer)) if !rxm => println!(
            "OK packetmax rank {rank}: {} started with packet_max {packet_max}",
            layer.provider()
        ),
        Ok(_) => panic!("rank {rank}: started with packet_max {packet_max} (rxm: {rxm})"),
        Err(e) if rxm => {
            let text = e.to_string();
            assert!(
                text.contains("CHARMRS_OFI_PACKET_MAX")
                    && text.contains("FI_OFI_RXM_BUFFER_SIZE")
                    && text.contains(&packet_max.to_string()),
                "rank {rank}: {text}"
            );
            println!("OK packetmax rank {rank}: {text}");
        }
        Err(e) => fail(&format!("rank {rank}: start"), e),
    }
}

/// See the module docs: the layer's start with [`OfiConfig::from_env`], so with
/// `CHARMRS_OFI_RECV_BUFFERS` as the test set it. With `refuse`, the start must fail naming the
/// variable, its value, the provider's limit and the provider's variable that raises it; with
/// `start`, it must succeed with that many buffers, and a message goes each way.
fn recvbuffers(expect_refusal: bool) {
    let rank: u32 = std::env::var(charmrs_transport::kv::ENV_RANK)
        .ok()
        .and_then(|r| r.parse().ok())
        .expect("a rank");
    let cfg = OfiConfig::from_env().unwrap_or_else(|e| fail("OfiConfig::from_env", e));
    let asked = cfg.recv_buffers;
    let rxm = std::env::var("CHARMRS_OFI_PROVIDER").is_ok_and(|p| p.contains("ofi_rxm"));
    match OfiLayer::from_env(cfg) {
        Err(e) if expect_refusal => {
            let text = e.to_string();
            let var = if rxm {
                "FI_OFI_RXM_RX_SIZE"
            } else {
                "FI_SHM_RX_SIZE"
            };
            assert!(
                text.contains(&format!("CHARMRS_OFI_RECV_BUFFERS) {asked} "))
                    && text.contains("at most ")
                    && text.contains(var),
                "rank {rank}: {text}"
            );
            println!("OK recvbuffers rank {rank}: {text}");
        }
        Ok(Some(layer)) if !expect_refusal => {
            assert_eq!(layer.config().recv_buffers, asked);
            let peer = (rank + 1) % layer.size();
            let mut job = Job {
                layer: Arc::new(layer),
                me: rank,
                n: 2,
                done_from: vec![false; 2],
            };
            job.layer
                .send(peer, Message::new(Header::new(K_DATA, rank, peer, 7)))
                .unwrap_or_else(|e| fail("send", e));
            let got = Cell::new(false);
            job.pump(
                30,
                "the message",
                &mut |_, _, m| got.set(m.header().tag == 7),
                &mut |_| got.get(),
            );
            job.finish();
            println!("OK recvbuffers rank {rank}: started with {asked} receive buffers");
        }
        Ok(_) => panic!("rank {rank}: started with {asked} receive buffers"),
        Err(e) => fail(
            &format!("rank {rank}: start with {asked} receive buffers"),
            e,
        ),
    }
}

/// See the module docs. PE `p` is endpoint `p` (process `p / lanes`, lane `p % lanes`).
fn lanes(layer: &Arc<OfiLayer>) {
    const PER_PE: u32 = 6;
    let me = layer.rank();
    let lanes = layer.lanes() as u32;
    assert!(lanes >= 2, "rank {me}: lanes needs --endpoints 2 or more");
    let pes = layer.size() * lanes;
    let finished = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let threads: Vec<_> = (0..lanes)
        .map(|lane| {
            let layer = Arc::clone(layer);
            let finished = Arc::clone(&finished);
            std::thread::spawn(move || {
                layer.bind_lane(lane as usize);
                let pe = me * lanes + lane;
                // A region for the next PE to read, its key sent first.
                let region_bytes = Bytes::from(fill(pe, 999, 0, 5000 + pe as usize));
                let region = layer
                    .register(region_bytes.clone())
                    .unwrap_or_else(|e| fail("register", e));
                let reader = (pe + 1) % pes;
                let key = region.key();
                let mut key_msg = Vec::new();
                key_msg.extend_from_slice(&key.addr.to_le_bytes());
                key_msg.extend_from_slice(&key.len.to_le_bytes());
                key_msg.extend_from_slice(&key.rkey);
                layer
                    .send(
                        reader / lanes,
                        Message::with_segments(
                            Header::new(K_KEY, pe, reader, 0),
                            vec![Bytes::from(key_msg)],
                        )
                        .expect("message"),
                    )
                    .unwrap_or_else(|e| fail("send key", e));
                for k in 0..PER_PE {
                    for d in 0..pes {
                        let dst_pe = (pe + 1 + d) % pes;
                        let len = SIZES[((k + d) as usize) % SIZES.len()];
                        let h = Header::new(K_DATA, pe, dst_pe, u64::from(k));
                        let segs = segments(fill(pe, dst_pe, k, len), k);
                        let m = Message::with_segments(h, segs).expect("message");
                        layer
                            .send(dst_pe / lanes, m)
                            .unwrap_or_else(|e| fail("send", e));
                    }
                }
                let mut next: HashMap<u32, u64> = HashMap::new();
                let mut received = 0u32;
                let mut read = false;
                let deadline = Instant::now() + Duration::from_secs(120);
                while received < PER_PE * pes || !read {
                    assert!(
                        Instant::now() < deadline,
                        "PE {pe}: {received} of {} messages, region read: {read}",
                        PER_PE * pes
                    );
                    let mut got = Vec::new();
                    layer
                        .progress(&mut |src, m| got.push((src, m)))
                        .unwrap_or_else(|e| fail("progress", e));
                    for (src, m) in got {
                        let h = *m.header();
                        match h.kind {
                            K_DATA => {
                                assert!(
                                    h.dst_pe == pe && h.src_pe / lanes == src,
                                    "PE {pe}: message {h:?} from process {src}"
                                );
                                let e = next.entry(h.src_pe).or_insert(0);
                                assert_eq!(h.tag, *e, "PE {pe}: from PE {}: order", h.src_pe);
                                *e += 1;
                                let len = SIZES[((h.tag as u32 + (pe + pes - h.src_pe - 1) % pes)
                                    as usize)
                                    % SIZES.len()];
                                let want = fill(h.src_pe, pe, h.tag as u32, len);
                                let data: Vec<u8> =
                                    m.segments().iter().flat_map(|s| s.to_vec()).collect();
                                assert!(data == want, "PE {pe}: message {h:?} corrupted");
                                received += 1;
                            }
                            K_KEY => {
                                assert_eq!(h.dst_pe, pe, "PE {pe}: a key for PE {}", h.dst_pe);
                                let b = m.segments()[0].clone();
                                let key = RemoteKey {
                                    addr: u64::from_le_bytes(b[..8].try_into().expect("8")),
                                    len: u64::from_le_bytes(b[8..16].try_into().expect("8")),
                                    rkey: b[16..].to_vec(),
                                };
                                layer
                                    .get(src, &key, K_GOT, u64::from(h.src_pe))
                                    .unwrap_or_else(|e| fail("get", e));
                            }
                            K_GOT => {
                                let owner = h.tag as u32;
                                let want = fill(owner, 999, 0, 5000 + owner as usize);
                                let data: Vec<u8> =
                                    m.segments().iter().flat_map(|s| s.to_vec()).collect();
                                assert!(data == want, "PE {pe}: region of PE {owner} corrupted");
                                read = true;
                            }
                            k => panic!("PE {pe}: unexpected kind {k} from process {src}"),
                        }
                    }
                }
                // Peers may still be reading this endpoint's large messages, which over
                // `tcp;ofi_rxm` needs its progress: it keeps polling until every PE of this
                // process is done (the barrier then covers the other processes).
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                while finished.load(std::sync::atomic::Ordering::SeqCst) < lanes {
                    assert!(
                        Instant::now() < deadline,
                        "PE {pe}: the other PEs never finished"
                    );
                    layer
                        .progress(&mut |src, m| {
                            panic!("PE {pe}: unexpected {:?} from process {src}", m.header())
                        })
                        .unwrap_or_else(|e| fail("progress", e));
                }
                // The region stays registered until every process is here (its reader may
                // still be reading it).
                (region, region_bytes)
            })
        })
        .collect();
    let regions: Vec<_> = threads
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap_or_else(|_| panic!("rank {me}: a PE thread failed"))
        })
        .collect();
    layer.barrier().unwrap_or_else(|e| fail("barrier", e));
    drop(regions);
    println!("OK lanes rank {me}: {lanes} endpoints");
}

/// See the module docs.
fn goodbye(layer: &Arc<OfiLayer>) {
    let me = layer.rank();
    assert!(
        layer.lanes() >= 2 && layer.size() == 2,
        "goodbye needs 2 processes, 2+ endpoints"
    );
    let poll_all = |what: &str, until: &mut dyn FnMut(ProcessId, Message) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut done = false;
        while !done {
            assert!(Instant::now() < deadline, "rank {me}: timed out: {what}");
            for lane in 0..layer.lanes() {
                layer.bind_lane(lane);
                layer
                    .progress(&mut |src, m| done |= until(src, m))
                    .unwrap_or_else(|e| fail(what, e));
            }
        }
    };
    if me == 1 {
        // A region on the second endpoint; its key leaves from the first.
        layer.bind_lane(1);
        let region = layer
            .register(Bytes::from(vec![7u8; 3000]))
            .unwrap_or_else(|e| fail("register", e));
        let key = region.key();
        let mut raw = key.addr.to_le_bytes().to_vec();
        raw.extend_from_slice(&key.len.to_le_bytes());
        raw.extend_from_slice(&key.rkey);
        layer.bind_lane(0);
        let m = Message::with_segments(Header::new(K_KEY, 1, 0, 0), vec![Bytes::from(raw)]);
        layer
            .send(0, m.expect("message"))
            .unwrap_or_else(|e| fail("send key", e));
        layer.barrier().unwrap_or_else(|e| fail("barrier", e));
        drop(region);
        println!("OK goodbye rank 1: leaving");
        return;
    }
    let mut key = None;
    poll_all("the key", &mut |_, m| {
        let b = m.segments()[0].clone();
        key = Some(RemoteKey {
            addr: u64::from_le_bytes(b[..8].try_into().expect("8")),
            len: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            rkey: b[16..].to_vec(),
        });
        true
    });
    layer.bind_lane(1);
    layer
        .get(1, &key.expect("a key"), K_GOT, 0)
        .unwrap_or_else(|e| fail("get", e));
    poll_all("the read", &mut |_, m| {
        assert_eq!(m.header().kind, K_GOT);
        assert!(m.segments()[0].iter().all(|&b| b == 7));
        true
    });
    layer.barrier().unwrap_or_else(|e| fail("barrier", e));
    // Rank 1 leaves now; its goodbye reaches this process's first endpoint only.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        for lane in 0..layer.lanes() {
            layer.bind_lane(lane);
            layer
                .progress(&mut |src, m| panic!("rank 0: unexpected {:?} from {src}", m.header()))
                .unwrap_or_else(|e| fail("rank 0 after rank 1 left cleanly", e));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("OK goodbye rank 0: no loss reported");
}

/// See the module docs.
fn bye(layer: OfiLayer) {
    let me = layer.rank();
    let lane = layer.lanes() - 1;
    let lens = [1usize << 20, 1 << 20, 8];
    // First a message to rank 0's last endpoint from each of rank 1's endpoints that take part,
    // then a barrier: the pairs are connected before the part that counts. The one from the
    // first endpoint makes it talk to rank 0's last, so its goodbye goes there too, at once (it
    // has nothing else for it).
    let warmups = if lane > 0 { 2 } else { 1 };
    if me == 1 {
        for from in [0, lane].into_iter().take(warmups) {
            layer.bind_lane(from);
            let h = Header::new(K_DATA, 2, lane as u32, 100);
            layer
                .send(0, Message::new(h))
                .unwrap_or_else(|e| fail("send", e));
        }
        layer.barrier().unwrap_or_else(|e| fail("barrier", e));
        layer.bind_lane(lane);
        for (tag, &len) in lens.iter().enumerate() {
            let h = Header::new(K_DATA, 1, lane as u32, tag as u64);
            let data = Bytes::from(fill(1, 0, tag as u32, len));
            let m = Message::with_segments(h, vec![data]).expect("message");
            layer.send(0, m).unwrap_or_else(|e| fail("send", e));
        }
        let linger = layer.config().linger;
        let t0 = Instant::now();
        drop(layer);
        let took = t0.elapsed();
        assert!(
            took < linger / 2,
            "rank 1: dropping the layer took {took:?} of its {linger:?} linger: rank 0 did not \
             read its large messages"
        );
        println!("OK bye rank 1: dropped in {took:?}");
        return;
    }
    if me != 0 {
        return;
    }
    layer.bind_lane(lane);
    let mut warm = 0;
    let t0 = Instant::now();
    while warm < warmups {
        assert!(t0.elapsed() < Duration::from_secs(10), "rank 0: no warm-up");
        layer
            .progress_wait(
                &mut |s, m| {
                    assert_eq!((s, m.header().tag), (1, 100), "rank 0: warm-up");
                    warm += 1;
                },
                Duration::from_millis(5),
            )
            .unwrap_or_else(|e| fail("progress", e));
    }
    layer.barrier().unwrap_or_else(|e| fail("barrier", e));
    // Everything rank 1 sends before it waits for its reads is there when polled: its goodbye
    // (from its first endpoint with two; before the fix, from every endpoint) after the
    // descriptors of its large messages.
    std::thread::sleep(Duration::from_millis(300));
    // Every endpoint is polled, as a job's PEs do (over `tcp;ofi_rxm` a connection to an endpoint
    // is accepted only while it progresses): the messages come to the last one.
    let poll_all = |got: &mut Vec<Message>| {
        for l in 0..=lane {
            layer.bind_lane(l);
            layer
                .progress(&mut |s, m| {
                    assert_eq!(
                        (s, l),
                        (1, lane),
                        "rank 0: a message from {s} on endpoint {l}"
                    );
                    got.push(m);
                })
                .unwrap_or_else(|e| fail("progress", e));
        }
    };
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.len() < lens.len() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rank 0: {} of 3 messages from rank 1 within 10 s (tags {:?})",
            got.len(),
            got.iter()
                .map(|m: &Message| m.header().tag)
                .collect::<Vec<_>>()
        );
        poll_all(&mut got);
    }
    let took = t0.elapsed();
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            m.header().tag,
            i as u64,
            "rank 0: order of rank 1's messages"
        );
        let data: Vec<u8> = m.segments().iter().flat_map(|s| s.to_vec()).collect();
        assert!(
            data == fill(1, 0, i as u32, lens[i]),
            "rank 0: message {i} corrupted"
        );
    }
    // Until rank 1 is known gone (its goodbye came), as a job's processes stay until the end.
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "rank 0: no goodbye from rank 1"
        );
        poll_all(&mut got);
        assert_eq!(got.len(), lens.len(), "rank 0: more messages than sent");
        layer.bind_lane(0);
        let probe = Message::new(Header::new(K_DATA, 0, lane as u32 + 1, 99));
        match layer.send(1, probe) {
            Ok(()) => std::thread::sleep(Duration::from_millis(1)),
            Err(TransportError::PeerLost { process: 1, .. }) => break,
            Err(e) => fail("probe send", e),
        }
    }
    println!("OK bye rank 0: 3 messages in order after {took:?}");
}

/// Whether the process `pid` is gone (or a zombie: its parent, the test, reaps it soon).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X', 'x'])),
    }
}

/// `lingerlost` (see the module docs): large messages a live peer never reads, given up on when
/// the sender's linger runs out.
fn linger_lost(layer: OfiLayer) {
    let me = layer.rank();
    let peer = 1 - me;
    // A message each way (the pair is connected before the part that counts), carrying the
    // sender's pid.
    let hello = Header::new(K_GOT, me, peer, u64::from(std::process::id()));
    layer
        .send(peer, Message::new(hello))
        .unwrap_or_else(|e| fail("send", e));
    let mut peer_pid = None;
    let t0 = Instant::now();
    while peer_pid.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "rank {me}: no hello from rank {peer}"
        );
        layer
            .progress_wait(
                &mut |s, m| {
                    assert_eq!((s, m.header().kind), (peer, K_GOT), "rank {me}: hello");
                    peer_pid = Some(m.header().tag as u32);
                },
                Duration::from_millis(5),
            )
            .unwrap_or_else(|e| fail("progress", e));
    }
    layer.barrier().unwrap_or_else(|e| fail("barrier", e));
    let killed = std::env::args().any(|a| a == "killed");
    // The file by which rank 0 says it left the barrier, whose fence progressed its endpoints
    // (no layer traffic: any progress there could read rank 1's messages).
    let out_of_barrier =
        |pid: u32| std::env::temp_dir().join(format!("charmrs-ofi-check-{pid}.out"));
    if me == 0 && !killed {
        std::fs::write(out_of_barrier(std::process::id()), b"")
            .unwrap_or_else(|e| panic!("rank 0: cannot say it left the barrier: {e}"));
    }
    if me == 0 && killed {
        // SAFETY: signalling our own process; never returns.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        unreachable!("SIGKILL");
    }
    if me == 1 {
        if killed {
            let pid = peer_pid.expect("rank 0's pid");
            let t0 = Instant::now();
            while !gone(pid) {
                assert!(t0.elapsed() < Duration::from_secs(30), "rank 0 did not die");
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            // Rank 0 may still be in the barrier, whose fence keeps its endpoints progressing
            // (it would read the messages): they go once it says it is out.
            let flag = out_of_barrier(peer_pid.expect("rank 0's pid"));
            let t0 = Instant::now();
            while !flag.exists() {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "rank 0 stayed in the barrier"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = std::fs::remove_file(&flag);
        }
        let mut accepted = 0;
        for tag in 0..3u32 {
            let data = Bytes::from(fill(1, 0, tag, 1 << 20));
            let m = Message::with_segments(Header::new(K_DATA, 1, 0, u64::from(tag)), vec![data])
                .expect("message");
            match layer.send(0, m) {
                Ok(()) => accepted += 1,
                // A dead rank 0 found by an earlier send's post (a provider that noticed the
                // broken connection by itself): refused, which the caller is told.
                Err(TransportError::PeerLost { process: 0, .. }) if killed => break,
                Err(e) => fail("send", e),
            }
        }
        let linger = layer.config().linger;
        let t0 = Instant::now();
        drop(layer);
        println!(
            "OK lingerlost rank 1: {accepted} accepted, dropped in {:?} (linger {linger:?})",
            t0.elapsed()
        );
        return;
    }
    // Rank 0 does not touch its layer until rank 1 is gone.
    let pid = peer_pid.expect("rank 1's pid");
    let t0 = Instant::now();
    while !gone(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "rank 0: rank 1 (pid {pid}) did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(layer);
    println!("OK lingerlost rank 0");
}

/// Writes `/dev/shm/<pid>:<uid>:<i>` for `i` in `0..count` — the names
/// libfabric 1.17's `shm` provider gives this process's first endpoints —
/// as regions it cannot reuse (zeros: not its version), like those left by
/// a killed process with `count` endpoints whose id this one got again.
fn plant_stale_shm_regions(count: usize) {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").expect("/proc/self").uid();
    for i in 0..count {
        let path = format!("/dev/shm/{}:{uid}:{i}", std::process::id());
        std::fs::write(&path, vec![0u8; 64 << 10]).expect("write the stale region");
    }
}

fn main() {
    let scenario = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "mixed".to_owned());
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name);
    let mut cfg = OfiConfig::default();
    if let Some(i) = flag("--endpoints") {
        cfg.endpoints = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--endpoints N");
    }
    if scenario == "mismatch" {
        return mismatch(cfg);
    }
    if let Some(i) = flag("--packet-max") {
        cfg.packet_max = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--packet-max N");
    }
    if scenario == "packetmax" {
        return packetmax(cfg);
    }
    if scenario == "recvbuffers" {
        return recvbuffers(flag("refuse").is_some());
    }
    if let Some(i) = flag("--recv-buffers") {
        cfg.recv_buffers = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--recv-buffers N");
    }
    if let Some(i) = flag("--rndv-per-peer") {
        cfg.rndv_per_peer = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--rndv-per-peer N");
    }
    if let Some(i) = flag("--rndv-bytes-per-peer") {
        cfg.rndv_bytes_per_peer = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--rndv-bytes-per-peer N");
    }
    if flag("--no-liveness").is_some() {
        // Only the provider's own error reports can reveal a lost peer.
        cfg.liveness_interval = Duration::from_secs(3600);
    }
    if scenario == "bye" {
        cfg.linger = Duration::from_secs(5);
        cfg.read_window = Some(0);
    }
    if scenario == "lingerlost" {
        cfg.linger = Duration::from_millis(200);
    }
    if let Some(i) = flag("--stale-shm-names") {
        plant_stale_shm_regions(
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .expect("--stale-shm-names N"),
        );
    }
    let layer = match OfiLayer::from_env(cfg) {
        Ok(Some(l)) => l,
        Ok(None) => {
            eprintln!("charmrs-ofi-check: not started by charmrun (CHARMRS_KV_ADDR unset)");
            std::process::exit(2);
        }
        Err(e) => fail("OfiLayer::from_env", e),
    };
    let me = layer.rank();
    let n = layer.size();
    println!(
        "rank {me}/{n}: provider {} (wait fd: {})",
        layer.provider(),
        layer.has_wait_fd()
    );
    assert_eq!(layer.name(), "ofi");
    if scenario == "bye" {
        return bye(layer);
    }
    if scenario == "lingerlost" {
        return linger_lost(layer);
    }
    let mut job = Job {
        layer: Arc::new(layer),
        me,
        n,
        done_from: vec![false; n as usize],
    };
    match scenario.as_str() {
        "mixed" => mixed(&mut job),
        "flood" => flood(&mut job),
        "rndvbound" => rndvbound(&mut job),
        "wakeup" => wakeup(&mut job),
        "lost" => lost(&mut job),
        "badkey" => badkey(&mut job),
        "lanes" => lanes(&job.layer),
        "goodbye" => goodbye(&job.layer),
        other => panic!("unknown scenario {other:?}"),
    }
}
