//! Every message keyfs can print is documented in docs/TROUBLESHOOTING.md.
//!
//! The test reads `src/**/*.rs` at test time and finds every call that makes
//! a user-facing message:
//!
//! - errors: `Error::new(…)`, `err(…)`, `mk_err(…)`, `store_err(…)`, `usage(…)`;
//! - stderr output and logs: `eprintln!(…)`, `log::error!(…)`, `log::warn!(…)`
//!   (debug/info/trace logs are not messages an operator has to act on);
//! - the problem lines of `keyfs check` / `keyfs audit --verify`:
//!   `problems.push(…)`.
//!
//! The message of a call is the first string literal among its arguments —
//! the literal itself, or the format string inside `format!(…)`. Its *stable
//! fragment* is the longest run of literal text between `{…}` placeholders,
//! trimmed; that fragment must appear verbatim in the document. A message
//! whose fragment is shorter than [`MIN_FRAGMENT`] characters cannot be
//! checked and must be listed in [`SHORT`] with a reason; a call whose
//! message is not a string literal at all (a pass-through such as
//! `Error::new(kind, msg)`) must be listed in [`PASS_THROUGH`].
//!
//! The source is tokenized (comments, char literals and lifetimes skipped;
//! normal, raw and byte strings with their escapes decoded), so rustfmt's line
//! wrapping, `r#"…"#` strings and `\"` do not matter. Items under
//! `#[cfg(test)]` are skipped: their messages are never shown to a user.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The operator's troubleshooting guide, relative to the crate root.
const DOC: &str = "docs/TROUBLESHOOTING.md";

/// A fragment shorter than this (in characters) is too generic to check.
const MIN_FRAGMENT: usize = 12;

/// Messages with no checkable fragment: (file, message template as written in
/// the source, after unescaping, why it is not checked).
const SHORT: &[(&str, &str, &str)] = &[
    (
        "src/main.rs",
        "keyfs: {e}",
        "the prefix every error message is printed with; the messages themselves are checked",
    ),
    (
        "src/cli.rs",
        "keyfs[{}] {}: {}",
        "the daemon's log-line format (pid, level, text); TROUBLESHOOTING §1 explains it",
    ),
    (
        "src/cli.rs",
        "cannot read {from}: {e}",
        "`rotate --from FILE` unreadable; documented in full in §7 (\"cannot read\" is too generic)",
    ),
    (
        "src/fs/core.rs",
        "not a file",
        "truncate of a directory (EISDIR); documented in §9",
    ),
    (
        "src/inventory/mod.rs",
        "entry {id} was removed",
        "an entry removed during the operation; documented in §7",
    ),
    (
        "src/inventory/mod.rs",
        "cannot move {} into itself",
        "moving a directory below itself (EINVAL); documented in §9",
    ),
    (
        "src/cli.rs",
        "{}: {e}",
        "io_err: a path and the OS error text through a mount; TROUBLESHOOTING documents it by errno",
    ),
    (
        "src/store/sled_backend.rs",
        "{}",
        "logs the fencing error once, whose two messages are checked where they are made",
    ),
    (
        "src/fs/mod.rs",
        "{e}",
        "the signal thread logs an unmount error whose message is checked where it is made",
    ),
    (
        "src/fs/fuse.rs",
        "{op}: {e}",
        "a refused FUSE request logged with its operation; the error messages are checked",
    ),
    (
        "src/inventory/mod.rs",
        "{}: {}",
        "an unreadable directory entry logged with its directory's path; the error is checked",
    ),
    (
        "src/inventory/admin.rs",
        "entry {id}: {}",
        "`keyfs check` line for an undecodable entry; the decoding errors are checked",
    ),
    (
        "src/inventory/admin.rs",
        "{vpath} (version {}): {}",
        "`keyfs check` line for a version that fails to open; the errors are checked",
    ),
    (
        "src/inventory/admin.rs",
        "audit log: {p}",
        "`keyfs check` prefix for audit-chain problems; the problem texts are checked",
    ),
];

/// Calls whose message is not a string literal: (file, the call's tokens with
/// whitespace removed, why).
const PASS_THROUGH: &[(&str, &str, &str)] = &[
    (
        "src/error.rs",
        "Error::new(kind,msg)",
        "`err()` itself: its callers' literals are checked",
    ),
    (
        "src/cli.rs",
        "Error::new(Kind::Usage,msg)",
        "`usage()` itself: its callers' literals are checked",
    ),
    (
        "src/store/etcd_backend.rs",
        "Error::new(Kind::Usage,msg)",
        "the URL parser's `usage()`: its callers' literals are checked",
    ),
    (
        "src/crypto/master.rs",
        "Error::new(Kind::MasterKey,msg)",
        "`mk_err()` itself: its callers' literals are checked",
    ),
    (
        "src/inventory/mod.rs",
        "Error::new(Kind::Store,msg)",
        "`store_err()` itself: its callers' literals are checked",
    ),
    (
        "src/cli.rs",
        "Error::new(Kind::Store,e.to_string())",
        "serde_json failing to serialize the listing; cannot happen for keyfs's own types",
    ),
];

// ---------------------------------------------------------------------------
// Tokenizer: just enough Rust to find calls and decode string literals.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A string literal, decoded (escapes resolved; raw strings verbatim).
    Str(String),
    Punct(char),
    /// Numbers, char literals, lifetimes.
    Other,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Decode the escapes of a normal (non-raw) string literal body.
fn unescape(body: &str) -> String {
    let mut out = String::new();
    let mut it = body.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some('\'') => out.push('\''),
            Some('"') => out.push('"'),
            Some('x') => {
                let h: String = it.by_ref().take(2).collect();
                if let Ok(b) = u8::from_str_radix(&h, 16) {
                    out.push(b as char);
                }
            }
            Some('u') => {
                let mut h = String::new();
                for c in it.by_ref() {
                    match c {
                        '{' => {}
                        '}' => break,
                        c => h.push(c),
                    }
                }
                if let Some(c) = u32::from_str_radix(&h, 16).ok().and_then(char::from_u32) {
                    out.push(c);
                }
            }
            // Line continuation: the newline and the next line's indentation vanish.
            Some('\n') => {
                while it.peek().is_some_and(|c| c.is_whitespace()) {
                    it.next();
                }
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn tokenize(src: &str) -> Vec<Token> {
    let s: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    let mut line = 1;
    // Advance over s[from..to], counting newlines.
    let count = |from: usize, to: usize, line: &mut usize| {
        *line += s[from..to.min(s.len())]
            .iter()
            .filter(|c| **c == '\n')
            .count();
    };
    while i < s.len() {
        let c = s[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && s.get(i + 1) == Some(&'/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && s.get(i + 1) == Some(&'*') {
            // Block comments nest in Rust.
            let start = i;
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            count(start, i, &mut line);
        } else if c == '"' {
            let start_line = line;
            let start = i;
            i += 1;
            let body_start = i;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            let body: String = s[body_start..i.min(s.len())].iter().collect();
            i += 1;
            count(start, i, &mut line);
            toks.push(Token {
                tok: Tok::Str(unescape(&body)),
                line: start_line,
            });
        } else if c == '\'' {
            // Char literal ('x', '\n', '\u{..}') or lifetime ('a, 'static).
            if s.get(i + 1) == Some(&'\\') {
                i += 3;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if s.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < s.len() && is_ident_char(s[i]) {
                    i += 1;
                }
            }
            toks.push(Token {
                tok: Tok::Other,
                line,
            });
        } else if is_ident_start(c) {
            let start = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            let str_prefix = matches!(word.as_str(), "b" | "c");
            if raw_prefix && matches!(s.get(i), Some('"') | Some('#')) {
                // r"…", r#"…"#, … — unless it is a raw identifier (r#name).
                let mut hashes = 0;
                let mut j = i;
                while s.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if s.get(j) == Some(&'"') {
                    let start_line = line;
                    let body_start = j + 1;
                    let mut k = body_start;
                    let body_end = loop {
                        if k >= s.len() {
                            break s.len();
                        }
                        if s[k] == '"' && (1..=hashes).all(|h| s.get(k + h) == Some(&'#')) {
                            break k;
                        }
                        k += 1;
                    };
                    let body: String = s[body_start..body_end].iter().collect();
                    i = (body_end + 1 + hashes).min(s.len());
                    count(start, i, &mut line);
                    toks.push(Token {
                        tok: Tok::Str(body),
                        line: start_line,
                    });
                    continue;
                }
            }
            if str_prefix && s.get(i) == Some(&'"') {
                // b"…" / c"…": let the string branch take it next round.
                continue;
            }
            if word == "b" && s.get(i) == Some(&'\'') {
                continue; // b'x': the char-literal branch takes it.
            }
            toks.push(Token {
                tok: Tok::Ident(word),
                line,
            });
        } else if c.is_ascii_digit() {
            while i < s.len()
                && (is_ident_char(s[i])
                    || s[i] == '.' && s.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
            {
                i += 1;
            }
            toks.push(Token {
                tok: Tok::Other,
                line,
            });
        } else {
            toks.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        }
    }
    toks
}

fn is_punct(t: Option<&Token>, c: char) -> bool {
    matches!(t, Some(Token { tok: Tok::Punct(p), .. }) if *p == c)
}

fn is_ident(t: Option<&Token>, w: &str) -> bool {
    matches!(t, Some(Token { tok: Tok::Ident(x), .. }) if x == w)
}

/// Index just past the bracket that closes the one at `open`.
fn close_of(toks: &[Token], open: usize) -> usize {
    let mut depth = 0i32;
    for (k, t) in toks.iter().enumerate().skip(open) {
        match t.tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

/// Drop every item annotated `#[cfg(test)]` (test modules and test helpers).
fn strip_cfg_test(toks: Vec<Token>) -> Vec<Token> {
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let attr = is_punct(toks.get(i), '#')
            && is_punct(toks.get(i + 1), '[')
            && is_ident(toks.get(i + 2), "cfg")
            && is_punct(toks.get(i + 3), '(')
            && is_ident(toks.get(i + 4), "test")
            && is_punct(toks.get(i + 5), ')')
            && is_punct(toks.get(i + 6), ']');
        if !attr {
            out.push(toks[i].clone());
            i += 1;
            continue;
        }
        // Skip the item: up to its `;`, or through its `{ … }` body.
        i += 7;
        while i < toks.len() {
            match toks[i].tok {
                Tok::Punct(';') => {
                    i += 1;
                    break;
                }
                Tok::Punct('{') => {
                    i = close_of(&toks, i);
                    break;
                }
                Tok::Punct('(' | '[') => i = close_of(&toks, i),
                _ => i += 1,
            }
        }
    }
    out
}

/// One message-making call found in the source.
#[derive(Debug, Clone)]
struct Call {
    file: String,
    line: usize,
    /// How it was made: `Error::new`, `err`, `eprintln!`, …
    how: String,
    /// The message template (decoded literal), if the call has one.
    template: Option<String>,
    /// Whether the template is a format string (`{…}` are placeholders).
    is_format: bool,
    /// The call's tokens, whitespace-free (to name pass-through calls).
    text: String,
}

fn tokens_text(toks: &[Token]) -> String {
    let mut s = String::new();
    for t in toks {
        match &t.tok {
            Tok::Ident(w) => {
                if s.ends_with(|c: char| is_ident_char(c)) {
                    s.push(' ');
                }
                s.push_str(w);
            }
            Tok::Str(x) => {
                let _ = write!(s, "{x:?}");
            }
            Tok::Punct(c) => s.push(*c),
            Tok::Other => s.push('_'),
        }
    }
    s
}

/// If a message-making call starts at `i`: its name and the index of its `(`.
fn call_at(toks: &[Token], i: usize) -> Option<(String, usize)> {
    let Tok::Ident(w) = &toks[i].tok else {
        return None;
    };
    let prev = i.checked_sub(1).map(|p| &toks[p]);
    let plain_fn = !is_ident(prev, "fn") && !is_punct(prev, '.');
    match w.as_str() {
        "Error"
            if is_punct(toks.get(i + 1), ':')
                && is_punct(toks.get(i + 2), ':')
                && is_ident(toks.get(i + 3), "new")
                && is_punct(toks.get(i + 4), '(') =>
        {
            Some(("Error::new".into(), i + 4))
        }
        "err" | "mk_err" | "store_err" | "usage" if plain_fn && is_punct(toks.get(i + 1), '(') => {
            Some((w.clone(), i + 1))
        }
        "eprintln" | "error" | "warn"
            if is_punct(toks.get(i + 1), '!') && is_punct(toks.get(i + 2), '(') =>
        {
            Some((format!("{w}!"), i + 2))
        }
        "problems"
            if is_punct(toks.get(i + 1), '.')
                && is_ident(toks.get(i + 2), "push")
                && is_punct(toks.get(i + 3), '(') =>
        {
            Some(("problems.push".into(), i + 3))
        }
        _ => None,
    }
}

fn calls_in(file: &str, src: &str) -> Vec<Call> {
    let toks = strip_cfg_test(tokenize(src));
    let mut calls = Vec::new();
    for i in 0..toks.len() {
        let Some((how, open)) = call_at(&toks, i) else {
            continue;
        };
        let end = close_of(&toks, open);
        let lit = (open + 1..end).find(|&k| matches!(toks[k].tok, Tok::Str(_)));
        let (template, is_format) = match lit {
            Some(k) => {
                let Tok::Str(t) = &toks[k].tok else {
                    unreachable!()
                };
                // The first argument of a macro (`format!(`, `eprintln!(`) is a format string.
                let fmt = is_punct(toks.get(k - 1), '(') && is_punct(toks.get(k - 2), '!');
                (Some(t.clone()), fmt)
            }
            None => (None, false),
        };
        calls.push(Call {
            file: file.to_string(),
            line: toks[i].line,
            how,
            template,
            is_format,
            text: tokens_text(&toks[i..end]),
        });
    }
    calls
}

/// The literal runs of a message: split at `{…}` placeholders when it is a
/// format string (`{{`/`}}` are literal braces).
fn literal_runs(template: &str, is_format: bool) -> Vec<String> {
    if !is_format {
        return vec![template.to_string()];
    }
    let mut runs = vec![String::new()];
    let mut it = template.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '{' if it.peek() == Some(&'{') => {
                it.next();
                runs.last_mut().expect("one run").push('{');
            }
            '}' if it.peek() == Some(&'}') => {
                it.next();
                runs.last_mut().expect("one run").push('}');
            }
            '{' => {
                for c in it.by_ref() {
                    if c == '}' {
                        break;
                    }
                }
                runs.push(String::new());
            }
            c => runs.last_mut().expect("one run").push(c),
        }
    }
    runs
}

/// The longest literal run, trimmed.
fn fragment(template: &str, is_format: bool) -> String {
    literal_runs(template, is_format)
        .into_iter()
        .map(|r| r.trim().to_string())
        .max_by_key(|r| r.chars().count())
        .unwrap_or_default()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn all_calls(root: &Path) -> Vec<Call> {
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut calls = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let src =
            std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        calls.extend(calls_in(&rel, &src));
    }
    calls
}

/// Everything wrong with `doc` for these calls, as lines for a developer.
fn problems(calls: &[Call], doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut short_used = vec![false; SHORT.len()];
    let mut pass_used = vec![false; PASS_THROUGH.len()];
    for c in calls {
        let Some(t) = &c.template else {
            match PASS_THROUGH
                .iter()
                .position(|(f, text, _)| *f == c.file && *text == c.text)
            {
                Some(k) => pass_used[k] = true,
                None => out.push(format!(
                    "{}:{}: {} has no string-literal message: `{}` — give it a literal message, \
                     or add (\"{}\", {:?}, \"why\") to PASS_THROUGH in tests/messages.rs",
                    c.file, c.line, c.how, c.text, c.file, c.text
                )),
            }
            continue;
        };
        let frag = fragment(t, c.is_format);
        if frag.chars().count() < MIN_FRAGMENT {
            match SHORT
                .iter()
                .position(|(f, m, _)| *f == c.file && *m == t.as_str())
            {
                Some(k) => short_used[k] = true,
                None => out.push(format!(
                    "{}:{}: {} message {:?} has no literal run of {MIN_FRAGMENT}+ characters to \
                     check — make it say more, or add (\"{}\", {:?}, \"why\") to SHORT in \
                     tests/messages.rs",
                    c.file, c.line, c.how, t, c.file, t
                )),
            }
            continue;
        }
        if !doc.contains(&frag) {
            out.push(format!(
                "{}:{}: {} message not in {DOC}; document it (the message with placeholders \
                 written like <path>, its cause and its fix) so that the page contains this \
                 text verbatim:\n      message:  {t}\n      contains: {frag}",
                c.file, c.line, c.how
            ));
        }
    }
    for (k, (f, m, _)) in SHORT.iter().enumerate() {
        if !short_used[k] {
            out.push(format!(
                "SHORT entry ({f:?}, {m:?}) matches no message any more; remove it from tests/messages.rs"
            ));
        }
    }
    for (k, (f, m, _)) in PASS_THROUGH.iter().enumerate() {
        if !pass_used[k] {
            out.push(format!(
                "PASS_THROUGH entry ({f:?}, {m:?}) matches no call any more; remove it from tests/messages.rs"
            ));
        }
    }
    out
}

#[test]
fn every_message_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let calls = all_calls(root);
    // Guard against an extractor that silently finds nothing.
    assert!(
        calls.len() >= 100,
        "found only {} message calls in src/; the extractor in tests/messages.rs is broken",
        calls.len()
    );
    let doc =
        std::fs::read_to_string(root.join(DOC)).unwrap_or_else(|e| panic!("{DOC} must exist: {e}"));
    if std::env::var_os("KEYFS_MESSAGES_DUMP").is_some() {
        for c in &calls {
            eprintln!(
                "{}:{}\t{}\t{:?}\t{:?}",
                c.file,
                c.line,
                c.how,
                c.template.as_deref().unwrap_or(""),
                c.template
                    .as_deref()
                    .map(|t| fragment(t, c.is_format))
                    .unwrap_or_default()
            );
        }
    }
    let p = problems(&calls, &doc);
    let checked = calls
        .iter()
        .filter(|c| {
            c.template
                .as_deref()
                .is_some_and(|t| fragment(t, c.is_format).chars().count() >= MIN_FRAGMENT)
        })
        .count();
    assert!(
        p.is_empty(),
        "{} of {} message calls in src/ need attention ({checked} checkable):\n  {}\n",
        p.len(),
        calls.len(),
        p.join("\n  ")
    );
}

/// The extractor on a synthetic source with everything that could trip it.
#[test]
fn extractor_handles_wrapping_raw_strings_and_escapes() {
    let src = r####"
        // err(Kind::Usage, "in a comment: not a message")
        /* Error::new(Kind::Store, "in a /* nested */ block comment") */
        fn usage(msg: impl Into<String>) -> Error { Error::new(Kind::Usage, msg) }
        fn f<'a>(x: &'a str) -> Result<()> {
            let _c = '"';
            let _d = '\'';
            let _e = b'"';
            let _ = x.err();
            err(Kind::Invalid, "plain literal with {braces} and a \"quote\"")?;
            Err(Error::new(
                Kind::Busy,
                format!(
                    "store {} is in use by another process ({}); retry",
                    dir.display(),
                    holder
                ),
            ))?;
            return Err(mk_err(format!(r#"raw "quoted" {x} and {{literal}} braces"#)));
            eprintln!("keyfs: wrote {} \
                       and its key", x);
            log::warn!("{} was busy; detached it", x);
            log::debug!("debug logs are not messages");
            problems.push(format!("audit entry {seq} is out of order (inserted)"));
        }
        #[cfg(test)]
        mod tests {
            fn t() { err(Kind::Usage, "inside a test module: skipped"); }
        }
        #[cfg(test)]
        fn helper() -> Error { usage("test helper: skipped") }
        fn after() { usage("after the test items: {not a placeholder}") }
    "####;
    let calls = calls_in("x.rs", src);
    let got: Vec<(usize, &str, Option<&str>, String)> = calls
        .iter()
        .map(|c| {
            (
                c.line,
                c.how.as_str(),
                c.template.as_deref(),
                c.template
                    .as_deref()
                    .map(|t| fragment(t, c.is_format))
                    .unwrap_or_default(),
            )
        })
        .collect();
    let want: Vec<(usize, &str, Option<&str>, String)> = vec![
        (4, "Error::new", None, String::new()),
        (
            10,
            "err",
            Some("plain literal with {braces} and a \"quote\""),
            "plain literal with {braces} and a \"quote\"".into(),
        ),
        (
            11,
            "Error::new",
            Some("store {} is in use by another process ({}); retry"),
            "is in use by another process (".into(),
        ),
        (
            19,
            "mk_err",
            Some("raw \"quoted\" {x} and {{literal}} braces"),
            "and {literal} braces".into(),
        ),
        (
            20,
            "eprintln!",
            Some("keyfs: wrote {} and its key"),
            "keyfs: wrote".into(),
        ),
        (
            22,
            "warn!",
            Some("{} was busy; detached it"),
            "was busy; detached it".into(),
        ),
        (
            24,
            "problems.push",
            Some("audit entry {seq} is out of order (inserted)"),
            "is out of order (inserted)".into(),
        ),
        (
            32,
            "usage",
            Some("after the test items: {not a placeholder}"),
            "after the test items: {not a placeholder}".into(),
        ),
    ];
    assert_eq!(got, want);
    assert_eq!(calls[0].text, "Error::new(Kind::Usage,msg)");
}

/// A new, undocumented message makes the check fail and names its place.
#[test]
fn an_undocumented_message_fails_with_its_location() {
    let src = "fn f() -> Result<()> {\n    err(\n        Kind::Invalid,\n        format!(\"{p}: this brand-new refusal is not documented\"),\n    )\n}\n";
    let calls = calls_in("src/new.rs", src);
    let p = problems(&calls, "some other text");
    let mine: Vec<_> = p.iter().filter(|l| l.starts_with("src/new.rs")).collect();
    assert_eq!(mine.len(), 1, "{p:?}");
    assert!(mine[0].starts_with("src/new.rs:2: err message not in docs/TROUBLESHOOTING.md"));
    assert!(mine[0].contains("this brand-new refusal is not documented"));
    // Documented, it passes.
    let p = problems(
        &calls,
        "<path>: this brand-new refusal is not documented — cause, fix",
    );
    assert!(p.iter().all(|l| !l.starts_with("src/new.rs")), "{p:?}");
}
