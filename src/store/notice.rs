//! Warnings on stderr, and names shown safely.
//!
//! The engine reports things it skipped but did not fail on (an unexpected file in a store, a
//! damaged copy in the local cache) as one `kloset: warning: …` line on stderr, each once per
//! process however often it is met (a mount lists the store every two seconds). Names that
//! come from a store, a tree or a server are shown through [`escape`], so a newline cannot
//! split a line and an escape sequence never reaches a terminal.

use std::collections::HashSet;
use std::fmt::Write;

use parking_lot::Mutex;

/// Distinct warnings remembered and printed at most. A store server can list any number of
/// stray names, new ones on every listing (a mount lists every two seconds), and each would
/// otherwise print and stay in memory for the life of the process: the `sftp_listing` fuzz
/// target's memory grew from 61 to 242 MB in five minutes. 10,000 keeps that to a few MB.
const MAX_WARNINGS: usize = 10_000;

/// The warnings printed so far, in order, and the set that makes each one print once.
#[derive(Default)]
struct Warned {
    order: Vec<String>,
    seen: HashSet<String>,
    /// Whether the line saying the rest are not shown was printed.
    capped: bool,
}

impl Warned {
    /// The line to print for `msg`, if any, remembering it.
    fn note(&mut self, msg: String, max: usize) -> Option<String> {
        if self.seen.contains(&msg) {
            return None;
        }
        if self.seen.len() >= max {
            return (!std::mem::replace(&mut self.capped, true))
                .then(|| format!("more than {max} different warnings; the rest are not shown"));
        }
        self.seen.insert(msg.clone());
        self.order.push(msg.clone());
        Some(msg)
    }
}

static WARNED: Mutex<Option<Warned>> = Mutex::new(None);

/// Print `kloset: warning: {msg}` on stderr, unless this exact warning was printed before
/// (or `MAX_WARNINGS` others were).
pub fn warn_once(msg: impl Into<String>) {
    let mut w = WARNED.lock();
    if let Some(line) = w
        .get_or_insert_with(Warned::default)
        .note(msg.into(), MAX_WARNINGS)
    {
        eprintln!("kloset: warning: {line}");
    }
}

/// The warnings printed so far (for tests).
pub fn warnings() -> Vec<String> {
    WARNED
        .lock()
        .as_ref()
        .map(|w| w.order.clone())
        .unwrap_or_default()
}

/// A name as `ls -b` (GNU "escape" quoting) shows it: printable UTF-8 as is; a backslash
/// doubled; `\a \b \t \n \v \f \r` in C style; every other control character (C0, DEL, and the
/// C1 range U+0080–U+009F, which some terminals obey) and every byte that is not part of valid
/// UTF-8 as a backslash and three octal digits, one per byte (`\033`, `\377`).
pub fn escape(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\x07' => out.push_str("\\a"),
                '\x08' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\x0b' => out.push_str("\\v"),
                '\x0c' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => {
                    let mut b = [0u8; 4];
                    for byte in c.encode_utf8(&mut b).bytes() {
                        let _ = write!(out, "\\{byte:03o}");
                    }
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\{byte:03o}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_ls_b() {
        assert_eq!(escape(b"plain name.txt"), "plain name.txt");
        assert_eq!(escape("é ü 雪".as_bytes()), "é ü 雪");
        assert_eq!(escape(b"a\nb"), "a\\nb");
        assert_eq!(escape(b"\x1b[31mred"), "\\033[31mred");
        assert_eq!(escape(b"\xff\xfe"), "\\377\\376");
        assert_eq!(escape(b"back\\slash"), "back\\\\slash");
        assert_eq!(escape(b"\x7f\t\r"), "\\177\\t\\r");
        // C1 controls (CSI is U+009B) are escaped byte by byte.
        assert_eq!(escape("x\u{9b}y".as_bytes()), "x\\302\\233y");
        // A truncated multi-byte sequence is escaped, the rest kept.
        assert_eq!(escape(b"a\xc3"), "a\\303");
    }

    #[test]
    fn warns_once() {
        warn_once("test warning one");
        warn_once("test warning one");
        let n = warnings()
            .iter()
            .filter(|w| *w == "test warning one")
            .count();
        assert_eq!(n, 1);
    }

    /// A server that lists a new stray name every time costs a bounded amount of memory and
    /// output: each distinct warning once, up to the limit, then one line, then nothing.
    #[test]
    fn warnings_are_remembered_up_to_a_limit() {
        let mut w = Warned::default();
        assert_eq!(w.note("a".into(), 3).as_deref(), Some("a"));
        assert_eq!(w.note("a".into(), 3), None);
        assert!(w.note("b".into(), 3).is_some());
        assert!(w.note("c".into(), 3).is_some());
        let capped = w
            .note("d".into(), 3)
            .expect("one line says the rest are not shown");
        assert!(capped.contains("not shown"), "{capped}");
        for i in 0..100 {
            assert_eq!(w.note(format!("n{i}"), 3), None);
        }
        assert_eq!(w.note("a".into(), 3), None);
        assert_eq!(w.order, ["a", "b", "c"]);
        assert_eq!(w.seen.len(), 3);
    }
}
