//! What a machine layer gave up on when it was dropped: the messages it had accepted for sending
//! that are not known delivered when its shutdown ends, per peer process and why, and the one
//! line it prints on stderr about them.
//!
//! # What this module owns
//!
//! [`Undelivered`] (the tally, filled by a layer's drop from its own structures) and the line's
//! wording, shared by the UCX and libfabric layers so that both report alike. A layer that
//! knows the bytes of what it gave up on counts them ([`Tally`]); one that does not uses
//! [`Undelivered::messages_only`], and the line then gives messages only.
//!
//! # Invariants
//!
//! * Entries are merged per process and kind of reason (a `Lost` keeps its first reason).
//! * No line when nothing was given up on, or only towards peers whose loss the runtime was
//!   told of already ([`Why::Reported`]: mentioned at the end of a line printed anyway).
//! * A layer prints nothing once the runtime said the job is ending
//!   ([`MachineLayer::stopping`](crate::MachineLayer::stopping)): what `exit` leaves in flight
//!   is discarded by design.

use std::time::Duration;

use crate::ProcessId;

/// Processes named in one group of the line; the rest are summed up.
const NAMED: usize = 8;

/// Why messages to a peer process were given up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The peer is alive as far as this process knows, and did not take them before the linger
    /// ran out.
    Linger,
    /// The peer left (said goodbye: its layer was dropped) before taking them.
    Left,
    /// The peer was lost (this reason), and its loss was never reported to the runtime: during
    /// the shutdown, or reported by the layer but never taken from it.
    Lost(String),
    /// The peer was lost and its loss reported ([`TransportError::PeerLost`]) before the
    /// shutdown: the runtime knows already.
    ///
    /// [`TransportError::PeerLost`]: crate::TransportError::PeerLost
    Reported,
}

impl Why {
    /// Entries of the same kind are merged per process (a `Lost` keeps its first reason).
    fn same_kind(&self, other: &Why) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// A number of messages and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Messages.
    pub messages: usize,
    /// Their bytes (0 for a layer that does not count them: see
    /// [`Undelivered::messages_only`]).
    pub bytes: usize,
}

impl Tally {
    /// `messages` messages of bytes not counted.
    pub fn messages(messages: usize) -> Tally {
        Tally { messages, bytes: 0 }
    }

    /// One message of `bytes` bytes more.
    pub fn add(&mut self, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes;
    }

    /// One message of `bytes` bytes less.
    pub fn sub(&mut self, bytes: usize) {
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Adds `other`'s messages and bytes.
    pub fn merge(&mut self, other: Tally) {
        self.messages += other.messages;
        self.bytes += other.bytes;
    }

    fn is_empty(&self) -> bool {
        self.messages == 0
    }
}

/// What a dropped layer gave up on, per peer process and why.
/// What a dropped layer gave up on, per peer process and why.
#[derive(Debug, Default)]
pub struct Undelivered {
    entries: Vec<(ProcessId, Why, Tally)>,
    /// The layer counts messages, not their bytes: the line gives no bytes.
    messages_only: bool,
}

impl Undelivered {
    /// For a layer that counts messages but not their bytes ([`Tally::messages`]); the default
    /// counts both.
    pub fn messages_only() -> Undelivered {
        Undelivered {
            entries: Vec::new(),
            messages_only: true,
        }
    }

    /// Adds what `other` gave up on (another endpoint's or worker's).
    pub fn merge(&mut self, other: Undelivered) {
        for (p, why, t) in other.entries {
            self.add(p, why, t);
        }
    }

    /// `tally` messages to `process`, given up on for `why` (nothing if the tally is empty).
    pub fn add(&mut self, process: ProcessId, why: Why, tally: Tally) {
        if tally.is_empty() {
            return;
        }
        match self
            .entries
            .iter_mut()
            .find(|(p, w, _)| *p == process && w.same_kind(&why))
        {
            Some((_, _, t)) => t.merge(tally),
            None => self.entries.push((process, why, tally)),
        }
    }

    /// The line to print on stderr, `None` when nothing was given up on but towards peers whose
    /// loss the runtime was told of already (those are mentioned at the end of a line printed
    /// anyway). `layer` opens it (`charmrs-ofi`), then this process's `rank`; `linger` is the
    /// layer's. For example:
    ///
    /// ```text
    /// charmrs-ofi: process 1: 3 messages (3145728 bytes) sent before the layer was dropped are
    /// not known delivered: process 0 (3 messages, 3145728 bytes) did not take them before the
    /// linger of 200 ms ran out
    /// ```
    pub fn line(&self, layer: &str, rank: ProcessId, linger: Duration) -> Option<String> {
        let mut total = Tally::default();
        let mut groups = Vec::new();
        for kind in [Why::Linger, Why::Left, Why::Lost(String::new())] {
            let mut group: Vec<&(ProcessId, Why, Tally)> = self
                .entries
                .iter()
                .filter(|(_, w, _)| w.same_kind(&kind))
                .collect();
            if group.is_empty() {
                continue;
            }
            group.sort_by_key(|(p, _, _)| *p);
            for (_, _, t) in &group {
                total.merge(*t);
            }
            let who = listing(&group, true, self.messages_only);
            groups.push(match kind {
                Why::Linger => format!(
                    "{who} did not take them before the linger of {} ms ran out",
                    linger.as_millis()
                ),
                Why::Left => format!("{who} left (said goodbye) before taking them"),
                _ => format!(
                    "{who} {} lost during the shutdown",
                    if group.len() == 1 { "was" } else { "were" }
                ),
            });
        }
        if groups.is_empty() {
            return None;
        }
        let mut line = format!(
            "{layer}: process {rank}: {} sent before the layer was dropped {} not known \
             delivered: {}",
            count(total, self.messages_only),
            if total.messages == 1 { "is" } else { "are" },
            groups.join("; ")
        );
        let mut reported: Vec<&(ProcessId, Why, Tally)> = self
            .entries
            .iter()
            .filter(|(_, w, _)| *w == Why::Reported)
            .collect();
        if !reported.is_empty() {
            reported.sort_by_key(|(p, _, _)| *p);
            let mut sum = Tally::default();
            for (_, _, t) in &reported {
                sum.merge(*t);
            }
            line.push_str(&format!(
                "; besides, {} to {} reported lost already",
                count(sum, self.messages_only),
                listing(&reported, false, self.messages_only)
            ));
        }
        Some(line)
    }
}

/// "3 messages", then (unless `messages_only`) the bytes: "3 messages (3145728 bytes)".
fn count(t: Tally, messages_only: bool) -> String {
    if messages_only {
        messages(t)
    } else {
        format!("{} ({})", messages(t), bytes(t))
    }
}

/// "3 messages".
fn messages(t: Tally) -> String {
    format!("{} message{}", t.messages, plural(t.messages))
}

/// "3145728 bytes".
fn bytes(t: Tally) -> String {
    format!("{} byte{}", t.bytes, plural(t.bytes))
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// "process 0 (3 messages, 3145728 bytes), process 2 (...)": the first [`NAMED`] processes
/// (with what was given up on towards each when `detail`), then "and N more processes (...)".
fn listing(group: &[&(ProcessId, Why, Tally)], detail: bool, messages_only: bool) -> String {
    let mut parts: Vec<String> = group
        .iter()
        .take(NAMED)
        .map(|(p, why, t)| {
            if !detail {
                return format!("process {p}");
            }
            let reason = match why {
                Why::Lost(r) if !r.is_empty() => format!("; {r}"),
                _ => String::new(),
            };
            if messages_only {
                format!("process {p} ({}{reason})", messages(*t))
            } else {
                format!("process {p} ({}, {}{reason})", messages(*t), bytes(*t))
            }
        })
        .collect();
    if group.len() > NAMED {
        let mut rest = Tally::default();
        for (_, _, t) in &group[NAMED..] {
            rest.merge(*t);
        }
        parts.push(format!(
            "and {} more process{} ({})",
            group.len() - NAMED,
            if group.len() - NAMED == 1 { "" } else { "es" },
            count(rest, messages_only)
        ));
    }
    parts.join(", ")
}

#[cfg(test)]
mod with_bytes {
    use super::*;

    fn t(messages: usize, bytes: usize) -> Tally {
        Tally { messages, bytes }
    }

    const LINGER: Duration = Duration::from_millis(200);

    #[test]
    fn nothing_given_up_on_prints_nothing() {
        let mut u = Undelivered::default();
        assert_eq!(u.line("charmrs-ofi", 1, LINGER), None);
        u.add(0, Why::Linger, Tally::default());
        assert_eq!(u.line("charmrs-ofi", 1, LINGER), None, "an empty tally");
        // Towards a peer the runtime was told is lost: no line of its own.
        u.add(2, Why::Reported, t(4, 40));
        assert_eq!(u.line("charmrs-ofi", 1, LINGER), None);
    }

    #[test]
    fn the_line_names_the_rank_counts_peers_and_why() {
        let mut u = Undelivered::default();
        u.add(0, Why::Linger, t(2, 2 << 20));
        u.add(0, Why::Linger, t(1, 1 << 20)); // another endpoint of process 0
        assert_eq!(
            u.line("charmrs-ofi", 1, LINGER).unwrap(),
            "charmrs-ofi: process 1: 3 messages (3145728 bytes) sent before the layer was \
             dropped are not known delivered: process 0 (3 messages, 3145728 bytes) did not \
             take them before the linger of 200 ms ran out"
        );
        u.add(3, Why::Left, t(1, 8));
        u.add(2, Why::Lost("its process exited".into()), t(1, 1));
        u.add(2, Why::Lost("another reason".into()), t(1, 9));
        u.add(5, Why::Reported, t(2, 20));
        assert_eq!(
            u.line("charmrs-ofi", 1, LINGER).unwrap(),
            "charmrs-ofi: process 1: 6 messages (3145746 bytes) sent before the layer was \
             dropped are not known delivered: process 0 (3 messages, 3145728 bytes) did not \
             take them before the linger of 200 ms ran out; process 3 (1 message, 8 bytes) \
             left (said goodbye) before taking them; process 2 (2 messages, 10 bytes; its \
             process exited) was lost during the shutdown; besides, 2 messages (20 bytes) to \
             process 5 reported lost already"
        );
    }

    #[test]
    fn a_long_list_of_peers_is_cut_after_eight() {
        let mut u = Undelivered::default();
        for p in (0..11).rev() {
            u.add(p, Why::Linger, t(1, 100));
        }
        let line = u.line("charmrs-ofi", 20, LINGER).unwrap();
        assert!(
            line.starts_with(
                "charmrs-ofi: process 20: 11 messages (1100 bytes) sent before the layer was \
                 dropped are not known delivered: process 0 (1 message, 100 bytes), process 1 "
            ),
            "{line}"
        );
        assert!(
            line.contains(
                "process 7 (1 message, 100 bytes), and 3 more processes (3 messages (300 \
                 bytes)) did not take them"
            ),
            "{line}"
        );
        assert!(!line.contains("process 8 "), "{line}");
    }
}

#[cfg(test)]
mod messages_only {
    use super::*;

    const LINGER: Duration = Duration::from_millis(200);

    #[test]
    fn nothing_given_up_on_prints_nothing() {
        let mut u = Undelivered::messages_only();
        assert_eq!(u.line("charmrs-ucx", 1, LINGER), None);
        u.add(0, Why::Linger, Tally::messages(0));
        assert_eq!(u.line("charmrs-ucx", 1, LINGER), None, "no message");
        // Towards a peer the runtime was told is lost: no line of its own.
        u.add(2, Why::Reported, Tally::messages(4));
        assert_eq!(u.line("charmrs-ucx", 1, LINGER), None);
    }

    #[test]
    fn the_line_names_the_rank_counts_peers_and_why() {
        let mut u = Undelivered::messages_only();
        u.add(0, Why::Linger, Tally::messages(1));
        assert_eq!(
            u.line("charmrs-ucx", 1, LINGER).unwrap(),
            "charmrs-ucx: process 1: 1 message sent before the layer was dropped is not known \
             delivered: process 0 (1 message) did not take them before the linger of 200 ms \
             ran out"
        );
        // Another worker's.
        let mut other = Undelivered::messages_only();
        other.add(0, Why::Linger, Tally::messages(2));
        other.add(3, Why::Left, Tally::messages(1));
        other.add(
            2,
            Why::Lost("its process (pid 7) no longer exists".into()),
            Tally::messages(1),
        );
        other.add(5, Why::Reported, Tally::messages(2));
        u.merge(other);
        u.add(2, Why::Lost("another reason".into()), Tally::messages(1));
        assert_eq!(
            u.line("charmrs-ucx", 1, LINGER).unwrap(),
            "charmrs-ucx: process 1: 6 messages sent before the layer was dropped are not known \
             delivered: process 0 (3 messages) did not take them before the linger of 200 ms \
             ran out; process 3 (1 message) left (said goodbye) before taking them; process 2 \
             (2 messages; its process (pid 7) no longer exists) was lost during the shutdown; \
             besides, 2 messages to process 5 reported lost already"
        );
    }

    #[test]
    fn a_long_list_of_peers_is_cut_after_eight() {
        let mut u = Undelivered::messages_only();
        for p in (0..10).rev() {
            u.add(p, Why::Left, Tally::messages(p as usize + 1));
        }
        let line = u.line("charmrs-ucx", 20, LINGER).unwrap();
        assert!(
            line.ends_with(
                "process 7 (8 messages), and 2 more processes (19 messages) left (said \
                 goodbye) before taking them"
            ),
            "{line}"
        );
        assert!(line.contains(": 55 messages sent before"), "{line}");
        assert!(!line.contains("process 8 "), "{line}");
    }
}
