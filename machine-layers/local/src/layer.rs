//! [`LocalLayer`]: the machine layer of a one-process job.
//!
//! Invariants: `rank() == 0`, `size() == 1`; a send to process 0 loops back and is delivered by the
//! next `progress`; a send to any other process is an `UnknownProcess` error, never a silent drop.

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
        let mut n = 0;
        while let Some(m) = self.loopback.pop() {
            sink(0, m);
            n += 1;
        }
        Ok(n)
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
}
