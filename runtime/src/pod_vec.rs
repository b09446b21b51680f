//! Vectors of plain numbers that cross processes as message segments, without copies where the
//! machine allows.
//!
//! # What this module owns
//!
//! [`PodVec<T>`] and the [`Pod`] element trait. A `PodVec` is either a vector (shared by its
//! clones and by messages being sent, copied on write while shared) or a view of received bytes
//! that reads as `&[T]` where they landed.
//!
//! Why: numeric arrays are what HPC programs send. Converting them element by element into a new
//! segment on the sender and into a new vector on the receiver costs two copies of every byte,
//! about as much as moving the bytes between processes. On a little-endian machine the bytes of
//! a `[f64]` already are the wire format, so the vector itself is the segment that is sent (no
//! copy), and a large received segment is read where it landed (no copy) when its address suits
//! `T`'s alignment, which the machine layers arrange for a message's largest segment (UCX and
//! libfabric co-align it with the sender's copy, or put it on a cache line; TCP pads large
//! frames so).
//!
//! # Invariants
//!
//! * A view of received bytes exists only for the built-in element types (whose every bit
//!   pattern is a valid value and which have no padding), on little-endian targets, only over
//!   bytes whose length is a whole number of elements and whose address is aligned for `T`, and
//!   only from [`IN_PLACE_MIN`] bytes (a smaller segment is copied, so that a kept vector does
//!   not hold on to a transport's receive descriptor or frame). Anything else becomes a vector:
//!   one `memcpy`, or element by element for other element types.
//! * Neither form is ever written while someone else can read it: a view is copied into a
//!   vector before the first write, and a vector shared with a clone or with a message still in
//!   flight is copied (`Arc::make_mut`) before it is written.
//! * The wire format is the same for every form: the elements' little-endian bytes, as one
//!   out-of-band segment (or inline up to 256 bytes, see `wire`).

use std::any::TypeId;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire::{deserialize_received, serialize_segment, serialize_segment_with, Received};

/// Received segments of at least this many bytes are read in place; smaller ones are copied
/// into a vector (a copy that size costs little, and frees the transport's buffer at once).
pub const IN_PLACE_MIN: usize = 16 << 10;

/// A vector of plain-old-data numbers (`f64`, `u32`, …) that crosses processes as its own
/// message segment, without being copied into the serialized arguments (vectors of at most 256
/// bytes are copied inline, which is cheaper). Of the built-in element types on a little-endian
/// machine it is not copied at all: the vector is the segment, and the receiver reads a large
/// segment in place (see the module docs). Clones share the elements until one is written.
///
/// ```
/// use charmrs::PodVec;
/// let mut v = PodVec::from(vec![1.0f64, 2.0, 3.0]);
/// assert_eq!(&v[..], &[1.0, 2.0, 3.0]);
/// let before = v.clone(); // shares the elements
/// v.as_mut_vec().push(4.0); // copies them first, since `before` shares them
/// assert_eq!(&before[..], &[1.0, 2.0, 3.0]);
/// assert_eq!(Vec::from(v), vec![1.0, 2.0, 3.0, 4.0]); // no copy: nobody else holds it
/// ```
pub struct PodVec<T: Pod>(Repr<T>);

enum Repr<T> {
    /// A vector, shared by clones and by segments of messages being sent.
    Vec(Arc<Vec<T>>),
    /// Received bytes read in place. Invariant (module docs): `castable::<T>()`,
    /// `len % size_of::<T>() == 0`, aligned for `T`.
    Wire(Bytes),
}

/// Plain-old-data element types of a [`PodVec`].
///
/// The built-in types (`u8` … `u64`, `i8` … `i64`, `f32`, `f64`) travel without copies; a type
/// of your own is converted element by element with these two functions, which must read and
/// write exactly `size_of::<Self>()` bytes.
pub trait Pod: Copy + Send + Sync + 'static + PartialEq + fmt::Debug {
    /// Decodes from little-endian bytes (`bytes.len() == size_of::<Self>()`).
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends the little-endian encoding (`size_of::<Self>()` bytes).
    fn to_le(self, out: &mut Vec<u8>);
}

macro_rules! pod {
    ($($t:ty),*) => {
        $(
            impl Pod for $t {
                fn from_le(b: &[u8]) -> Self {
                    <$t>::from_le_bytes(b.try_into().expect("caller passes exactly one element"))
                }
                fn to_le(self, out: &mut Vec<u8>) {
                    out.extend_from_slice(&self.to_le_bytes());
                }
            }
        )*
        /// Whether `T` is one of the built-in element types and the target is little-endian:
        /// its values then are their wire bytes, and any bytes are a valid value.
        fn castable<T: 'static>() -> bool {
            cfg!(target_endian = "little") && [$(TypeId::of::<$t>()),*].contains(&TypeId::of::<T>())
        }
    };
}
pod!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

/// The bytes of a shared vector of a castable type, as a segment's owner (no copy).
struct VecBytes<T>(Arc<Vec<T>>);

impl<T> Clone for VecBytes<T> {
    fn clone(&self) -> Self {
        VecBytes(Arc::clone(&self.0))
    }
}

impl<T: Pod> AsRef<[u8]> for VecBytes<T> {
    fn as_ref(&self) -> &[u8] {
        debug_assert!(castable::<T>());
        // SAFETY: only made for castable `T` (a primitive number: no padding, every byte
        // initialised), so the elements are `len * size_of::<T>()` initialised bytes. They are
        // not written while this owner lives: a `PodVec` writes only through `Arc::make_mut`,
        // which copies while this `Arc` clone exists. Borrowed for as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.0.as_ptr().cast::<u8>(),
                std::mem::size_of_val(&**self.0),
            )
        }
    }
}

impl<T: Pod> PodVec<T> {
    /// Reads `bytes` as elements in place where that is sound and worth it (see the module
    /// docs), else copies or decodes them into a vector. `None` if the length is not a whole
    /// number of elements (or the element type has no size).
    fn from_wire(bytes: Bytes) -> Option<PodVec<T>> {
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
        if castable::<T>()
            && aligned
            && bytes.len() >= IN_PLACE_MIN
            && bytes.len().is_multiple_of(std::mem::size_of::<T>())
        {
            return Some(PodVec(Repr::Wire(bytes)));
        }
        PodVec::copied(&bytes)
    }

    /// The elements of `bytes` in a vector of their own: one `memcpy` for a built-in type,
    /// element by element for another. `None` as for [`from_wire`](PodVec::from_wire).
    fn copied(bytes: &[u8]) -> Option<PodVec<T>> {
        let size = std::mem::size_of::<T>();
        if size == 0 || !bytes.len().is_multiple_of(size) {
            return None;
        }
        let v = if castable::<T>() {
            copy_out(bytes)
        } else {
            bytes.chunks_exact(size).map(T::from_le).collect()
        };
        Some(PodVec(Repr::Vec(Arc::new(v))))
    }

    /// The elements as a vector of this `PodVec`'s own, to change: copied first if they are
    /// received bytes or shared with a clone or a message still being sent.
    pub fn as_mut_vec(&mut self) -> &mut Vec<T> {
        if let Repr::Wire(b) = &self.0 {
            self.0 = Repr::Vec(Arc::new(copy_out(b)));
        }
        match &mut self.0 {
            Repr::Vec(v) => Arc::make_mut(v),
            Repr::Wire(_) => unreachable!("made a vector above"),
        }
    }

    /// The vector (copied only if the elements are received bytes or still shared).
    pub fn into_vec(self) -> Vec<T> {
        match self.0 {
            Repr::Vec(v) => Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone()),
            Repr::Wire(b) => copy_out(&b),
        }
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        match &self.0 {
            Repr::Vec(v) => v,
            // SAFETY: a view satisfies the module's invariant: `T` is a primitive number (any
            // bytes are a valid value), the bytes are a whole number of elements, aligned for
            // `T`, and live as long as `self`; and they are never written while viewed: no
            // owner of a `Bytes` this module views (a layer's pool buffer or lent descriptor, a
            // received `Vec`, an in-process `VecBytes` or huge mapping under `+wirecheck`)
            // writes its memory or hands it out again while any view of it exists.
            Repr::Wire(b) => unsafe {
                std::slice::from_raw_parts(
                    b.as_ptr().cast::<T>(),
                    b.len() / std::mem::size_of::<T>(),
                )
            },
        }
    }

    /// Whether the elements are read in place from received bytes (rather than held in a
    /// vector).
    pub fn is_received_in_place(&self) -> bool {
        matches!(self.0, Repr::Wire(_))
    }

    /// Whether writing through this `PodVec` would copy its elements first (they are received
    /// bytes, or shared with a clone or a message being sent).
    pub(crate) fn writing_copies(&self) -> bool {
        match &self.0 {
            Repr::Vec(v) => Arc::strong_count(v) > 1 || Arc::weak_count(v) > 0,
            Repr::Wire(_) => true,
        }
    }
}

/// The elements of castable-type bytes, copied into a vector (one `memcpy`).
fn copy_out<T: Pod>(bytes: &[u8]) -> Vec<T> {
    debug_assert!(castable::<T>());
    let count = bytes.len() / std::mem::size_of::<T>();
    let mut v = Vec::<T>::with_capacity(count);
    // SAFETY: `T` is castable (a primitive number: any bytes are a valid value, no padding); the
    // vector has room for `count` elements, whose `count * size_of::<T>()` bytes are all written
    // (the callers pass whole elements) before the length is set; distinct allocations.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            v.as_mut_ptr().cast::<u8>(),
            count * std::mem::size_of::<T>(),
        );
        v.set_len(count);
    }
    v
}

impl<T: Pod> From<Vec<T>> for PodVec<T> {
    /// Takes the vector over (no copy; sending it later does not copy it either).
    fn from(v: Vec<T>) -> Self {
        PodVec(Repr::Vec(Arc::new(v)))
    }
}

impl<T: Pod> From<PodVec<T>> for Vec<T> {
    fn from(p: PodVec<T>) -> Vec<T> {
        p.into_vec()
    }
}

impl<T: Pod> FromIterator<T> for PodVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        PodVec::from(iter.into_iter().collect::<Vec<T>>())
    }
}

impl<T: Pod> Default for PodVec<T> {
    fn default() -> Self {
        PodVec::from(Vec::new())
    }
}

impl<T: Pod> AsRef<[T]> for PodVec<T> {
    fn as_ref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Pod> std::ops::Deref for PodVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Pod> std::ops::DerefMut for PodVec<T> {
    /// Copies first if the elements are shared (see [`PodVec::as_mut_vec`]).
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_vec()
    }
}

impl<T: Pod> Clone for PodVec<T> {
    /// Shares the elements (copy on write).
    fn clone(&self) -> Self {
        PodVec(match &self.0 {
            Repr::Vec(v) => Repr::Vec(Arc::clone(v)),
            Repr::Wire(b) => Repr::Wire(b.clone()),
        })
    }
}

impl<T: Pod> PartialEq for PodVec<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Pod> fmt::Debug for PodVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PodVec").field(&self.as_slice()).finish()
    }
}

impl<T: Pod> Serialize for PodVec<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Repr::Wire(b) => serialize_segment(b, s),
            Repr::Vec(v) if castable::<T>() => {
                let owner = VecBytes(Arc::clone(v));
                serialize_segment_with(owner.as_ref(), || Bytes::from_owner(owner.clone()), s)
            }
            Repr::Vec(v) => {
                let mut bytes = Vec::with_capacity(std::mem::size_of_val(&***v));
                for &x in v.iter() {
                    x.to_le(&mut bytes);
                }
                serialize_segment(&Bytes::from(bytes), s)
            }
        }
    }
}

impl<'de, T: Pod> Deserialize<'de> for PodVec<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (decoded, len) = match deserialize_received(d)? {
            Received::Inline(b) => (PodVec::copied(b), b.len()),
            Received::Segment(b) => {
                let len = b.len();
                (PodVec::from_wire(b), len)
            }
        };
        decoded.ok_or_else(|| {
            crate::wire::custom_error::<D::Error>(format!(
                "a PodVec<{}> segment of {len} bytes is not a whole number of {}-byte elements",
                std::any::type_name::<T>(),
                std::mem::size_of::<T>(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{collecting, offering};

    #[test]
    fn a_vector_is_sent_as_it_is() {
        let v: Vec<f64> = (0..5000).map(|i| i as f64 * 0.5).collect();
        let at = v.as_ptr();
        let p = PodVec::from(v);
        let ((bytes,), segs) = collecting(|| (postcard::to_stdvec(&p).unwrap(),));
        assert_eq!(segs.len(), 1);
        assert_eq!(
            segs[0].as_ptr(),
            at.cast::<u8>(),
            "the segment is the vector"
        );
        assert_eq!(p.clone().as_ptr(), at, "clones share");
        let back: PodVec<f64> = offering(segs, || postcard::from_bytes(&bytes).unwrap());
        assert_eq!(back, p);
    }

    #[test]
    fn writing_copies_only_what_someone_else_holds() {
        let mut p = PodVec::from(vec![1u32, 2, 3]);
        let at = p.as_ptr();
        p[0] = 10; // nobody else holds it: in place
        assert_eq!(p.as_ptr(), at);
        let q = p.clone();
        p.as_mut_vec().push(4); // `q` shares it: copied first
        assert_eq!(&q[..], &[10, 2, 3]);
        assert_eq!(&p[..], &[10, 2, 3, 4]);
        drop(q);
        // A message still holding the segment counts as a holder too (above the inline size).
        let mut big = PodVec::from(vec![10u32; 100]);
        let (_, segs) = collecting(|| postcard::to_stdvec(&big).unwrap());
        assert_eq!(segs.len(), 1);
        let before = big.as_ptr();
        big[0] = 11;
        assert_ne!(
            big.as_ptr(),
            before,
            "copied: a segment still holds the old elements"
        );
        assert_eq!(segs[0][..4], 10u32.to_le_bytes()[..]);
        drop(segs);
        let at = big.as_ptr();
        let back = Vec::from(big);
        assert_eq!(back.as_ptr(), at, "into_vec without a copy when unshared");
    }

    #[test]
    fn large_aligned_segments_are_read_in_place_and_others_copied() {
        let n = IN_PLACE_MIN / 8 * 2;
        let raw: Vec<u8> = (0..8 * n + 8).map(|i| i as u8).collect();
        let bytes = Bytes::from(raw);
        let off = (8 - bytes.as_ptr() as usize % 8) % 8;
        let aligned = bytes.slice(off..off + 8 * n);
        let misaligned = bytes.slice(off + 1..off + 1 + 8 * (n - 1));
        let small = bytes.slice(off..off + 64);
        let a = PodVec::<u64>::from_wire(aligned.clone()).unwrap();
        assert_eq!(a.is_received_in_place(), cfg!(target_endian = "little"));
        for (b, in_place) in [(misaligned, false), (small, false), (aligned, true)] {
            let p = PodVec::<u64>::from_wire(b.clone()).unwrap();
            assert_eq!(
                p.is_received_in_place(),
                in_place && cfg!(target_endian = "little")
            );
            let want: Vec<u64> = b.chunks_exact(8).map(<u64 as Pod>::from_le).collect();
            assert_eq!(&p[..], &want[..]);
        }
        assert!(PodVec::<u32>::from_wire(Bytes::from(vec![0u8; 7])).is_none());
        let mut a = a;
        a[0] = 7; // copies out of the received bytes first
        assert!(!a.is_received_in_place());
    }

    /// A user-defined element type: never read in place, always converted.
    #[derive(Clone, Copy, PartialEq, Debug)]
    struct Flag(bool);

    impl Pod for Flag {
        fn from_le(b: &[u8]) -> Self {
            Flag(b[0] != 0)
        }
        fn to_le(self, out: &mut Vec<u8>) {
            out.push(u8::from(self.0));
        }
    }

    #[test]
    fn other_element_types_are_converted_element_by_element() {
        let q = PodVec::<Flag>::from_wire(Bytes::from(vec![2u8; IN_PLACE_MIN])).unwrap();
        assert!(
            !q.is_received_in_place(),
            "bytes other than 0 and 1 are no `bool`s"
        );
        assert!(q.iter().all(|&f| f == Flag(true)));
        let p: PodVec<Flag> = [Flag(true), Flag(false)].into_iter().collect();
        let (bytes, segs) = collecting(|| postcard::to_stdvec(&p).unwrap());
        let back: PodVec<Flag> = offering(segs, || postcard::from_bytes(&bytes).unwrap());
        assert_eq!(back, p);
    }

    /// A zero-sized element type cannot travel (its count would be lost).
    #[derive(Clone, Copy, PartialEq, Debug)]
    struct Nothing;

    impl Pod for Nothing {
        fn from_le(_: &[u8]) -> Self {
            Nothing
        }
        fn to_le(self, _: &mut Vec<u8>) {}
    }

    #[test]
    fn zero_sized_elements_are_refused_not_a_panic() {
        assert!(PodVec::<Nothing>::from_wire(Bytes::new()).is_none());
    }
}
