//! LVM2's text metadata grammar (the libdm config syntax): sections
//! `name { ... }`, assignments `key = value`, values that are strings
//! (with `\` escapes), integers, floats or arrays of those, and `#` comments.
//! The tree keeps item order; the printer writes what the parser reads.

mod parse;
mod print;

pub use parse::{ParseError, parse};
pub use print::{Writer, print};

/// A scalar or array value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    /// A float, kept as written so that printing does not change it.
    Float(String),
    Str(String),
    Array(Vec<Value>),
}

/// One item of a section: an assignment or a subsection.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Assign(String, Value),
    Section(String, Section),
}

/// An ordered list of items.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Section {
    pub items: Vec<Item>,
}

impl Item {
    pub fn key(&self) -> &str {
        match self {
            Item::Assign(k, _) | Item::Section(k, _) => k,
        }
    }
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.items.iter().find_map(|i| match i {
            Item::Assign(k, v) if k == key => Some(v),
            _ => None,
        })
    }
    pub fn section(&self, key: &str) -> Option<&Section> {
        self.items.iter().find_map(|i| match i {
            Item::Section(k, s) if k == key => Some(s),
            _ => None,
        })
    }
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Section)> {
        self.items.iter().filter_map(|i| match i {
            Item::Section(k, s) => Some((k.as_str(), s)),
            _ => None,
        })
    }
    pub fn push(&mut self, key: &str, v: Value) {
        self.items.push(Item::Assign(key.to_string(), v));
    }
    pub fn push_section(&mut self, key: &str, s: Section) {
        self.items.push(Item::Section(key.to_string(), s));
    }
}

impl Value {
    pub fn str_array<S: AsRef<str>>(v: &[S]) -> Value {
        Value::Array(
            v.iter()
                .map(|s| Value::Str(s.as_ref().to_string()))
                .collect(),
        )
    }
}
