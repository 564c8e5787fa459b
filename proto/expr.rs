//! The `--where` text syntax of a [`Selection`](crate::Selection), parsed into a [`Predicate`].
//!
//! ```text
//! expr    := or
//! or      := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | "(" expr ")" | compare
//! compare := FIELD ("=" | "!=" | "<" | "<=" | ">" | ">=") VALUE
//!          | FIELD ["not"] "in" "(" VALUE ("," VALUE)* ")"
//!          | FIELD "between" NUMBER "and" NUMBER
//! VALUE   := bare word (letters, digits, . _ - + / : @) | "double quoted" | 'single quoted'
//! ```
//! Keywords are case-insensitive. Used by the CLI and by the server for `Selection.expr`, so
//! both read the text the same way.

use crate::{Field, FieldMatch, FieldRange, Predicate, PredicateList, predicate::Kind};

/// A parse error with the byte offset where it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// Byte offset into the expression.
    pub offset: usize,
    /// What was expected or found.
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at character {}: {}", self.offset + 1, self.message)
    }
}

impl std::error::Error for ParseError {}

/// The field names the syntax accepts, with the field each means.
pub const FIELD_NAMES: &[(&str, Field)] = &[
    ("model", Field::Model),
    ("dataset", Field::TrainingDataset),
    ("training_dataset", Field::TrainingDataset),
    ("pretraining_dataset", Field::PretrainingDataset),
    ("task", Field::Task),
    ("architecture", Field::Architecture),
    ("arch", Field::Architecture),
    ("variant", Field::ArchitectureVariant),
    ("architecture_variant", Field::ArchitectureVariant),
    ("visual_category", Field::VisualCategory),
    ("category", Field::VisualCategory),
    ("format", Field::Format),
    ("producer", Field::Producer),
    ("tag", Field::Tag),
    ("license", Field::License),
    ("depth_definition", Field::DepthDefinition),
    ("conv_depth", Field::ConvDepth),
    ("conv_depth_norm", Field::ConvDepthNorm),
    ("layer_index", Field::LayerIndex),
    ("in_channels", Field::InChannels),
    ("out_channels", Field::OutChannels),
    ("n_filters", Field::NFilters),
    ("model_id", Field::ModelId),
    ("layer_id", Field::LayerId),
    ("opset", Field::Opset),
    ("depth_decile", Field::DepthDecile),
    ("depth_decile_first", Field::DepthDecileFirst),
];

/// Looks a field up by its syntax name (case-insensitive).
pub fn field_by_name(name: &str) -> Option<Field> {
    let lower = name.to_ascii_lowercase();
    FIELD_NAMES.iter().find(|(n, _)| *n == lower).map(|(_, f)| *f)
}

/// The canonical syntax name of a field.
pub fn field_name(field: Field) -> &'static str {
    FIELD_NAMES.iter().find(|(_, f)| *f == field).map(|(n, _)| *n).unwrap_or("unspecified")
}

/// True for fields compared as numbers.
pub fn is_numeric(field: Field) -> bool {
    matches!(
        field,
        Field::ConvDepth
            | Field::ConvDepthNorm
            | Field::LayerIndex
            | Field::InChannels
            | Field::OutChannels
            | Field::NFilters
            | Field::ModelId
            | Field::LayerId
            | Field::Opset
    )
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

fn lex(s: &str) -> Result<Vec<(usize, Tok)>, ParseError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        match c {
            b'(' => {
                out.push((start, Tok::LParen));
                i += 1;
            }
            b')' => {
                out.push((start, Tok::RParen));
                i += 1;
            }
            b',' => {
                out.push((start, Tok::Comma));
                i += 1;
            }
            b'=' => {
                out.push((start, Tok::Op("=")));
                i += if b.get(i + 1) == Some(&b'=') { 2 } else { 1 };
            }
            b'!' if b.get(i + 1) == Some(&b'=') => {
                out.push((start, Tok::Op("!=")));
                i += 2;
            }
            b'<' | b'>' => {
                let eq = b.get(i + 1) == Some(&b'=');
                let op = match (c, eq) {
                    (b'<', true) => "<=",
                    (b'<', false) => "<",
                    (_, true) => ">=",
                    _ => ">",
                };
                out.push((start, Tok::Op(op)));
                i += if eq { 2 } else { 1 };
            }
            b'"' | b'\'' => {
                let q = c;
                let mut j = i + 1;
                while j < b.len() && b[j] != q {
                    j += 1;
                }
                if j >= b.len() {
                    return Err(ParseError { offset: start, message: "unterminated quoted string".into() });
                }
                out.push((start, Tok::Quoted(s[i + 1..j].to_string())));
                i = j + 1;
            }
            _ if is_word_byte(c) => {
                let mut j = i;
                while j < b.len() && is_word_byte(b[j]) {
                    j += 1;
                }
                out.push((start, Tok::Word(s[i..j].to_string())));
                i = j;
            }
            _ => {
                let ch = s[i..].chars().next().unwrap_or('?');
                return Err(ParseError { offset: start, message: format!("unexpected character `{ch}`") });
            }
        }
    }
    Ok(out)
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+' | b'/' | b':' | b'@') || c >= 0x80
}

struct Parser<'a> {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
    _src: &'a str,
}

/// Parses the `--where` syntax. An empty or all-whitespace string yields `None` (select all).
pub fn parse(src: &str) -> Result<Option<Predicate>, ParseError> {
    let toks = lex(src)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let mut p = Parser { toks, pos: 0, len: src.len(), _src: src };
    let e = p.or()?;
    if let Some((off, t)) = p.toks.get(p.pos) {
        return Err(ParseError { offset: *off, message: format!("unexpected {}", describe(t)) });
    }
    Ok(Some(e))
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Word(w) => format!("`{w}`"),
        Tok::Quoted(w) => format!("\"{w}\""),
        Tok::Op(o) => format!("`{o}`"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }
    fn offset(&self) -> usize {
        self.toks.get(self.pos).map(|(o, _)| *o).unwrap_or(self.len)
    }
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { offset: self.offset(), message: msg.into() })
    }
    fn keyword(&mut self, kw: &str) -> bool {
        if let Some(Tok::Word(w)) = self.peek() {
            if w.eq_ignore_ascii_case(kw) {
                self.pos += 1;
                return true;
            }
        }
        false
    }
    fn or(&mut self) -> Result<Predicate, ParseError> {
        let mut items = vec![self.and()?];
        while self.keyword("or") {
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 { items.remove(0) } else { Predicate { kind: Some(Kind::Any(PredicateList { items })) } })
    }
    fn and(&mut self) -> Result<Predicate, ParseError> {
        let mut items = vec![self.unary()?];
        while self.keyword("and") {
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 { items.remove(0) } else { Predicate { kind: Some(Kind::All(PredicateList { items })) } })
    }
    fn unary(&mut self) -> Result<Predicate, ParseError> {
        if self.keyword("not") {
            let inner = self.unary()?;
            return Ok(not(inner));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let e = self.or()?;
            if self.peek() != Some(&Tok::RParen) {
                return self.err("expected `)`");
            }
            self.pos += 1;
            return Ok(e);
        }
        self.compare()
    }
    fn value(&mut self) -> Result<String, ParseError> {
        match self.peek().cloned() {
            Some(Tok::Word(w)) | Some(Tok::Quoted(w)) => {
                self.pos += 1;
                Ok(w)
            }
            Some(t) => self.err(format!("expected a value, found {}", describe(&t))),
            None => self.err("expected a value, found the end"),
        }
    }
    fn number(&mut self, field: &str) -> Result<f64, ParseError> {
        let off = self.offset();
        let v = self.value()?;
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or(ParseError { offset: off, message: format!("`{field}` compares numbers, `{v}` is not one") })
    }
    fn compare(&mut self) -> Result<Predicate, ParseError> {
        let off = self.offset();
        let name = match self.peek().cloned() {
            Some(Tok::Word(w)) => w,
            Some(t) => return self.err(format!("expected a field name, found {}", describe(&t))),
            None => return self.err("expected a field name, found the end"),
        };
        let field = field_by_name(&name).ok_or_else(|| ParseError {
            offset: off,
            message: format!(
                "unknown field `{name}`; fields: {}",
                FIELD_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        })?;
        self.pos += 1;
        let numeric = is_numeric(field);
        if self.keyword("between") {
            if !numeric {
                return self.err(format!("`between` needs a numeric field, `{name}` is text"));
            }
            let lo = self.number(&name)?;
            if !self.keyword("and") {
                return self.err("expected `and` in `between A and B`");
            }
            let hi = self.number(&name)?;
            return Ok(range(field, Some(lo), Some(hi), false, false));
        }
        let negated_in = self.keyword("not");
        if self.keyword("in") {
            if self.peek() != Some(&Tok::LParen) {
                return self.err("expected `(` after `in`");
            }
            self.pos += 1;
            let mut values = vec![self.value()?];
            while self.peek() == Some(&Tok::Comma) {
                self.pos += 1;
                values.push(self.value()?);
            }
            if self.peek() != Some(&Tok::RParen) {
                return self.err("expected `,` or `)` in the value list");
            }
            self.pos += 1;
            if numeric {
                for v in &values {
                    if v.parse::<f64>().is_err() {
                        return self.err(format!("`{name}` compares numbers, `{v}` is not one"));
                    }
                }
            }
            let m = Predicate { kind: Some(Kind::Match(FieldMatch { field: field as i32, values })) };
            return Ok(if negated_in { not(m) } else { m });
        }
        if negated_in {
            return self.err("expected `in` after `not`");
        }
        let op = match self.peek() {
            Some(Tok::Op(o)) => *o,
            _ => return self.err(format!("expected an operator after `{name}` (=, !=, <, <=, >, >=, in, between)")),
        };
        self.pos += 1;
        match op {
            "=" | "!=" => {
                let v = self.value()?;
                if numeric && v.parse::<f64>().is_err() {
                    return self.err(format!("`{name}` compares numbers, `{v}` is not one"));
                }
                let m = Predicate { kind: Some(Kind::Match(FieldMatch { field: field as i32, values: vec![v] })) };
                Ok(if op == "!=" { not(m) } else { m })
            }
            _ => {
                if !numeric {
                    return self.err(format!("`{op}` needs a numeric field, `{name}` is text"));
                }
                let x = self.number(&name)?;
                Ok(match op {
                    "<" => range(field, None, Some(x), false, true),
                    "<=" => range(field, None, Some(x), false, false),
                    ">" => range(field, Some(x), None, true, false),
                    _ => range(field, Some(x), None, false, false),
                })
            }
        }
    }
}

fn not(p: Predicate) -> Predicate {
    Predicate { kind: Some(Kind::Not(Box::new(p))) }
}

fn range(field: Field, min: Option<f64>, max: Option<f64>, min_exclusive: bool, max_exclusive: bool) -> Predicate {
    Predicate { kind: Some(Kind::Range(FieldRange { field: field as i32, min, max, min_exclusive, max_exclusive })) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(field: Field, v: &[&str]) -> Predicate {
        Predicate {
            kind: Some(Kind::Match(FieldMatch { field: field as i32, values: v.iter().map(|s| s.to_string()).collect() })),
        }
    }

    #[test]
    fn precedence_and_forms() {
        let p = parse("task = Classification and dataset in (imagenet, 'cifar 10') or not arch != VGG").unwrap().unwrap();
        let expect = Predicate {
            kind: Some(Kind::Any(PredicateList {
                items: vec![
                    Predicate {
                        kind: Some(Kind::All(PredicateList {
                            items: vec![
                                m(Field::Task, &["Classification"]),
                                m(Field::TrainingDataset, &["imagenet", "cifar 10"]),
                            ],
                        })),
                    },
                    not(not(m(Field::Architecture, &["VGG"]))),
                ],
            })),
        };
        assert_eq!(p, expect);
        assert_eq!(
            parse("conv_depth between 1 and 3").unwrap().unwrap(),
            range(Field::ConvDepth, Some(1.0), Some(3.0), false, false)
        );
        assert_eq!(parse("conv_depth_norm > 0.5").unwrap().unwrap(), range(Field::ConvDepthNorm, Some(0.5), None, true, false));
        assert_eq!(parse("  ").unwrap(), None);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = parse("task = A and colour = red").unwrap_err();
        assert_eq!(e.offset, 13);
        assert!(e.message.contains("unknown field `colour`"));
        assert!(parse("conv_depth < deep").unwrap_err().message.contains("not one"));
        assert!(parse("task < 3").unwrap_err().message.contains("numeric"));
        assert!(parse("(task = A").unwrap_err().message.contains("`)`"));
        assert!(parse("task = 'A").unwrap_err().message.contains("unterminated"));
    }
}
