//! Command-line and environment options of the runtime (Charm++ conventions: `+pN`, …).
//!
//! The runtime takes its own `+` options out of the argument list and hands the rest to the
//! program (argument 0, the program name, stays first). A literal `--` ends option parsing: what
//! follows goes to the program untouched. Invariant: any argument starting with `+` that is not an
//! option of [`OPTIONS`] is an error that lists the valid ones — never silently passed on or
//! ignored. That includes every `++` argument: the runtime has no `++` option (`++ppn` is
//! charmrun's, which takes it out of the arguments before starting the program).

use crate::error::{Error, Result};
use std::time::Duration;

/// The runtime's options, with one line of help each.
pub const OPTIONS: &[(&str, &str)] = &[
    (
        "+pN, +p N",
        "number of PEs (worker threads); default: $CHARMRS_PES, else the number of cores",
    ),
    (
        "+noaffinity",
        "do not pin PE threads to cores (pinning is on when PEs <= cores)",
    ),
    (
        "+idlespin US",
        "microseconds an idle PE polls before it sleeps (default 100)",
    ),
    (
        "+wirecheck",
        "send messages between PEs through the inter-process wire format (a check)",
    ),
    (
        "+machine NAME",
        "machine layer of a multi-process job: ucx, ofi, tcp or local (default: $CHARMRS_MACHINE, \
         else ucx if built in, else ofi if built in, else tcp)",
    ),
    (
        "+balancer NAME",
        "load-balancing strategy for at_sync: GreedyRefine, Greedy, Refine, Hierarchical, \
         Rotate, Random, Dummy (default: none, no migration)",
    ),
    (
        "+LBDebug",
        "print objects, migrations and max/avg load before and after each balancing step",
    ),
    (
        "+LBPeriod SECONDS",
        "also balance periodically, every SECONDS, without waiting for at_sync (needs +balancer)",
    ),
    (
        "+LBDump FILE",
        "write the load data of each balancing step to FILE.<step> (input for lbsim)",
    ),
    (
        "+trace FILE",
        "write each PE's timeline to FILE (Chrome/Perfetto trace JSON; FILE with the rank before \
         its extension per process) and print a time-per-entry summary",
    ),
];

/// Parsed runtime options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Number of PEs, if given.
    pub pes: Option<usize>,
    /// Pin PE threads to cores when there are enough cores.
    pub affinity: bool,
    /// How long an idle PE polls before parking.
    pub idle_spin: Duration,
    /// Encode and decode every message between PEs as if it crossed processes.
    pub wire_check: bool,
    /// Run as a one-process job even if started by a launcher (embedded jobs: tests, benches).
    pub local_only: bool,
    /// Machine layer named by `+machine`, if any.
    pub machine: Option<String>,
    /// Load-balancing strategy (a name `charmrs_lb::strategy_by_name` knows); `None`: none.
    pub balancer: Option<String>,
    /// Print each balancing step.
    pub lb_debug: bool,
    /// Write each balancing step's load data to `<path>.<step>`.
    pub lb_dump: Option<String>,
    /// Balance every this many milliseconds as well (periodic mode).
    pub lb_period_ms: Option<u64>,
    /// Write each PE's timeline to this Chrome/Perfetto trace file at the end of the job, and
    /// print a summary (see [`Runtime::trace`](crate::Runtime::trace)).
    pub trace: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pes: None,
            affinity: true,
            idle_spin: Duration::from_micros(100),
            wire_check: false,
            local_only: false,
            machine: None,
            balancer: None,
            lb_debug: false,
            lb_dump: None,
            lb_period_ms: None,
            trace: None,
        }
    }
}

fn usage() -> String {
    let mut s = String::from("valid runtime options are:\n");
    for (opt, help) in OPTIONS {
        s.push_str(&format!("  {opt:<16} {help}\n"));
    }
    s.push_str("  --               end of runtime options; the rest goes to the program");
    s
}

fn bad(msg: String) -> Error {
    Error::Options(format!("{msg}\n{}", usage()))
}

/// Records a `+p` value; a second one that differs is an error (which one was meant?).
fn set_pes(pes: &mut Option<usize>, n: usize) -> Result<()> {
    match *pes {
        Some(before) if before != n => Err(bad(format!(
            "+p given twice, as {before} and as {n}: give it once"
        ))),
        _ => {
            *pes = Some(n);
            Ok(())
        }
    }
}

fn parse_pes(text: &str, origin: &str) -> Result<usize> {
    match text.parse::<usize>() {
        Ok(0) => Err(bad(format!(
            "{origin}: the number of PEs must be at least 1"
        ))),
        Ok(n) if n > crate::MAX_PES => Err(bad(format!(
            "{origin}: {n} PEs is more than a job may have ({})",
            crate::MAX_PES
        ))),
        Ok(n) => Ok(n),
        Err(_) => Err(bad(format!("{origin}: `{text}` is not a number of PEs"))),
    }
}

impl Options {
    /// Splits `args` (including the program name) into runtime options and program arguments;
    /// `env_pes` is the value of `CHARMRS_PES`, if set.
    ///
    /// # Errors
    /// An unknown `+` option, `+p0`, or a value that is not a number; the message lists the valid
    /// options.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env_pes: Option<String>,
    ) -> Result<(Options, Vec<String>)> {
        let mut opts = Options::default();
        if let Some(v) = env_pes {
            opts.pes = Some(parse_pes(v.trim(), "CHARMRS_PES")?);
        }
        // `+p` overrides `CHARMRS_PES`; only two `+p`s that differ are an error.
        let mut flag_pes = None;
        let mut rest = Vec::new();
        let mut args = args.into_iter();
        if let Some(program) = args.next() {
            rest.push(program);
        }
        while let Some(arg) = args.next() {
            if arg == "--" {
                rest.extend(args.by_ref());
                break;
            }
            if !arg.starts_with('+') {
                rest.push(arg);
                continue;
            }
            let mut value_of = |name: &str| {
                args.next()
                    .ok_or_else(|| bad(format!("{name} needs a value")))
            };
            match arg.as_str() {
                "+p" => set_pes(&mut flag_pes, parse_pes(&value_of("+p")?, "+p")?)?,
                "+noaffinity" => opts.affinity = false,
                "+wirecheck" => opts.wire_check = true,
                "+balancer" => {
                    let name = value_of("+balancer")?;
                    charmrs_lb::strategy_by_name(&name)
                        .map_err(|e| bad(format!("+balancer: {e}")))?;
                    opts.balancer = Some(name);
                }
                "+LBDebug" => opts.lb_debug = true,
                "+machine" => {
                    let name = value_of("+machine")?;
                    if !crate::machine::MACHINES.contains(&name.as_str()) {
                        return Err(bad(format!(
                            "+machine: unknown machine layer `{name}`; valid: {}",
                            crate::machine::MACHINES.join(", ")
                        )));
                    }
                    opts.machine = Some(name);
                }
                "+LBDump" => opts.lb_dump = Some(value_of("+LBDump")?),
                "+trace" => opts.trace = Some(value_of("+trace")?.into()),
                "+LBPeriod" => {
                    let v = value_of("+LBPeriod")?;
                    let secs = v.parse::<f64>().ok().filter(|s| *s > 0.0 && s.is_finite());
                    let secs = secs.ok_or_else(|| {
                        bad(format!(
                            "+LBPeriod: `{v}` is not a positive number of seconds"
                        ))
                    })?;
                    opts.lb_period_ms = Some((secs * 1e3).ceil() as u64);
                }
                "+idlespin" => {
                    let v = value_of("+idlespin")?;
                    let us = v.parse::<u64>().map_err(|_| {
                        bad(format!("+idlespin: `{v}` is not a number of microseconds"))
                    })?;
                    opts.idle_spin = Duration::from_micros(us);
                }
                a if a.starts_with("+p") && a[2..].chars().all(|c| c.is_ascii_digit()) => {
                    set_pes(&mut flag_pes, parse_pes(&a[2..], a)?)?
                }
                a if a.starts_with("+p") => {
                    return Err(bad(format!("{a}: `{}` is not a number of PEs", &a[2..])));
                }
                a => return Err(bad(format!("unknown runtime option `{a}`"))),
            }
        }
        if flag_pes.is_some() {
            opts.pes = flag_pes;
        }
        Ok((opts, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Options, Vec<String>)> {
        Options::parse(args.iter().map(|s| s.to_string()), None)
    }

    #[test]
    fn strips_runtime_options() {
        let (o, rest) = parse(&["app", "+p4", "3", "x", "+noaffinity"]).unwrap();
        assert_eq!(o.pes, Some(4));
        assert!(!o.affinity);
        assert_eq!(rest, vec!["app", "3", "x"]);
        let (o, _) = parse(&["app", "+p", "2"]).unwrap();
        assert_eq!(o.pes, Some(2));
        let (_, rest) = parse(&["app", "--", "+p9", "y"]).unwrap();
        assert_eq!(rest, vec!["app", "+p9", "y"]);
    }

    #[test]
    fn errors_name_the_option_and_list_valid_ones() {
        for (args, needle) in [
            (&["app", "+p0"][..], "at least 1"),
            (&["app", "+pfoo"][..], "`foo` is not a number"),
            (&["app", "+bogus"][..], "unknown runtime option `+bogus`"),
            (&["app", "+p"][..], "+p needs a value"),
            (
                &["app", "+p3", "+p", "5"][..],
                "+p given twice, as 3 and as 5: give it once",
            ),
            (
                &["app", "+p16777217"][..],
                "16777217 PEs is more than a job may have",
            ),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert!(e.contains("+noaffinity"), "lists valid options: {e}");
        }
        let e = Options::parse(["app".to_string()], Some("zero".into())).unwrap_err();
        assert!(e.to_string().contains("CHARMRS_PES"), "{e}");
        // `+p` overrides `CHARMRS_PES` (no "given twice"), and the same `+p` twice is fine.
        let args = ["app", "+p3", "+p", "3"].map(String::from);
        let (o, _) = Options::parse(args, Some("2".into())).unwrap();
        assert_eq!(o.pes, Some(3));
    }
}
