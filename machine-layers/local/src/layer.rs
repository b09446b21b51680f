//! [`LocalLayer`]: the machine layer of a one-process job.
//!
//! Invariants: `rank() == 0`, `size() == 1`; a send to process 0 loops back and is delivered by the
//! next `progress`; a send to any other process is an `UnknownProcess` error, never a silent drop.
//! A `progress` call delivers at most the messages queued when it began (a sink that sends on
//! every message, or senders on other threads, cannot keep it from returning): what arrives
//! meanwhile waits for the next call.

use bytes::Bytes;
use charmrs_transport::{MachineLayer, MemRegion, Message, ProcessId, RemoteKey, TransportError};
use crossbeam_queue::SegQueue;

/// Machine layer for a job made of exactly one process.
#[derive(Default)]
pub struct LocalLayer {
    loopback: SegQueue<Message>,
}

impl LocalLayer {
    /// A layer for a one-process job.
    pub fn new() -> Self {
        Self::default()
    }

    fn check(&self, dst: ProcessId) -> Result<(), TransportError> {
        if dst == 0 {
            Ok(())
        } else {
            Err(TransportError::UnknownProcess { dst, size: 1 })
        }
    }
}

impl MachineLayer for LocalLayer {
    fn rank(&self) -> ProcessId {
        0
    }

    fn size(&self) -> u32 {
        1
    }

    fn send(&self, dst: ProcessId, msg: Message) -> Result<(), TransportError> {
        self.check(dst)?;
        self.loopback.push(msg);
        Ok(())
    }

    fn progress(&self, sink: &mut dyn FnMut(ProcessId, Message)) -> Result<usize, TransportError> {
        // The snapshot bounds the call: messages pushed after it (by the sink, or by other
        // threads) wait for the next call. A pop that finds nothing (another thread polling at
        // the same time took the rest) ends it early.
        let queued_at_entry = self.loopback.len();
        let mut delivered = 0;
        while delivered < queued_at_entry {
            let Some(m) = self.loopback.pop() else {
                break;
            };
            sink(0, m);
            delivered += 1;
        }
        Ok(delivered)
    }

    fn register(&self, buf: Bytes) -> Result<MemRegion, TransportError> {
        let key = RemoteKey {
            addr: buf.as_ptr() as u64,
            len: buf.len() as u64,
            rkey: Vec::new(),
        };
        Ok(MemRegion::new(buf, key))
    }

    fn get(
        &self,
        src: ProcessId,
        _key: &RemoteKey,
        _completion_kind: u8,
        _completion_tag: u64,
    ) -> Result<(), TransportError> {
        self.check(src)?;
        // Inside one process, buffers are moved between PEs as `Bytes`; there is nothing to read.
        Err(TransportError::Unsupported(
            "RDMA get within a single-process job",
        ))
    }

    fn barrier(&self) -> Result<(), TransportError> {
        Ok(())
    }

    fn abort(&self, _reason: &str) {}

    fn name(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use charmrs_transport::Header;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn loopback_and_unknown_process() {
        let l = LocalLayer::new();
        assert_eq!((l.rank(), l.size(), l.name()), (0, 1, "local"));
        let err = l.send(3, Message::new(Default::default())).unwrap_err();
        assert!(err.to_string().contains('3'), "{err}");
        l.send(0, Message::new(Default::default())).unwrap();
        let mut got = 0;
        l.progress(&mut |src, _| {
            assert_eq!(src, 0);
            got += 1;
        })
        .unwrap();
        assert_eq!(got, 1);
    }

    /// A sink that sends a message for every one it gets cannot keep `progress` from returning:
    /// each call delivers the one message queued when it began, and leaves the re-sent one for
    /// the next call.
    #[test]
    fn progress_delivers_only_what_was_queued_when_it_began() {
        const RESENDS: usize = 1000;
        let l = LocalLayer::new();
        l.send(0, Message::new(Header::new(1, 0, 0, 0))).unwrap();
        let mut resent = 0;
        for call in 0..10 {
            let n = l
                .progress(&mut |_, m| {
                    // Bounded so that, were the bound missing, the test fails instead of hanging.
                    if resent < RESENDS {
                        resent += 1;
                        l.send(0, m).unwrap();
                    }
                })
                .unwrap();
            assert_eq!(n, 1, "call {call}");
            assert_eq!(
                l.loopback.len(),
                1,
                "call {call}: the re-sent message waits"
            );
        }
    }

    /// Several threads send while one thread polls: every message is delivered exactly once, and
    /// each sender's in its order.
    #[test]
    fn concurrent_senders_and_one_poller_deliver_every_message_once() {
        const SENDERS: u32 = 4;
        const PER_SENDER: u64 = 20_000;
        let layer = Arc::new(LocalLayer::new());
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let layer = Arc::clone(&layer);
                std::thread::spawn(move || {
                    for i in 0..PER_SENDER {
                        layer
                            .send(0, Message::new(Header::new(1, s, 0, i)))
                            .unwrap();
                    }
                })
            })
            .collect();
        let (done_tx, done_rx) = mpsc::channel();
        let poller = {
            let layer = Arc::clone(&layer);
            std::thread::spawn(move || {
                let mut next = vec![0u64; SENDERS as usize];
                let mut total = 0u64;
                while total < u64::from(SENDERS) * PER_SENDER {
                    let n = layer
                        .progress(&mut |src, m| {
                            assert_eq!(src, 0);
                            let h = m.header();
                            let sender = h.src_pe as usize;
                            assert_eq!(
                                h.tag, next[sender],
                                "sender {sender}: lost, repeated or reordered"
                            );
                            next[sender] += 1;
                        })
                        .unwrap();
                    total += n as u64;
                    if n == 0 {
                        std::thread::yield_now();
                    }
                }
                let _ = done_tx.send(next);
            })
        };
        let next = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the poller panicked (see its message) or missed messages for 60 s");
        assert!(next.iter().all(|&n| n == PER_SENDER), "{next:?}");
        for s in senders {
            s.join().unwrap();
        }
        poller.join().unwrap();
        // Nothing more arrives: every message was delivered once.
        assert_eq!(
            layer
                .progress(&mut |_, _| panic!("a message delivered twice"))
                .unwrap(),
            0
        );
    }
}
