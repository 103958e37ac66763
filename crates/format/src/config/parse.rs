//! Parser for the text metadata grammar. Never panics: every failure is a
//! `ParseError` with the byte offset, line and column.

use super::{Item, Section, Value};
use thiserror::Error;

/// Sections may nest this deep (LVM2 metadata uses four levels).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}, column {column} (text byte {offset}): {reason}")]
pub struct ParseError {
    pub offset: usize,
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Float(String),
    Eq,
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Comma,
    Eof,
}

struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
}

fn is_delim(c: u8) -> bool {
    c.is_ascii_whitespace()
        || matches!(
            c,
            b'#' | b'=' | b'{' | b'}' | b'[' | b']' | b',' | b'"' | b'\'' | 0
        )
}

impl<'a> Lexer<'a> {
    fn skip_blank(&mut self) {
        while self.pos < self.s.len() {
            match self.s[self.pos] {
                b'#' => {
                    while self.pos < self.s.len() && self.s[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                c if c.is_ascii_whitespace() => self.pos += 1,
                _ => break,
            }
        }
    }

    fn err(&self, at: usize, reason: impl Into<String>) -> ParseError {
        error_at(self.s, at, reason.into())
    }

    /// Next token and its start offset.
    fn next(&mut self) -> Result<(Tok, usize), ParseError> {
        self.skip_blank();
        let start = self.pos;
        let Some(&c) = self.s.get(self.pos) else {
            return Ok((Tok::Eof, start));
        };
        // LVM2 terminates the on-disk text with a NUL.
        if c == 0 {
            if self.s[self.pos..].iter().all(|&b| b == 0) {
                self.pos = self.s.len();
                return Ok((Tok::Eof, start));
            }
            return Err(self.err(start, "NUL byte inside the text"));
        }
        self.pos += 1;
        let t = match c {
            b'=' => Tok::Eq,
            b'{' => Tok::LBrace,
            b'}' => Tok::RBrace,
            b'[' => Tok::LBracket,
            b']' => Tok::RBracket,
            b',' => Tok::Comma,
            b'"' | b'\'' => Tok::Str(self.string(c, start)?),
            _ => {
                while self.pos < self.s.len() && !is_delim(self.s[self.pos]) {
                    self.pos += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.pos])
                    .map_err(|_| self.err(start, "invalid UTF-8"))?;
                classify_word(word)
            }
        };
        Ok((t, start))
    }

    fn string(&mut self, quote: u8, start: usize) -> Result<String, ParseError> {
        // Most strings have no escapes: find the end first and copy once.
        let body = &self.s[self.pos..];
        let end = body
            .iter()
            .position(|&c| c == quote || c == b'\\' || c == 0);
        if let Some(n) = end
            && body[n] == quote
        {
            self.pos += n + 1;
            return Ok(text_of(&body[..n]));
        }
        let mut out = Vec::with_capacity(end.unwrap_or(0) + 16);
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                return Err(self.err(start, "unterminated string"));
            };
            self.pos += 1;
            match c {
                b'\\' if quote == b'"' => {
                    let Some(&e) = self.s.get(self.pos) else {
                        return Err(self.err(start, "unterminated string"));
                    };
                    // Escaped or not, a NUL cannot be written back (LVM2
                    // reads the text as a C string).
                    if e == 0 {
                        return Err(self.err(self.pos, "NUL byte inside a string"));
                    }
                    out.push(e);
                    self.pos += 1;
                }
                0 => return Err(self.err(self.pos - 1, "NUL byte inside a string")),
                c if c == quote => break,
                c => out.push(c),
            }
        }
        Ok(text_of(&out))
    }
}

/// A string's bytes as text. LVM2 writes whatever bytes its command line
/// held into `description` (a device path that is not UTF-8, say): those
/// are read with U+FFFD in their place rather than refusing the whole VG.
/// Names, uuids and tags, which LVM2 restricts to ASCII, are checked later.
fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn classify_word(w: &str) -> Tok {
    let digits = w.strip_prefix('-').unwrap_or(w);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(v) = w.parse::<i64>()
    {
        return Tok::Int(v);
    }
    if !digits.is_empty()
        && digits.as_bytes()[0].is_ascii_digit()
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() == 1
    {
        return Tok::Float(w.to_string());
    }
    Tok::Ident(w.to_string())
}

fn error_at(s: &[u8], at: usize, reason: String) -> ParseError {
    let at = at.min(s.len());
    let before = &s[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0)
        + 1;
    ParseError {
        offset: at,
        line,
        column,
        reason,
    }
}

struct Parser<'a> {
    lx: Lexer<'a>,
    peeked: Option<(Tok, usize)>,
    // Items and array elements of the sections and arrays being read, so each
    // finished one is moved into a vector of exactly its size (a VG with tens
    // of thousands of LVs would otherwise spend much of its parse regrowing).
    open_items: Vec<Item>,
    open_values: Vec<Value>,
}

impl<'a> Parser<'a> {
    fn peek(&mut self) -> Result<&(Tok, usize), ParseError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lx.next()?);
        }
        // Just filled above.
        Ok(self.peeked.as_ref().expect("peeked token"))
    }
    fn bump(&mut self) -> Result<(Tok, usize), ParseError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lx.next(),
        }
    }

    fn items(&mut self, depth: usize, top: bool) -> Result<Section, ParseError> {
        let base = self.open_items.len();
        let r = self.items_onto_stack(depth, top);
        let items = self.open_items.drain(base..).collect();
        r.map(|()| Section { items })
    }

    fn items_onto_stack(&mut self, depth: usize, top: bool) -> Result<(), ParseError> {
        loop {
            let (tok, at) = self.bump()?;
            let key = match tok {
                Tok::Eof if top => return Ok(()),
                Tok::Eof => return Err(self.lx.err(at, "missing '}' at end of text")),
                Tok::RBrace if !top => return Ok(()),
                Tok::Ident(k) => k,
                // Numbers are valid section names too (e.g. an LV called "1").
                Tok::Int(i) => i.to_string(),
                Tok::Float(f) => f,
                other => {
                    return Err(self
                        .lx
                        .err(at, format!("expected a name, found {}", describe(&other))));
                }
            };
            let (tok, at) = self.bump()?;
            match tok {
                Tok::Eq => {
                    let v = self.value(at)?;
                    self.open_items.push(Item::Assign(key, v));
                }
                Tok::LBrace => {
                    if depth >= MAX_DEPTH {
                        return Err(self.lx.err(at, "sections nested too deeply"));
                    }
                    let s = self.items(depth + 1, false)?;
                    self.open_items.push(Item::Section(key, s));
                }
                other => {
                    return Err(self.lx.err(
                        at,
                        format!(
                            "expected '=' or '{{' after '{key}', found {}",
                            describe(&other)
                        ),
                    ));
                }
            }
        }
    }

    /// The value a token stands for, or the token back when it is not one.
    fn scalar(tok: Tok) -> Result<Value, Tok> {
        match tok {
            Tok::Int(i) => Ok(Value::Int(i)),
            Tok::Float(f) => Ok(Value::Float(f)),
            Tok::Str(s) => Ok(Value::Str(s)),
            t => Err(t),
        }
    }

    /// The elements of an array up to its `]`, pushed on `open_values`
    /// above `base`.
    fn array_onto_stack(&mut self, base: usize) -> Result<(), ParseError> {
        loop {
            let empty = self.open_values.len() == base;
            let (tok, at) = self.bump()?;
            match tok {
                Tok::RBracket => return Ok(()),
                Tok::Comma if !empty => {
                    let (tok, at) = self.bump()?;
                    match tok {
                        Tok::RBracket => return Ok(()),
                        t => self.push_element(t, at)?,
                    }
                }
                t if empty => self.push_element(t, at)?,
                t => {
                    return Err(self
                        .lx
                        .err(at, format!("expected ',' or ']', found {}", describe(&t))));
                }
            }
        }
    }

    fn push_element(&mut self, tok: Tok, at: usize) -> Result<(), ParseError> {
        match Self::scalar(tok) {
            Ok(v) => {
                self.open_values.push(v);
                Ok(())
            }
            Err(t) => Err(self.lx.err(
                at,
                format!("expected an array element, found {}", describe(&t)),
            )),
        }
    }

    fn value(&mut self, eq_at: usize) -> Result<Value, ParseError> {
        let (tok, at) = self.bump()?;
        if tok == Tok::LBracket {
            let base = self.open_values.len();
            let r = self.array_onto_stack(base);
            let arr = self.open_values.drain(base..).collect();
            return r.map(|()| Value::Array(arr));
        }
        match Self::scalar(tok) {
            Ok(v) => Ok(v),
            Err(Tok::Eof) => Err(self.lx.err(eq_at, "missing value after '='")),
            Err(t) => Err(self
                .lx
                .err(at, format!("expected a value, found {}", describe(&t)))),
        }
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("'{}'", s.chars().take(40).collect::<String>()),
        Tok::Str(_) => "a string".into(),
        Tok::Int(i) => format!("number {i}"),
        Tok::Float(f) => format!("number {f}"),
        Tok::Eq => "'='".into(),
        Tok::LBrace => "'{'".into(),
        Tok::RBrace => "'}'".into(),
        Tok::LBracket => "'['".into(),
        Tok::RBracket => "']'".into(),
        Tok::Comma => "','".into(),
        Tok::Eof => "end of text".into(),
    }
}

/// Parse a whole metadata text (a trailing NUL, as LVM2 writes, is accepted).
pub fn parse(text: &[u8]) -> Result<Section, ParseError> {
    let mut p = Parser {
        lx: Lexer { s: text, pos: 0 },
        peeked: None,
        open_items: Vec::new(),
        open_values: Vec::new(),
    };
    let s = p.items(0, true)?;
    let _ = p.peek()?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_that_are_not_utf8_are_read_with_replacement_characters() {
        let s = parse(b"description = \"vgcreate vg /dev/nu-\xff\"\nx = \"a\\\"\xfe\"\n").unwrap();
        assert_eq!(
            s.items,
            vec![
                Item::Assign(
                    "description".into(),
                    Value::Str("vgcreate vg /dev/nu-\u{fffd}".into())
                ),
                Item::Assign("x".into(), Value::Str("a\"\u{fffd}".into())),
            ]
        );
        // A bare word (a key) still has to be text.
        assert!(parse(b"k\xff = 1\n").is_err());
    }

    #[test]
    fn parses_all_value_kinds() {
        let t = br#"
# comment
a = 1   # trailing comment
b = -42
c = "x \"quoted\" \\ back"
d = [ "p", 1, 2.5 ]
e = []
f = 'single'
g = 0.75
vg { sub { k = "v" } }
"#;
        let s = parse(t).unwrap();
        assert_eq!(s.get("a"), Some(&Value::Int(1)));
        assert_eq!(s.get("b"), Some(&Value::Int(-42)));
        assert_eq!(s.get("c"), Some(&Value::Str("x \"quoted\" \\ back".into())));
        assert_eq!(
            s.get("d"),
            Some(&Value::Array(vec![
                Value::Str("p".into()),
                Value::Int(1),
                Value::Float("2.5".into())
            ]))
        );
        assert_eq!(s.get("e"), Some(&Value::Array(vec![])));
        assert_eq!(s.get("f"), Some(&Value::Str("single".into())));
        assert_eq!(s.get("g"), Some(&Value::Float("0.75".into())));
        assert_eq!(
            s.section("vg").unwrap().section("sub").unwrap().get("k"),
            Some(&Value::Str("v".into()))
        );
    }

    #[test]
    fn accepts_lvm2_trailing_nul() {
        let s = parse(b"a = 1\n\0").unwrap();
        assert_eq!(s.items.len(), 1);
    }

    #[test]
    fn errors_carry_positions() {
        for (t, line, what) in [
            (&b"a = 1\nb = \"open"[..], 2, "unterminated"),
            (b"a {\n b = 1\n", 3, "missing '}'"),
            (b"a = = 1", 1, "expected a value"),
            (b"a = [1 2]", 1, "expected ',' or ']'"),
            (b"}", 1, "expected a name"),
            (b"a = 1\0b = 2", 1, "NUL"),
            (b"a = \"x\\\0\"", 1, "NUL byte inside a string"),
            (b"a = ", 1, "missing value"),
        ] {
            let e = parse(t).unwrap_err();
            assert_eq!(e.line, line, "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut t = String::new();
        for _ in 0..10_000 {
            t.push_str("a {");
        }
        assert!(
            parse(t.as_bytes())
                .unwrap_err()
                .reason
                .contains("too deeply")
        );
    }
}
