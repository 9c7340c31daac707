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

/// Every warning printed so far, in order (also what makes each one print once).
static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Print `kloset: warning: {msg}` on stderr, unless this exact warning was printed before.
pub fn warn_once(msg: impl Into<String>) {
    let msg = msg.into();
    let mut seen = SEEN.lock();
    if !seen.get_or_insert_with(HashSet::new).insert(msg.clone()) {
        return;
    }
    eprintln!("kloset: warning: {msg}");
    WARNED.lock().push(msg);
}

/// The warnings printed so far (for tests).
pub fn warnings() -> Vec<String> {
    WARNED.lock().clone()
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
}
