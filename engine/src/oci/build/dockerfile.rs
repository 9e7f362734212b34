//! Dockerfiles: instructions, their two forms (shell and JSON), flags,
//! and variable substitution (`$VAR`, `${VAR}`, `${VAR:-default}`,
//! `${VAR:+alt}`), with the escape character a parser directive may set.

use std::collections::BTreeMap;

use crate::oci::error::OciError;

/// One instruction, its arguments joined across continuation lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// Upper case: `RUN`, `COPY`, ...
    pub cmd: String,
    /// `--name=value` flags before the arguments.
    pub flags: Vec<(String, String)>,
    /// The arguments as written, flags removed.
    pub args: String,
    /// 1-based line where it starts.
    pub line: usize,
}

impl Instruction {
    pub fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The JSON form (`["a", "b"]`) if the arguments are one.
    pub fn json(&self) -> Option<Vec<String>> {
        let t = self.args.trim();
        if !t.starts_with('[') {
            return None;
        }
        serde_json::from_str(t).ok()
    }

    /// What the cache key and messages show.
    pub fn text(&self) -> String {
        let mut s = self.cmd.clone();
        for (k, v) in &self.flags {
            s += &format!(" --{k}={v}");
        }
        s + " " + self.args.trim()
    }
}

fn err(line: usize, msg: impl std::fmt::Display) -> OciError {
    OciError::Build(format!("Dockerfile line {line}: {msg}"))
}

/// Parses a Dockerfile into instructions.
pub fn parse(text: &str) -> Result<Vec<Instruction>, OciError> {
    let mut escape = '\\';
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    let mut directives = true;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = raw.trim();
        if cur.is_none() {
            if directives {
                if let Some(d) = trimmed.strip_prefix('#') {
                    if let Some((k, v)) = d.split_once('=') {
                        if k.trim().eq_ignore_ascii_case("escape") {
                            escape = match v.trim() {
                                "`" => '`',
                                "\\" => '\\',
                                o => {
                                    return Err(err(
                                        line_no,
                                        format!("escape `{o}` must be \\ or `"),
                                    ))
                                }
                            };
                            continue;
                        }
                    }
                }
                directives = false;
            }
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
        } else if trimmed.starts_with('#') {
            continue; // comments inside a continued instruction
        }
        let (start, mut acc) = cur.take().unwrap_or((line_no, String::new()));
        let body = raw.trim_end();
        if let Some(stripped) = body.strip_suffix(escape) {
            acc.push_str(stripped);
            acc.push(' ');
            cur = Some((start, acc));
        } else {
            acc.push_str(body);
            out.push(split(start, &acc)?);
        }
    }
    if let Some((start, acc)) = cur {
        out.push(split(start, &acc)?);
    }
    Ok(out)
}

fn split(line: usize, text: &str) -> Result<Instruction, OciError> {
    let t = text.trim();
    let (cmd, mut rest) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
    let cmd = cmd.to_ascii_uppercase();
    if rest.contains("<<")
        && matches!(cmd.as_str(), "RUN" | "COPY" | "ADD")
        && !rest.trim_start().starts_with('[')
    {
        let after = rest.split("<<").nth(1).unwrap_or("");
        if after.starts_with(|c: char| c.is_ascii_uppercase() || c == '-' || c == '"' || c == '\'')
        {
            return Err(err(
                line,
                "heredocs are not supported; write the lines as a RUN with && or COPY a file",
            ));
        }
    }
    let mut flags = Vec::new();
    loop {
        let r = rest.trim_start();
        let Some(f) = r.strip_prefix("--") else {
            break;
        };
        let (word, tail) = f.split_once(char::is_whitespace).unwrap_or((f, ""));
        let (k, v) = word.split_once('=').unwrap_or((word, ""));
        flags.push((k.to_owned(), v.to_owned()));
        rest = tail;
    }
    Ok(Instruction {
        cmd,
        flags,
        args: rest.trim().to_owned(),
        line,
    })
}

/// Substitutes `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}`; `\$` is a dollar.
pub fn substitute(s: &str, vars: &BTreeMap<String, String>) -> String {
    let b: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '\\' && i + 1 < b.len() && b[i + 1] == '$' {
            out.push('$');
            i += 2;
            continue;
        }
        if c != '$' || i + 1 >= b.len() {
            out.push(c);
            i += 1;
            continue;
        }
        if b[i + 1] == '{' {
            let Some(end) = b[i..].iter().position(|&c| c == '}') else {
                out.push(c);
                i += 1;
                continue;
            };
            let inner: String = b[i + 2..i + end].iter().collect();
            i += end + 1;
            let (name, op) = match inner.find(':') {
                Some(p) => (&inner[..p], Some(&inner[p + 1..])),
                None => (inner.as_str(), None),
            };
            let val = vars.get(name).filter(|v| !v.is_empty());
            match op {
                Some(o) if o.starts_with('-') => out.push_str(val.map_or(&o[1..], |v| v.as_str())),
                Some(o) if o.starts_with('+') => {
                    if val.is_some() {
                        out.push_str(&o[1..])
                    }
                }
                _ => out.push_str(vars.get(name).map_or("", |v| v.as_str())),
            }
            continue;
        }
        let n = b[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .count();
        if n == 0 {
            out.push(c);
            i += 1;
            continue;
        }
        let name: String = b[i + 1..i + 1 + n].iter().collect();
        out.push_str(vars.get(&name).map_or("", |v| v.as_str()));
        i += 1 + n;
    }
    out
}

/// Words of a shell-form argument list, honouring quotes (for COPY, ENV).
pub fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (_, '\\') if chars.peek().is_some() && quote != Some('\'') => {
                cur.push(chars.next().expect("peeked"));
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// `K=V K2="v 2"` pairs, or the old `K V` form.
pub fn pairs(s: &str) -> Vec<(String, String)> {
    let w = words(s);
    if w.first().is_some_and(|f| !f.contains('=')) {
        let (k, rest) = s
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((s.trim(), ""));
        return vec![(k.to_owned(), rest.trim().to_owned())];
    }
    w.into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p, String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_continuations_flags_and_forms() {
        let f = parse(
            "# escape=\\\nFROM base AS b\n\n# c\nRUN echo a \\\n  # inner\n  && echo b\nCOPY --from=b --chown=1:2 x /y\nCMD [\"a\", \"b c\"]\n",
        )
        .unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f[1].args, "echo a    && echo b");
        assert_eq!(f[2].flag("from"), Some("b"));
        assert_eq!(f[2].flag("chown"), Some("1:2"));
        assert_eq!(f[3].json().unwrap(), vec!["a", "b c"]);
        assert!(parse("RUN <<EOF\nx\nEOF\n").is_err());
    }

    #[test]
    fn substitutes_variables() {
        let mut v = BTreeMap::new();
        v.insert("A".to_owned(), "1".to_owned());
        v.insert("E".to_owned(), String::new());
        assert_eq!(
            substitute("$A-${A}-${B:-d}-${A:+x}-${E:-e}-\\$A", &v),
            "1-1-d-x-e-$A"
        );
        assert_eq!(
            pairs("K=v K2=\"a b\""),
            vec![("K".into(), "v".into()), ("K2".into(), "a b".into())]
        );
        assert_eq!(
            pairs("K some value"),
            vec![("K".into(), "some value".into())]
        );
    }
}
