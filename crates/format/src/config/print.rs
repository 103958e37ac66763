//! Printer for the text metadata grammar, in the style LVM2 writes to disk
//! (no indentation, one item per line, a blank line before subsections).

use super::{Item, Section, Value};

fn push_str_escaped(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::Int(i) => out.push_str(&i.to_string()),
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

fn push_items(out: &mut String, s: &Section) {
    for item in &s.items {
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
                push_items(out, sub);
                out.push_str("}\n");
            }
        }
    }
}

/// Print a section's items as text that `parse` reads back to the same tree.
pub fn print(s: &Section) -> String {
    let mut out = String::new();
    push_items(&mut out, s);
    out
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
