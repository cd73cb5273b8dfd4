//! GBNF (llama.cpp's grammar format) converted to the Lark syntax llguidance reads, so that a
//! grammar written for llama.cpp constrains Ember's output to the same language.
//!
//! GBNF as llama.cpp defines it: rules `name ::= alternatives`, one per line (a rule goes on
//! past a newline inside parentheses and after `|`; here also on a next line that starts
//! with `|`); names of letters, digits, `-` and `_`; the start rule `root`; terms `"literal"`,
//! character classes `[a-z]` / `[^...]`, `.` (any character), groups `( ... )`, rule
//! references; postfix `*`, `+`, `?`, `{m}`, `{m,}` and `{m,n}` (and `{,n}`, which llama.cpp
//! refuses); `#` comments; the
//! escapes `\n \r \t \\ \" \[ \] \xHH \uHHHH \UHHHHHHHH`.
//!
//! Each GBNF rule becomes a Lark rule of a name of its own (Lark reads upper-case names as
//! terminals, and `-` is not a name character); literals become Lark strings, classes and `.`
//! become regular expressions whose characters are all written as `\x{...}` escapes. The
//! converter is linear in its input, and its nesting is bounded by [`MAX_NESTING`].

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::error::{Error, Result};

/// The deepest nesting of parentheses accepted.
pub const MAX_NESTING: usize = 64;

/// The Lark grammar (start rule `start`) for a GBNF grammar (start rule `root`).
pub fn to_lark(source: &str) -> Result<String> {
    let mut p = Parser {
        chars: source.chars().collect(),
        pos: 0,
        depth: 0,
        names: HashMap::new(),
        taken: HashMap::new(),
        defined: Vec::new(),
        referenced: Vec::new(),
    };
    let mut out = String::new();
    let mut rules = String::new();
    loop {
        p.skip_space(true);
        if p.at_end() {
            break;
        }
        let line = p.line();
        let name = p.name().ok_or_else(|| p.error("a rule name"))?;
        p.skip_space(false);
        if !p.eat_str("::=") {
            return Err(p.error("`::=` after the rule name"));
        }
        p.skip_space(true);
        let body = p.alternates()?;
        if p.defined.iter().any(|(n, _)| *n == name) {
            return Err(Error::InvalidArgument(format!(
                "GBNF line {line}: rule {name} is defined twice"
            )));
        }
        let lark = p.lark_name(&name);
        p.defined.push((name, line));
        let _ = writeln!(rules, "{lark}: {body}");
        p.skip_space(false);
        if !p.at_end() && !p.eat('\n') {
            return Err(p.error("the end of the line"));
        }
    }
    if let Some((name, line)) = p
        .referenced
        .iter()
        .find(|(n, _)| !p.defined.iter().any(|(d, _)| d == n))
    {
        return Err(Error::InvalidArgument(format!(
            "GBNF line {line}: rule {name} is not defined"
        )));
    }
    if !p.defined.iter().any(|(n, _)| n == "root") {
        return Err(Error::InvalidArgument(
            "GBNF: the grammar has no `root` rule".into(),
        ));
    }
    let root = p.lark_name("root");
    let _ = writeln!(out, "start: {root}");
    out.push_str(&rules);
    Ok(out)
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    /// Parentheses open at `pos`.
    depth: usize,
    /// GBNF name → Lark name.
    names: HashMap<String, String>,
    /// Lark names given out (→ the GBNF name they stand for).
    taken: HashMap<String, String>,
    /// Rules defined, with their lines.
    defined: Vec<(String, usize)>,
    /// Rules referenced, with their lines.
    referenced: Vec<(String, usize)>,
}

impl Parser {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if self.chars.len() >= self.pos + n
            && s.chars()
                .eq(self.chars[self.pos..self.pos + n].iter().copied())
        {
            self.pos += n;
            true
        } else {
            false
        }
    }

    /// The 1-based line of `pos`.
    fn line(&self) -> usize {
        1 + self.chars[..self.pos.min(self.chars.len())]
            .iter()
            .filter(|&&c| c == '\n')
            .count()
    }

    fn error(&self, expected: &str) -> Error {
        let found = match self.peek() {
            None => "the end".to_string(),
            Some(c) => format!("{c:?}"),
        };
        Error::InvalidArgument(format!(
            "GBNF line {}: expected {expected}, found {found}",
            self.line()
        ))
    }

    /// Skips blanks and comments, and newlines too when `newlines` (or inside parentheses).
    fn skip_space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' | '\r' => self.pos += 1,
                '\n' if newlines || self.depth > 0 => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.pos += 1;
        }
        (self.pos > start).then(|| self.chars[start..self.pos].iter().collect())
    }

    /// The Lark rule name of a GBNF rule: `g_` and its lower-cased name with `-` as `_`,
    /// numbered when two GBNF names would meet.
    fn lark_name(&mut self, name: &str) -> String {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let base = format!("g_{}", name.to_ascii_lowercase().replace('-', "_"));
        let mut lark = base.clone();
        let mut i = 1;
        while self.taken.contains_key(&lark) {
            i += 1;
            lark = format!("{base}_{i}");
        }
        self.taken.insert(lark.clone(), name.to_string());
        self.names.insert(name.to_string(), lark.clone());
        lark
    }

    /// `sequence ('|' sequence)*`; at the top level a line that starts with `|` goes on.
    fn alternates(&mut self) -> Result<String> {
        let mut out = self.sequence()?;
        loop {
            let before = self.pos;
            self.skip_space(self.depth == 0);
            if self.eat('|') {
                self.skip_space(true);
                out.push_str(" | ");
                out.push_str(&self.sequence()?);
            } else {
                self.pos = before;
                return Ok(out);
            }
        }
    }

    /// Items up to `|`, `)`, the end of the line (at the top level) or of the input.
    fn sequence(&mut self) -> Result<String> {
        let mut items: Vec<String> = Vec::new();
        loop {
            self.skip_space(false);
            match self.peek() {
                None | Some('|') | Some(')') | Some('\n') => break,
                _ => {}
            }
            // A name followed by `::=` starts the next rule (a rule ends at a newline, so
            // this is only reached when the newline is missing).
            let at = self.pos;
            if let Some(name) = self.name() {
                self.skip_space(false);
                if self.eat_str("::=") {
                    return Err(Error::InvalidArgument(format!(
                        "GBNF line {}: rule {name} starts before the line ends",
                        self.line()
                    )));
                }
                self.pos = at;
            }
            let item = self.primary()?;
            items.push(self.suffixes(item)?);
        }
        Ok(if items.is_empty() {
            "\"\"".to_string()
        } else {
            items.join(" ")
        })
    }

    fn primary(&mut self) -> Result<String> {
        let line = self.line();
        match self.peek() {
            Some('"') => {
                self.pos += 1;
                let mut text = String::new();
                loop {
                    match self.peek() {
                        None | Some('\n') => return Err(self.error("the closing `\"`")),
                        Some('"') => {
                            self.pos += 1;
                            break;
                        }
                        Some(_) => text.push(self.char_of_literal()?),
                    }
                }
                Ok(serde_json::Value::String(text).to_string())
            }
            Some('[') => {
                self.pos += 1;
                let negated = self.eat('^');
                let mut class = String::new();
                let mut any = false;
                loop {
                    match self.peek() {
                        None => return Err(self.error("the closing `]`")),
                        Some(']') => {
                            self.pos += 1;
                            break;
                        }
                        Some(_) => {
                            let from = self.char_of_literal()?;
                            let _ = write!(class, "\\x{{{:X}}}", from as u32);
                            if self.peek() == Some('-')
                                && self.chars.get(self.pos + 1) != Some(&']')
                            {
                                self.pos += 1;
                                let to = self.char_of_literal()?;
                                if to < from {
                                    return Err(Error::InvalidArgument(format!(
                                        "GBNF line {line}: range {from:?}-{to:?} is reversed"
                                    )));
                                }
                                let _ = write!(class, "-\\x{{{:X}}}", to as u32);
                            }
                            any = true;
                        }
                    }
                }
                if !any {
                    return Err(Error::InvalidArgument(format!(
                        "GBNF line {line}: an empty character class"
                    )));
                }
                Ok(format!("/[{}{class}]/", if negated { "^" } else { "" }))
            }
            Some('.') => {
                self.pos += 1;
                Ok("/(?s:.)/".to_string())
            }
            Some('(') => {
                if self.depth == MAX_NESTING {
                    return Err(Error::InvalidArgument(format!(
                        "GBNF line {line}: parentheses nested deeper than {MAX_NESTING}"
                    )));
                }
                self.pos += 1;
                self.depth += 1;
                self.skip_space(true);
                let inner = self.alternates()?;
                self.skip_space(true);
                if !self.eat(')') {
                    return Err(self.error("`)`"));
                }
                self.depth -= 1;
                Ok(format!("({inner})"))
            }
            _ => {
                let name = self.name().ok_or_else(|| self.error("a term"))?;
                self.referenced.push((name.clone(), line));
                Ok(self.lark_name(&name))
            }
        }
    }

    /// The postfix operators after an item, each applied to what comes before it.
    fn suffixes(&mut self, mut item: String) -> Result<String> {
        loop {
            match self.peek() {
                Some(op @ ('*' | '+' | '?')) => {
                    self.pos += 1;
                    item = format!("({item}){op}");
                }
                Some('{') => {
                    self.pos += 1;
                    self.skip_space(false);
                    let min = self.number()?;
                    self.skip_space(false);
                    let max = if self.eat(',') {
                        self.skip_space(false);
                        self.number()?
                    } else {
                        Some(min.unwrap_or(0))
                    };
                    self.skip_space(false);
                    if !self.eat('}') {
                        return Err(self.error("`}` ending a repetition"));
                    }
                    let min = min.unwrap_or(0);
                    item = match max {
                        Some(max) if max < min => {
                            return Err(Error::InvalidArgument(format!(
                                "GBNF line {}: repetition {{{min},{max}}}",
                                self.line()
                            )))
                        }
                        Some(0) => "\"\"".to_string(),
                        Some(max) => format!("({item}){{{min},{max}}}"),
                        None => format!("({item}){{{min},}}"),
                    };
                }
                _ => return Ok(item),
            }
        }
    }

    /// A decimal number, if one is here (at most 6 digits: repetitions beyond are refused
    /// by llguidance's grammar size limit anyway).
    fn number(&mut self) -> Result<Option<usize>> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Ok(None);
        }
        if self.pos - start > 6 {
            return Err(Error::InvalidArgument(format!(
                "GBNF line {}: a repetition count over 999999",
                self.line()
            )));
        }
        let digits: String = self.chars[start..self.pos].iter().collect();
        Ok(digits.parse().ok())
    }

    /// One character of a literal or class, its escape decoded.
    fn char_of_literal(&mut self) -> Result<char> {
        let c = self.peek().ok_or_else(|| self.error("a character"))?;
        self.pos += 1;
        if c != '\\' {
            return Ok(c);
        }
        let e = self.peek().ok_or_else(|| self.error("an escape"))?;
        self.pos += 1;
        let digits = match e {
            'n' => return Ok('\n'),
            'r' => return Ok('\r'),
            't' => return Ok('\t'),
            '\\' | '"' | '[' | ']' => return Ok(e),
            'x' => 2,
            'u' => 4,
            'U' => 8,
            _ => return Err(self.error("an escape (\\n \\r \\t \\\\ \\\" \\[ \\] \\x \\u \\U)")),
        };
        let hex: String = self.chars[self.pos..(self.pos + digits).min(self.chars.len())]
            .iter()
            .collect();
        let code = (hex.len() == digits)
            .then(|| u32::from_str_radix(&hex, 16).ok())
            .flatten()
            .and_then(char::from_u32)
            .ok_or_else(|| self.error(&format!("{digits} hex digits of a character")))?;
        self.pos += digits;
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::to_lark;

    #[test]
    fn rules_names_and_terms_convert() {
        let lark = to_lark(
            "root ::= greeting \" \" name-list # a comment\n\
             greeting ::= \"hi\" | \"hello\\n\"\n\
             name-list ::= [A-Z] [a-z\\x41]{1,8} (\", \" [A-Z] .?)*\n",
        )
        .unwrap();
        assert_eq!(
            lark,
            "start: g_root\n\
             g_root: g_greeting \" \" g_name_list\n\
             g_greeting: \"hi\" | \"hello\\n\"\n\
             g_name_list: /[\\x{41}-\\x{5A}]/ (/[\\x{61}-\\x{7A}\\x{41}]/){1,8} \
             ((\", \" /[\\x{41}-\\x{5A}]/ (/(?s:.)/)?))*\n"
        );
    }

    #[test]
    fn rules_go_on_in_parentheses_and_after_bars() {
        let lark = to_lark("root ::= (\n  \"a\"\n  | \"b\"\n) ws\nws ::=\n  | \" \" ws\n").unwrap();
        assert_eq!(
            lark,
            "start: g_root\ng_root: (\"a\" | \"b\") g_ws\ng_ws: \"\" | \" \" g_ws\n"
        );
    }

    #[test]
    fn repetitions_keep_their_bounds() {
        let lark = to_lark("root ::= \"a\"{3} \"b\"{2,} \"c\"{,4} \"d\"{0} [^x]+\n").unwrap();
        assert_eq!(
            lark,
            "start: g_root\ng_root: (\"a\"){3,3} (\"b\"){2,} (\"c\"){0,4} \"\" (/[^\\x{78}]/)+\n"
        );
    }

    #[test]
    fn names_that_would_meet_stay_apart() {
        let lark =
            to_lark("root ::= a-b a_b A-B\na-b ::= \"1\"\na_b ::= \"2\"\nA-B ::= \"3\"\n").unwrap();
        assert!(lark.contains("g_root: g_a_b g_a_b_2 g_a_b_3\n"), "{lark}");
    }

    #[test]
    fn bad_grammars_say_where() {
        for (source, says) in [
            ("root ::= missing\n", "rule missing is not defined"),
            ("start ::= \"a\"\n", "no `root` rule"),
            ("root ::= \"a\nroot2 ::= \"b\"\n", "closing `\"`"),
            ("root ::= [z-a]\n", "reversed"),
            ("root ::= []\n", "empty character class"),
            ("root ::= \"a\"{3,2}\n", "repetition"),
            ("root ::= \"\\q\"\n", "an escape"),
            ("root ::= \"\\u12\"\n", "hex digits"),
            ("root ::= (\"a\"\n", "`)`"),
            ("root = \"a\"\n", "`::=`"),
            ("root ::= \"a\"\nroot ::= \"b\"\n", "defined twice"),
            (
                "root ::= \"a\" x ::= \"b\"\n",
                "starts before the line ends",
            ),
        ] {
            let err = to_lark(source).unwrap_err().to_string();
            assert!(err.contains(says), "{source:?}: {err}");
        }
        let deep = format!("root ::= {}\"a\"{}\n", "(".repeat(100), ")".repeat(100));
        assert!(to_lark(&deep)
            .unwrap_err()
            .to_string()
            .contains("nested deeper"));
    }
}
