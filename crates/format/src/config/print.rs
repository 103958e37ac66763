//! Printer for the text metadata grammar, in the style LVM2 writes to disk
//! (no indentation, one item per line, a blank line before subsections).

use super::{Item, Section, Value};
use std::fmt::Write;

fn push_str_escaped(out: &mut String, s: &str) {
    out.push('"');
    // Whole runs between the characters that need a backslash (metadata
    // strings rarely hold any): a commit prints every LV's name and tags.
    let mut rest = s;
    while let Some(i) = rest.find(['"', '\\']) {
        out.push_str(&rest[..i]);
        out.push('\\');
        out.push_str(&rest[i..i + 1]);
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::Int(i) => {
            // Formatting into the buffer avoids one allocation per number.
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => out.push_str(f),
        Value::Str(s) => push_str_escaped(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_value(out, e);
            }
            out.push(']');
        }
    }
}

fn push_items(out: &mut String, items: &[Item]) {
    for item in items {
        match item {
            Item::Assign(k, v) => {
                out.push_str(k);
                out.push_str(" = ");
                push_value(out, v);
                out.push('\n');
            }
            Item::Section(k, sub) => {
                // LVM2 reads the VG name from the first byte of the text.
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(k);
                out.push_str(" {\n");
                push_items(out, &sub.items);
                out.push_str("}\n");
            }
        }
    }
}

/// Print a section's items as text that `parse` reads back to the same tree.
pub fn print(s: &Section) -> String {
    let mut out = String::new();
    push_items(&mut out, &s.items);
    out
}

/// Writes text in exactly [`print`]'s layout without building a tree first:
/// the VG model streams itself through this (metadata reaches megabytes).
pub struct Writer {
    out: String,
}

impl Writer {
    pub fn with_capacity(capacity: usize) -> Writer {
        Writer {
            out: String::with_capacity(capacity),
        }
    }
    pub fn int(&mut self, key: &str, v: i64) {
        self.out.push_str(key);
        let _ = writeln!(self.out, " = {v}");
    }
    pub fn str(&mut self, key: &str, v: &str) {
        self.out.push_str(key);
        self.out.push_str(" = ");
        push_str_escaped(&mut self.out, v);
        self.out.push('\n');
    }
    pub fn strs<S: AsRef<str>>(&mut self, key: &str, v: &[S]) {
        self.out.push_str(key);
        self.out.push_str(" = [");
        for (i, e) in v.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            push_str_escaped(&mut self.out, e.as_ref());
        }
        self.out.push_str("]\n");
    }
    /// `key = [ "name", number, ... ]` (a striped segment's `stripes`).
    pub fn pairs<S: AsRef<str>>(&mut self, key: &str, v: &[(S, u64)]) {
        self.out.push_str(key);
        self.out.push_str(" = [");
        for (i, (name, n)) in v.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            push_str_escaped(&mut self.out, name.as_ref());
            let _ = write!(self.out, ", {n}");
        }
        self.out.push_str("]\n");
    }
    pub fn open(&mut self, key: &str) {
        // LVM2 reads the VG name from the first byte of the text.
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        self.out.push_str(key);
        self.out.push_str(" {\n");
    }
    pub fn close(&mut self) {
        self.out.push_str("}\n");
    }
    pub fn item(&mut self, item: &Item) {
        push_items(&mut self.out, std::slice::from_ref(item));
    }
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use proptest::prelude::*;

    fn arb_scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::Int),
            "\\PC{0,12}".prop_map(Value::Str),
            (0u32..1000, 0u32..1000).prop_map(|(a, b)| Value::Float(format!("{a}.{b}"))),
        ]
    }
    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            arb_scalar(),
            proptest::collection::vec(arb_scalar(), 0..4).prop_map(Value::Array)
        ]
    }
    fn arb_key() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_.+-]{0,10}"
    }
    fn arb_section() -> impl Strategy<Value = Section> {
        let leaf = proptest::collection::vec(
            (arb_key(), arb_value()).prop_map(|(k, v)| Item::Assign(k, v)),
            0..5,
        )
        .prop_map(|items| Section { items });
        leaf.prop_recursive(3, 30, 5, |inner| {
            proptest::collection::vec(
                prop_oneof![
                    (arb_key(), arb_value()).prop_map(|(k, v)| Item::Assign(k, v)),
                    (arb_key(), inner).prop_map(|(k, s)| Item::Section(k, s)),
                ],
                0..5,
            )
            .prop_map(|items| Section { items })
        })
    }

    #[test]
    fn quotes_and_backslashes_are_escaped_and_nothing_else() {
        for (s, want) in [
            ("", r#""""#),
            ("plain", r#""plain""#),
            (r#"a"b\c"#, r#""a\"b\\c""#),
            (r#"""#, r#""\"""#),
            ("\\", r#""\\""#),
            ("é\"", r#""é\"""#),
        ] {
            let mut out = String::new();
            push_str_escaped(&mut out, s);
            assert_eq!(out, want, "{s:?}");
        }
    }

    proptest! {
        #[test]
        fn print_then_parse_is_identity(s in arb_section()) {
            let text = print(&s);
            let back = parse(text.as_bytes()).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(back, s);
        }

        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }
    }
}
