//! What a dropped layer gave up on: the messages it had accepted for sending that are not known
//! delivered when its shutdown ends, per peer process and why, and the one line it prints on
//! stderr about them (see `OfiLayer`'s drop). Counted at drop time from the engines' own
//! structures (queues, registrations waiting for their reader's acknowledgement, eager sends
//! the provider holds, and what was dropped for a peer that left or was lost). The send path
//! adds only a plain per-peer count of eager sends the provider has not completed (no atomic).
//! Nothing is printed once the runtime said the job is ending (`MachineLayer::stopping`).

use std::time::Duration;

use charmrs_transport::ProcessId;

/// Processes named in one group of the line; the rest are summed up.
const NAMED: usize = 8;

/// Why messages to a peer process were given up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Why {
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
    /// [`TransportError::PeerLost`]: charmrs_transport::TransportError::PeerLost
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
pub(crate) struct Tally {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

impl Tally {
    /// One message of `bytes` bytes more.
    pub(crate) fn add(&mut self, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes;
    }

    /// One message of `bytes` bytes less.
    pub(crate) fn sub(&mut self, bytes: usize) {
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    fn merge(&mut self, other: Tally) {
        self.messages += other.messages;
        self.bytes += other.bytes;
    }

    fn is_empty(&self) -> bool {
        self.messages == 0
    }
}

/// What a dropped layer gave up on, per peer process and why.
#[derive(Debug, Default)]
pub(crate) struct Undelivered {
    entries: Vec<(ProcessId, Why, Tally)>,
}

impl Undelivered {
    /// `tally` messages to `process`, given up on for `why` (nothing if the tally is empty).
    pub(crate) fn add(&mut self, process: ProcessId, why: Why, tally: Tally) {
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
    pub(crate) fn line(&self, layer: &str, rank: ProcessId, linger: Duration) -> Option<String> {
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
            let who = listing(&group, true);
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
            count(total),
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
                count(sum),
                listing(&reported, false)
            ));
        }
        Some(line)
    }
}

/// "3 messages (3145728 bytes)".
fn count(t: Tally) -> String {
    format!(
        "{} message{} ({} byte{})",
        t.messages,
        if t.messages == 1 { "" } else { "s" },
        t.bytes,
        if t.bytes == 1 { "" } else { "s" }
    )
}

/// "process 0 (3 messages, 3145728 bytes), process 2 (...)": the first [`NAMED`] processes
/// (with what was given up on towards each when `detail`), then "and N more processes (...)".
fn listing(group: &[&(ProcessId, Why, Tally)], detail: bool) -> String {
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
            format!(
                "process {p} ({} message{}, {} byte{}{reason})",
                t.messages,
                if t.messages == 1 { "" } else { "s" },
                t.bytes,
                if t.bytes == 1 { "" } else { "s" }
            )
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
            count(rest)
        ));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
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
