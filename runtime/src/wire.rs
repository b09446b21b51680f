//! The wire format of messages between processes: an entry call (or a collection creation) as a
//! transport [`Message`] — a fixed header, segment 0 holding the call's metadata and arguments,
//! and out-of-band segments for zero-copy buffers ([`PodVec`](crate::PodVec), [`Buffer`]) that travel without
//! being copied into segment 0. The arguments are postcard-encoded; a call's metadata, which
//! every call carries, is written by hand (postcard's serde path cost four times as many
//! instructions), little-endian:
//!
//! | bytes | field |
//! |------:|-------|
//! | 4 | entry's wire id |
//! | 8 | collection id |
//! | 4 | priority (signed) |
//! | 1 + … | destination: 0 = element (then its [`Index`]: dimension byte + 4 per word), 1 = broadcast, 2 = tree broadcast (then the root process, 4), 3 = element, forwarded already (its [`Index`], then the route: hops in the top byte, origin PE below, 4), 4 = section multicast (the calling PE 4, the group count 4, then per group its PE 4, member count 4 and the members' [`Index`]es; reply must be none) |
//! | 1 + … | reply: 0 = none, 1 = future (owner PE 4, id 8), 2 = gather (owner PE 4, id 8, values 1) |
//!
//! Decoding treats every byte as hostile: unknown entry ids, truncated or trailing bytes, bad
//! segment references and malformed values are errors, never panics. Within a process none of this
//! runs: arguments are moved.

use crate::chare::{Chare, Entry};
use crate::collection::{CollectionId, Shape};
use crate::element::ElementObj;
use crate::envelope::{
    Body, Call, Construct, Construction, Control, Envelope, Invocation, Reply, Route, Site,
};
use crate::index::Index;
use crate::registry::{Decoder, EntryInfo, EntryTable};
use crate::scheduler::PeState;
use bytes::Bytes;
use charmrs_transport::{Header, Message};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Message kind (in the transport header) of an entry call.
pub(crate) const KIND_CALL: u8 = 1;
/// Message kind of a collection creation.
pub(crate) const KIND_CREATE: u8 = 2;
/// The job ended with `exit(tag)`.
pub(crate) const KIND_EXIT: u8 = 3;
/// The job aborted; segment 0 is the message (UTF-8).
pub(crate) const KIND_ABORT: u8 = 4;
/// A process's entry-table checksum (in the tag), sent to process 0 at start-up.
pub(crate) const KIND_HELLO: u8 = 5;

/// The value (or error) of a future, for its owner PE (tag: the future's id).
pub(crate) const KIND_FULFIL: u8 = 6;
/// One PE's part of a broadcast result, for the owner of the gather future (tag: its id).
pub(crate) const KIND_PARTIAL: u8 = 7;

/// A child PE's encoded partial result, for its parent PE (tag: the reduction number).
pub(crate) const KIND_REDUCE_UP: u8 = 8;
/// An encoded allreduce result, for a child PE (tag: the reduction number).
pub(crate) const KIND_REDUCE_DOWN: u8 = 9;

/// Which reduction a [`raw_reduction_message`] or [`allreduce_result_message`] belongs to.
#[derive(Serialize, Deserialize)]
struct ReductionMeta {
    coll: CollectionId,
    shape: Shape,
    /// Up: the PE that encoded each value (segments 1..), and whether this is a request to
    /// finish the reduction (see [`crate::reduction::Raw`]). Down: empty.
    origins: Vec<u32>,
    /// Up: the target digest of each value (see [`crate::reduction::Raw::target`]). Down: empty.
    targets: Vec<u64>,
    /// Up, when the partials outnumber a message's segments: the length of each, all of them
    /// in segment 1 one after another (empty: one segment per partial).
    packed: Vec<u64>,
    finish: bool,
    /// Down: a subscriber's copy of an allreduce result (see
    /// [`Control::AllreduceSubscribe`](crate::envelope::Control::AllreduceSubscribe)).
    for_subscriber: bool,
}

/// Encoded partials of a reduction for PE `dst` of another process: segment 0 names the
/// reduction and the partials' origins, segments 1.. are the partials (without copies); when
/// there are more partials than a message has segments (elements contributing away from their
/// home PEs each send one), they are copied one after another into segment 1.
pub(crate) fn raw_reduction_message(
    finish: bool,
    coll: CollectionId,
    seq: u64,
    shape: Shape,
    src_pe: u32,
    dst_pe: u32,
    raws: Vec<crate::reduction::Raw>,
) -> Result<Message, String> {
    let mut m = Message::new(Header::new(KIND_REDUCE_UP, src_pe, dst_pe, seq));
    let pack = raws.len() >= usize::from(charmrs_transport::MAX_SEGMENTS);
    let meta = ReductionMeta {
        coll,
        shape,
        origins: raws.iter().map(|r| r.origin).collect(),
        targets: raws.iter().map(|r| r.target).collect(),
        packed: if pack {
            raws.iter().map(|r| r.bytes.len() as u64).collect()
        } else {
            Vec::new()
        },
        finish,
        for_subscriber: false,
    };
    let meta = postcard::to_stdvec(&meta).map_err(|e| e.to_string())?;
    m.push_segment(Bytes::from(meta))
        .map_err(|e| e.to_string())?;
    if pack {
        let mut all = Vec::with_capacity(raws.iter().map(|r| r.bytes.len()).sum());
        for r in &raws {
            all.extend_from_slice(&r.bytes);
        }
        m.push_segment(Bytes::from(all))
            .map_err(|e| e.to_string())?;
    } else {
        for r in raws {
            m.push_segment(r.bytes).map_err(|e| e.to_string())?;
        }
    }
    Ok(m)
}

/// The partials of a reduction message: one per segment, or cut out of the one packed segment
/// by their `lengths`.
fn unpack_partials(values: &[Bytes], lengths: &[u64]) -> Result<Vec<Bytes>, String> {
    if lengths.is_empty() {
        return Ok(values.to_vec());
    }
    let [all] = values else {
        return Err(format!(
            "packed reduction partials in {} segments instead of 1",
            values.len()
        ));
    };
    let mut parts = Vec::with_capacity(lengths.len());
    let mut at = 0usize;
    for &len in lengths {
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(len))
            .filter(|&end| end <= all.len())
            .ok_or_else(|| {
                format!(
                    "packed reduction partials longer than their {}-byte segment",
                    all.len()
                )
            })?;
        parts.push(all.slice(at..end));
        at = end;
    }
    if at != all.len() {
        return Err(format!(
            "{} unexpected trailing byte(s) after packed reduction partials",
            all.len() - at
        ));
    }
    Ok(parts)
}

/// An encoded allreduce result (`for_subscriber`: a subscriber's copy) for PE `dst` of another
/// process: segment 0 names the reduction, segment 1 is the encoded value.
pub(crate) fn allreduce_result_message(
    for_subscriber: bool,
    coll: CollectionId,
    seq: u64,
    shape: Shape,
    src_pe: u32,
    dst_pe: u32,
    value: Vec<u8>,
) -> Result<Message, String> {
    let mut m = Message::new(Header::new(KIND_REDUCE_DOWN, src_pe, dst_pe, seq));
    let meta = postcard::to_stdvec(&ReductionMeta {
        coll,
        shape,
        origins: Vec::new(),
        targets: Vec::new(),
        packed: Vec::new(),
        finish: false,
        for_subscriber,
    })
    .map_err(|e| e.to_string())?;
    m.push_segment(Bytes::from(meta))
        .map_err(|e| e.to_string())?;
    m.push_segment(Bytes::from(value))
        .map_err(|e| e.to_string())?;
    Ok(m)
}

/// Decodes a [`raw_reduction_message`] or [`allreduce_result_message`] into the envelope for its PE.
pub(crate) fn decode_reduction(msg: &Message) -> Result<Envelope, String> {
    let header = msg.header();
    let [meta, values @ ..] = msg.segments() else {
        return Err("a reduction message without segments".into());
    };
    let meta: ReductionMeta = decode_exact(meta).map_err(|e| format!("reduction metadata: {e}"))?;
    meta.shape
        .check_size()
        .map_err(|e| format!("reduction metadata: {e}"))?;
    let (coll, seq, shape) = (meta.coll, header.tag, meta.shape);
    if header.kind == KIND_REDUCE_UP {
        let values = unpack_partials(values, &meta.packed)?;
        if values.is_empty()
            || values.len() != meta.origins.len()
            || values.len() != meta.targets.len()
        {
            return Err(format!(
                "a reduction partial with {} values, {} origins and {} targets",
                values.len(),
                meta.origins.len(),
                meta.targets.len()
            ));
        }
        let raws: Vec<crate::reduction::Raw> = meta
            .origins
            .iter()
            .zip(&meta.targets)
            .zip(values)
            .map(|((&origin, &target), bytes)| crate::reduction::Raw {
                origin,
                bytes,
                target,
            })
            .collect();
        let control =
            crate::reduction::encoded_partials(meta.finish, coll, seq, shape, raws, header.src_pe);
        return Ok(Envelope::new(crate::envelope::MIGRATION_ORDER, control));
    }
    let [bytes] = values else {
        return Err(format!(
            "an allreduce result with {} values instead of 1",
            values.len()
        ));
    };
    let bytes = bytes.clone();
    Ok(Envelope::new(
        0,
        Control::ReduceDownEncoded {
            coll,
            seq,
            shape,
            bytes,
            for_subscriber: meta.for_subscriber,
        },
    ))
}

/// To a reduction tree's root: another PE finished reduction `tag` for it (segment 0:
/// [`FinishedMeta`]; with a call, its segments follow).
pub(crate) const KIND_REDUCE_FINISHED: u8 = 15;

/// What a [`finished_message`] carries besides the reduction number.
#[derive(Serialize, Deserialize)]
struct FinishedMeta {
    coll: CollectionId,
    /// The result's call for an entry target: the PE to send it to (none: a broadcast to the
    /// whole collection) and the header of the call's own message, whose segments follow.
    call: Option<(Option<u32>, [u8; Header::SIZE])>,
}

/// Tells PE `dst`, the root of `coll`'s reduction tree, that PE `src` finished reduction `seq`,
/// with the result's call for an entry target (see
/// [`Control::ReduceFinished`](crate::envelope::Control::ReduceFinished)); `None` if the call has
/// so many segments that the report cannot carry it.
pub(crate) fn finished_message(
    table: &EntryTable,
    coll: CollectionId,
    seq: u64,
    call: Option<&crate::callback::Routed>,
    src_pe: u32,
    dst_pe: u32,
) -> Result<Option<Message>, String> {
    let (call, segments) = match call {
        None => (None, Vec::new()),
        Some(routed) => {
            let inner = encode(&routed.env, table, src_pe, routed.to.unwrap_or(dst_pe))?;
            if inner.segments().len() >= usize::from(charmrs_transport::MAX_SEGMENTS) {
                return Ok(None); // no room for the report's own segment
            }
            let header = inner.header().to_bytes();
            (Some((routed.to, header)), inner.segments().to_vec())
        }
    };
    let meta = postcard::to_stdvec(&FinishedMeta { coll, call }).map_err(|e| e.to_string())?;
    let mut m = Message::new(Header::new(KIND_REDUCE_FINISHED, src_pe, dst_pe, seq));
    m.push_segment(Bytes::from(meta))
        .map_err(|e| e.to_string())?;
    for seg in segments {
        m.push_segment(seg).map_err(|e| e.to_string())?;
    }
    Ok(Some(m))
}

/// Decodes a [`finished_message`] into the envelope for its PE.
pub(crate) fn decode_finished(msg: &Message, table: &EntryTable) -> Result<Envelope, String> {
    let header = msg.header();
    let [meta, rest @ ..] = msg.segments() else {
        return Err("a finished-reduction message without segments".into());
    };
    let meta: FinishedMeta =
        decode_exact(meta).map_err(|e| format!("finished-reduction metadata: {e}"))?;
    let call = match meta.call {
        None if rest.is_empty() => None,
        None => return Err("a finished-reduction message with segments but no call".into()),
        Some((to, inner)) => {
            let inner = Header::from_bytes(&inner).map_err(|e| format!("its call: {e}"))?;
            if inner.kind != KIND_CALL || usize::from(inner.segment_count) != rest.len() {
                return Err("a finished-reduction message whose call does not add up".into());
            }
            let inner = Message::with_segments(inner, rest.to_vec()).map_err(|e| e.to_string())?;
            let env = decode(inner, table).map_err(|e| format!("its call: {e}"))?;
            let broadcast = matches!(env.body, Body::Broadcast { .. });
            if to.is_none() && !broadcast {
                return Err("a finished-reduction message's call goes nowhere".into());
            }
            Some(Box::new(crate::callback::Routed { env, to }))
        }
    };
    Ok(Envelope::new(
        0,
        Control::ReduceFinished {
            coll: meta.coll,
            seq: header.tag,
            from: header.src_pe,
            call,
        },
    ))
}

/// Quiescence-detection traffic (segment 0: the message).
pub(crate) const KIND_QD: u8 = 10;
/// Task-pool traffic (segment 0: the message).
pub(crate) const KIND_POOL: u8 = 11;

/// The wire form of a task-pool message, if `env` is one.
pub(crate) fn pool_message(
    env: &Envelope,
    src_pe: u32,
    dst_pe: u32,
) -> Option<Result<Message, String>> {
    let Body::Control(c) = &env.body else {
        return None;
    };
    let bytes = crate::pool::pool_wire(c)?;
    Some(bytes.and_then(|b| {
        let mut m = Message::new(Header::new(KIND_POOL, src_pe, dst_pe, 0));
        m.push_segment(Bytes::from(b)).map_err(|e| e.to_string())?;
        Ok(m)
    }))
}

/// Decodes a [`pool_message`].
pub(crate) fn decode_pool(msg: &Message) -> Result<Envelope, String> {
    let seg = msg
        .segments()
        .first()
        .ok_or("a pool message without its segment")?;
    crate::pool::decode_pool_wire(seg).map(|c| Envelope::new(0, c))
}

/// Migration, location and load-balancing traffic (segment 0: the message).
pub(crate) const KIND_MOBILITY: u8 = 12;
/// End-of-job handshake: "your end-of-job message arrived here" (see `scheduler::ending`).
pub(crate) const KIND_END_ACK: u8 = 13;
/// End-of-job handshake: "every process knows: you may leave".
pub(crate) const KIND_END_GO: u8 = 14;

/// Whether messages of `kind` start or end the job (hello, exit, abort, the end handshake)
/// rather than carry the PEs' work.
pub(crate) fn is_job_control(kind: u8) -> bool {
    matches!(
        kind,
        KIND_EXIT | KIND_ABORT | KIND_HELLO | KIND_END_ACK | KIND_END_GO
    )
}

/// The wire form of migration, location-update and load-balancing messages (decoding side; the
/// encoding side is [`MobilityWireRef`], which has the same variants in the same order and so
/// the same encoding, without copying a migrating element's state).
#[derive(Serialize, Deserialize)]
enum MobilityWire {
    Migrate(crate::migration::Migrant),
    Located {
        coll: CollectionId,
        index: Index,
        pe: u32,
        epoch: u32,
        inserted: bool,
    },
    Balance(crate::balance::LbMsg),
    Census {
        coll: CollectionId,
        reply: (u32, u64),
    },
    Seal {
        coll: CollectionId,
        counts: Vec<u32>,
    },
    AllreduceSubscribe {
        coll: CollectionId,
        seq: u64,
        pe: u32,
    },
}

/// [`MobilityWire`] borrowing from the envelope.
#[derive(Serialize)]
enum MobilityWireRef<'a> {
    Migrate(&'a crate::migration::Migrant),
    Located {
        coll: CollectionId,
        index: Index,
        pe: u32,
        epoch: u32,
        inserted: bool,
    },
    Balance(&'a crate::balance::LbMsg),
    Census {
        coll: CollectionId,
        reply: (u32, u64),
    },
    Seal {
        coll: CollectionId,
        counts: &'a [u32],
    },
    AllreduceSubscribe {
        coll: CollectionId,
        seq: u64,
        pe: u32,
    },
}

/// The wire form of a migration, location or load-balancing message, if `env` is one.
pub(crate) fn mobility_message(
    env: &Envelope,
    src_pe: u32,
    dst_pe: u32,
) -> Option<Result<Message, String>> {
    let Body::Control(c) = &env.body else {
        return None;
    };
    let wire = match &**c {
        Control::Migrate(m) => MobilityWireRef::Migrate(m),
        Control::Located {
            coll,
            index,
            pe,
            epoch,
            inserted,
        } => MobilityWireRef::Located {
            coll: *coll,
            index: *index,
            pe: *pe,
            epoch: *epoch,
            inserted: *inserted,
        },
        Control::Balance(b) => MobilityWireRef::Balance(b),
        Control::Census { coll, reply } => MobilityWireRef::Census {
            coll: *coll,
            reply: *reply,
        },
        Control::Seal { coll, counts } => MobilityWireRef::Seal {
            coll: *coll,
            counts,
        },
        Control::AllreduceSubscribe { coll, seq, pe } => MobilityWireRef::AllreduceSubscribe {
            coll: *coll,
            seq: *seq,
            pe: *pe,
        },
        _ => return None,
    };
    let encoded = postcard::to_stdvec(&wire);
    Some(encoded.map_err(|e| e.to_string()).and_then(|seg| {
        let mut m = Message::new(Header::new(KIND_MOBILITY, src_pe, dst_pe, 0));
        m.push_segment(Bytes::from(seg))
            .map_err(|e| e.to_string())?;
        Ok(m)
    }))
}

/// Decodes a [`mobility_message`].
pub(crate) fn decode_mobility(msg: &Message) -> Result<Envelope, String> {
    let seg = msg
        .segments()
        .first()
        .ok_or("a migration message without its segment")?;
    let control = match decode_exact::<MobilityWire>(seg)
        .map_err(|e| format!("migration or load-balancing message: {e}"))?
    {
        MobilityWire::Migrate(m) => Control::Migrate(Box::new(m)),
        MobilityWire::Located {
            coll,
            index,
            pe,
            epoch,
            inserted,
        } => Control::Located {
            coll,
            index,
            pe,
            epoch,
            inserted,
        },
        MobilityWire::Balance(b) => Control::Balance(b),
        MobilityWire::Census { coll, reply } => Control::Census { coll, reply },
        MobilityWire::Seal { coll, counts } => Control::Seal { coll, counts },
        MobilityWire::AllreduceSubscribe { coll, seq, pe } => {
            Control::AllreduceSubscribe { coll, seq, pe }
        }
    };
    let priority = match control {
        // An allreduce subscription must stay ahead of the contribution that follows it, which
        // travels at this priority too.
        Control::Migrate(_) | Control::AllreduceSubscribe { .. } => {
            crate::envelope::MIGRATION_ORDER
        }
        _ => 0,
    };
    Ok(Envelope::new(priority, control))
}

#[derive(Serialize, Deserialize)]
enum QdWire {
    Start { from: u32, token: u64 },
    Done { token: u64 },
    Probe,
    Counts { sent: u64, processed: u64 },
}

/// The wire form of a quiescence-detection message, if `env` is one.
pub(crate) fn qd_message(
    env: &Envelope,
    src_pe: u32,
    dst_pe: u32,
) -> Option<Result<Message, String>> {
    let Body::Control(c) = &env.body else {
        return None;
    };
    let wire = match **c {
        Control::QdStart { from, token } => QdWire::Start { from, token },
        Control::QdDone { token } => QdWire::Done { token },
        Control::QdProbe => QdWire::Probe,
        Control::QdCounts { sent, processed } => QdWire::Counts { sent, processed },
        _ => return None,
    };
    let mut m = Message::new(Header::new(KIND_QD, src_pe, dst_pe, 0));
    Some(
        postcard::to_stdvec(&wire)
            .map_err(|e| e.to_string())
            .and_then(|seg| m.push_segment(Bytes::from(seg)).map_err(|e| e.to_string()))
            .map(|()| m),
    )
}

/// Decodes a [`qd_message`].
pub(crate) fn decode_qd(msg: &Message) -> Result<Envelope, String> {
    let seg = msg
        .segments()
        .first()
        .ok_or("a quiescence message without its segment")?;
    let control =
        match decode_exact::<QdWire>(seg).map_err(|e| format!("quiescence message: {e}"))? {
            QdWire::Start { from, token } => Control::QdStart { from, token },
            QdWire::Done { token } => Control::QdDone { token },
            QdWire::Probe => Control::QdProbe,
            QdWire::Counts { sent, processed } => Control::QdCounts { sent, processed },
        };
    Ok(Envelope::new(0, control))
}

/// A future's value as it travels: the encoded value, or the error that replaces it.
#[derive(Serialize, Deserialize)]
enum WireOutcome {
    /// A value without out-of-band segments, encoded here: the message stays one segment (two
    /// for a partial), which the layers' small-message paths take.
    Inline(#[serde(with = "byte_vec")] Vec<u8>),
    /// The encoded value follows as a segment of its own (after a partial's count), then the
    /// `segments` out-of-band segments of its [`PodVec`](crate::PodVec)s and [`Buffer`]s: none
    /// of their bytes is copied into the message.
    Value {
        segments: u32,
    },
    Remote {
        pe: u64,
        entry: String,
        index: Option<Index>,
        message: String,
    },
    Failed(String),
}

/// The message carrying a future's value (or error) to PE `dst`: the value is its encoding and
/// the out-of-band segments that encoding refers to (see [`collecting`]).
pub(crate) fn value_message(
    partial: Option<crate::future::PartialCount>,
    id: u64,
    src_pe: u32,
    dst_pe: u32,
    value: Result<(Vec<u8>, Vec<Bytes>), crate::error::Error>,
) -> Result<Message, String> {
    let kind = if partial.is_some() {
        KIND_PARTIAL
    } else {
        KIND_FULFIL
    };
    use crate::error::Error;
    let (outcome, value) = match value {
        Ok((bytes, segments)) if segments.is_empty() => (WireOutcome::Inline(bytes), None),
        Ok((bytes, segments)) => {
            let n = u32::try_from(segments.len()).map_err(|_| "too many segments")?;
            (WireOutcome::Value { segments: n }, Some((bytes, segments)))
        }
        Err(Error::Remote {
            pe,
            entry,
            index,
            message,
        }) => (
            WireOutcome::Remote {
                pe: pe as u64,
                entry,
                index,
                message,
            },
            None,
        ),
        Err(other) => (WireOutcome::Failed(other.to_string()), None),
    };
    let mut m = Message::new(Header::new(kind, src_pe, dst_pe, id));
    let mut push = |seg: Bytes| m.push_segment(seg).map_err(|e| e.to_string());
    push(
        postcard::to_stdvec(&outcome)
            .map_err(|e| e.to_string())?
            .into(),
    )?;
    if let Some(count) = partial {
        // A partial says how it counts towards its gather, in a second segment.
        push(
            postcard::to_stdvec(&count)
                .map_err(|e| e.to_string())?
                .into(),
        )?;
    }
    if let Some((bytes, segments)) = value {
        push(bytes.into())?;
        for seg in segments {
            push(seg)?;
        }
    }
    Ok(m)
}

/// Decodes a [`value_message`] into the envelope for the owner PE.
pub(crate) fn decode_value(msg: &Message) -> Result<Envelope, String> {
    use crate::error::Error;
    use crate::future::WireValue;
    let header = msg.header();
    let segs = msg.segments();
    let seg = segs.first().ok_or("a future's value without its segment")?;
    let outcome: WireOutcome = decode_exact(seg).map_err(|e| format!("a future's value: {e}"))?;
    // The outcome, and a partial's count, come first.
    let fixed: usize = if header.kind == KIND_FULFIL { 1 } else { 2 };
    let expected = match outcome {
        WireOutcome::Value { segments } => (fixed + 1).checked_add(segments as usize),
        _ => Some(fixed),
    };
    if expected != Some(segs.len()) {
        return Err(format!(
            "a future's value ({}) in {} segments, not {}",
            if fixed == 1 { "whole" } else { "partial" },
            segs.len(),
            expected.map_or_else(|| "a countable number".to_owned(), |n| n.to_string())
        ));
    }
    let outcome = match outcome {
        WireOutcome::Inline(bytes) => {
            Ok(Box::new(WireValue::inline(Bytes::from(bytes))) as Box<dyn std::any::Any + Send>)
        }
        WireOutcome::Value { .. } => Ok(Box::new(WireValue {
            bytes: segs[fixed].clone(),
            segments: segs[fixed + 1..].to_vec(),
        }) as Box<dyn std::any::Any + Send>),
        WireOutcome::Remote {
            pe,
            entry,
            index,
            message,
        } => Err(Error::Remote {
            pe: pe as usize,
            entry,
            index,
            message,
        }),
        WireOutcome::Failed(text) => Err(Error::Aborted(text)),
    };
    let id = header.tag;
    let outcome = outcome.map_err(Box::new);
    let body = if header.kind == KIND_FULFIL {
        Body::Fulfil { id, outcome }
    } else {
        let count = decode_exact(&segs[1]).map_err(|e| format!("a partial result's count: {e}"))?;
        Body::Partial { id, outcome, count }
    };
    Ok(Envelope::new(0, body))
}

/// The message that tells another process how the job ended.
pub(crate) fn end_message(outcome: &crate::scheduler::Outcome, src_pe: u32) -> Message {
    use crate::scheduler::Outcome;
    match outcome {
        Outcome::Exit(code) => Message::new(Header::new(KIND_EXIT, src_pe, 0, *code as u32 as u64)),
        Outcome::Abort(text) => {
            let mut m = Message::new(Header::new(KIND_ABORT, src_pe, 0, 0));
            let _ = m.push_segment(Bytes::from(text.clone()));
            m
        }
    }
}

/// The start-up message carrying this binary's entry-table checksum (in the tag) and, as its
/// segment, its build id (empty if it has none).
pub(crate) fn hello_message(checksum: u64, src_pe: u32) -> Message {
    let id = crate::build_id::build_id().unwrap_or_default();
    Message::with_segment(
        Header::new(KIND_HELLO, src_pe, 0, checksum),
        bytes::Bytes::from_static(id),
    )
}

/// Where a call goes, on the wire.
#[derive(Debug, Clone, PartialEq)]
enum WireDest<'a> {
    Point(Index),
    /// A point call already forwarded (chasing a migrated element): its route travels along, so
    /// the PE that finally delivers it can correct the location cache of the PE that sent it
    /// first, in whatever process (a fresh call's origin is the message's sending PE).
    Chased {
        index: Index,
        route: Route,
    },
    Broadcast,
    /// A broadcast travelling down the spanning tree of processes rooted at process `root`: the
    /// receiving process forwards it to its children, then delivers it to each of its PEs.
    Tree {
        root: u32,
    },
    /// A section call travelling down its multicast tree (see `multicast`) from PE `origin`:
    /// the receiving PE's members first, then its subtree.
    Multicast {
        origin: u32,
        /// Borrowed from the message being encoded; owned once decoded.
        groups: std::borrow::Cow<'a, [crate::multicast::Group]>,
    },
}

/// The metadata that precedes a call's arguments in segment 0 (layout in the module docs).
#[derive(Debug)]
struct CallMeta<'a> {
    /// Dense wire id of the entry (position in the sorted entry table).
    entry: u32,
    coll: CollectionId,
    dest: WireDest<'a>,
    reply: Reply,
    priority: i32,
}

impl CallMeta<'_> {
    /// Appends the wire form.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.entry.to_le_bytes());
        out.extend_from_slice(&self.coll.0.to_le_bytes());
        out.extend_from_slice(&self.priority.to_le_bytes());
        match &self.dest {
            WireDest::Point(index) => {
                out.push(0);
                index.write_le(out);
            }
            WireDest::Chased { index, route } => {
                out.push(3);
                index.write_le(out);
                out.extend_from_slice(&route.raw().to_le_bytes());
            }
            WireDest::Broadcast => out.push(1),
            WireDest::Tree { root } => {
                out.push(2);
                out.extend_from_slice(&root.to_le_bytes());
            }
            WireDest::Multicast { origin, groups } => {
                out.push(4);
                out.extend_from_slice(&origin.to_le_bytes());
                out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
                for g in groups.iter() {
                    out.extend_from_slice(&g.pe.to_le_bytes());
                    out.extend_from_slice(&(g.members.len() as u32).to_le_bytes());
                    for index in &g.members {
                        index.write_le(out);
                    }
                }
            }
        }
        match self.reply {
            Reply::None => out.push(0),
            Reply::Future { pe, id } => {
                out.push(1);
                out.extend_from_slice(&pe.to_le_bytes());
                out.extend_from_slice(&id.to_le_bytes());
            }
            Reply::Gather { pe, id, values } => {
                out.push(2);
                out.extend_from_slice(&pe.to_le_bytes());
                out.extend_from_slice(&id.to_le_bytes());
                out.push(u8::from(values));
            }
        }
    }

    /// Reads the wire form at the start of `b`; returns it and the rest (the arguments).
    fn read(b: &[u8]) -> Result<(CallMeta<'static>, &[u8]), String> {
        let mut r = Reader(b);
        let short = || format!("call metadata cut short ({} bytes)", b.len());
        let (entry, coll, priority) = match (r.u32(), r.u64(), r.u32()) {
            (Some(e), Some(c), Some(p)) => (e, CollectionId(c), p as i32),
            _ => return Err(short()),
        };
        let dest = match r.u8().ok_or_else(short)? {
            0 => {
                let (index, rest) = Index::read_le(r.0)?;
                r.0 = rest;
                WireDest::Point(index)
            }
            1 => WireDest::Broadcast,
            2 => WireDest::Tree {
                root: r.u32().ok_or_else(short)?,
            },
            3 => {
                let (index, rest) = Index::read_le(r.0)?;
                r.0 = rest;
                let route = Route::from_raw(r.u32().ok_or_else(short)?)
                    .ok_or("a forwarded call without a valid route")?;
                WireDest::Chased { index, route }
            }
            4 => {
                // Counts are checked against the bytes left (a group takes 8 bytes or more, an
                // index 1 or more) before anything is allocated for them.
                let origin = r.u32().ok_or_else(short)?;
                let groups = r.u32().ok_or_else(short)? as usize;
                if groups > r.0.len() / 8 {
                    return Err(format!("a section call claiming {groups} groups"));
                }
                let mut out = Vec::with_capacity(groups);
                for _ in 0..groups {
                    let (pe, n) = match (r.u32(), r.u32()) {
                        (Some(pe), Some(n)) => (pe, n as usize),
                        _ => return Err(short()),
                    };
                    if n > r.0.len() {
                        return Err(format!("a section call claiming {n} members on PE {pe}"));
                    }
                    let mut members = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (index, rest) = Index::read_le(r.0)?;
                        r.0 = rest;
                        members.push(index);
                    }
                    out.push(crate::multicast::Group { pe, members });
                }
                WireDest::Multicast {
                    origin,
                    groups: out.into(),
                }
            }
            d => return Err(format!("unknown call destination kind {d}")),
        };
        let reply = match r.u8().ok_or_else(short)? {
            0 => Reply::None,
            1 => Reply::Future {
                pe: r.u32().ok_or_else(short)?,
                id: r.u64().ok_or_else(short)?,
            },
            2 => Reply::Gather {
                pe: r.u32().ok_or_else(short)?,
                id: r.u64().ok_or_else(short)?,
                values: match r.u8().ok_or_else(short)? {
                    0 => false,
                    1 => true,
                    v => return Err(format!("gather flag {v}, expected 0 or 1")),
                },
            },
            k => return Err(format!("unknown reply kind {k}")),
        };
        let meta = CallMeta {
            entry,
            coll,
            dest,
            reply,
            priority,
        };
        Ok((meta, r.0))
    }
}

/// Little-endian fields off the front of a byte slice (`None` once it runs short).
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    #[inline]
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    #[inline]
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    #[inline]
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    #[inline]
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

/// The metadata of a creation.
#[derive(Serialize, Deserialize, Debug)]
struct CreateMeta {
    /// Dense wire id of the constructor.
    ctor: u32,
    coll: CollectionId,
    shape: Shape,
    /// For an insertion into a sparse array: the new element's index.
    insert: Option<Index>,
}

/// A decoded call, ready to deliver (opaque; produced by generated decoders).
#[doc(hidden)]
pub struct WireCall(pub(crate) Box<dyn Invocation>);

/// A decoded constructor call (opaque).
#[doc(hidden)]
pub struct WireConstruct(pub(crate) Box<dyn Construction>);

/// Decodes the arguments of entry `E` (the decoder `#[chare]` registers).
#[doc(hidden)]
pub fn decode_call<C: Chare, E: Entry<C>>(bytes: &[u8], reply: Reply) -> Result<WireCall, String> {
    let args: E::Args = decode_exact(bytes)?;
    Ok(WireCall(Call::<C, E>::boxed(args, reply)))
}

/// How the runtime turns an entry method's arguments, received from another process, into a
/// call (generated by `#[chare]`, one per entry): boxed, for the PE's queue, or — a small call
/// the machine layer lent, for an idle PE — run at once without a box.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct EntryCodec {
    pub(crate) decode: fn(&[u8], Reply) -> Result<WireCall, String>,
    pub(crate) run_lent: RunLent,
    /// The chare type and the entry's argument and result types, as the compiler names them
    /// (full paths, enclosing functions included): part of the entry table's checksum (builds
    /// whose entries take other types are different programs), and what tells apart two chares
    /// of one name in one module.
    pub(crate) signature: fn() -> &'static str,
}

/// Decodes a call's arguments from `bytes` and, if they decode, calls `before` and runs the call
/// on `element` at once (see [`run_lent_call`]).
pub(crate) type RunLent =
    fn(&PeState, &Rc<dyn ElementObj>, &[u8], Reply, Site, &mut dyn FnMut()) -> Result<(), String>;

impl EntryCodec {
    /// The codec of entry `E` of `C`.
    pub const fn of<C: Chare, E: Entry<C>>() -> EntryCodec {
        EntryCodec {
            decode: decode_call::<C, E>,
            run_lent: run_lent_call::<C, E>,
            signature: std::any::type_name::<(C, E::Args, E::Output)>,
        }
    }
}

/// Decodes a constructor's arguments (generated by `#[chare]`).
#[derive(Clone, Copy)]
pub struct ConstructorCodec {
    pub(crate) decode: fn(&[u8]) -> Result<WireConstruct, String>,
    /// The chare type and the constructor's argument type, as the compiler names them (see
    /// [`EntryCodec`]).
    pub(crate) signature: fn() -> &'static str,
}

impl ConstructorCodec {
    /// The codec of `C`'s constructor.
    pub const fn of<C: Chare>() -> ConstructorCodec {
        ConstructorCodec {
            decode: decode_construct::<C>,
            signature: std::any::type_name::<(C, C::Init)>,
        }
    }
}

impl std::fmt::Debug for ConstructorCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConstructorCodec")
    }
}

impl std::fmt::Debug for EntryCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntryCodec")
    }
}

/// A point call read from a lent message's segment 0, its arguments not decoded yet.
pub(crate) struct LentCall<'a> {
    pub(crate) coll: CollectionId,
    pub(crate) index: Index,
    /// The entry's name (for errors).
    pub(crate) name: &'static str,
    pub(crate) codec: EntryCodec,
    pub(crate) reply: Reply,
    pub(crate) args: &'a [u8],
}

/// Reads `seg0` as a plain point call (not forwarded) of a known entry method; `None` for
/// anything else, malformed input included (the general path then reports what is wrong).
pub(crate) fn lent_point_call<'a>(seg0: &'a [u8], table: &EntryTable) -> Option<LentCall<'a>> {
    let (meta, args, info, codec) = read_call(seg0, table).ok()?;
    let WireDest::Point(index) = meta.dest else {
        return None;
    };
    Some(LentCall {
        coll: meta.coll,
        index,
        name: info.name,
        codec,
        reply: meta.reply,
        args,
    })
}

/// Runs a decoding, `decode`, with a panic inside it (a user's `Deserialize` of an argument
/// type, run on the network PE outside any entry method) turned into a decoding error, so the
/// job aborts naming the sending process instead of losing the PE.
pub(crate) fn guarded<T>(decode: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    crate::panic::catching("decoding its arguments", decode)
}

/// Decodes the arguments of entry `E` from `bytes` (a lent message's, read in place) and, if they
/// decode, calls `before` and runs the call on `element` — no boxed call, no queue.
fn run_lent_call<C: Chare, E: Entry<C>>(
    pe: &PeState,
    element: &Rc<dyn ElementObj>,
    bytes: &[u8],
    reply: Reply,
    site: Site,
    before: &mut dyn FnMut(),
) -> Result<(), String> {
    // A lent message has no out-of-band segments: a reference to one is refused. A panic in a
    // user's `Deserialize` becomes a decoding error, as on the general path.
    let args: E::Args = guarded(|| offering(Vec::new(), || decode_exact(bytes)))?;
    before();
    let site = Site {
        entry: E::NAME,
        ..site
    };
    crate::envelope::invoke_point::<C, E>(pe, element, args, reply, site);
    Ok(())
}

/// Decodes the constructor arguments of `C`.
pub(crate) fn decode_construct<C: Chare>(bytes: &[u8]) -> Result<WireConstruct, String> {
    let init: Option<C::Init> = decode_exact(bytes)?;
    Ok(WireConstruct(Construct::<C>::from_wire(init)))
}

fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, rest) = take_decoded::<T>(bytes).map_err(|e| format!("arguments: {e}"))?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(format!(
            "{} unexpected trailing byte(s) after the arguments",
            rest.len()
        ))
    }
}

thread_local! {
    /// The message of the last [`custom_error`] on this thread.
    static DETAIL: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether [`DETAIL`] holds a message (checked first: one load on the hot path).
    static DETAIL_SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A deserialization error saying `message`, which [`describe_decode_error`] can report:
/// postcard keeps only "Serde Deserialization Error" of a custom error.
pub(crate) fn custom_error<E: serde::de::Error>(message: String) -> E {
    let error = E::custom(&message);
    remember_detail(message);
    error
}

/// `message`, kept as this thread's custom error detail as [`custom_error`] keeps it: for a
/// conversion whose error serde turns into a custom error itself (`#[serde(try_from)]`).
pub(crate) fn remembered(message: String) -> String {
    remember_detail(message.clone());
    message
}

/// Keeps `message` as this thread's custom error detail (see [`DETAIL`]).
#[cold]
fn remember_detail(message: String) {
    DETAIL.with(|d| *d.borrow_mut() = Some(message));
    DETAIL_SET.with(|set| set.set(true));
}

/// Forgets a custom error's message left from an earlier operation that succeeded anyway (one
/// flag load when there is none: this runs before every encode and decode of a call).
#[inline(always)]
fn forget_detail() {
    if DETAIL_SET.with(|set| set.get()) {
        DETAIL_SET.with(|set| set.set(false));
        DETAIL.with(|d| d.borrow_mut().take());
    }
}

/// The message of the last custom error on this thread, if any; clears it.
#[cold]
fn take_detail() -> Option<String> {
    DETAIL_SET.with(|set| set.set(false));
    DETAIL.with(|d| d.borrow_mut().take())
}

/// An encoding error saying `message`, which [`encode_onto`] reports (postcard keeps only "Serde
/// Serialization Error" of a custom error).
pub(crate) fn custom_encode_error<E: serde::ser::Error>(message: String) -> E {
    let error = E::custom(&message);
    remember_detail(message);
    error
}

/// Encodes `value` (postcard) after the bytes of `buf`; an error says what went wrong, with the
/// message of a custom error (see [`custom_encode_error`]).
#[inline(always)]
pub(crate) fn encode_onto<T: Serialize + ?Sized>(
    value: &T,
    buf: Vec<u8>,
) -> Result<Vec<u8>, String> {
    forget_detail();
    postcard::to_extend(value, buf).map_err(describe_encode_error)
}

/// Describes a postcard encoding error, with the message of the custom error behind it if there
/// was one (see [`custom_encode_error`]).
#[cold]
fn describe_encode_error(e: postcard::Error) -> String {
    match (e, take_detail()) {
        (postcard::Error::SerdeSerCustom, Some(detail)) => detail,
        (e, _) => e.to_string(),
    }
}

/// Decodes a `T` from the front of `bytes` (postcard), returning it and the bytes after it; an
/// error says what went wrong, with the message of a custom error (see [`custom_error`]).
#[inline(always)]
pub(crate) fn take_decoded<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), String> {
    forget_detail();
    postcard::take_from_bytes::<T>(bytes).map_err(describe_decode_error)
}

/// [`take_decoded`] of exactly the whole of `bytes`.
pub(crate) fn decoded<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match take_decoded::<T>(bytes)? {
        (value, []) => Ok(value),
        (_, rest) => Err(format!("{} unexpected trailing byte(s)", rest.len())),
    }
}

/// Describes a postcard decoding error, with the message of the custom error behind it if there
/// was one (see [`custom_error`]).
#[cold]
fn describe_decode_error(e: postcard::Error) -> String {
    let detail = take_detail();
    match (e, detail) {
        (postcard::Error::SerdeDeCustom, Some(detail)) => detail,
        (e, _) => e.to_string(),
    }
}

thread_local! {
    /// The out-of-band segments of the message being encoded (collected) or decoded (offered)
    /// on this thread: the vector of the innermost [`collecting`] or [`offering`] call running
    /// here, or null outside any. Set and reset only by [`Installed`].
    static SEGMENTS: Cell<*mut Vec<Bytes>> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs a vector as the thread's [`SEGMENTS`] for the guard's lifetime and puts the previous
/// one back when dropped — also when a user's `Serialize` or `Deserialize` panics (caught by the
/// entry's `catch_unwind`; the PE goes on): later serializations on the thread must not write
/// their buffers into a message that does not exist any more, nor keep its segments referenced.
struct Installed<'a> {
    previous: *mut Vec<Bytes>,
    /// The installed vector stays borrowed, and in place, while the guard lives.
    _segs: std::marker::PhantomData<&'a mut Vec<Bytes>>,
}

impl<'a> Installed<'a> {
    fn new(segs: &'a mut Vec<Bytes>) -> Installed<'a> {
        let previous = SEGMENTS.with(|c| c.replace(segs));
        Installed {
            previous,
            _segs: std::marker::PhantomData,
        }
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        // `try_with`: during thread teardown the thread-local may be gone already.
        let _ = SEGMENTS.try_with(|c| c.set(self.previous));
    }
}

/// Runs `f` with the thread's segment vector, if a [`collecting`] or [`offering`] call is running
/// on this thread (`None` otherwise).
fn with_segments<R>(f: impl FnOnce(Option<&mut Vec<Bytes>>) -> R) -> R {
    let p = SEGMENTS.with(Cell::get);
    // SAFETY: a non-null pointer was installed by an `Installed` guard of this thread that is
    // still alive (it resets the pointer when dropped), from a `&mut Vec` that guard keeps
    // borrowed: the vector is alive, in place, and nothing else uses it while `f` runs — its
    // owner (`collecting`/`offering`) touches it only after the guard is gone, and nothing
    // reached from `f` (pushing a segment, cloning one) calls back into serialization.
    f(unsafe { p.as_mut() })
}

/// Runs `f` with an out-of-band segment collector; returns what `f` returned and the segments.
pub(crate) fn collecting<R>(f: impl FnOnce() -> R) -> (R, Vec<Bytes>) {
    let mut segs = Vec::new();
    let r = {
        let _installed = Installed::new(&mut segs);
        f()
    };
    (r, segs)
}

/// Runs `f` with `segs` offered to [`PodVec`](crate::PodVec)/[`Buffer`] deserializers.
pub(crate) fn offering<R>(mut segs: Vec<Bytes>, f: impl FnOnce() -> R) -> R {
    let _installed = Installed::new(&mut segs);
    f()
}

/// How a zero-copy buffer is serialized: out of band when a message is being built, inline
/// otherwise (any other serde use).
#[derive(Serialize, Deserialize)]
enum SegmentRef<'a> {
    OutOfBand(u32),
    /// Written as one byte string (serde writes a `&[u8]` as a sequence, a call per byte; the
    /// encoding is the same).
    #[serde(borrow)]
    Inline(#[serde(serialize_with = "inline_bytes")] &'a [u8]),
}

fn inline_bytes<S: Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

/// Byte buffers up to this size travel inside the serialized arguments rather than as segments of
/// their own: for them the copy costs less than a segment (a small message of one segment is
/// sent and received as one contiguous buffer).
pub(crate) const INLINE_MAX: usize = 256;

/// (`bytes` is cloned — a reference-count increment, or for a `Bytes` made from a `Vec` a
/// one-time allocation — only when it goes out of band.)
pub(crate) fn serialize_segment<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    serialize_segment_with(bytes, || bytes.clone(), s)
}

/// [`serialize_segment`] for bytes that are made into a [`Bytes`] (by `make`) only if they go
/// out of band.
pub(crate) fn serialize_segment_with<S: Serializer>(
    bytes: &[u8],
    make: impl FnOnce() -> Bytes,
    s: S,
) -> Result<S::Ok, S::Error> {
    if bytes.len() <= INLINE_MAX {
        return SegmentRef::Inline(bytes).serialize(s);
    }
    let idx = with_segments(|segs| {
        segs.map(|segs| {
            segs.push(make());
            (segs.len() - 1) as u32
        })
    });
    match idx {
        Some(i) => SegmentRef::OutOfBand(i).serialize(s),
        None => SegmentRef::Inline(bytes).serialize(s),
    }
}

pub(crate) fn deserialize_segment<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    Ok(match deserialize_received(d)? {
        Received::Inline(b) => Bytes::copy_from_slice(b),
        Received::Segment(b) => b,
    })
}

/// Bytes a deserializer received: inside the serialized arguments (borrowed from them), or a
/// segment of the message.
pub(crate) enum Received<'a> {
    Inline(&'a [u8]),
    Segment(Bytes),
}

/// [`deserialize_segment`] without copying inline bytes (for a reader that copies them anyway).
pub(crate) fn deserialize_received<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Received<'de>, D::Error> {
    match SegmentRef::deserialize(d)? {
        SegmentRef::Inline(b) => Ok(Received::Inline(b)),
        SegmentRef::OutOfBand(i) => with_segments(|segs| {
            let segs = segs.ok_or_else(|| {
                custom_error::<D::Error>("out-of-band segment outside a message".into())
            })?;
            segs.get(i as usize)
                .cloned()
                .map(Received::Segment)
                .ok_or_else(|| {
                    custom_error::<D::Error>(format!(
                        "segment {i} referenced but the message has {}",
                        segs.len()
                    ))
                })
        }),
    }
}

/// A byte buffer that crosses processes as its own message segment (no copy into the
/// serialized arguments; buffers of at most 256 bytes are copied inline, which is cheaper) and
/// is moved within a process.
///
/// Large buffers are best made with [`BufferMut`](crate::BufferMut) (huge pages, which the
/// shared-memory transports send from faster) and sent again rather than refilled per message.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Buffer(pub Bytes);

impl From<Vec<u8>> for Buffer {
    /// Takes the vector over (no copy).
    fn from(v: Vec<u8>) -> Buffer {
        Buffer(Bytes::from(v))
    }
}

impl From<Bytes> for Buffer {
    fn from(b: Bytes) -> Buffer {
        Buffer(b)
    }
}

impl Buffer {
    /// The bytes in `range` as a buffer of their own, sharing this one's memory (no copy).
    ///
    /// # Panics
    ///
    /// If `range` is out of bounds, like slicing a `[u8]`.
    pub fn slice(&self, range: impl std::ops::RangeBounds<usize>) -> Buffer {
        Buffer(self.0.slice(range))
    }
}

impl Serialize for Buffer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_segment(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Buffer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_segment(d).map(Buffer)
    }
}

/// Encodes an envelope for another process. Only calls and creations travel this way (runtime
/// control messages get their own formats with the multi-process layers).
pub(crate) fn encode(
    env: &Envelope,
    table: &EntryTable,
    src_pe: u32,
    dst_pe: u32,
) -> Result<Message, String> {
    let (kind, (seg0, segs)) = match &env.body {
        Body::Point { coll, index, call } => {
            let (pe, dst) = (src_pe as usize, dst_pe as usize);
            return encode_point_with(
                table,
                *coll,
                *index,
                &**call,
                env.priority,
                env.route,
                pe,
                dst,
                owned_call_message,
            )?;
        }
        Body::Broadcast { coll, call } => (
            KIND_CALL,
            encode_call(table, *coll, WireDest::Broadcast, &**call, env.priority)?,
        ),
        Body::Control(c) => match &**c {
            Control::Multicast {
                coll,
                origin,
                groups,
                call,
            } => (
                KIND_CALL,
                encode_call(
                    table,
                    *coll,
                    WireDest::Multicast {
                        origin: *origin,
                        groups: groups.as_slice().into(),
                    },
                    &**call,
                    env.priority,
                )?,
            ),
            Control::Create { coll, shape, build }
            | Control::Insert {
                coll, shape, build, ..
            } => {
                let ctor = table
                    .wire_id(build.ctor_id())
                    .ok_or("constructor not in the entry table")?;
                let insert = match &**c {
                    Control::Insert { index, .. } => Some(*index),
                    _ => None,
                };
                let mut buf = postcard::to_stdvec(&CreateMeta {
                    ctor,
                    coll: *coll,
                    shape: *shape,
                    insert,
                })
                .map_err(|e| e.to_string())?;
                let (r, segs) = collecting(|| build.encode(&mut buf));
                r?;
                (KIND_CREATE, (Bytes::from(buf), segs))
            }
            _ => return Err("this runtime message does not travel between processes yet".into()),
        },
        Body::Resume { .. } => return Err("task wake-ups never leave their PE".into()),
        Body::Fulfil { .. } | Body::Partial { .. } => {
            return Err("future values travel as value messages (KIND_FULFIL/KIND_PARTIAL)".into())
        }
    };
    call_message(Header::new(kind, src_pe, dst_pe, 0), seg0, segs)
}

/// Encodes a call of element `index` of `coll`, sent by PE `src_pe` to PE `dst_pe` (`route`: how
/// far it was forwarded already, and from where; unset or 0 hops for a fresh call), and hands it
/// to `send` as the message's header and its segments, segment 0 borrowed from this thread's
/// encoding buffer (a call without out-of-band segments can then go to the machine layer without
/// a buffer of its own, see `MachineLayer::send_copy`; [`owned_call_message`] makes a message
/// of it). Returns what `send` returned.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_point_with<R>(
    table: &EntryTable,
    coll: CollectionId,
    index: Index,
    call: &dyn Invocation,
    priority: i32,
    route: Route,
    src_pe: usize,
    dst_pe: usize,
    send: impl FnOnce(Header, &[u8], Vec<Bytes>) -> R,
) -> Result<R, String> {
    let dest = if route.hops() > 0 {
        WireDest::Chased { index, route }
    } else {
        WireDest::Point(index)
    };
    let header = Header::new(KIND_CALL, src_pe as u32, dst_pe as u32, 0);
    encode_call_with(table, coll, dest, call, priority, |seg0, segs| {
        send(header, seg0, segs)
    })
}

/// A call message of `header`, segment 0 copied from `seg0` and the out-of-band segments
/// `segs` after it.
pub(crate) fn owned_call_message(
    header: Header,
    seg0: &[u8],
    segs: Vec<Bytes>,
) -> Result<Message, String> {
    call_message(header, Bytes::copy_from_slice(seg0), segs)
}

/// A message of segment 0 followed by the out-of-band segments `segs`.
fn call_message(header: Header, seg0: Bytes, segs: Vec<Bytes>) -> Result<Message, String> {
    let mut msg = Message::with_segment(header, seg0);
    for s in segs {
        msg.push_segment(s).map_err(|e| e.to_string())?;
    }
    Ok(msg)
}

fn encode_call(
    table: &EntryTable,
    coll: CollectionId,
    dest: WireDest<'_>,
    call: &dyn Invocation,
    priority: i32,
) -> Result<(Bytes, Vec<Bytes>), String> {
    // Encoded into this thread's scratch buffer, then copied once into a buffer of exactly
    // the right size: a `Bytes` made from a `Vec` with spare capacity would allocate a second
    // time for its shared header, and the copy of a small segment costs less than that.
    encode_call_with(table, coll, dest, call, priority, |seg0, segs| {
        (Bytes::copy_from_slice(seg0), segs)
    })
}

/// Encodes a call's segment 0 into this thread's scratch buffer and hands it, with the call's
/// out-of-band segments, to `then`; returns what `then` returned.
fn encode_call_with<R>(
    table: &EntryTable,
    coll: CollectionId,
    dest: WireDest<'_>,
    call: &dyn Invocation,
    priority: i32,
    then: impl FnOnce(&[u8], Vec<Bytes>) -> R,
) -> Result<R, String> {
    let entry = table
        .wire_id(call.entry_id())
        .ok_or_else(|| format!("entry `{}` not in the entry table", call.entry_name()))?;
    let meta = CallMeta {
        entry,
        coll,
        dest,
        reply: call.reply(),
        priority,
    };
    ENCODE_SCRATCH.with(|scratch| {
        // Taken, not borrowed: `then` may encode another call (it then gets a fresh buffer).
        let mut buf = scratch.take();
        buf.clear();
        meta.write(&mut buf);
        let (r, segs) = collecting(|| call.encode(&mut buf));
        let out = r.map(|()| then(&buf, segs));
        if buf.capacity() <= ENCODE_SCRATCH_KEEP {
            scratch.set(buf);
        }
        out
    })
}

thread_local! {
    /// Reused by [`encode_call`] for segment 0 of each call message.
    static ENCODE_SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Largest scratch buffer [`encode_call`] keeps for the next call (a rare huge inline argument
/// is not kept alive).
const ENCODE_SCRATCH_KEEP: usize = 64 << 10;

/// Encodes a broadcast of `call` for the spanning tree of processes rooted at `root`.
pub(crate) fn encode_tree_broadcast(
    table: &EntryTable,
    coll: CollectionId,
    call: &dyn Invocation,
    priority: i32,
    root: u32,
    src_pe: u32,
) -> Result<Message, String> {
    let (seg0, segs) = encode_call(table, coll, WireDest::Tree { root }, call, priority)?;
    call_message(Header::new(KIND_CALL, src_pe, 0, TREE_TAG), seg0, segs)
}

/// Header tag of a call message that travels down the tree of processes (other calls have 0):
/// a receiver learns that it must forward a message without decoding it first.
const TREE_TAG: u64 = 1;

/// Whether a message of `header` may be a call travelling down the tree of processes (see
/// [`tree_root`], which decides).
pub(crate) fn is_tree(header: &Header) -> bool {
    header.kind == KIND_CALL && header.tag == TREE_TAG
}

/// The root of the process tree a call message travels down, if it is a tree broadcast.
pub(crate) fn tree_root(msg: &Message) -> Option<u32> {
    if !is_tree(msg.header()) {
        return None;
    }
    let seg0 = msg.segments().first()?;
    match CallMeta::read(seg0) {
        Ok((
            CallMeta {
                dest: WireDest::Tree { root },
                ..
            },
            _,
        )) => Some(root),
        _ => None,
    }
}

/// The children of process `me` in the 4-ary spanning tree of `n` processes rooted at `root`.
pub(crate) fn tree_children(me: u32, root: u32, n: u32) -> impl Iterator<Item = u32> {
    let rel = (me + n - root) % n;
    (1..=4u32)
        .map(move |c| 4 * rel + c)
        .take_while(move |&c| c < n)
        .map(move |c| (c + root) % n)
}

/// A call message's metadata, its arguments (not decoded yet), and its entry method's record and
/// codec, read from segment 0.
fn read_call<'s, 't>(
    seg0: &'s [u8],
    table: &'t EntryTable,
) -> Result<(CallMeta<'static>, &'s [u8], &'t EntryInfo, EntryCodec), String> {
    let (meta, args) = CallMeta::read(seg0).map_err(|e| format!("call metadata: {e}"))?;
    let info = table
        .by_wire_id(meta.entry)
        .ok_or_else(|| format!("unknown entry id {}", meta.entry))?;
    let Decoder::Entry(codec) = info.decoder else {
        return Err(format!(
            "entry id {} names a constructor, not an entry method",
            meta.entry
        ));
    };
    Ok((meta, args, info, codec))
}

/// Decodes a call message (`KIND_CALL`) of `header` from its segment 0, `seg0`, and its
/// out-of-band segments `segments` (for a small message lent by the machine layer, `seg0` is
/// the layer's buffer: nothing of it is kept).
///
/// # Errors
/// Anything malformed, described (the caller adds which peer sent it).
pub(crate) fn decode_call_message(
    header: Header,
    seg0: &[u8],
    segments: Vec<Bytes>,
    table: &EntryTable,
) -> Result<Envelope, String> {
    if header.src_pe as usize >= crate::MAX_PES {
        return Err(format!(
            "a call from PE {}, beyond the largest job ({} PEs)",
            header.src_pe,
            crate::MAX_PES
        ));
    }
    let (meta, args, info, codec) = read_call(seg0, table)?;
    let call = offering(segments, || (codec.decode)(args, meta.reply))
        .map_err(|e| format!("`{}`: {e}", info.name))?
        .0;
    let (body, route) = match meta.dest {
        WireDest::Point(index) => (
            Body::Point {
                coll: meta.coll,
                index,
                call,
            },
            Route::new(header.src_pe as usize, 0),
        ),
        WireDest::Chased { index, route } => (
            Body::Point {
                coll: meta.coll,
                index,
                call,
            },
            route,
        ),
        WireDest::Broadcast | WireDest::Tree { .. } => {
            // A broadcast's results are gathered (or not asked for): a single future's reply
            // would be dropped, and its owner wait for ever.
            if matches!(meta.reply, Reply::Future { .. }) {
                return Err(format!(
                    "`{}`: a broadcast asking for a single future's reply",
                    info.name
                ));
            }
            (
                Body::Broadcast {
                    coll: meta.coll,
                    call,
                },
                Route::UNSET,
            )
        }
        WireDest::Multicast { origin, groups } => {
            // One reply per member would break a future's single value or a gather's
            // count: section calls carry none.
            if !matches!(meta.reply, Reply::None) {
                return Err(format!(
                    "`{}`: a section call asking for a reply",
                    info.name
                ));
            }
            (
                Body::Control(Box::new(Control::Multicast {
                    coll: meta.coll,
                    origin,
                    groups: groups.into_owned(),
                    call,
                })),
                Route::UNSET,
            )
        }
    };
    let mut env = Envelope::new(meta.priority, body);
    env.route = route;
    Ok(env)
}

/// Decodes a message from another process into an envelope.
///
/// # Errors
/// Anything malformed, described (the caller adds which peer sent it).
pub(crate) fn decode(msg: Message, table: &EntryTable) -> Result<Envelope, String> {
    let (header, segments) = msg.into_parts();
    let Some((seg0, segments)) = segments.split_first() else {
        return Err("a message without its metadata segment".into());
    };
    match header.kind {
        KIND_CALL => decode_call_message(header, &seg0, segments, table),
        KIND_CREATE => {
            let (meta, args) = postcard::take_from_bytes::<CreateMeta>(&seg0)
                .map_err(|e| format!("creation metadata: {e}"))?;
            meta.shape
                .check_size()
                .map_err(|e| format!("creation metadata: {e}"))?;
            let info = table
                .by_wire_id(meta.ctor)
                .ok_or_else(|| format!("unknown constructor id {}", meta.ctor))?;
            let Decoder::Constructor(ConstructorCodec {
                decode: decode_init,
                ..
            }) = info.decoder
            else {
                return Err(format!(
                    "id {} names an entry method, not a constructor",
                    meta.ctor
                ));
            };
            let build = offering(segments, || decode_init(args))
                .map_err(|e| format!("`{}`: {e}", info.name))?
                .0;
            let control = match meta.insert {
                Some(index) => Control::Insert {
                    coll: meta.coll,
                    shape: meta.shape,
                    index,
                    build,
                },
                None => Control::Create {
                    coll: meta.coll,
                    shape: meta.shape,
                    build,
                },
            };
            Ok(Envelope::new(0, control))
        }
        other => Err(format!("unknown message kind {other}")),
    }
}

/// Decodes a whole frame as if it had arrived from the network (for the fuzzer and tests): must
/// never panic, whatever the bytes.
#[doc(hidden)]
pub fn decode_untrusted_frame(bytes: &[u8]) -> Result<(), String> {
    let table = EntryTable::get().map_err(|e| e.to_string())?;
    let (msg, _) = charmrs_transport::decode_frame(bytes, 1 << 20).map_err(|e| e.to_string())?;
    match msg.header().kind {
        KIND_FULFIL | KIND_PARTIAL => decode_value(&msg).map(drop),
        KIND_REDUCE_UP | KIND_REDUCE_DOWN => decode_reduction(&msg).map(drop),
        KIND_QD => decode_qd(&msg).map(drop),
        KIND_POOL => decode_pool(&msg).map(drop),
        KIND_MOBILITY => decode_mobility(&msg).map(drop),
        KIND_REDUCE_FINISHED => decode_finished(&msg, table).map(drop),
        _ => decode(msg, table).map(drop),
    }
}

/// `#[serde(with = "crate::wire::byte_vec")]` for a `Vec<u8>` of opaque bytes (a chare's packed
/// state): written and read as one byte string. serde's own `Vec<u8>` goes byte by byte, a call
/// per byte; postcard writes both forms identically (a length, then the bytes), so this changes
/// speed, not the format.
pub(crate) mod byte_vec {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// `#[serde(with = "byte_vecs")]` for a `Vec<Vec<u8>>`: each inner vector as one byte string,
/// as [`byte_vec`] does for one.
pub(crate) mod byte_vecs {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::{SerializeSeq, Serializer};

    #[derive(serde::Deserialize)]
    struct One(#[serde(with = "super::byte_vec")] Vec<u8>);

    struct Ref<'a>(&'a [u8]);

    impl serde::Serialize for Ref<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub(crate) fn serialize<S: Serializer>(all: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(all.len()))?;
        for v in all {
            seq.serialize_element(&Ref(v))?;
        }
        seq.end()
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        d.deserialize_seq(All)
    }

    struct All;

    impl<'de> Visitor<'de> for All {
        type Value = Vec<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a sequence of byte strings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Vec<u8>>, A::Error> {
            let mut all = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(One(v)) = seq.next_element()? {
                all.push(v);
            }
            Ok(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_vec_is_written_as_serde_writes_a_vec_of_bytes() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Fast(#[serde(with = "byte_vec")] Vec<u8>);
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain(Vec<u8>);
        for len in [0usize, 1, 127, 128, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let fast = postcard::to_allocvec(&Fast(data.clone())).unwrap();
            let plain = postcard::to_allocvec(&Plain(data.clone())).unwrap();
            assert_eq!(fast, plain, "{len} bytes");
            assert_eq!(postcard::from_bytes::<Fast>(&plain).unwrap().0, data);
        }
    }

    #[test]
    fn byte_vecs_and_inline_segments_are_written_as_serde_writes_vecs_of_bytes() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Fast(#[serde(with = "byte_vecs")] Vec<Vec<u8>>);
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain(Vec<Vec<u8>>);
        let all: Vec<Vec<u8>> = [0usize, 1, 128, 300]
            .iter()
            .map(|&len| (0..len).map(|i| (i * 5 % 253) as u8).collect())
            .collect();
        let fast = postcard::to_allocvec(&Fast(all.clone())).unwrap();
        assert_eq!(fast, postcard::to_allocvec(&Plain(all.clone())).unwrap());
        assert_eq!(postcard::from_bytes::<Fast>(&fast).unwrap().0, all);
        for bytes in &all {
            let inline = postcard::to_allocvec(&SegmentRef::Inline(bytes)).unwrap();
            let plain = postcard::to_allocvec(&(1u8, bytes.clone())).unwrap();
            assert_eq!(inline, plain, "{} bytes", bytes.len());
            match postcard::from_bytes::<SegmentRef>(&inline).unwrap() {
                SegmentRef::Inline(b) => assert_eq!(b, &bytes[..]),
                SegmentRef::OutOfBand(_) => panic!("read back as out of band"),
            }
        }
    }
    #[test]
    fn a_call_from_a_pe_beyond_any_job_is_refused() {
        let mut m = Message::new(Header::new(KIND_CALL, crate::MAX_PES as u32, 0, 0));
        m.push_segment(Bytes::from_static(&[0u8; 32])).unwrap();
        let table = EntryTable::get().unwrap();
        let Err(e) = decode(m, table) else {
            panic!("a call from PE {} was decoded", crate::MAX_PES);
        };
        assert!(e.contains("beyond the largest job"), "{e}");
    }

    #[test]
    fn packed_reduction_partials_are_cut_by_their_lengths_and_bad_lengths_are_named() {
        let all = [Bytes::from_static(b"abcdef")];
        let parts = unpack_partials(&all, &[2, 0, 4]).unwrap();
        assert_eq!(parts, [&b"ab"[..], b"", b"cdef"]);
        let e = unpack_partials(&all, &[2, 5]).unwrap_err();
        assert!(e.contains("longer than their 6-byte segment"), "{e}");
        let e = unpack_partials(&all, &[2, 1]).unwrap_err();
        assert!(e.contains("3 unexpected trailing byte"), "{e}");
        let e = unpack_partials(&[all[0].clone(), all[0].clone()], &[6]).unwrap_err();
        assert!(e.contains("in 2 segments instead of 1"), "{e}");
        assert!(unpack_partials(&all, &[u64::MAX]).is_err());
    }

    #[test]
    fn a_reduction_message_with_more_partials_than_segments_packs_them() {
        let raws: Vec<crate::reduction::Raw> = (0..600u32)
            .map(|i| crate::reduction::Raw {
                origin: i % 7,
                bytes: Bytes::from(i.to_le_bytes().to_vec()),
                target: u64::from(i),
            })
            .collect();
        let m = raw_reduction_message(true, CollectionId::new(0, 1), 3, Shape::Group, 0, 1, raws)
            .unwrap();
        assert_eq!(m.segments().len(), 2);
        let env = decode_reduction(&m).unwrap();
        let crate::envelope::Body::Control(control) = env.body else {
            panic!("not a control message");
        };
        let Control::ReduceFinish { raws, .. } = *control else {
            panic!("not a finishing request");
        };
        assert_eq!(raws.len(), 600);
        for (i, r) in raws.iter().enumerate() {
            assert_eq!(r.origin, i as u32 % 7);
            assert_eq!(&r.bytes[..], &(i as u32).to_le_bytes());
        }
    }
    use crate::PodVec;

    fn frame(kind: u8, segs: &[&[u8]]) -> Vec<u8> {
        let mut m = Message::new(Header::new(kind, 0, 1, 0));
        for s in segs {
            m.push_segment(Bytes::copy_from_slice(s)).unwrap();
        }
        let mut out = charmrs_transport::encode_frame_prefix(&m);
        for s in m.segments() {
            out.extend_from_slice(s);
        }
        out
    }

    #[test]
    fn partial_results_carry_how_they_count() {
        use crate::future::PartialCount;
        for count in [PartialCount::Pe { extras: 3 }, PartialCount::Element] {
            let m = value_message(Some(count), 9, 1, 2, Ok((vec![1, 2, 3], Vec::new()))).unwrap();
            assert_eq!(m.header().kind, KIND_PARTIAL);
            let env = decode_value(&m).unwrap();
            assert!(
                matches!(env.body, Body::Partial { id: 9, count: c, .. } if c == count),
                "{count:?}"
            );
        }
        // A partial without its count, or a value with one, is malformed.
        let value = value_message(None, 9, 1, 2, Ok((vec![1], Vec::new()))).unwrap();
        let mut partial = value.clone();
        let mut h = *partial.header();
        h.kind = KIND_PARTIAL;
        partial.set_header(h);
        assert!(decode_value(&partial).is_err());
        let mut fulfil = value_message(
            Some(PartialCount::Element),
            9,
            1,
            2,
            Ok((vec![1], Vec::new())),
        )
        .unwrap();
        let mut h = *fulfil.header();
        h.kind = KIND_FULFIL;
        fulfil.set_header(h);
        assert!(decode_value(&fulfil).is_err());
    }

    #[test]
    fn call_metadata_round_trips_and_refuses_short_input() {
        let dests = [
            WireDest::Point(Index::SCALAR),
            WireDest::Point(Index::new(&[3, 70_000]).unwrap()),
            WireDest::Broadcast,
            WireDest::Tree { root: 9 },
            WireDest::Chased {
                index: Index::new(&[5]).unwrap(),
                route: Route::new(123_456, 3),
            },
            WireDest::Multicast {
                origin: 12,
                groups: vec![
                    crate::multicast::Group {
                        pe: 3,
                        members: vec![Index::new(&[1, 2]).unwrap(), Index::SCALAR],
                    },
                    crate::multicast::Group {
                        pe: 70_000,
                        members: vec![Index::new(&[9]).unwrap()],
                    },
                ]
                .into(),
            },
        ];
        let replies = [
            Reply::None,
            Reply::Future { pe: 2, id: 1 << 40 },
            Reply::Gather {
                pe: 7,
                id: 5,
                values: true,
            },
        ];
        for dest in dests {
            for reply in replies {
                let meta = CallMeta {
                    entry: 12,
                    coll: CollectionId(0xabc << 40 | 3),
                    dest: dest.clone(),
                    reply,
                    priority: -4,
                };
                let mut b = Vec::new();
                meta.write(&mut b);
                b.extend_from_slice(b"args");
                let (back, rest) = CallMeta::read(&b).unwrap();
                assert_eq!(rest, b"args");
                assert_eq!(format!("{back:?}"), format!("{meta:?}"));
                let meta_len = b.len() - 4;
                for cut in 0..meta_len {
                    assert!(
                        CallMeta::read(&b[..cut]).is_err(),
                        "cut at {cut} of {meta_len}"
                    );
                }
            }
        }
        // A forwarded call's route must be a set one.
        let mut b = Vec::new();
        CallMeta {
            entry: 1,
            coll: CollectionId(1),
            dest: WireDest::Chased {
                index: Index::SCALAR,
                route: Route::new(1, 1),
            },
            reply: Reply::None,
            priority: 0,
        }
        .write(&mut b);
        let at = b.len() - 5;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(CallMeta::read(&b).is_err(), "an unset route refused");
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        // Unknown kind, empty message, garbage metadata, unknown entry id.
        assert!(decode_untrusted_frame(&frame(99, &[b"x"]))
            .unwrap_err()
            .contains("unknown message kind"));
        assert!(decode_untrusted_frame(&frame(KIND_CALL, &[]))
            .unwrap_err()
            .contains("metadata segment"));
        assert!(decode_untrusted_frame(&frame(KIND_CALL, &[&[0xff; 3]])).is_err());
        let meta = CallMeta {
            entry: u32::MAX,
            coll: CollectionId(1),
            dest: WireDest::Broadcast,
            reply: Reply::None,
            priority: 0,
        };
        let mut bytes = Vec::new();
        meta.write(&mut bytes);
        assert!(decode_untrusted_frame(&frame(KIND_CALL, &[&bytes]))
            .unwrap_err()
            .contains("unknown entry id"));
        // Deterministic random bytes behind valid headers.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let junk: Vec<u8> = (0..len).map(|k| (x >> (k % 56)) as u8).collect();
            let kinds = [
                KIND_CALL,
                KIND_CREATE,
                KIND_FULFIL,
                KIND_REDUCE_UP,
                KIND_REDUCE_DOWN,
                KIND_REDUCE_FINISHED,
                KIND_QD,
                KIND_POOL,
                KIND_MOBILITY,
            ];
            let kind = kinds[round % kinds.len()];
            let _ = decode_untrusted_frame(&frame(kind, &[&junk, &junk[..len / 2]]));
            let _ = decode_untrusted_frame(&frame(kind, &[&junk]));
            let _ = decode_untrusted_frame(&junk);
        }
    }

    /// A migrating element's unreceived channel values cross processes, zero-copy buffers
    /// included (inline: a mobility message has no segment list of its own).
    #[test]
    fn unreceived_channel_values_survive_a_migration_message() {
        use crate::channel::{ChannelData, ChannelEnd};
        let floats = PodVec::from(vec![1.5f64; 1000]);
        let mut ends = vec![ChannelEnd {
            remote: (CollectionId::new(1, 2), Index::new(&[3]).unwrap()),
            port: 4,
            next_send: 0,
            next_receive: 7,
            arrived: vec![
                (7, ChannelData::new(floats.clone())),
                (9, ChannelData::new(2u8)),
            ],
        }];
        crate::channel::encode_values(&mut ends).unwrap();
        let migrant = crate::migration::Migrant {
            coll: CollectionId::new(1, 2),
            index: Index::new(&[5]).unwrap(),
            epoch: 1,
            reductions: 0,
            load: 0.0,
            channels: ends,
            sections: Vec::new(),
            state: Vec::new(),
            balance: None,
        };
        let env = Envelope::new(0, Control::Migrate(Box::new(migrant)));
        let msg = mobility_message(&env, 0, 1).unwrap().unwrap();
        let Body::Control(back) = decode_mobility(&msg).unwrap().body else {
            panic!("a control message")
        };
        let Control::Migrate(mut m) = *back else {
            panic!("a migration")
        };
        let mut arrived = std::mem::take(&mut m.channels[0].arrived).into_iter();
        let (seq, data) = arrived.next().unwrap();
        assert_eq!(seq, 7);
        let back: PodVec<f64> = data.into_value().unwrap();
        assert_eq!(&back[..], &floats[..]);
        let (seq, data) = arrived.next().unwrap();
        assert_eq!(seq, 9);
        assert!(
            data.into_value::<u16>().is_err(),
            "the type tag travels too"
        );
    }

    #[test]
    fn mobility_messages_round_trip() {
        let coll = CollectionId::new(1, 2);
        let index = Index::new(&[3, 4]).unwrap();
        let migrant = crate::migration::Migrant {
            coll,
            index,
            epoch: 5,
            reductions: 6,
            load: 0.25,
            channels: vec![crate::channel::ChannelEnd {
                remote: (CollectionId::new(1, 2), Index::new(&[3]).unwrap()),
                port: 4,
                next_send: 5,
                next_receive: 6,
                arrived: Vec::new(),
            }],
            sections: vec![(CollectionId::new(2, 3).as_section(), 7)],
            state: vec![1, 2, 3],
            balance: Some((0, 9)),
        };
        let envs = [
            Envelope::new(0, Control::Migrate(Box::new(migrant))),
            Envelope::new(
                0,
                Control::Seal {
                    coll,
                    counts: vec![1, 0, 2],
                },
            ),
        ];
        for env in envs {
            let msg = mobility_message(&env, 0, 1).unwrap().unwrap();
            let Body::Control(back) = decode_mobility(&msg).unwrap().body else {
                panic!("a control message")
            };
            match (&*back, env.body) {
                (Control::Migrate(m), Body::Control(c)) => {
                    let Control::Migrate(want) = *c else { panic!() };
                    assert_eq!(
                        (
                            m.coll,
                            m.index,
                            m.epoch,
                            m.reductions,
                            m.load,
                            &m.state,
                            m.balance,
                            format!("{:?}", m.channels),
                            &m.sections
                        ),
                        (
                            want.coll,
                            want.index,
                            want.epoch,
                            want.reductions,
                            want.load,
                            &want.state,
                            want.balance,
                            format!("{:?}", want.channels),
                            &want.sections
                        )
                    );
                }
                (Control::Seal { coll: c, counts }, _) => {
                    assert_eq!((*c, counts.as_slice()), (coll, &[1, 0, 2][..]));
                }
                _ => panic!("decoded another kind"),
            }
        }
    }

    #[test]
    fn pod_vec_and_buffer_go_out_of_band() {
        let v = PodVec::from((0..100).map(|i| i as f64 * 1.5).collect::<Vec<_>>());
        let text = Bytes::from(vec![b'h'; INLINE_MAX + 1]);
        let b = Buffer(text.clone());
        let ((bytes,), segs) =
            collecting(|| (postcard::to_stdvec(&(v.clone(), b.clone())).unwrap(),));
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1], text);
        assert!(
            bytes.len() < 8,
            "only segment references in the arguments: {} bytes",
            bytes.len()
        );
        let back: (PodVec<f64>, Buffer) = offering(segs, || postcard::from_bytes(&bytes).unwrap());
        assert_eq!(back, (v.clone(), b.clone()));
        // Outside a message they serialize inline.
        let inline = postcard::to_stdvec(&v).unwrap();
        assert_eq!(postcard::from_bytes::<PodVec<f64>>(&inline).unwrap(), v);
        // A reference to a missing segment is an error.
        let err = offering(Vec::new(), || {
            postcard::from_bytes::<(PodVec<f64>, Buffer)>(&bytes)
        });
        assert!(err.is_err());
    }

    #[test]
    fn small_buffers_travel_inline() {
        let v = PodVec::from(vec![1.5f64, -2.0, 3.25]);
        let b = Buffer(Bytes::from(vec![7u8; INLINE_MAX]));
        let ((bytes,), segs) =
            collecting(|| (postcard::to_stdvec(&(v.clone(), b.clone())).unwrap(),));
        assert!(segs.is_empty(), "no segments of their own");
        assert!(bytes.len() > INLINE_MAX + 24, "both inside the arguments");
        let back: (PodVec<f64>, Buffer) = offering(segs, || postcard::from_bytes(&bytes).unwrap());
        assert_eq!(back, (v, b));
    }

    /// A user's `Serialize` / `Deserialize` that panics inside a message's encoding or decoding
    /// (the entry's `catch_unwind` catches it and the PE goes on) leaves no segments behind: the
    /// thread serializes inline afterwards, and the vector it was sending is no longer shared.
    #[test]
    fn a_panic_inside_encoding_or_decoding_leaves_no_segments_installed() {
        struct Bomb;
        impl serde::Serialize for Bomb {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                panic!("user serializer panicked")
            }
        }
        let v = PodVec::from(vec![0.25f64; 1000]);
        let hit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            collecting(|| postcard::to_stdvec(&(v.clone(), Bomb)).map(|_| ()))
        }));
        assert!(hit.is_err(), "the serializer panicked");
        let inline = postcard::to_stdvec(&v).unwrap();
        assert!(inline.len() > 8000, "inline again: {} bytes", inline.len());
        let mut v = v;
        let before = v.as_ptr();
        v.as_mut_vec()[0] = 1.0;
        assert_eq!(v.as_ptr(), before, "no stale segment shares the vector");

        let hit = std::panic::catch_unwind(|| {
            offering(vec![Bytes::from(vec![1u8; 64])], || {
                panic!("user deserializer panicked")
            })
        });
        assert!(hit.is_err());
        let ((bytes,), segs) = collecting(|| (postcard::to_stdvec(&v).unwrap(),));
        assert_eq!(segs.len(), 1, "a fresh collector, not the offered segments");
        assert!(bytes.len() < 8);
    }

    /// The bytes `frame` would send for `m` (prefix and segments).
    fn frame_of(m: &Message) -> Vec<u8> {
        let mut out = charmrs_transport::encode_frame_prefix(m);
        for seg in m.segments() {
            out.extend_from_slice(seg);
        }
        out
    }

    /// xorshift64: deterministic, seeded per test.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// One random damage to `bytes`: a flipped bit, a byte set to a boundary value, a length
    /// field's worth of 0xff, a truncation, or an inserted byte.
    fn mutate(bytes: &mut Vec<u8>, x: &mut u64) {
        if bytes.is_empty() {
            bytes.push(next(x) as u8);
            return;
        }
        let at = (next(x) % bytes.len() as u64) as usize;
        match next(x) % 6 {
            0 => bytes[at] ^= 1 << (next(x) % 8),
            1 => bytes[at] = [0, 1, 0x7f, 0x80, 0xff][(next(x) % 5) as usize],
            2 => {
                let end = (at + 8).min(bytes.len());
                bytes[at..end].fill(0xff);
            }
            3 => bytes.truncate(at),
            4 => bytes.insert(at, next(x) as u8),
            _ => bytes[at] = next(x) as u8,
        }
    }

    /// Valid messages of every kind the network carries, damaged one to three times each,
    /// 60 000 times in all: each decodes to a message or an error, never a panic (the fuzz
    /// target `decode_frame` does the same from random bytes, with nightly Rust).
    #[test]
    fn damaged_valid_messages_are_errors_or_messages_never_panics() {
        let raws = |n: u32| -> Vec<crate::reduction::Raw> {
            (0..n)
                .map(|i| crate::reduction::Raw {
                    origin: i % 5,
                    bytes: Bytes::from(vec![i as u8; (i % 9) as usize]),
                    target: 7,
                })
                .collect()
        };
        let coll = CollectionId::new(1, 2);
        let big = PodVec::from((0..64).map(f64::from).collect::<Vec<_>>());
        let text = Buffer(Bytes::from(vec![b'z'; INLINE_MAX + 3]));
        let (value, segments) =
            collecting(|| postcard::to_stdvec(&(big.clone(), text.clone())).unwrap());
        let migrant = crate::migration::Migrant {
            coll,
            index: Index::new(&[3, 4]).unwrap(),
            epoch: 5,
            reductions: 6,
            load: 0.25,
            channels: Vec::new(),
            sections: vec![(CollectionId::new(2, 3).as_section(), 7)],
            state: vec![1, 2, 3],
            balance: Some((0, 9)),
        };
        let table = EntryTable::get().unwrap();
        // Any entry method of this test binary's table (its arguments are not these: a
        // damaged call may fail at its arguments too).
        let method = (0..table.entries().len() as u32)
            .find(|&w| {
                matches!(
                    table.by_wire_id(w).map(|i| &i.decoder),
                    Some(Decoder::Entry(_))
                )
            })
            .expect("the test binary registers entry methods");
        let meta = CallMeta {
            entry: method,
            coll,
            dest: WireDest::Point(Index::new(&[2]).unwrap()),
            reply: Reply::None,
            priority: 0,
        };
        let mut call = Vec::new();
        meta.write(&mut call);
        let seeds: Vec<Vec<u8>> = vec![
            frame_of(&raw_reduction_message(false, coll, 3, Shape::Group, 0, 1, raws(4)).unwrap()),
            frame_of(&raw_reduction_message(true, coll, 3, Shape::Group, 0, 1, raws(300)).unwrap()),
            frame_of(&value_message(None, 7, 0, 1, Ok((value.clone(), segments.clone()))).unwrap()),
            frame_of(
                &value_message(
                    Some(crate::future::PartialCount::Pe { extras: 2 }),
                    7,
                    0,
                    1,
                    Ok((value.clone(), segments.clone())),
                )
                .unwrap(),
            ),
            frame_of(
                &mobility_message(&Envelope::new(0, Control::Migrate(Box::new(migrant))), 0, 1)
                    .unwrap()
                    .unwrap(),
            ),
            frame(KIND_CALL, &[&call, &value, &segments[0], &segments[1]]),
        ];
        for (k, seed) in seeds.iter().enumerate() {
            match decode_untrusted_frame(seed) {
                Ok(()) => {}
                // The call's metadata is read; its arguments are another entry's.
                Err(e) if k == 5 && e.contains("arguments") => {}
                Err(e) => panic!("seed {k} does not decode: {e}"),
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..60_000 {
            let mut damaged = seeds[round % seeds.len()].clone();
            for _ in 0..=next(&mut x) % 3 {
                mutate(&mut damaged, &mut x);
            }
            let outcome = std::panic::catch_unwind(|| decode_untrusted_frame(&damaged));
            assert!(
                outcome.is_ok(),
                "round {round}: a panic decoding {damaged:?}"
            );
        }
    }

    /// A call's arguments with zero-copy vectors, decoded from damaged bytes and damaged,
    /// short, odd-length or unaligned segments: a value or an error, never a panic.
    #[test]
    fn damaged_zero_copy_arguments_are_errors_never_panics() {
        type Args = (PodVec<f64>, Buffer, PodVec<u16>, String, Vec<u64>);
        let args: Args = (
            PodVec::from((0..100).map(|i| f64::from(i) * 0.5).collect::<Vec<_>>()),
            Buffer(Bytes::from(vec![7u8; INLINE_MAX + 1])),
            PodVec::from((0..300u16).collect::<Vec<_>>()),
            "text".into(),
            vec![1, u64::MAX],
        );
        let (bytes, segs) = collecting(|| postcard::to_stdvec(&args).unwrap());
        assert_eq!(segs.len(), 3);
        let back: Args = offering(segs.clone(), || postcard::from_bytes(&bytes).unwrap());
        assert_eq!(back, args);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..20_000 {
            let mut b = bytes.clone();
            let mut s = segs.clone();
            match round % 3 {
                0 => mutate(&mut b, &mut x),
                1 => {
                    // A segment cut short, made one byte longer, or shifted off its alignment.
                    let k = (next(&mut x) % s.len() as u64) as usize;
                    let mut v = s[k].to_vec();
                    mutate(&mut v, &mut x);
                    let shift = (next(&mut x) % 8) as usize;
                    let mut padded = vec![0u8; shift];
                    padded.extend_from_slice(&v);
                    s[k] = Bytes::from(padded).slice(shift..);
                }
                _ => {
                    s.truncate((next(&mut x) % 4) as usize);
                    mutate(&mut b, &mut x);
                }
            }
            let outcome = std::panic::catch_unwind(|| {
                offering(s.clone(), || postcard::from_bytes::<Args>(&b).map(drop))
            });
            assert!(
                outcome.is_ok(),
                "round {round}: a panic decoding {b:?} with {s:?}"
            );
        }
    }
}
