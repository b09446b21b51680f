//! Array indices: the dynamic [`Index`] (0 to 6 dimensions) and the [`ArrayIndex`] trait that lets
//! `usize` and tuples of up to six `usize` name array elements.
//!
//! Invariant: an [`Index`] stores `dims` coordinates (≤ [`MAX_DIMS`]), each < 2^32; the unused
//! coordinates are zero, so derived `Eq`/`Hash` compare exactly the meaningful part.
//!
//! Serialized form: the `dims` byte, then only the meaningful 32-bit words (the coordinates, or
//! the words a user key's bytes occupy), as one tuple — an index travels in every call message,
//! and the six fixed coordinates cost a scalar chare's call six useless varints each way.
//! Deserialization checks the dimension count, the key length and that a key's unused bytes
//! are zero (the invariant above), so a hostile message cannot make two equal-looking indices.

use crate::error::{Error, Result};
use serde::de::{Error as _, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Largest number of dimensions of an array index (as in Charm++).
pub const MAX_DIMS: usize = 6;

/// Longest postcard encoding of a user index key, in bytes.
pub const MAX_KEY_BYTES: usize = 4 * MAX_DIMS;

/// The dimension count of an index made from a user key (one more than any coordinate index,
/// so the two kinds never mix in one array).
pub const KEY_DIMS: usize = MAX_DIMS + 1;

/// Marks `Index::dims` as "a key of this many bytes".
const KEY_FLAG: u8 = 0x80;

/// An array element index of 0 to 6 dimensions, each coordinate < 2^32.
///
/// ```
/// use charmrs::Index;
/// let i = Index::new(&[1, 2, 3]).unwrap();
/// assert_eq!(i.to_string(), "(1, 2, 3)");
/// let dims = Index::new(&[2, 3, 4]).unwrap();
/// assert_eq!(i.linear(&dims), 1 * 12 + 2 * 4 + 3);
/// assert_eq!(Index::from_linear(i.linear(&dims), &dims), i);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Index {
    dims: u8,
    coords: [u32; MAX_DIMS],
}

impl Index {
    /// The index with no dimensions (that of a single chare).
    pub const SCALAR: Index = Index {
        dims: 0,
        coords: [0; MAX_DIMS],
    };

    /// Builds an index from its coordinates.
    ///
    /// # Errors
    /// More than [`MAX_DIMS`] coordinates, or a coordinate ≥ 2^32.
    pub fn new(coords: &[usize]) -> Result<Index> {
        if coords.len() > MAX_DIMS {
            return Err(Error::Options(format!(
                "an index has at most {MAX_DIMS} dimensions, {} were given",
                coords.len()
            )));
        }
        let mut c = [0u32; MAX_DIMS];
        for (slot, &x) in c.iter_mut().zip(coords) {
            *slot = u32::try_from(x).map_err(|_| Error::DimensionTooLarge {
                extent: x,
                max: u32::MAX as usize,
            })?;
        }
        Ok(Index {
            dims: coords.len() as u8,
            coords: c,
        })
    }

    /// A one-dimensional index.
    pub fn one(i: usize) -> Result<Index> {
        Index::new(&[i])
    }

    /// Number of dimensions ([`KEY_DIMS`] for a user key, see [`from_key`](Self::from_key)).
    pub fn dims(&self) -> usize {
        if self.dims & KEY_FLAG != 0 {
            KEY_DIMS
        } else {
            self.dims as usize
        }
    }

    /// An index made from a user key (any `Serialize` type whose postcard encoding fits in
    /// [`MAX_KEY_BYTES`] bytes): Charm++'s user-defined array indices. Equal keys give equal
    /// indices in every process. Declare a key type with [`index_key!`](crate::index_key) to use
    /// it directly as an array's index type.
    ///
    /// ```
    /// use charmrs::Index;
    /// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    /// struct Cell { level: u8, x: u32, y: u32 }
    /// let i = Index::from_key(&Cell { level: 2, x: 5, y: 9 }).unwrap();
    /// assert_eq!(i.key::<Cell>(), Some(Cell { level: 2, x: 5, y: 9 }));
    /// ```
    ///
    /// # Errors
    /// The key does not serialize, or its encoding is longer than [`MAX_KEY_BYTES`].
    pub fn from_key<K: serde::Serialize>(key: &K) -> Result<Index> {
        let mut buf = [0u8; MAX_KEY_BYTES];
        let used = postcard::to_slice(key, &mut buf)
            .map_err(|e| {
                Error::Options(format!(
                    "an index key of type {} does not fit in {MAX_KEY_BYTES} bytes: {e}",
                    std::any::type_name::<K>()
                ))
            })?
            .len();
        let mut coords = [0u32; MAX_DIMS];
        for (k, chunk) in buf.chunks(4).enumerate() {
            coords[k] = u32::from_le_bytes(chunk.try_into().expect("24 bytes in chunks of 4"));
        }
        Ok(Index {
            dims: KEY_FLAG | used as u8,
            coords,
        })
    }

    /// The user key this index was made from, if it was made from a key of type `K`.
    pub fn key<K: serde::de::DeserializeOwned>(&self) -> Option<K> {
        if self.dims & KEY_FLAG == 0 {
            return None;
        }
        let len = (self.dims & !KEY_FLAG) as usize;
        let mut buf = [0u8; MAX_KEY_BYTES];
        for (k, c) in self.coords.iter().enumerate() {
            buf[4 * k..4 * k + 4].copy_from_slice(&c.to_le_bytes());
        }
        let (value, rest) = postcard::take_from_bytes::<K>(buf.get(..len)?).ok()?;
        rest.is_empty().then_some(value)
    }

    /// Whether this index was made from a user key.
    pub fn is_key(&self) -> bool {
        self.dims & KEY_FLAG != 0
    }

    /// Coordinate `d` (0 if `d ≥ dims`).
    pub fn get(&self, d: usize) -> usize {
        self.coords.get(d).copied().unwrap_or(0) as usize
    }

    /// The coordinates as a slice of `u32` (for a key: its encoding, in words).
    pub fn coords(&self) -> &[u32] {
        if self.is_key() {
            &self.coords
        } else {
            &self.coords[..self.dims()]
        }
    }

    /// Number of elements of an array whose extents are `self` (1 for zero dimensions).
    pub fn volume(&self) -> u64 {
        // Saturating: extents that do not fit a u64 are refused before any walk of the space
        // (`Shape::check_size`), and must not wrap to a small count meanwhile.
        self.coords()
            .iter()
            .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
    }

    /// Whether every coordinate is below the matching extent of `dims` (same dimension count).
    pub fn within(&self, dims: &Index) -> bool {
        self.dims == dims.dims && self.coords().iter().zip(dims.coords()).all(|(i, d)| i < d)
    }

    /// Row-major linear position of `self` in an array of extents `dims` (last coordinate fastest).
    pub fn linear(&self, dims: &Index) -> u64 {
        self.coords()
            .iter()
            .zip(dims.coords())
            .fold(0u64, |acc, (&i, &d)| acc * d as u64 + i as u64)
    }

    /// Inverse of [`linear`](Self::linear): the index at row-major position `pos` of `dims`.
    pub fn from_linear(mut pos: u64, dims: &Index) -> Index {
        let mut out = Index {
            dims: dims.dims,
            coords: [0; MAX_DIMS],
        };
        // A key's words are not extents: it gets as many words as it has, never more.
        for d in (0..dims.coords().len()).rev() {
            let extent = dims.coords[d].max(1) as u64;
            out.coords[d] = (pos % extent) as u32;
            pos /= extent;
        }
        out
    }
}

/// The number of meaningful 32-bit words of an index whose `dims` byte is `dims`, or `None` for
/// an invalid one.
fn words_of(dims: u8) -> Option<usize> {
    if dims & KEY_FLAG != 0 {
        let len = usize::from(dims & !KEY_FLAG);
        (len <= MAX_KEY_BYTES).then_some(len.div_ceil(4))
    } else {
        let d = usize::from(dims);
        (d <= MAX_DIMS).then_some(d)
    }
}

impl Index {
    /// The number of meaningful 32-bit words (see the module docs).
    fn words(&self) -> usize {
        words_of(self.dims).expect("an Index keeps a valid dimension byte")
    }

    /// Appends the wire form (the dimension byte, then the meaningful words, little-endian):
    /// the same information as the serde form, for hand-written message headers.
    pub(crate) fn write_le(&self, out: &mut Vec<u8>) {
        let n = self.words();
        out.push(self.dims);
        for c in &self.coords[..n] {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }

    /// Reads what [`write_le`](Self::write_le) wrote at the start of `b`; returns the index and
    /// the rest of `b`.
    pub(crate) fn read_le(b: &[u8]) -> std::result::Result<(Index, &[u8]), String> {
        let (&dims, rest) = b.split_first().ok_or("an index cut short")?;
        let n = words_of(dims).ok_or_else(|| format!("invalid index dimension byte {dims:#x}"))?;
        if rest.len() < 4 * n {
            return Err("an index cut short".into());
        }
        let mut coords = [0u32; MAX_DIMS];
        for (c, w) in coords.iter_mut().zip(rest.chunks_exact(4)).take(n) {
            *c = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
        Ok((checked(dims, coords)?, &rest[4 * n..]))
    }
}

/// `Index { dims, coords }` if it keeps the invariant (see the module docs): the key form's
/// unused bytes are zero.
fn checked(dims: u8, coords: [u32; MAX_DIMS]) -> std::result::Result<Index, &'static str> {
    if dims & KEY_FLAG != 0 {
        let len = usize::from(dims & !KEY_FLAG);
        let n = len.div_ceil(4);
        let spare = 4 * n - len;
        if spare > 0 && coords[n - 1].to_le_bytes()[4 - spare..] != [0u8; 4][..spare] {
            return Err("an index key with bytes past its length");
        }
    }
    Ok(Index { dims, coords })
}

impl Serialize for Index {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let n = self.words();
        let mut t = s.serialize_tuple(1 + n)?;
        t.serialize_element(&self.dims)?;
        for c in &self.coords[..n] {
            t.serialize_element(c)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Index {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Index, D::Error> {
        struct IndexVisitor;
        impl<'de> Visitor<'de> for IndexVisitor {
            type Value = Index;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array index: a dimension byte, then its coordinates")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Index, A::Error> {
                let dims: u8 = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let n = words_of(dims).ok_or_else(|| {
                    crate::wire::custom_error::<A::Error>(format!(
                        "invalid index dimension byte {dims:#x}"
                    ))
                })?;
                let mut coords = [0u32; MAX_DIMS];
                for (k, c) in coords[..n].iter_mut().enumerate() {
                    *c = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(k + 1, &self))?;
                }
                checked(dims, coords)
                    .map_err(|e| crate::wire::custom_error::<A::Error>(e.to_string()))
            }
        }
        // The tuple's length depends on its first element: announce the longest one (formats
        // that need a length, like postcard, read elements only as they are asked for).
        d.deserialize_tuple(1 + MAX_DIMS, IndexVisitor)
    }
}

impl fmt::Display for Index {
    /// Python tuple notation, as charm4py prints `thisIndex`: `(1, 2)`, `(5,)`, `()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_key() {
            let len = (self.dims & !KEY_FLAG) as usize;
            f.write_str("key:")?;
            for b in self.coords.iter().flat_map(|c| c.to_le_bytes()).take(len) {
                write!(f, "{b:02x}")?;
            }
            return Ok(());
        }
        f.write_str("(")?;
        for (k, c) in self.coords().iter().enumerate() {
            if k > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}")?;
        }
        if self.dims == 1 {
            f.write_str(",")?;
        }
        f.write_str(")")
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A type that names an element of an N-d array: `usize`, tuples of 2–6 `usize`, or [`Index`].
pub trait ArrayIndex: Copy + Send + 'static + fmt::Debug {
    /// Converts to the runtime's index representation.
    ///
    /// # Errors
    /// A coordinate ≥ 2^32.
    fn to_index(&self) -> Result<Index>;
    /// Converts back; `None` if `index` has the wrong number of dimensions for `Self`.
    fn from_index(index: &Index) -> Option<Self>;
    /// Number of dimensions, if fixed by the type (`None` for [`Index`]).
    fn fixed_dims() -> Option<usize>;
}

impl ArrayIndex for Index {
    fn to_index(&self) -> Result<Index> {
        Ok(*self)
    }
    fn from_index(index: &Index) -> Option<Self> {
        Some(*index)
    }
    fn fixed_dims() -> Option<usize> {
        None
    }
}

impl ArrayIndex for usize {
    fn to_index(&self) -> Result<Index> {
        Index::new(&[*self])
    }
    fn from_index(index: &Index) -> Option<Self> {
        (index.dims() == 1).then(|| index.get(0))
    }
    fn fixed_dims() -> Option<usize> {
        Some(1)
    }
}

macro_rules! tuple_index {
    ($n:literal; $($t:ident $k:tt),+) => {
        impl ArrayIndex for ($($t,)+) {
            fn to_index(&self) -> Result<Index> {
                Index::new(&[$(self.$k),+])
            }
            fn from_index(index: &Index) -> Option<Self> {
                (index.dims() == $n).then(|| ($(index.get($k),)+))
            }
            fn fixed_dims() -> Option<usize> {
                Some($n)
            }
        }
    };
}
/// Makes a user key type usable as an array index type (`Array<C, MyKey>`), through
/// [`Index::from_key`]: the type must be `Copy + Debug + Serialize + DeserializeOwned`, and its
/// postcard encoding fit in [`MAX_KEY_BYTES`] bytes. Use it with sparse arrays
/// ([`Array::new_sparse`](crate::Array::new_sparse)).
///
/// ```
/// #[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
/// struct Octant { level: u8, code: u64 }
/// charmrs::index_key!(Octant);
/// use charmrs::ArrayIndex;
/// assert_eq!(Octant::fixed_dims(), Some(charmrs::KEY_DIMS));
/// ```
#[macro_export]
macro_rules! index_key {
    ($t:ty) => {
        impl $crate::ArrayIndex for $t {
            fn to_index(&self) -> $crate::Result<$crate::Index> {
                $crate::Index::from_key(self)
            }
            fn from_index(index: &$crate::Index) -> ::std::option::Option<Self> {
                index.key::<$t>()
            }
            fn fixed_dims() -> ::std::option::Option<usize> {
                ::std::option::Option::Some($crate::KEY_DIMS)
            }
        }
    };
}

tuple_index!(1; usize 0);
tuple_index!(2; usize 0, usize 1);
tuple_index!(3; usize 0, usize 1, usize 2);
tuple_index!(4; usize 0, usize 1, usize 2, usize 3);
tuple_index!(5; usize 0, usize 1, usize 2, usize 3, usize 4);
tuple_index!(6; usize 0, usize 1, usize 2, usize 3, usize 4, usize 5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_carries_only_the_meaningful_words() {
        let scalar = postcard::to_stdvec(&Index::SCALAR).unwrap();
        assert_eq!(scalar, [0], "a scalar index is its dimension byte");
        let i = Index::new(&[1, 300, 5]).unwrap();
        let b = postcard::to_stdvec(&i).unwrap();
        assert_eq!(b.len(), 1 + 1 + 2 + 1);
        assert_eq!(postcard::from_bytes::<Index>(&b).unwrap(), i);
        let k = Index::from_key(&(7u8, 1_000_000u32)).unwrap();
        let b = postcard::to_stdvec(&k).unwrap();
        assert_eq!(postcard::from_bytes::<Index>(&b).unwrap(), k);
        // Followed by other data, it stops at its own end.
        let both = postcard::to_stdvec(&(i, 9u8)).unwrap();
        assert_eq!(postcard::from_bytes::<(Index, u8)>(&both).unwrap(), (i, 9));
    }

    #[test]
    fn hostile_wire_indices_are_refused() {
        // Seven dimensions.
        assert!(postcard::from_bytes::<Index>(&[7, 1, 1, 1, 1, 1, 1, 1]).is_err());
        // A key longer than MAX_KEY_BYTES.
        assert!(postcard::from_bytes::<Index>(&[KEY_FLAG | 25]).is_err());
        // A 1-byte key whose word has bytes past the key.
        let bad = postcard::to_stdvec(&(KEY_FLAG | 1, 0x0102u32)).unwrap();
        assert!(postcard::from_bytes::<Index>(&bad).is_err());
        let good = postcard::to_stdvec(&(KEY_FLAG | 1, 0x02u32)).unwrap();
        assert!(postcard::from_bytes::<Index>(&good).is_ok());
        // Truncated.
        assert!(postcard::from_bytes::<Index>(&[2, 5]).is_err());
    }

    #[test]
    fn display_like_python_tuples() {
        assert_eq!(Index::SCALAR.to_string(), "()");
        assert_eq!(Index::one(5).unwrap().to_string(), "(5,)");
        assert_eq!((1usize, 2usize).to_index().unwrap().to_string(), "(1, 2)");
    }

    #[test]
    fn linear_roundtrip_all_dims() {
        for nd in 1..=MAX_DIMS {
            let extents: Vec<usize> = (0..nd).map(|d| d + 2).collect();
            let dims = Index::new(&extents).unwrap();
            for pos in 0..dims.volume() {
                let i = Index::from_linear(pos, &dims);
                assert!(i.within(&dims));
                assert_eq!(i.linear(&dims), pos);
            }
        }
    }

    #[test]
    fn bad_indices_are_named() {
        let e = Index::new(&[1; 7]).unwrap_err();
        assert!(e.to_string().contains("at most 6"), "{e}");
        let e = Index::new(&[1usize << 40]).unwrap_err();
        assert!(e.to_string().contains(&(1usize << 40).to_string()), "{e}");
        assert_eq!(<(usize, usize)>::from_index(&Index::one(3).unwrap()), None);
    }
}
