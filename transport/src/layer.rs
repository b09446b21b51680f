//! The machine-layer contract: what the runtime needs from whatever moves
//! bytes between *processes* (the LRTS role in Converse).
//!
//! # What this module owns
//!
//! * [`ProcessId`]: a process rank, `0..size`.
//! * [`MachineLayer`]: the trait every transport (local, TCP, UCX, OFI)
//!   implements.
//!
//! # Invariants every implementation upholds
//!
//! * Messages between one ordered pair of processes are delivered in the
//!   order they were sent, exactly once, while both processes live.
//! * [`MachineLayer::send`] takes ownership and never blocks indefinitely:
//!   the layer queues what it cannot put on the wire yet.
//! * Delivery happens only inside [`MachineLayer::progress`], on the calling
//!   thread; the sink is never called re-entrantly.
//! * A lost peer surfaces as [`TransportError::PeerLost`] from `send` or
//!   `progress`, never as a silent drop.
//! * Sending to a rank `>= size()` fails with
//!   [`TransportError::UnknownProcess`]. Sending to one's own rank is allowed
//!   and loops back through `progress`.
//! * All methods take `&self`: a layer is shared by the runtime's threads and
//!   does its own locking.

use std::time::Duration;

use bytes::Bytes;

use crate::arrival::Arrival;
use crate::error::TransportError;
use crate::memory::{MemRegion, RemoteKey};
use crate::message::{Header, Message};

/// Rank of a process in the job, in `0..size`.
pub type ProcessId = u32;

/// How long a thread polling a layer that cannot wake it
/// ([`set_wakeup`](MachineLayer::set_wakeup) returned `false`) keeps polling after its last
/// input before it naps. A nap is not cut short by an arrival and lasts ~50 µs longer than asked
/// (the kernel's timer slack): with a spin shorter than the other process's naps, two processes
/// in a ping-pong napped in turn, and a 16 KiB entry call over libfabric's `shm` took ~210 µs
/// one-way instead of ~11 µs.
pub const NAP_SPIN: Duration = Duration::from_millis(1);

/// Longest nap of a thread polling a layer that cannot wake it, while input came recently.
pub const NAP_MAX: Duration = Duration::from_micros(100);

/// Process-level transport used by the runtime. PEs inside one process never
/// talk through it; see the crate docs.
pub trait MachineLayer: Send + Sync {
    /// This process's rank in the job.
    fn rank(&self) -> ProcessId;

    /// Number of processes in the job.
    fn size(&self) -> u32;

    /// Queue `msg` for delivery to process `dst`; never blocks indefinitely
    /// (back-pressure is the layer's business).
    fn send(&self, dst: ProcessId, msg: Message) -> Result<(), TransportError>;

    /// Queues a message of one segment, `data`, for delivery to process `dst`, as
    /// [`send`](MachineLayer::send) does with `Message::with_segment(header, data)` and in the same
    /// order as `send`'s messages; the caller keeps its buffer. For small messages encoded into a
    /// reused buffer: a layer that copies them into buffers of its own anyway overrides this, and
    /// the runtime then allocates no segment per message. The default copies `data` into a new
    /// segment and calls `send`.
    fn send_copy(&self, dst: ProcessId, header: Header, data: &[u8]) -> Result<(), TransportError> {
        self.send(dst, Message::with_copied_segment(header, data))
    }

    /// Make progress; hand every message that arrived to `sink` (source
    /// process, message). Returns how many were delivered.
    fn progress(&self, sink: &mut dyn FnMut(ProcessId, Message)) -> Result<usize, TransportError>;

    /// [`progress`](MachineLayer::progress) (`idle` false) or
    /// [`progress_idle`](MachineLayer::progress_idle) (`idle` true), handing each message to
    /// `sink` as an [`Arrival`]: a layer that copies small messages out of its own receive
    /// buffers may lend them ([`Arrival::Borrowed`], valid during the sink call) instead of
    /// allocating a segment for each. Same order and guarantees as `progress`. The default hands
    /// every message over owned.
    fn progress_arrivals(
        &self,
        idle: bool,
        sink: &mut dyn FnMut(ProcessId, Arrival<'_>),
    ) -> Result<usize, TransportError> {
        let mut owned = |src, msg| sink(src, Arrival::Owned(msg));
        if idle {
            self.progress_idle(&mut owned)
        } else {
            self.progress(&mut owned)
        }
    }

    /// Installs `hook`, called whenever something becomes available to
    /// [`progress`](MachineLayer::progress) (from whatever thread noticed it), so that a scheduler
    /// can sleep and still be woken by the network. Returns `false` if the layer cannot (then the
    /// caller must poll or block in [`progress_wait`](MachineLayer::progress_wait)).
    fn set_wakeup(&self, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        let _ = hook;
        false
    }

    /// How many independent pollers ("lanes") this layer has in this process: 1 (the default),
    /// polled by one thread for the whole process, or one per PE (UCX's per-PE workers,
    /// libfabric's per-PE endpoints), in
    /// which case local PE `i` polls lane `i` and receives there what is sent to it. Fixed for
    /// the layer's life.
    fn lanes(&self) -> usize {
        1
    }

    /// Binds the calling thread to lane `lane` (< [`lanes`](MachineLayer::lanes)): its
    /// [`progress`](MachineLayer::progress) calls (and `progress_arrivals`, `progress_idle`,
    /// `before_park`, `progress_wait`) poll that lane, and its sends leave from it. A thread
    /// never bound uses lane 0. The default does nothing (one lane).
    fn bind_lane(&self, lane: usize) {
        let _ = lane;
    }

    /// [`set_wakeup`](MachineLayer::set_wakeup) for lane `lane`: `hook` is called when something
    /// becomes available to that lane's poller. The default installs lane 0's through
    /// `set_wakeup` and refuses any other.
    fn set_lane_wakeup(&self, lane: usize, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        lane == 0 && self.set_wakeup(hook)
    }

    /// [`progress`](MachineLayer::progress) for a caller that has nothing else to do (a PE
    /// spinning while idle): the layer may spend a system call per call looking for input that
    /// a plain `progress` (called between other work, where a system call per call would cost
    /// too much) notices only later. The default is `progress`.
    fn progress_idle(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
    ) -> Result<usize, TransportError> {
        self.progress(sink)
    }

    /// The thread that polls this layer is about to sleep until the wake-up hook
    /// ([`set_wakeup`](MachineLayer::set_wakeup)) is called: from now on the layer must call the
    /// hook when anything arrives. Returns `false` if something already waits (the caller
    /// polls again instead of sleeping). Layers whose hook is always live keep the default
    /// (`true`); others arm it here only, so that while the caller polls, arrivals cost no
    /// extra thread wake-up.
    fn before_park(&self) -> bool {
        true
    }

    /// Like [`progress`](MachineLayer::progress), but when nothing has arrived waits up to
    /// `timeout` for something to. Layers that can sleep in the kernel override this; the default
    /// polls every 50 µs.
    fn progress_wait(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
        timeout: std::time::Duration,
    ) -> Result<usize, TransportError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let n = self.progress(sink)?;
            if n > 0 || std::time::Instant::now() >= deadline {
                return Ok(n);
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Register memory for RDMA; returns a region whose [`RemoteKey`] can be
    /// shipped to peers. The registration lasts until the region is dropped.
    fn register(&self, buf: Bytes) -> Result<MemRegion, TransportError>;

    /// RDMA-read the `key.len` bytes described by `key` from process `src`
    /// into a fresh buffer; completion is reported through
    /// [`progress`](MachineLayer::progress) as a message from `src` whose
    /// `header.kind` is `completion_kind`, whose `header.tag` is
    /// `completion_tag` and whose single segment holds the bytes read.
    fn get(
        &self,
        src: ProcessId,
        key: &RemoteKey,
        completion_kind: u8,
        completion_tag: u64,
    ) -> Result<(), TransportError>;

    /// Block until every process reached the barrier.
    fn barrier(&self) -> Result<(), TransportError>;

    /// Bring the whole job down with `reason` (best effort) — used when a PE
    /// aborts.
    fn abort(&self, reason: &str);

    /// The job is ending: from now on peers may go away at any moment, and
    /// failures to reach them are expected (the runtime ignores them). A layer
    /// may quieten its library's error reporting, and need not report messages
    /// it gives up on when dropped (what `exit` leaves in flight is discarded,
    /// as in Charm++; an abort is its own report). The default does nothing.
    fn stopping(&self) {}

    /// The process exits as soon as the layer is dropped (the runtime's `start` does so after
    /// the end-of-job handshake). Dropping must still finish every send, but a layer may leave
    /// its library's handles for the operating system to free instead of destroying them,
    /// where destroying them can fail or wait. The default does nothing.
    fn exit_follows(&self) {}

    /// Short name for diagnostics ("local", "tcp", "ucx", "ofi").
    fn name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    //! A one-process loopback layer exercising the contract end to end.

    use super::*;
    use crate::message::Header;
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Loopback {
        inbox: Mutex<VecDeque<Message>>,
        regions: Arc<Mutex<HashMap<u64, Bytes>>>,
        next_region: Mutex<u64>,
    }

    impl MachineLayer for Loopback {
        fn rank(&self) -> ProcessId {
            0
        }
        fn size(&self) -> u32 {
            1
        }
        fn send(&self, dst: ProcessId, msg: Message) -> Result<(), TransportError> {
            if dst >= self.size() {
                return Err(TransportError::UnknownProcess {
                    dst,
                    size: self.size(),
                });
            }
            self.inbox.lock().unwrap().push_back(msg);
            Ok(())
        }
        fn progress(
            &self,
            sink: &mut dyn FnMut(ProcessId, Message),
        ) -> Result<usize, TransportError> {
            let batch: Vec<Message> = self.inbox.lock().unwrap().drain(..).collect();
            let n = batch.len();
            for m in batch {
                sink(0, m);
            }
            Ok(n)
        }
        fn register(&self, buf: Bytes) -> Result<MemRegion, TransportError> {
            let id = {
                let mut next = self.next_region.lock().unwrap();
                *next += 1;
                *next
            };
            self.regions.lock().unwrap().insert(id, buf.clone());
            let key = RemoteKey {
                addr: id,
                len: buf.len() as u64,
                rkey: Vec::new(),
            };
            let regions = Arc::clone(&self.regions);
            Ok(MemRegion::with_release(buf, key, move || {
                regions.lock().unwrap().remove(&id);
            }))
        }
        fn get(
            &self,
            src: ProcessId,
            key: &RemoteKey,
            completion_kind: u8,
            completion_tag: u64,
        ) -> Result<(), TransportError> {
            let bytes = self
                .regions
                .lock()
                .unwrap()
                .get(&key.addr)
                .cloned()
                .ok_or_else(|| TransportError::Malformed("unknown remote key".into()))?;
            let mut msg = Message::new(Header::new(completion_kind, 0, 0, completion_tag));
            msg.push_segment(bytes)?;
            self.send(src, msg)
        }
        fn barrier(&self) -> Result<(), TransportError> {
            Ok(())
        }
        fn abort(&self, _reason: &str) {}
        fn name(&self) -> &'static str {
            "loopback-test"
        }
    }

    #[test]
    fn trait_is_object_safe_and_loops_back() {
        let layer: Arc<dyn MachineLayer> = Arc::new(Loopback::default());
        assert_eq!(layer.name(), "loopback-test");
        let mut msg = Message::new(Header::new(3, 0, 0, 11));
        msg.push_segment(Bytes::from_static(b"payload")).unwrap();
        layer.send(0, msg.clone()).unwrap();
        assert!(matches!(
            layer.send(1, msg.clone()),
            Err(TransportError::UnknownProcess { dst: 1, size: 1 })
        ));
        let mut got = Vec::new();
        let n = layer.progress(&mut |src, m| got.push((src, m))).unwrap();
        assert_eq!(n, 1);
        assert_eq!(got, vec![(0, msg)]);
        layer.barrier().unwrap();
    }

    #[test]
    fn get_completes_through_progress_while_region_lives() {
        let layer = Loopback::default();
        let region = layer.register(Bytes::from_static(b"rdma!")).unwrap();
        layer.get(0, region.key(), 9, 77).unwrap();
        let mut got = Vec::new();
        layer.progress(&mut |_, m| got.push(m)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].header().kind, 9);
        assert_eq!(got[0].header().tag, 77);
        assert_eq!(got[0].segments()[0].as_ref(), b"rdma!");

        let key = region.key().clone();
        drop(region);
        assert!(layer.get(0, &key, 9, 78).is_err());
    }
}
