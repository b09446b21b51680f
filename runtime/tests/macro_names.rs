//! What `#[chare]` accepts in an entry's signature and attributes: `Self` in argument and return
//! types, `#[cfg]` on an entry, and the list of entry names it refuses because an inherent proxy
//! method would hide them (checked against the proxy types' sources).

// `#[cfg(all())]` (always on) is what the test wants, not a condition to simplify.
#![allow(clippy::non_minimal_cfg)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use charmrs::prelude::*;
use common::run_job;

/// A ring node: its entries take and return types that name `Self`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Node {
    id: usize,
    neighbor: Option<ElementProxy<Node>>,
    absorbed: usize,
}

#[chare]
impl Node {
    /// Bytes in a `take_bytes` message (a `Self::N` path in an argument type).
    const N: usize = 4;

    fn new(ctx: &Ctx<Self>) -> Self {
        Node {
            id: ctx.index::<usize>(),
            neighbor: None,
            absorbed: 0,
        }
    }

    #[entry]
    fn set_neighbor(&mut self, n: ElementProxy<Self>) {
        self.neighbor = Some(n);
    }

    #[entry]
    fn neighbor(&self) -> Option<ElementProxy<Self>> {
        self.neighbor
    }

    /// Asks the neighbor for its id, through the proxy it was given.
    #[entry]
    async fn neighbor_id(this: Coro<Self>) -> usize {
        let n = this.with(|s, _| s.neighbor).expect("a neighbor was set");
        n.ret().my_id().await
    }

    #[entry]
    fn my_id(&self) -> usize {
        self.id
    }

    #[entry]
    fn snapshot(&self) -> Vec<Self> {
        vec![self.clone()]
    }

    #[entry]
    fn absorb(&mut self, others: Vec<Self>) -> usize {
        self.absorbed += others.len();
        self.absorbed
    }

    #[entry]
    fn take_bytes(&mut self, bytes: [u8; Self::N]) -> usize {
        bytes.iter().map(|&b| b as usize).sum()
    }

    /// Never compiled: it names a field that does not exist, so the items generated for it
    /// must be left out with it.
    #[cfg(any())]
    #[entry(when = "self.no_such_field == x")]
    fn never(&mut self, x: u32) {
        self.no_such_field += x;
    }

    /// Never compiled either, through `cfg_attr`.
    #[cfg_attr(all(), cfg(any()))]
    #[entry]
    fn never_either(&mut self) {
        self.no_such_field += 1;
    }

    /// Always compiled.
    #[cfg(all())]
    #[entry]
    fn always(&self) -> u32 {
        7
    }
}

#[test]
fn entries_with_self_in_their_types_and_cfg_entries_are_called() {
    run_job(2, |_| async {
        let ring = Array::<Node, usize>::new(3, ());
        for i in 0..3 {
            ring.at(i).set_neighbor(ring.at((i + 1) % 3));
        }
        let n: Option<ElementProxy<Node>> = ring.at(2).ret().neighbor().await;
        assert_eq!(n.expect("set").index(), ring.at(0).index());
        assert_eq!(ring.at(0).ret().neighbor_id().await, 1);
        assert_eq!(ring.at(2).ret().neighbor_id().await, 0);

        let snap: Vec<Node> = ring.at(1).ret().snapshot().await;
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].id, 1);
        assert_eq!(
            snap[0].neighbor.map(|p| p.index()),
            Some(ring.at(2).index())
        );
        assert_eq!(ring.at(0).ret().absorb(snap.clone()).await, 1);
        assert_eq!(ring.at(0).ret().absorb(snap).await, 2);
        assert_eq!(ring.at(1).ret().take_bytes([1, 2, 3, 4]).await, 10);

        assert_eq!(ring.at(2).ret().always().await, 7);
        assert_eq!(ring.gather().always().await, vec![7, 7, 7]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// A chare made by a `macro_rules!` that passes on its `when` condition: the string carries the
/// macro's hygiene, under which `self` and the entry's arguments would not be found.
macro_rules! sequencer {
    ($name:ident, $condition:literal) => {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct $name {
            next: u64,
            seen: Vec<u64>,
        }

        #[chare]
        impl $name {
            fn new() -> Self {
                $name {
                    next: 0,
                    seen: Vec::new(),
                }
            }

            #[entry(when = $condition)]
            fn step(&mut self, k: u64) {
                self.seen.push(k);
                self.next = k + 1;
            }

            #[entry]
            fn seen(&mut self) -> Vec<u64> {
                self.seen.clone()
            }
        }
    };
}

sequencer!(Sequencer, "self.next == k");

#[test]
fn a_when_condition_passed_through_a_macro_rules_resolves_at_the_chare() {
    run_job(2, |_| async {
        let s = Single::<Sequencer>::new((), Some(1));
        for k in (0..6).rev() {
            s.step(k);
        }
        charmrs::wait_qd().await;
        assert_eq!(s.ret().seen().await, vec![0, 1, 2, 3, 4, 5]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// The types the generated proxy traits are implemented for, and the files with their inherent
/// methods.
const PROXY_TYPES: &[&str] = &[
    "ElementProxy",
    "Proxy",
    "Group",
    "Array",
    "Single",
    "Section",
    "Ret",
    "Gather",
];

/// The inherent `pub` methods taking `self` of the proxy types, as (type, method), read from the
/// runtime's sources: every top-level `impl<…> Type<…> {` block (not `impl Trait for`) and the
/// `pub fn` / `pub async fn` in it whose first parameter is a `self`.
fn inherent_proxy_methods(src: &Path) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                files.push(e.unwrap().path());
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut current: Option<&str> = None;
        let mut pending = String::new();
        let lines: Vec<&str> = text.lines().collect();
        for (at, &line) in lines.iter().enumerate() {
            if line.starts_with("impl") {
                // The header may continue over several lines up to its `{`.
                pending = line.to_string();
            } else if !pending.is_empty() {
                pending.push(' ');
                pending.push_str(line.trim());
            }
            if !pending.is_empty() && pending.contains('{') {
                let header = std::mem::take(&mut pending);
                current = None;
                if !header.contains(" for ") {
                    // `impl<C: Chare, I> crate::Array<C, I>`: the type is the last path
                    // segment before its `<` after the generics of the `impl`.
                    let after_generics = match header.strip_prefix("impl<") {
                        Some(rest) => skip_angle(rest),
                        None => header.strip_prefix("impl").unwrap_or(""),
                    };
                    let ty_path = after_generics.trim_start().split(['<', ' ', '{']).next();
                    let ty = ty_path.and_then(|p| p.rsplit("::").next()).unwrap_or("");
                    current = PROXY_TYPES.iter().copied().find(|t| *t == ty);
                }
                continue;
            }
            if line == "}" {
                current = None;
                continue;
            }
            let Some(ty) = current else { continue };
            let Some(rest) = line
                .strip_prefix("    pub fn ")
                .or_else(|| line.strip_prefix("    pub async fn "))
                .or_else(|| line.strip_prefix("    pub const fn "))
            else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // The first parameter, after the method's own generics.
            let params = rest[name.len()..].trim_start();
            let params = match params.strip_prefix('<') {
                Some(p) => skip_angle(p),
                None => params,
            };
            let mut first = params.trim_start_matches('(').trim_start();
            if first.is_empty() {
                // `pub fn name(` with one parameter a line.
                first = lines.get(at + 1).map_or("", |l| l.trim_start());
            }
            let first = first
                .trim_start_matches('&')
                .trim_start_matches("'_ ")
                .trim_start_matches("mut ");
            if first.starts_with("self") {
                found.insert((ty.to_string(), name));
            }
        }
    }
    found
}

/// The rest of `s` after the `>` closing an already opened `<`.
fn skip_angle(s: &str) -> &str {
    let mut depth = 1;
    for (k, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => {
                depth -= 1;
                if depth == 0 {
                    return &s[k + 1..];
                }
            }
            _ => {}
        }
    }
    ""
}

/// `#[chare]` refuses an entry named like an inherent method of a proxy type (such an entry
/// would never be sent from that type). Its list must be exactly those methods: a method added
/// to a proxy type is to be added to `PROXY_METHODS` in runtime/macros/src/lib.rs.
#[test]
fn the_refused_entry_names_are_the_inherent_proxy_methods() {
    let listed: BTreeSet<(String, String)> = charmrs_macros::__proxy_method_names!()
        .iter()
        .map(|(t, m)| (t.to_string(), m.to_string()))
        .collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let actual = inherent_proxy_methods(&src);
    // The scan itself found the methods it must (a broken scan would find nothing).
    for known in [
        ("ElementProxy", "index"),
        ("Proxy", "at"),
        ("Array", "dims"),
    ] {
        assert!(
            actual.contains(&(known.0.to_string(), known.1.to_string())),
            "the scan of runtime/src missed {known:?}: {actual:?}"
        );
    }
    let missing: Vec<_> = actual.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&actual).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "PROXY_METHODS in runtime/macros/src/lib.rs is out of date: add {missing:?}, \
         remove {stale:?}"
    );
}
