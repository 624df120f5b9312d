//! Tensor selection by name: `--tensors GLOB` (repeatable), matched like
//! Python's `fnmatch.fnmatchcase` (what `evod.gguf`'s `only=` uses), so a
//! pattern selects the same tensors in the CLI and the Python package.
//!
//! `*` matches any run of characters (dots included: `blk.*.attn_q.weight`
//! spans every block), `?` one character, `[abc]`, `[a-z]` and `[!abc]` one
//! character of (not of) a set; everything else matches itself. Unlike
//! fnmatch, which reads an unclosed `[` as a literal, an unclosed `[` or an
//! empty pattern is refused: on the command line it is more likely a typo.

use super::SurgeonError;

/// One parsed pattern.
#[derive(Debug, Clone)]
pub struct Glob {
    pattern: String,
    tokens: Vec<Tok>,
}

#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    One,
    Star,
    Class {
        negate: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Glob {
    /// Parses `pattern`; [`SurgeonError::BadGlob`] if it is empty or has
    /// an unclosed `[`.
    pub fn parse(pattern: &str) -> Result<Glob, SurgeonError> {
        let bad = |problem: &str| SurgeonError::BadGlob {
            glob: pattern.to_owned(),
            problem: problem.to_owned(),
        };
        if pattern.is_empty() {
            return Err(bad("an empty pattern matches no tensor"));
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' => {
                    // Consecutive stars are one star.
                    if !matches!(tokens.last(), Some(Tok::Star)) {
                        tokens.push(Tok::Star);
                    }
                    i += 1;
                }
                '?' => {
                    tokens.push(Tok::One);
                    i += 1;
                }
                '[' => {
                    let mut j = i + 1;
                    let negate = chars.get(j) == Some(&'!');
                    if negate {
                        j += 1;
                    }
                    let mut ranges = Vec::new();
                    // A `]` right after `[` or `[!` is a member, as in fnmatch.
                    let mut first = true;
                    loop {
                        let Some(&c) = chars.get(j) else {
                            return Err(bad("unclosed '['"));
                        };
                        if c == ']' && !first {
                            break;
                        }
                        first = false;
                        if chars.get(j + 1) == Some(&'-')
                            && chars.get(j + 2).is_some_and(|&e| e != ']')
                        {
                            ranges.push((c, chars[j + 2]));
                            j += 3;
                        } else {
                            ranges.push((c, c));
                            j += 1;
                        }
                    }
                    tokens.push(Tok::Class { negate, ranges });
                    i = j + 1;
                }
                c => {
                    tokens.push(Tok::Lit(c));
                    i += 1;
                }
            }
        }
        Ok(Glob {
            pattern: pattern.to_owned(),
            tokens,
        })
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        let (mut p, mut n) = (0, 0);
        // The last star seen and the name position it was tried at: on a
        // mismatch the star takes one more character (linear backtracking
        // suffices for a single wildcard kind).
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match self.tokens.get(p) {
                Some(Tok::Star) => {
                    star = Some((p, n));
                    p += 1;
                    continue;
                }
                Some(t) if one(t, name[n]) => {
                    p += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            }
        }
        self.tokens[p..].iter().all(|t| matches!(t, Tok::Star))
    }
}

/// Whether a single-character token matches `c`.
fn one(t: &Tok, c: char) -> bool {
    match t {
        Tok::Lit(l) => *l == c,
        Tok::One => true,
        Tok::Class { negate, ranges } => {
            ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negate
        }
        Tok::Star => false,
    }
}

/// The tensors a command works on: every tensor when no pattern is given,
/// else those matching any pattern.
#[derive(Debug, Clone)]
pub struct Selection {
    globs: Vec<Glob>,
}

impl Selection {
    /// Parses every pattern (none: everything is selected).
    pub fn parse(patterns: &[String]) -> Result<Selection, SurgeonError> {
        Ok(Selection {
            globs: patterns
                .iter()
                .map(|p| Glob::parse(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether tensor `name` is selected.
    pub fn selects(&self, name: &str) -> bool {
        self.globs.is_empty() || self.globs.iter().any(|g| g.matches(name))
    }

    /// The patterns as given (`*` when none was).
    pub fn patterns(&self) -> Vec<String> {
        if self.globs.is_empty() {
            vec!["*".to_owned()]
        } else {
            self.globs.iter().map(|g| g.as_str().to_owned()).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        Glob::parse(p).unwrap().matches(n)
    }

    #[test]
    fn matches_like_fnmatchcase() {
        assert!(m("*", "blk.0.attn_q.weight"));
        assert!(m("blk.*.attn_q.weight", "blk.12.attn_q.weight"));
        assert!(!m("blk.*.attn_q.weight", "blk.12.attn_k.weight"));
        assert!(m("blk.?.ffn_*", "blk.3.ffn_down.weight"));
        assert!(!m("blk.?.ffn_*", "blk.13.ffn_down.weight"));
        assert!(m("blk.[0-2].*", "blk.1.x"));
        assert!(!m("blk.[0-2].*", "blk.3.x"));
        assert!(m("blk.[!0-2].*", "blk.3.x"));
        assert!(m("[]]x", "]x"));
        assert!(m("a-b", "a-b"));
        assert!(m("[a-]", "-"));
        assert!(m("*.weight", ".weight"));
        assert!(m("a**b", "ab"));
        assert!(!m("a*b", "abc"));
        assert!(m("*a*a*a*", "xaxxaxa"));
        assert!(!m("output", "output.weight"));
        assert!(m("ünï*", "ünïcode"));
    }

    #[test]
    fn bad_patterns_are_refused_by_name() {
        for p in ["", "blk.[0-2", "[!"] {
            let e = Glob::parse(p).unwrap_err().to_string();
            assert!(e.contains(&format!("{p:?}")), "{e}");
        }
    }

    #[test]
    fn no_pattern_selects_everything() {
        let s = Selection::parse(&[]).unwrap();
        assert!(s.selects("anything"));
        let s = Selection::parse(&["a*".into(), "b".into()]).unwrap();
        assert!(s.selects("ab") && s.selects("b") && !s.selects("c"));
    }
}
