//! URI patterns of aiocoap's credentials map and the index that finds the winning one.
//!
//! aiocoap (`CredentialsMap._wildcard_match`) escapes the pattern, turns every `*` into `.*`
//! and requires a full match: `*` is "any run of characters, including `/` and `:`", and
//! there are no other metacharacters. Among the patterns that match, the longest (counted
//! in characters, as Python's `len`) wins; ties go to the one that comes first in the file
//! (Python's `sorted` is stable).
//!
//! Why no crate: `glob`, `globset` and `wildmatch` all give `?`, `[`, `{` or `\` a meaning
//! that aiocoap's patterns do not have, and `regex` would need escaping plus a large
//! dependency for what is a split on `*` and a few substring searches. The matcher below is
//! the classic one for `*`-only patterns: the first and last literal pieces are anchored,
//! the middle pieces are found left to right, each at its leftmost occurrence (taking the
//! leftmost occurrence never loses a match, so there is no backtracking).

use std::cmp::Reverse;
use std::collections::HashMap;

/// One URI pattern, split at its `*`s.
#[derive(Debug, Clone)]
pub struct UriPattern {
    text: String,
    /// Length in characters (Python `len`), the precedence key.
    char_len: usize,
    /// The literal pieces between the `*`s; one piece means no `*` at all.
    pieces: Vec<String>,
}

impl UriPattern {
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            char_len: text.chars().count(),
            pieces: text.split('*').map(str::to_owned).collect(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn char_len(&self) -> usize {
        self.char_len
    }

    pub fn has_wildcard(&self) -> bool {
        self.pieces.len() > 1
    }

    /// The literal text before the first `*` (the whole pattern if there is none).
    pub fn literal_prefix(&self) -> &str {
        &self.pieces[0]
    }

    /// Whether the pattern matches the whole of `uri`.
    pub fn matches(&self, uri: &str) -> bool {
        let (first, rest) = match self.pieces.split_first() {
            Some(split) => split,
            None => return uri.is_empty(),
        };
        let Some((last, middle)) = rest.split_last() else {
            return uri == first;
        };
        if uri.len() < first.len() + last.len() || !uri.starts_with(first.as_str()) {
            return false;
        }
        if !uri.ends_with(last.as_str()) {
            return false;
        }
        // Both cuts are on char boundaries: `uri` starts with `first` and ends with `last`.
        let mut hay = &uri[first.len()..uri.len() - last.len()];
        for piece in middle {
            match hay.find(piece.as_str()) {
                Some(at) => hay = &hay[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

/// Finds, for a request URI, the pattern aiocoap would pick, without trying every pattern:
/// patterns without `*` are looked up in a hash map, the others are bucketed by their
/// literal prefix (only buckets whose prefix starts the URI are tried), and each bucket is
/// kept in precedence order so the first match in a bucket is that bucket's best.
#[derive(Debug, Default)]
pub(crate) struct PatternIndex {
    patterns: Vec<UriPattern>,
    /// Pattern text -> slot, for patterns without `*`.
    exact: HashMap<String, usize>,
    /// Literal prefix -> slots of the `*` patterns with that prefix, in precedence order.
    buckets: HashMap<String, Vec<usize>>,
    /// The distinct byte lengths of the bucket prefixes, ascending, each with the set of
    /// last bytes its prefixes end in: a URI whose byte at that position is not in the set
    /// cannot start with any of them, so the hash lookup is skipped. (With 10 000 patterns
    /// `coap://h/c{i}/*` there are four prefix lengths, and three probes per request were
    /// cache misses in a 10 000-entry table.)
    prefix_lens: Vec<(usize, ByteSet)>,
}

/// A set of bytes (a 256-bit bitmap).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    fn contains(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)] & (1 << (b & 63)) != 0
    }
}

impl PatternIndex {
    /// `patterns` in file order; a slot is the position in this list.
    pub(crate) fn new(patterns: Vec<UriPattern>) -> Self {
        let mut exact = HashMap::new();
        let mut buckets: HashMap<String, Vec<usize>> = HashMap::new();
        for (slot, p) in patterns.iter().enumerate() {
            if p.has_wildcard() {
                buckets
                    .entry(p.literal_prefix().to_owned())
                    .or_default()
                    .push(slot);
            } else {
                exact.insert(p.as_str().to_owned(), slot);
            }
        }
        for slots in buckets.values_mut() {
            slots.sort_by_key(|&s| rank(&patterns, s));
        }
        let mut by_len: std::collections::BTreeMap<usize, ByteSet> = Default::default();
        for prefix in buckets.keys() {
            let last = by_len.entry(prefix.len()).or_default();
            if let Some(&b) = prefix.as_bytes().last() {
                last.insert(b);
            }
        }
        let prefix_lens = by_len.into_iter().collect();
        Self {
            patterns,
            exact,
            buckets,
            prefix_lens,
        }
    }

    /// The slot of the winning pattern for `uri`, if any matches.
    pub(crate) fn find(&self, uri: &str) -> Option<usize> {
        let mut best = self.exact.get(uri).copied();
        for &(len, last) in &self.prefix_lens {
            if len > uri.len() {
                break;
            }
            // (the empty prefix, of the pattern "*", has no last byte and is always tried)
            if len > 0 && !last.contains(uri.as_bytes()[len - 1]) {
                continue;
            }
            let Some(prefix) = uri.get(..len) else {
                continue; // not a char boundary, so no prefix of this length can match
            };
            let Some(slots) = self.buckets.get(prefix) else {
                continue;
            };
            for &slot in slots {
                if best.is_some_and(|b| rank(&self.patterns, b) <= rank(&self.patterns, slot)) {
                    break; // the rest of this bucket ranks lower still
                }
                if self.patterns[slot].matches(uri) {
                    best = Some(slot);
                    break;
                }
            }
        }
        best
    }
}

/// Precedence: longer pattern first, then earlier in the file. Smaller ranks win.
fn rank(patterns: &[UriPattern], slot: usize) -> (Reverse<usize>, usize) {
    (Reverse(patterns[slot].char_len()), slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, u: &str) -> bool {
        UriPattern::new(p).matches(u)
    }

    #[test]
    fn star_matches_any_run_including_slash_and_colon() {
        assert!(m("*", ""));
        assert!(m("*", "coap://h:1/a/b?c"));
        assert!(m("coap://h/*", "coap://h/"));
        assert!(m("coap://h/*", "coap://h/a/b/c"));
        assert!(!m("coap://h/*", "coap://h"));
        assert!(m("coap://*/x", "coap://h:5690/a/x"));
        assert!(m("coap://*.example/*", "coap://a.b.example/q"));
        assert!(!m("coap://*.example/*", "coap://example/q"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXcYb"));
        assert!(m("a**", "a"));
        assert!(!m("ab*ba", "aba")); // anchored pieces must not overlap
        assert!(m("ab*ba", "abba"));
    }

    #[test]
    fn no_other_metacharacters() {
        assert!(m("coap://h/a?b", "coap://h/a?b"));
        assert!(!m("coap://h/a?b", "coap://h/aXb"));
        assert!(!m("coap://h/[ab]", "coap://h/a"));
        assert!(m("coap://h/.+", "coap://h/.+"));
        assert!(!m("coap://h/.+", "coap://h/xx"));
        assert!(!m("coap://exact/path", "coap://exact/path/"));
    }

    #[test]
    fn matches_on_non_ascii_text() {
        assert!(m("coap://ü*ö/*", "coap://üaöö/x"));
        assert!(!m("coap://ü*ö/*", "coap://ü/x"));
    }

    #[test]
    fn index_agrees_with_linear_scan() {
        let texts = [
            "*",
            "coap://localhost/*",
            "coap://localhost:5690/*",
            "coap://*.example/*",
            "coap://exact/path",
            "coap://a*",
            "coap://ab/*",
            "coap://ab/x",
            "*x",
            "coap://ab/*x",
            "coaps://*",
        ];
        let pats: Vec<_> = texts.iter().map(|t| UriPattern::new(t)).collect();
        let idx = PatternIndex::new(pats.clone());
        let uris = [
            "coap://localhost/a",
            "coap://localhost:5690/x",
            "coap://localhost:5683/x",
            "coap://q.example/",
            "coap://exact/path",
            "coap://ab/x",
            "coap://ab/y",
            "coap://abx",
            "coaps://x/y",
            "",
            "x",
        ];
        for u in uris {
            let mut order: Vec<usize> = (0..pats.len()).collect();
            order.sort_by_key(|&s| rank(&pats, s));
            let linear = order.into_iter().find(|&s| pats[s].matches(u));
            assert_eq!(idx.find(u), linear, "uri {u:?}");
        }
    }

    /// Prefixes of several lengths ending in various bytes (ASCII, the last byte of a
    /// multi-byte char, `/`), as the last-byte filter sees them: the index still picks
    /// what a scan of every pattern in precedence order picks.
    #[test]
    fn index_with_last_byte_filter_agrees_with_linear_scan() {
        let mut texts: Vec<String> = (0..300).map(|i| format!("coap://h/c{i}/*")).collect();
        texts.extend(
            [
                "coap://h/c1*",
                "coap://h/c12*x",
                "coap://h/ü*",
                "coap://h/aü/*",
                "coap://h/*",
                "coap://*",
                "coap://h/c7/exact",
            ]
            .map(String::from),
        );
        let pats: Vec<_> = texts.iter().map(|t| UriPattern::new(t)).collect();
        let idx = PatternIndex::new(pats.clone());
        let mut order: Vec<usize> = (0..pats.len()).collect();
        order.sort_by_key(|&s| rank(&pats, s));
        let mut uris: Vec<String> = (0..320).map(|i| format!("coap://h/c{i}/x")).collect();
        uris.extend(
            [
                "coap://h/c12/x",
                "coap://h/c12ax",
                "coap://h/c1",
                "coap://h/c7/exact",
                "coap://h/üb",
                "coap://h/aü/q",
                "coap://h/a/q",
                "coap://g/",
                "coaps://h/c1/x",
                "",
            ]
            .map(String::from),
        );
        for u in &uris {
            let linear = order.iter().copied().find(|&s| pats[s].matches(u));
            assert_eq!(idx.find(u), linear, "uri {u:?}");
        }
    }
}
