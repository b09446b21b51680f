//! `+LBDump` files: load-balancing input written by a job and replayed by `lbsim --load`.
//!
//! A line-based text format, one record per line, fields separated by single spaces or tabs:
//!
//! ```text
//! charmrs-lbdump 1
//! # anything after '#' is a comment; blank lines are ignored
//! pes 3
//! pe 0 0.25 1
//! pe 1 0 1
//! pe 2 0 0
//! objects 2
//! obj 17 0 1.5 1
//! obj 18 2 0.75 0
//! ```
//!
//! - `charmrs-lbdump 1`: the header and format version; must be the first record.
//! - `pes N`, then exactly N records `pe INDEX BACKGROUND_LOAD AVAILABLE`, INDEX going 0..N in
//!   order, AVAILABLE being `1` or `0`.
//! - `objects M`, then exactly M records `obj ID PE LOAD MIGRATABLE`, ID a u64 unique in the file,
//!   PE < N, MIGRATABLE `1` or `0`.
//! - Loads are finite, non-negative decimal numbers; [`write_dump`] prints them in the shortest
//!   form that reads back to the same `f64`, so a round trip is exact.
//!
//! Errors name the line (1-based) and what was expected there.

use crate::{LbStats, ObjStats, PeStats};
use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The first record of every dump.
pub const HEADER: &str = "charmrs-lbdump 1";

/// What went wrong reading a dump.
#[derive(Debug)]
pub enum DumpError {
    /// The file could not be opened or read.
    Io {
        /// The file, when reading from a path.
        path: Option<PathBuf>,
        /// The underlying error.
        source: io::Error,
    },
    /// The content does not follow the format.
    Parse {
        /// The file, when reading from a path.
        path: Option<PathBuf>,
        /// 1-based line number (the line after the last one for a truncated file).
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl DumpError {
    fn with_path(self, p: &Path) -> Self {
        match self {
            DumpError::Io { source, .. } => DumpError::Io {
                path: Some(p.into()),
                source,
            },
            DumpError::Parse { line, message, .. } => DumpError::Parse {
                path: Some(p.into()),
                line,
                message,
            },
        }
    }
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::Io {
                path: Some(p),
                source,
            } => {
                write!(f, "cannot read LB dump {}: {source}", p.display())
            }
            DumpError::Io { path: None, source } => write!(f, "cannot read LB dump: {source}"),
            DumpError::Parse {
                path,
                line,
                message,
            } => {
                let name = path
                    .as_ref()
                    .map_or("LB dump".to_string(), |p| p.display().to_string());
                write!(f, "{name}:{line}: {message}")
            }
        }
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DumpError::Io { source, .. } => Some(source),
            DumpError::Parse { .. } => None,
        }
    }
}

/// Writes `stats` in the dump format.
pub fn write_dump<W: Write>(stats: &LbStats, out: W) -> io::Result<()> {
    let mut w = BufWriter::new(out);
    writeln!(w, "{HEADER}")?;
    writeln!(w, "pes {}", stats.pes.len())?;
    for (i, p) in stats.pes.iter().enumerate() {
        writeln!(w, "pe {i} {} {}", p.background_load, u8::from(p.available))?;
    }
    writeln!(w, "objects {}", stats.objects.len())?;
    for o in &stats.objects {
        writeln!(
            w,
            "obj {} {} {} {}",
            o.id,
            o.pe,
            o.load,
            u8::from(o.migratable)
        )?;
    }
    w.flush()
}

/// Writes `stats` to the file `path` (created or truncated).
pub fn save_dump(stats: &LbStats, path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    let f = std::fs::File::create(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create LB dump {}: {e}", path.display()),
        )
    })?;
    write_dump(stats, f)
}

/// Reads a dump; the result passes [`LbStats::validate`].
pub fn read_dump<R: BufRead>(input: R) -> Result<LbStats, DumpError> {
    let mut lines = Records {
        inner: input.lines(),
        line: 0,
    };
    let parse_err = |line: usize, message: String| DumpError::Parse {
        path: None,
        line,
        message,
    };

    match lines.next()? {
        Some((_, rec)) if rec.join(" ") == HEADER => {}
        Some((n, rec)) => {
            return Err(parse_err(
                n,
                format!("expected the header '{HEADER}', found '{}'", rec.join(" ")),
            ))
        }
        None => {
            return Err(parse_err(
                lines.line + 1,
                format!("empty file, expected '{HEADER}'"),
            ))
        }
    }

    let n_pes = lines.count_record("pes")?;
    let mut pes = Vec::with_capacity(n_pes.min(1 << 24));
    for i in 0..n_pes {
        let (n, rec) = lines.expect("pe INDEX BACKGROUND_LOAD AVAILABLE")?;
        let fields = fields(n, &rec, "pe", 3, "pe INDEX BACKGROUND_LOAD AVAILABLE")?;
        let index: usize = number(n, fields[0], "PE index")?;
        if index != i {
            return Err(parse_err(
                n,
                format!("expected PE index {i}, found {index}"),
            ));
        }
        let background_load = load(n, fields[1], "background load")?;
        let available = flag(n, fields[2], "AVAILABLE")?;
        pes.push(PeStats {
            background_load,
            available,
        });
    }

    let n_objs = lines.count_record("objects")?;
    let mut objects = Vec::with_capacity(n_objs.min(1 << 24));
    let mut ids = HashSet::with_capacity(n_objs.min(1 << 24));
    for _ in 0..n_objs {
        let (n, rec) = lines.expect("obj ID PE LOAD MIGRATABLE")?;
        let fields = fields(n, &rec, "obj", 4, "obj ID PE LOAD MIGRATABLE")?;
        let id: u64 = number(n, fields[0], "object id")?;
        let pe: usize = number(n, fields[1], "PE")?;
        if pe >= n_pes {
            return Err(parse_err(
                n,
                format!("object {id} is on PE {pe}, but there are {n_pes} PEs"),
            ));
        }
        let load = load(n, fields[2], "load")?;
        let migratable = flag(n, fields[3], "MIGRATABLE")?;
        if !ids.insert(id) {
            return Err(parse_err(n, format!("object id {id} appears twice")));
        }
        objects.push(ObjStats {
            id,
            pe,
            load,
            migratable,
        });
    }
    if let Some((n, rec)) = lines.next()? {
        return Err(parse_err(
            n,
            format!(
                "unexpected '{}' after the {n_objs} objects announced",
                rec.join(" ")
            ),
        ));
    }
    Ok(LbStats { pes, objects })
}

/// Reads the dump file `path`; errors name the file and line.
pub fn load_dump(path: impl AsRef<Path>) -> Result<LbStats, DumpError> {
    let path = path.as_ref();
    let f = std::fs::File::open(path).map_err(|source| DumpError::Io {
        path: Some(path.into()),
        source,
    })?;
    read_dump(io::BufReader::new(f)).map_err(|e| e.with_path(path))
}

/// Non-empty, non-comment records with their 1-based line numbers.
struct Records<L> {
    inner: L,
    line: usize,
}

impl<L: Iterator<Item = io::Result<String>>> Records<L> {
    fn next(&mut self) -> Result<Option<(usize, Vec<String>)>, DumpError> {
        for l in self.inner.by_ref() {
            self.line += 1;
            let l = l.map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => DumpError::Parse {
                    path: None,
                    line: self.line,
                    message: "not valid UTF-8 text".into(),
                },
                _ => DumpError::Io {
                    path: None,
                    source: e,
                },
            })?;
            let content = l.split('#').next().unwrap_or("");
            let rec: Vec<String> = content.split_whitespace().map(str::to_owned).collect();
            if !rec.is_empty() {
                return Ok(Some((self.line, rec)));
            }
        }
        Ok(None)
    }

    fn expect(&mut self, what: &str) -> Result<(usize, Vec<String>), DumpError> {
        self.next()?.ok_or_else(|| DumpError::Parse {
            path: None,
            line: self.line + 1,
            message: format!("unexpected end of file, expected '{what}'"),
        })
    }

    fn count_record(&mut self, keyword: &str) -> Result<usize, DumpError> {
        let usage = format!("{keyword} COUNT");
        let (n, rec) = self.expect(&usage)?;
        let f = fields(n, &rec, keyword, 1, &usage)?;
        number(n, f[0], "count")
    }
}

fn fields<'a>(
    line: usize,
    rec: &'a [String],
    keyword: &str,
    count: usize,
    usage: &str,
) -> Result<Vec<&'a str>, DumpError> {
    if rec[0] != keyword || rec.len() != count + 1 {
        return Err(DumpError::Parse {
            path: None,
            line,
            message: format!("expected '{usage}', found '{}'", rec.join(" ")),
        });
    }
    Ok(rec[1..].iter().map(String::as_str).collect())
}

fn number<T: std::str::FromStr>(line: usize, s: &str, what: &str) -> Result<T, DumpError> {
    s.parse().map_err(|_| DumpError::Parse {
        path: None,
        line,
        message: format!("{what} '{s}' is not a valid non-negative integer"),
    })
}

fn load(line: usize, s: &str, what: &str) -> Result<f64, DumpError> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(DumpError::Parse {
            path: None,
            line,
            message: format!("{what} '{s}' is not a finite non-negative number"),
        }),
    }
}

fn flag(line: usize, s: &str, what: &str) -> Result<bool, DumpError> {
    match s {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(DumpError::Parse {
            path: None,
            line,
            message: format!("{what} must be 0 or 1, found '{s}'"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LbStats, DumpError> {
        read_dump(s.as_bytes())
    }

    #[test]
    fn documented_example_parses() {
        let s = parse(
            "charmrs-lbdump 1\n# comment\n\npes 3\npe 0 0.25 1\npe 1 0 1\npe 2 0 0\n\
             objects 2\nobj 17 0 1.5 1 # trailing comment\nobj 18 2 0.75 0\n",
        )
        .unwrap();
        assert_eq!(s.pes.len(), 3);
        assert!(!s.pes[2].available);
        assert_eq!(
            s.objects[1],
            ObjStats {
                id: 18,
                pe: 2,
                load: 0.75,
                migratable: false
            }
        );
        s.validate().unwrap();
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("", "1: empty file"),
            ("hello\n", "1: expected the header"),
            ("charmrs-lbdump 1\npes x\n", "2: count 'x'"),
            (
                "charmrs-lbdump 1\npes 1\npe 1 0 1\n",
                "3: expected PE index 0",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 -1 1\n",
                "3: background load '-1'",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 0 yes\n",
                "3: AVAILABLE must be 0 or 1",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 0 1\nobjects 2\nobj 1 0 1 1\n",
                "6: unexpected end",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 0 1\nobjects 1\nobj 1 1 1 1\n",
                "5: object 1 is on PE 1",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 0 1\nobjects 1\nobj 1 0 NaN 1\n",
                "5: load 'NaN'",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 0 1\nobjects 1\nobj 1 0 1\n",
                "5: expected 'obj ID",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 0 1\nobjects 2\nobj 1 0 1 1\nobj 1 0 1 1\n",
                "6: object id 1 appears twice",
            ),
            (
                "charmrs-lbdump 1\npes 1\npe 0 0 1\nobjects 0\nobj 1 0 1 1\n",
                "5: unexpected 'obj",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: got '{e}', want '{want}'");
        }
    }
}
