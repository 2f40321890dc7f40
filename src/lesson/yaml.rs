//! Positioned YAML: parsing a file into saphyr's marked nodes, and the readers that pull typed
//! values out of them while collecting every problem with its line and column.
//!
//! Scalars are kept as written (saphyr's `early_parse` off) so that a string field takes the text
//! exactly as the author typed it (`version: 1.10` stays `1.10`) and a number field can tell a
//! quoted `"22"` from a plain `22`. This module never knows what a lesson is.

use std::collections::HashSet;
use std::fmt;

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};
use saphyr_parser::Parser;

/// A place in a YAML file: 1-based line and 1-based column, as editors count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    /// Line, counted from 1.
    pub line: usize,
    /// Column in characters, counted from 1.
    pub column: usize,
}

impl Pos {
    /// The start of a file, for problems that belong to no node (an empty file).
    pub const START: Pos = Pos { line: 1, column: 1 };

    /// Where a node starts.
    pub(crate) fn of(node: &MarkedYaml<'_>) -> Pos {
        Pos::from_marker(&node.span.start)
    }

    // saphyr counts lines from 1 and columns from 0.
    fn from_marker(marker: &saphyr::Marker) -> Pos {
        Pos { line: marker.line().max(1), column: marker.col() + 1 }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem in one file: where, and a message that names the field, the bad value and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where the offending key or value starts.
    pub pos: Pos,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)
    }
}

/// A value together with where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where the value starts in the file.
    pub pos: Pos,
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// The problems found so far in one file.
#[derive(Debug, Default)]
pub(crate) struct Diagnostics(pub(crate) Vec<Diagnostic>);

impl Diagnostics {
    pub(crate) fn push(&mut self, pos: Pos, message: impl Into<String>) {
        self.0.push(Diagnostic { pos, message: message.into() });
    }
}

/// Parses `text` into its single YAML document. A syntax error (including a key written twice in
/// one mapping) is one diagnostic at the place the parser stopped.
pub(crate) fn parse_document(text: &str) -> Result<MarkedYaml<'_>, Diagnostic> {
    let mut loader: YamlLoader<'_, MarkedYaml<'_>> = YamlLoader::default();
    loader.early_parse(false);
    let mut parser = Parser::new_from_str(text);
    let syntax = |e: &saphyr::ScanError| Diagnostic {
        pos: Pos::from_marker(e.marker()),
        message: format!("YAML syntax error: {}", e.info()),
    };
    if let Err(e) = parser.load(&mut loader, true) {
        return Err(syntax(&e));
    }
    if let Some(e) = loader.error() {
        return Err(syntax(e));
    }
    let mut documents = loader.into_documents().into_iter();
    let Some(first) = documents.next() else {
        return Err(Diagnostic { pos: Pos::START, message: "the file is empty: expected a mapping of fields".into() });
    };
    if let Some(second) = documents.next() {
        return Err(Diagnostic {
            pos: Pos::of(&second),
            message: "a second YAML document: the file must hold exactly one (remove the extra `---`)".into(),
        });
    }
    Ok(first)
}

/// The text of a scalar as written, or `None` for anything that is not a scalar.
pub(crate) fn scalar_text<'a>(node: &'a MarkedYaml<'_>) -> Option<(&'a str, ScalarStyle)> {
    match &node.data {
        YamlData::Representation(text, style, _) => Some((text.as_ref(), *style)),
        _ => None,
    }
}

/// A plain `null`, `~` or nothing at all (`key:` with no value).
pub(crate) fn is_null(node: &MarkedYaml<'_>) -> bool {
    match &node.data {
        YamlData::Representation(text, ScalarStyle::Plain, _) => {
            matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL")
        }
        YamlData::Value(saphyr::Scalar::Null) => true,
        _ => false,
    }
}

/// A short description of what a node is, for "found ..." in messages.
pub(crate) fn describe(node: &MarkedYaml<'_>) -> String {
    if is_null(node) {
        return "nothing".into();
    }
    match &node.data {
        YamlData::Representation(text, _, _) => format!("`{text}`"),
        YamlData::Sequence(_) => "a list".into(),
        YamlData::Mapping(_) => "a mapping".into(),
        _ => "an unreadable value".into(),
    }
}

/// Reads the fields of one mapping. Every key that is not taken by the time `finish` runs is
/// reported as unknown, which is how unknown fields become errors (the positioned equivalent of
/// serde's `deny_unknown_fields`).
pub(crate) struct MapReader<'n, 'i> {
    /// Where the mapping starts, for "missing field" problems.
    pos: Pos,
    /// Path of the mapping in the document (`endpoints[1]`), empty at the top.
    path: String,
    entries: Vec<(String, &'n MarkedYaml<'i>, &'n MarkedYaml<'i>)>,
    taken: HashSet<String>,
}

impl<'n, 'i> MapReader<'n, 'i> {
    /// Starts reading `node` as a mapping; reports and returns `None` when it is something else.
    pub(crate) fn new(node: &'n MarkedYaml<'i>, path: &str, what: &str, d: &mut Diagnostics) -> Option<Self> {
        let YamlData::Mapping(map) = &node.data else {
            d.push(Pos::of(node), format!("{} must be {what}, found {}", name_of(path), describe(node)));
            return None;
        };
        let entries = map
            .iter()
            .map(|(k, v)| (scalar_text(k).map_or_else(|| describe(k), |(t, _)| t.to_string()), k, v))
            .collect();
        Some(MapReader { pos: Pos::of(node), path: path.to_string(), entries, taken: HashSet::new() })
    }

    /// Where the mapping starts.
    pub(crate) fn pos(&self) -> Pos {
        self.pos
    }

    /// The full path of field `key` in this mapping, for messages.
    pub(crate) fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The key node of `key`, without taking it.
    pub(crate) fn key_node(&self, key: &str) -> Option<&'n MarkedYaml<'i>> {
        self.entries.iter().find(|(k, _, _)| k == key).map(|(_, k, _)| *k)
    }

    /// Takes an optional field. A field written with no value (`video:`) counts as absent.
    pub(crate) fn optional(&mut self, key: &str) -> Option<&'n MarkedYaml<'i>> {
        self.taken.insert(key.to_string());
        self.entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| *v).filter(|v| !is_null(v))
    }

    /// Takes a required field; reports it missing (at the mapping) with an example of the fix.
    pub(crate) fn required(&mut self, key: &str, example: &str, d: &mut Diagnostics) -> Option<&'n MarkedYaml<'i>> {
        // An empty value is reported at its key: saphyr places an empty scalar on the colon.
        let present = self.key_node(key);
        let value = self.optional(key);
        if value.is_none() {
            let (pos, what) = match present {
                Some(k) => (Pos::of(k), "is empty"),
                None => (self.pos, "is missing"),
            };
            d.push(pos, format!("required field `{}` {what}: add `{key}: {example}`", self.path_of(key)));
        }
        value
    }

    /// Reports every key that was not taken. `hint` may explain a known key of an older format.
    pub(crate) fn finish(self, hint: impl Fn(&str) -> Option<String>, d: &mut Diagnostics) {
        let known: Vec<&String> = self.taken.iter().collect();
        for (key, key_node, _) in &self.entries {
            if self.taken.contains(key) {
                continue;
            }
            let fix = hint(key).or_else(|| closest(key, &known).map(|k| format!("did you mean `{k}`?")));
            let fix = fix.unwrap_or_else(|| {
                let mut names: Vec<&str> = known.iter().map(|k| k.as_str()).collect();
                names.sort_unstable();
                format!("remove it (known fields: {})", names.join(", "))
            });
            d.push(Pos::of(key_node), format!("unknown field `{}`: {fix}", self.path_of(key)));
        }
    }
}

/// "`endpoints[0]`", or "the file" at the top level.
pub(crate) fn name_of(path: &str) -> String {
    if path.is_empty() {
        "the file".into()
    } else {
        format!("`{path}`")
    }
}

/// The known name nearest to a misspelt one: same letters ignoring case, or at most two edits.
fn closest<'k>(key: &str, known: &[&'k String]) -> Option<&'k String> {
    let lower = key.to_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_lowercase()), *k))
        .filter(|(dist, _)| *dist <= 2)
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A string field: any scalar, as written. Lists, mappings and empty values are reported.
pub(crate) fn string(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<Spanned<String>> {
    match scalar_text(node) {
        Some((text, _)) if !is_null(node) && !text.trim().is_empty() => {
            Some(Spanned { value: text.to_string(), pos: Pos::of(node) })
        }
        _ => {
            d.push(Pos::of(node), format!("`{path}` must be a non-empty string, found {}", describe(node)));
            None
        }
    }
}

/// An integer field: a plain (unquoted) whole number within `range`.
pub(crate) fn integer(
    node: &MarkedYaml<'_>,
    path: &str,
    range: std::ops::RangeInclusive<i64>,
    d: &mut Diagnostics,
) -> Option<Spanned<i64>> {
    let parsed = match scalar_text(node) {
        Some((text, ScalarStyle::Plain)) => text.parse::<i64>().ok(),
        _ => None,
    };
    match parsed {
        Some(n) if range.contains(&n) => Some(Spanned { value: n, pos: Pos::of(node) }),
        Some(n) => {
            d.push(
                Pos::of(node),
                format!("`{path}` is {n}, out of range: use a whole number from {} to {}", range.start(), range.end()),
            );
            None
        }
        None => {
            d.push(
                Pos::of(node),
                format!(
                    "`{path}` must be a whole number from {} to {}, found {} (write it unquoted)",
                    range.start(),
                    range.end(),
                    describe(node)
                ),
            );
            None
        }
    }
}

/// A boolean field: plain `true` or `false`.
pub(crate) fn boolean(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<bool> {
    match scalar_text(node) {
        Some(("true" | "True" | "TRUE", ScalarStyle::Plain)) => Some(true),
        Some(("false" | "False" | "FALSE", ScalarStyle::Plain)) => Some(false),
        _ => {
            d.push(Pos::of(node), format!("`{path}` must be `true` or `false`, found {}", describe(node)));
            None
        }
    }
}

/// A list field: its items, or an empty list after reporting a non-list.
pub(crate) fn list<'n, 'i>(
    node: &'n MarkedYaml<'i>,
    path: &str,
    what: &str,
    d: &mut Diagnostics,
) -> &'n [MarkedYaml<'i>] {
    match &node.data {
        YamlData::Sequence(items) => items,
        _ => {
            d.push(Pos::of(node), format!("`{path}` must be a list of {what}, found {}", describe(node)));
            &[]
        }
    }
}

/// A string field whose value must be one of `choices`.
pub(crate) fn one_of<T: Copy>(
    node: &MarkedYaml<'_>,
    path: &str,
    choices: &[(&str, T)],
    hint: impl Fn(&str) -> Option<String>,
    d: &mut Diagnostics,
) -> Option<Spanned<T>> {
    let text = string(node, path, d)?;
    if let Some((_, value)) = choices.iter().find(|(name, _)| *name == text.value) {
        return Some(Spanned { value: *value, pos: text.pos });
    }
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    let fix = hint(&text.value).unwrap_or_else(|| format!("use one of {}", names.join(", ")));
    d.push(text.pos, format!("`{path}` has unknown value `{}`: {fix}", text.value));
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let doc = parse_document("a: 1\nb:\n  c: x\n").unwrap();
        let mut d = Diagnostics::default();
        let mut top = MapReader::new(&doc, "", "a mapping", &mut d).unwrap();
        let b = top.optional("b").unwrap();
        assert_eq!(Pos::of(b), Pos { line: 3, column: 3 });
        let a = top.optional("a").unwrap();
        assert_eq!(Pos::of(a), Pos { line: 1, column: 4 });
    }

    #[test]
    fn duplicate_keys_are_a_syntax_error_with_a_position() {
        let err = parse_document("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.pos.line, 2);
        assert!(err.message.contains("duplicated key"), "{err}");
    }

    #[test]
    fn unknown_keys_are_reported_with_a_suggestion() {
        let doc = parse_document("name: x\nnmae: y\n").unwrap();
        let mut d = Diagnostics::default();
        let mut top = MapReader::new(&doc, "", "a mapping", &mut d).unwrap();
        top.optional("name");
        top.finish(|_| None, &mut d);
        assert_eq!(d.0.len(), 1);
        assert_eq!(d.0[0].pos, Pos { line: 2, column: 1 });
        assert!(d.0[0].message.contains("did you mean `name`"), "{}", d.0[0]);
    }

    #[test]
    fn quoted_numbers_are_not_numbers() {
        let doc = parse_document("p: \"22\"\nq: 22\n").unwrap();
        let mut d = Diagnostics::default();
        let mut top = MapReader::new(&doc, "", "a mapping", &mut d).unwrap();
        assert!(integer(top.optional("p").unwrap(), "p", 1..=9, &mut d).is_none());
        assert_eq!(integer(top.optional("q").unwrap(), "q", 1..=99, &mut d).unwrap().value, 22);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("tier", "tier"), 0);
        assert_eq!(edit_distance("teir", "tier"), 2);
        assert_eq!(edit_distance("slugg", "slug"), 1);
    }

    #[test]
    fn empty_and_multi_document_files_are_refused() {
        assert!(parse_document("").is_err());
        assert!(parse_document("# only a comment\n").is_err());
        assert_eq!(parse_document("a: 1\n---\nb: 2\n").unwrap_err().pos.line, 3);
    }
}
