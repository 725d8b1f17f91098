//! A small HuJSON reader: JSON plus `//` and `/* */` comments and trailing
//! commas, keeping the line of every value so that policy errors can name
//! the line the operator has to fix.
//!
//! The reader is bounded, because policies reach it from the admin API: a
//! document larger than [`MAX_SIZE`] or nested deeper than [`MAX_DEPTH`] is
//! refused with the line where the limit is crossed (recursion per level
//! would otherwise let a 200 KB document of `[` overflow the stack), and
//! duplicate keys are found with a set, linear in the object's size.

use std::collections::HashSet;
use std::fmt;

/// The largest document accepted, in bytes. A real policy is a few KB;
/// this leaves room for generated ones with thousands of hosts.
pub const MAX_SIZE: usize = 1 << 20;

/// The deepest nesting of arrays and objects accepted. A policy needs 4.
pub const MAX_DEPTH: u32 = 64;

/// A value and the line (1-based) where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Spanned {
    /// Line where the value starts.
    pub line: u32,
    /// The value.
    pub value: Value,
}

/// A HuJSON value. Object members keep their order and their key's line.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number (as written; the policy only needs integers).
    Number(f64),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Spanned>),
    /// An object: (key, key line, value).
    Object(Vec<(String, u32, Spanned)>),
}

impl Value {
    /// The JSON type name, for error messages.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number(_) => "a number",
            Self::String(_) => "a string",
            Self::Array(_) => "an array",
            Self::Object(_) => "an object",
        }
    }
}

/// A syntax error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SyntaxError {
    /// Line of the problem.
    pub line: u32,
    /// What is wrong.
    pub message: String,
}

/// Parses a HuJSON document.
pub fn parse(text: &str) -> Result<Spanned, SyntaxError> {
    if text.len() > MAX_SIZE {
        let line = text.as_bytes()[..MAX_SIZE].iter().filter(|&&c| c == b'\n').count() + 1;
        return Err(SyntaxError {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            message: format!("the document is {} bytes, over the limit of {MAX_SIZE} bytes", text.len()),
        });
    }
    let mut p = Parser { s: text.as_bytes(), pos: 0, line: 1, depth: 0 };
    p.skip_ws()?;
    let v = p.value()?;
    p.skip_ws()?;
    if p.pos < p.s.len() {
        return Err(p.err("unexpected text after the end of the document"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    line: u32,
    /// Arrays and objects open around the current position.
    depth: u32,
}

impl Parser<'_> {
    fn err(&self, message: impl fmt::Display) -> SyntaxError {
        SyntaxError { line: self.line, message: message.to_string() }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn skip_ws(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r' | b'\n') => {
                    self.bump();
                }
                Some(b'/') if self.s.get(self.pos + 1) == Some(&b'/') => {
                    while let Some(c) = self.bump() {
                        if c == b'\n' {
                            break;
                        }
                    }
                }
                Some(b'/') if self.s.get(self.pos + 1) == Some(&b'*') => {
                    let start = self.line;
                    self.pos += 2;
                    loop {
                        match self.bump() {
                            None => {
                                return Err(SyntaxError { line: start, message: "unterminated /* comment".into() });
                            }
                            Some(b'*') if self.peek() == Some(b'/') => {
                                self.pos += 1;
                                break;
                            }
                            Some(_) => {}
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self) -> Result<Spanned, SyntaxError> {
        let line = self.line;
        let value = match self.peek() {
            None => return Err(self.err("unexpected end of document")),
            Some(b'{') => self.nested(Self::object)?,
            Some(b'[') => self.nested(Self::array)?,
            Some(b'"') => Value::String(self.string()?),
            Some(b't') => self.word("true", Value::Bool(true))?,
            Some(b'f') => self.word("false", Value::Bool(false))?,
            Some(b'n') => self.word("null", Value::Null)?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(c) => return Err(self.err(format!("unexpected character {:?}", c as char))),
        };
        Ok(Spanned { line, value })
    }

    /// Parses an array or object one level deeper, refusing to go past
    /// [`MAX_DEPTH`].
    fn nested(&mut self, f: fn(&mut Self) -> Result<Value, SyntaxError>) -> Result<Value, SyntaxError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.err(format!("arrays and objects nested deeper than {MAX_DEPTH} levels")));
        }
        self.depth += 1;
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn word(&mut self, word: &str, v: Value) -> Result<Value, SyntaxError> {
        if self.s[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(v)
        } else {
            Err(self.err("unexpected word (strings need double quotes)"))
        }
    }

    fn number(&mut self) -> Result<Value, SyntaxError> {
        let start = self.pos;
        while matches!(self.peek(), Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.pos]).map_err(|_| self.err("bad number"))?;
        text.parse().map(Value::Number).map_err(|_| self.err(format!("bad number {text:?}")))
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start_line = self.line;
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.bump() {
                None | Some(b'\n') => {
                    return Err(SyntaxError { line: start_line, message: "unterminated string".into() });
                }
                Some(b'"') => break,
                Some(b'\\') => match self.bump() {
                    Some(b'"') => out.push(b'"'),
                    Some(b'\\') => out.push(b'\\'),
                    Some(b'/') => out.push(b'/'),
                    Some(b'n') => out.push(b'\n'),
                    Some(b't') => out.push(b'\t'),
                    Some(b'r') => out.push(b'\r'),
                    Some(b'b') => out.push(8),
                    Some(b'f') => out.push(12),
                    Some(b'u') => {
                        let hex = self.s.get(self.pos..self.pos + 4).ok_or_else(|| self.err("bad \\u escape"))?;
                        let code = std::str::from_utf8(hex)
                            .ok()
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .and_then(char::from_u32)
                            .ok_or_else(|| self.err("bad \\u escape"))?;
                        self.pos += 4;
                        let mut buf = [0; 4];
                        out.extend_from_slice(code.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => return Err(self.err("bad escape in string")),
                },
                Some(c) => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| SyntaxError { line: start_line, message: "string is not UTF-8".into() })
    }

    fn array(&mut self) -> Result<Value, SyntaxError> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_ws()?;
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Value::Array(items));
            }
            items.push(self.value()?);
            // A missing comma is reported on the line of the value before it.
            let end = self.line;
            self.skip_ws()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                _ => return Err(SyntaxError { line: end, message: "expected ',' or ']' after array element".into() }),
            }
        }
    }

    fn object(&mut self) -> Result<Value, SyntaxError> {
        self.pos += 1;
        let mut members: Vec<(String, u32, Spanned)> = Vec::new();
        let mut keys = HashSet::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                Some(b'"') => {}
                _ => return Err(self.err("expected a quoted key or '}' in object")),
            }
            let line = self.line;
            let key = self.string()?;
            if !keys.insert(key.clone()) {
                return Err(SyntaxError { line, message: format!("duplicate key {key:?}") });
            }
            self.skip_ws()?;
            if self.peek() != Some(b':') {
                return Err(self.err(format!("expected ':' after key {key:?}")));
            }
            self.pos += 1;
            self.skip_ws()?;
            let value = self.value()?;
            members.push((key, line, value));
            let end = self.line;
            self.skip_ws()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                _ => return Err(SyntaxError { line: end, message: "expected ',' or '}' after object member".into() }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas() {
        let doc = "// head\n{\n  \"a\": [1, 2,], /* inline */\n  \"b\": {\"c\": \"x\\\"y\",},\n}\n";
        let v = parse(doc).unwrap();
        let Value::Object(m) = v.value else { panic!("object") };
        assert_eq!(m[0].0, "a");
        assert_eq!(m[0].1, 3);
        assert_eq!(m[1].2.line, 4);
        let Value::Object(inner) = &m[1].2.value else { panic!("inner") };
        assert_eq!(inner[0].2.value, Value::String("x\"y".into()));
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("{\n\"a\": 1\n\"b\": 2}").unwrap_err().line, 2);
        assert_eq!(parse("{\n\n \"a\": tru }").unwrap_err().line, 3);
        assert_eq!(parse("/* open\n\n").unwrap_err().line, 1);
        assert_eq!(parse("{\"a\":1,\n\"a\":2}").unwrap_err().line, 2);
        assert!(parse("{} x").is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // 200 KB of '[' used to overflow the stack and abort control.
        let deep = "[".repeat(200_000);
        let e = parse(&deep).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("nested deeper than 64"), "{e}");
        // The limit itself is fine, one more level is not; the error names
        // the line where the limit is crossed.
        let ok = format!("{}{}", "[\n".repeat(64), "]".repeat(64));
        assert!(parse(&ok).is_ok());
        let over = format!("{}{}", "{\"a\":\n".repeat(65), "}".repeat(65));
        assert_eq!(parse(&over).unwrap_err().line, 65);
    }

    #[test]
    fn oversized_documents_are_refused_with_their_line() {
        let big = format!("{{\"a\": \"{}\",\n\"b\": 1}}", "x".repeat(MAX_SIZE));
        let e = parse(&big).unwrap_err();
        assert!(e.message.contains("over the limit"), "{e}");
        assert_eq!(e.line, 1);
        let lines = format!("[{}]", "1,\n".repeat(MAX_SIZE / 3 + 10));
        assert!(parse(&lines).unwrap_err().line > 300_000);
    }

    #[test]
    fn many_keys_parse_in_linear_time() {
        // 50k distinct keys: the pairwise check took over a minute here.
        let doc = format!("{{{}}}", (0..50_000).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>().join(","));
        let Value::Object(m) = parse(&doc).unwrap().value else { panic!("object") };
        assert_eq!(m.len(), 50_000);
        let dup =
            format!("{{{},\n\"k7\":0}}", (0..50_000).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>().join(","));
        assert_eq!(parse(&dup).unwrap_err().line, 2);
    }
}
