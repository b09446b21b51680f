//! The segment list of a [`Message`](crate::Message).
//!
//! # What this module owns
//!
//! [`Segments`]: an ordered list of [`Bytes`] that holds a single segment in place and any other
//! number in a vector. Most messages of a running job are one segment (an encoded call, a small
//! value); as a plain `Vec` each of them cost an allocation and a free on the sending and on the
//! receiving side.
//!
//! # Invariants
//!
//! * The order of segments is the order they were pushed in, whatever the form.
//! * The empty list is a vector with no capacity (no allocation).

use std::ops::Deref;

use bytes::Bytes;

/// An ordered list of message segments; see the module docs.
///
/// ```
/// use bytes::Bytes;
/// use charmrs_transport::Segments;
/// let mut s = Segments::new();
/// s.push(Bytes::from_static(b"args"));
/// s.push(Bytes::from_static(b"data"));
/// assert_eq!(s.len(), 2);
/// let (first, rest) = s.split_first().unwrap();
/// assert_eq!(&first[..], b"args");
/// assert_eq!(&rest[0][..], b"data");
/// ```
#[derive(Clone)]
pub struct Segments(Repr);

#[derive(Clone)]
enum Repr {
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Segments {
    /// No segments (no allocation).
    pub const fn new() -> Segments {
        Segments(Repr::Many(Vec::new()))
    }

    /// Appends `segment`.
    pub fn push(&mut self, segment: Bytes) {
        match &mut self.0 {
            Repr::Many(v) if v.is_empty() && v.capacity() == 0 => self.0 = Repr::One(segment),
            Repr::Many(v) => v.push(segment),
            Repr::One(first) => {
                let first = std::mem::take(first);
                self.0 = Repr::Many(vec![first, segment]);
            }
        }
    }

    /// Removes every segment (dropping them).
    pub fn clear(&mut self) {
        match &mut self.0 {
            Repr::Many(v) => v.clear(),
            Repr::One(_) => self.0 = Repr::Many(Vec::new()),
        }
    }

    /// The first segment and the others, or `None` if there is none.
    pub fn split_first(self) -> Option<(Bytes, Vec<Bytes>)> {
        match self.0 {
            Repr::One(b) => Some((b, Vec::new())),
            Repr::Many(mut v) if !v.is_empty() => {
                let first = v.remove(0);
                Some((first, v))
            }
            Repr::Many(_) => None,
        }
    }
}

impl Default for Segments {
    fn default() -> Segments {
        Segments::new()
    }
}

impl Deref for Segments {
    type Target = [Bytes];
    #[inline]
    fn deref(&self) -> &[Bytes] {
        match &self.0 {
            Repr::One(b) => std::slice::from_ref(b),
            Repr::Many(v) => v,
        }
    }
}

impl From<Bytes> for Segments {
    /// One segment.
    fn from(segment: Bytes) -> Segments {
        Segments(Repr::One(segment))
    }
}

impl From<Vec<Bytes>> for Segments {
    /// Takes over the vector (no copy, no allocation).
    fn from(v: Vec<Bytes>) -> Segments {
        Segments(Repr::Many(v))
    }
}

impl From<Segments> for Vec<Bytes> {
    fn from(s: Segments) -> Vec<Bytes> {
        match s.0 {
            Repr::One(b) => vec![b],
            Repr::Many(v) => v,
        }
    }
}

impl FromIterator<Bytes> for Segments {
    fn from_iter<I: IntoIterator<Item = Bytes>>(iter: I) -> Segments {
        let mut s = Segments::new();
        for b in iter {
            s.push(b);
        }
        s
    }
}

impl IntoIterator for Segments {
    type Item = Bytes;
    type IntoIter = std::vec::IntoIter<Bytes>;
    fn into_iter(self) -> Self::IntoIter {
        Vec::from(self).into_iter()
    }
}

impl<'a> IntoIterator for &'a Segments {
    type Item = &'a Bytes;
    type IntoIter = std::slice::Iter<'a, Bytes>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for Segments {
    fn eq(&self, other: &Segments) -> bool {
        **self == **other
    }
}

impl Eq for Segments {}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: u8) -> Bytes {
        Bytes::from(vec![x; 3])
    }

    #[test]
    fn keeps_order_across_forms() {
        for n in 0..5u8 {
            let mut s = Segments::new();
            for i in 0..n {
                s.push(b(i));
            }
            let want: Vec<Bytes> = (0..n).map(b).collect();
            assert_eq!(&s[..], &want[..]);
            assert_eq!(&Segments::from(want.clone())[..], &want[..]);
            assert_eq!(Vec::from(s.clone()), want);
            assert_eq!(s.clone().into_iter().collect::<Vec<_>>(), want);
            match s.clone().split_first() {
                None => assert_eq!(n, 0),
                Some((first, rest)) => {
                    assert_eq!(first, want[0]);
                    assert_eq!(&rest[..], &want[1..]);
                }
            }
            s.clear();
            assert!(s.is_empty());
            s.push(b(9));
            assert_eq!(&s[..], &[b(9)]);
        }
    }
}
