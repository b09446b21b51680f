//! Vectors of plain numbers that cross processes as message segments, without copies where the
//! machine allows.
//!
//! # What this module owns
//!
//! [`PodVec<T>`] and the [`Pod`] element trait. A `PodVec` is either a vector it owns, or a view
//! of shared bytes (a received message segment, or a vector handed over with `From<Vec<T>>`)
//! that reads as `&[T]` in place.
//!
//! Why: numeric arrays are what HPC programs send. Converting them element by element into a new
//! segment on the sender and into a new vector on the receiver costs two copies of every byte,
//! about as much as moving the bytes between processes. On a little-endian machine the bytes of
//! a `[f64]` already are the wire format, so a vector handed to `PodVec::from` becomes the
//! segment itself (no copy), and a received segment is read where it landed (no copy), when its
//! address suits `T`'s alignment — which it does when the sender's did: the machine layers place
//! large segments at the sender's offset within a cache line.
//!
//! # Invariants
//!
//! * A shared view exists only for the built-in element types (whose every bit pattern is a
//!   valid value and which have no padding), on little-endian targets, and only over bytes whose
//!   length is a whole number of elements and whose address is aligned for `T`. Anything else is
//!   converted element by element into an owned vector, as before.
//! * A shared view is never written: [`PodVec::as_mut_vec`] (and `DerefMut`) first copies it into
//!   a vector of its own, so other holders of the bytes never see a change.
//! * The wire format is the same for every representation: the elements' little-endian bytes,
//!   as one out-of-band segment (or inline up to 256 bytes, see `wire`).

use std::any::TypeId;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire::{deserialize_segment, serialize_segment};

/// A vector of plain-old-data numbers (`f64`, `u32`, …) that crosses processes as its own
/// message segment, without being copied into the serialized arguments (vectors of at most 256
/// bytes are copied inline, which is cheaper). Of the built-in element types on a little-endian
/// machine it is not copied at all: the vector becomes the segment, and the receiver reads the
/// segment in place (see the module docs).
///
/// ```
/// use charmrs::PodVec;
/// let mut v = PodVec::from(vec![1.0f64, 2.0, 3.0]);
/// assert_eq!(&v[..], &[1.0, 2.0, 3.0]);
/// v.as_mut_vec().push(4.0); // writing makes (or keeps) a vector of its own
/// assert_eq!(v.into_vec(), vec![1.0, 2.0, 3.0, 4.0]);
/// ```
pub struct PodVec<T: Pod>(Repr<T>);

enum Repr<T> {
    Owned(Vec<T>),
    /// Invariant (module docs): `castable::<T>()`, `len % size_of::<T>() == 0`, aligned.
    Shared(Bytes),
}

/// Plain-old-data element types of a [`PodVec`].
pub trait Pod: Copy + Send + Sync + 'static + PartialEq + fmt::Debug {
    /// Decodes from little-endian bytes (`bytes.len() == size_of::<Self>()`).
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends the little-endian encoding.
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

/// The bytes of a vector of a castable type, as a segment's owner (no copy).
struct VecBytes<T>(Vec<T>);

impl<T: Pod> AsRef<[u8]> for VecBytes<T> {
    fn as_ref(&self) -> &[u8] {
        debug_assert!(castable::<T>());
        // SAFETY: only made for castable `T` (a primitive number: no padding, every byte
        // initialised), so the vector's elements are `len * size_of::<T>()` initialised bytes,
        // borrowed for as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.0.as_ptr().cast::<u8>(),
                std::mem::size_of_val(&*self.0),
            )
        }
    }
}

impl<T: Pod> PodVec<T> {
    /// Reads `bytes` as elements in place where that is sound (see the module docs), else
    /// decodes them into a vector. `None` if the length is not a whole number of elements.
    fn from_wire(bytes: Bytes) -> Option<PodVec<T>> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size) {
            return None;
        }
        if !castable::<T>() {
            return Some(PodVec(Repr::Owned(
                bytes.chunks_exact(size).map(T::from_le).collect(),
            )));
        }
        if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Some(PodVec(Repr::Shared(bytes)));
        }
        // Misaligned: one copy of the bytes into a vector.
        let count = bytes.len() / size;
        let mut v = Vec::<T>::with_capacity(count);
        // SAFETY: `T` is castable (a primitive number: any bytes are a valid value, no padding);
        // the vector has room for `count` elements = `bytes.len()` bytes, written in full before
        // the length is set, and the two buffers are distinct allocations.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), bytes.len());
            v.set_len(count);
        }
        Some(PodVec(Repr::Owned(v)))
    }

    /// The elements as a vector of its own, to change (a shared view is copied into one first,
    /// once).
    pub fn as_mut_vec(&mut self) -> &mut Vec<T> {
        if let Repr::Shared(_) = self.0 {
            self.0 = Repr::Owned(self.as_slice().to_vec());
        }
        match &mut self.0 {
            Repr::Owned(v) => v,
            Repr::Shared(_) => unreachable!("made owned above"),
        }
    }

    /// The vector (a shared view is copied).
    pub fn into_vec(self) -> Vec<T> {
        match self.0 {
            Repr::Owned(v) => v,
            Repr::Shared(_) => self.as_slice().to_vec(),
        }
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        match &self.0 {
            Repr::Owned(v) => v,
            // SAFETY: a shared view satisfies the module's invariant: `T` is a primitive number
            // (any bytes are a valid value), the bytes are a whole number of elements, aligned
            // for `T`, immutable, and live as long as `self`.
            Repr::Shared(b) => unsafe {
                std::slice::from_raw_parts(
                    b.as_ptr().cast::<T>(),
                    b.len() / std::mem::size_of::<T>(),
                )
            },
        }
    }

    /// Whether the elements are read in place from shared bytes (a received segment, or a vector
    /// handed over to be sent) rather than held in a vector of its own.
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Repr::Shared(_))
    }
}

impl<T: Pod> From<Vec<T>> for PodVec<T> {
    /// Takes the vector over; of a built-in element type on a little-endian machine it becomes
    /// the bytes that are sent, without a copy (writing through the `PodVec` afterwards copies
    /// it back into a vector once).
    fn from(v: Vec<T>) -> Self {
        if castable::<T>() {
            PodVec(Repr::Shared(Bytes::from_owner(VecBytes(v))))
        } else {
            PodVec(Repr::Owned(v))
        }
    }
}

impl<T: Pod> std::ops::Deref for PodVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Pod> std::ops::DerefMut for PodVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_vec()
    }
}

impl<T: Pod> Clone for PodVec<T> {
    /// A shared view is cloned by reference (no copy).
    fn clone(&self) -> Self {
        PodVec(match &self.0 {
            Repr::Owned(v) => Repr::Owned(v.clone()),
            Repr::Shared(b) => Repr::Shared(b.clone()),
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
            Repr::Shared(b) => serialize_segment(b, s),
            Repr::Owned(v) => {
                let mut bytes = Vec::with_capacity(std::mem::size_of_val(&**v));
                for &x in v {
                    x.to_le(&mut bytes);
                }
                serialize_segment(&Bytes::from(bytes), s)
            }
        }
    }
}

impl<'de, T: Pod> Deserialize<'de> for PodVec<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let bytes = deserialize_segment(d)?;
        let len = bytes.len();
        PodVec::from_wire(bytes).ok_or_else(|| {
            D::Error::custom(format!(
                "a PodVec<{}> segment of {len} bytes is not a whole number of elements",
                std::any::type_name::<T>(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_of_numbers_become_their_bytes_without_a_copy() {
        let v: Vec<f64> = (0..1000).map(|i| i as f64 * 0.5).collect();
        let at = v.as_ptr();
        let p = PodVec::from(v);
        assert_eq!(p.is_shared(), cfg!(target_endian = "little"));
        assert_eq!(p.as_ptr(), at, "no copy");
        assert_eq!(p[999], 499.5);
        assert_eq!(p.clone().as_ptr(), at, "clones share");
    }

    #[test]
    fn writing_copies_a_shared_view_once_and_leaves_the_bytes_alone() {
        let p = PodVec::from(vec![1u32, 2, 3]);
        let mut q = p.clone();
        q[1] = 20;
        q.as_mut_vec().push(4);
        assert_eq!(&p[..], &[1, 2, 3]);
        assert_eq!(&q[..], &[1, 20, 3, 4]);
        assert!(!q.is_shared());
    }

    #[test]
    fn wire_bytes_are_read_in_place_when_aligned_and_copied_otherwise() {
        let raw: Vec<u8> = (0..8 * 17 + 1).map(|i| i as u8).collect();
        let bytes = Bytes::from(raw);
        let (aligned, misaligned) = if (bytes.as_ptr() as usize).is_multiple_of(8) {
            (bytes.slice(..8 * 17), bytes.slice(1..))
        } else {
            let off = 8 - bytes.as_ptr() as usize % 8;
            (
                bytes.slice(off..off + 8 * 16),
                bytes.slice(off + 1..off + 1 + 8 * 16),
            )
        };
        let a = PodVec::<u64>::from_wire(aligned.clone()).unwrap();
        assert_eq!(a.is_shared(), cfg!(target_endian = "little"));
        let m = PodVec::<u64>::from_wire(misaligned.clone()).unwrap();
        assert!(
            !m.is_shared(),
            "a misaligned segment is decoded into a vector"
        );
        for (p, b) in [(a, aligned), (m, misaligned)] {
            let want: Vec<u64> = b.chunks_exact(8).map(<u64 as Pod>::from_le).collect();
            assert_eq!(&p[..], &want[..]);
        }
        assert!(PodVec::<u32>::from_wire(Bytes::from(vec![0u8; 7])).is_none());
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
        let p = PodVec::from(vec![Flag(true), Flag(false)]);
        assert!(!p.is_shared());
        let q = PodVec::<Flag>::from_wire(Bytes::from(vec![2u8, 0, 1])).unwrap();
        assert!(!q.is_shared(), "bytes other than 0 and 1 are no `bool`s");
        assert_eq!(&q[..], &[Flag(true), Flag(false), Flag(true)]);
    }
}
