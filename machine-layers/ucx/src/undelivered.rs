//! What a dropped layer gave up on: the messages it had accepted for sending that are not known
//! delivered when its shutdown ends — sends UCX did not complete (eager ones, and large ones
//! whose data the receiver never fetched), whether still held or cancelled by an endpoint's
//! forced close — per peer process and why, and the one line it prints on stderr about them
//! (see `UcxLayer`'s drop). Counted at drop time from the counts the inbox keeps anyway (sends
//! UCX holds per peer; failed sends, on the failure path only): their bytes are not known
//! without counting on the send path, and are not given. Nothing is printed once the runtime
//! said the job is ending (`MachineLayer::stopping`).

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

/// What a dropped layer gave up on: messages per peer process and why.
#[derive(Debug, Default)]
pub(crate) struct Undelivered {
    entries: Vec<(ProcessId, Why, usize)>,
}

impl Undelivered {
    /// `messages` to `process`, given up on for `why` (nothing if none).
    pub(crate) fn add(&mut self, process: ProcessId, why: Why, messages: usize) {
        if messages == 0 {
            return;
        }
        match self
            .entries
            .iter_mut()
            .find(|(p, w, _)| *p == process && w.same_kind(&why))
        {
            Some((_, _, n)) => *n += messages,
            None => self.entries.push((process, why, messages)),
        }
    }

    /// Adds what `other` gave up on (another worker's).
    pub(crate) fn merge(&mut self, other: Undelivered) {
        for (p, why, n) in other.entries {
            self.add(p, why, n);
        }
    }

    /// The line to print on stderr, `None` when nothing was given up on but towards peers whose
    /// loss the runtime was told of already (those are mentioned at the end of a line printed
    /// anyway). `layer` opens it (`charmrs-ucx`), then this process's `rank`; `linger` is the
    /// layer's. For example:
    ///
    /// ```text
    /// charmrs-ucx: process 1: 3 messages sent before the layer was dropped are not known
    /// delivered: process 0 (3 messages) did not take them before the linger of 200 ms ran out
    /// ```
    pub(crate) fn line(&self, layer: &str, rank: ProcessId, linger: Duration) -> Option<String> {
        let mut total = 0;
        let mut groups = Vec::new();
        for kind in [Why::Linger, Why::Left, Why::Lost(String::new())] {
            let mut group: Vec<&(ProcessId, Why, usize)> = self
                .entries
                .iter()
                .filter(|(_, w, _)| w.same_kind(&kind))
                .collect();
            if group.is_empty() {
                continue;
            }
            group.sort_by_key(|(p, _, _)| *p);
            total += group.iter().map(|(_, _, n)| n).sum::<usize>();
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
            if total == 1 { "is" } else { "are" },
            groups.join("; ")
        );
        let mut reported: Vec<&(ProcessId, Why, usize)> = self
            .entries
            .iter()
            .filter(|(_, w, _)| *w == Why::Reported)
            .collect();
        if !reported.is_empty() {
            reported.sort_by_key(|(p, _, _)| *p);
            line.push_str(&format!(
                "; besides, {} to {} reported lost already",
                count(reported.iter().map(|(_, _, n)| n).sum()),
                listing(&reported, false)
            ));
        }
        Some(line)
    }
}

/// "3 messages".
fn count(n: usize) -> String {
    format!("{n} message{}", if n == 1 { "" } else { "s" })
}

/// "process 0 (3 messages), process 2 (...)": the first [`NAMED`] processes (with what was
/// given up on towards each when `detail`), then "and N more processes (...)".
fn listing(group: &[&(ProcessId, Why, usize)], detail: bool) -> String {
    let mut parts: Vec<String> = group
        .iter()
        .take(NAMED)
        .map(|(p, why, n)| {
            if !detail {
                return format!("process {p}");
            }
            let reason = match why {
                Why::Lost(r) if !r.is_empty() => format!("; {r}"),
                _ => String::new(),
            };
            format!("process {p} ({}{reason})", count(*n))
        })
        .collect();
    if group.len() > NAMED {
        let rest = group[NAMED..].iter().map(|(_, _, n)| n).sum();
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

    const LINGER: Duration = Duration::from_millis(200);

    #[test]
    fn nothing_given_up_on_prints_nothing() {
        let mut u = Undelivered::default();
        assert_eq!(u.line("charmrs-ucx", 1, LINGER), None);
        u.add(0, Why::Linger, 0);
        assert_eq!(u.line("charmrs-ucx", 1, LINGER), None, "no message");
        // Towards a peer the runtime was told is lost: no line of its own.
        u.add(2, Why::Reported, 4);
        assert_eq!(u.line("charmrs-ucx", 1, LINGER), None);
    }

    #[test]
    fn the_line_names_the_rank_counts_peers_and_why() {
        let mut u = Undelivered::default();
        u.add(0, Why::Linger, 1);
        assert_eq!(
            u.line("charmrs-ucx", 1, LINGER).unwrap(),
            "charmrs-ucx: process 1: 1 message sent before the layer was dropped is not known \
             delivered: process 0 (1 message) did not take them before the linger of 200 ms \
             ran out"
        );
        // Another worker's.
        let mut other = Undelivered::default();
        other.add(0, Why::Linger, 2);
        other.add(3, Why::Left, 1);
        other.add(
            2,
            Why::Lost("its process (pid 7) no longer exists".into()),
            1,
        );
        other.add(5, Why::Reported, 2);
        u.merge(other);
        u.add(2, Why::Lost("another reason".into()), 1);
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
        let mut u = Undelivered::default();
        for p in (0..10).rev() {
            u.add(p, Why::Left, p as usize + 1);
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
