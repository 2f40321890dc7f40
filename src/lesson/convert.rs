//! Converting a Syringe-era lesson (`lessonName`, `lessonId`, 1-based stage `id`s; curriculum
//! v1.0.0 to v1.1.0) to the current format, the way antidote-core's v0.6 migration mapped the
//! fields. Pure: text in, text out; the caller reads and writes files.
//!
//! | Syringe | current |
//! |---|---|
//! | `lessonName` | `name` |
//! | `lessonId` | dropped; `slug` comes from the directory name (`lesson-41-x` → `x`) |
//! | `slug` (a free-text label such as `NAPALM`) | `shortDescription` |
//! | `lessonDiagram`, `lessonVideo` | `diagram`, `video` |
//! | `prereqs`, `collection` as numeric ids | dropped, with a note (slugs are needed) |
//! | endpoint `image: antidotelabs/vqfx-snap1` | `image: vqfx-snap1` (the image slug) |
//! | `configurationType: napalm-junos` | `napalm`; the stage file becomes `<endpoint>-junos.txt` |
//! | stages with `id: 1..N` | stages in `id` order, numbered 0..N-1 by place |
//! | stage `jupyterLabGuide: true` | `guideType: jupyter` (else `markdown`) |

use std::borrow::Cow;

use saphyr::{MarkedYaml, Scalar, Yaml, YamlEmitter};

use super::model::{is_slug, legacy_marker, slugify, Lesson};
use super::yaml::{self, Diagnostic, Diagnostics, MapReader, Pos};

/// The result of a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The lesson in the current format, ready to be written as `lesson.meta.yaml`.
    pub text: String,
    /// What the author must still do by hand (rename stage directories, fill in slugs for
    /// numeric ids); also written as comments at the top of `text`.
    pub notes: Vec<String>,
}

/// Why a conversion failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConvertFailure {
    /// The file is already in the current format; nothing to convert.
    NotLegacy,
    /// The legacy file has problems the converter cannot map (positions in the input).
    Input(Vec<Diagnostic>),
    /// The converted text does not validate (positions in the output); a converter bug or a
    /// value that was already bad in the legacy file.
    Output { text: String, problems: Vec<Diagnostic> },
}

/// The slug the converter derives from a lesson directory name: `lesson-41-ansible-network` →
/// `ansible-network`.
pub fn slug_from_dir_name(dir_name: &str) -> String {
    let stripped = dir_name
        .strip_prefix("lesson-")
        .and_then(|rest| rest.split_once('-'))
        .filter(|(id, _)| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .map_or(dir_name, |(_, rest)| rest);
    slugify(stripped)
}

/// Whether `text` is a Syringe-era lesson. Unparseable text is not.
pub fn is_legacy(text: &str) -> bool {
    yaml::parse_document(text).ok().is_some_and(|doc| legacy_marker(&doc).is_some())
}

/// Converts a Syringe-era `lesson.meta.yaml` to the current format; `slug` is the new lesson's
/// slug (see [`slug_from_dir_name`]). The result is checked with [`Lesson::parse`].
pub fn convert(text: &str, slug: &str) -> Result<Converted, ConvertFailure> {
    let doc = yaml::parse_document(text).map_err(|d| ConvertFailure::Input(vec![d]))?;
    if legacy_marker(&doc).is_none() {
        return Err(ConvertFailure::NotLegacy);
    }
    let mut d = Diagnostics::default();
    let mut notes = Vec::new();
    let Some(out) = convert_top(&doc, slug, &mut notes, &mut d) else {
        return Err(ConvertFailure::Input(d.0));
    };
    if !d.0.is_empty() {
        d.0.sort_by_key(|p| p.pos);
        return Err(ConvertFailure::Input(d.0));
    }
    let mut body = String::new();
    let mut emitter = YamlEmitter::new(&mut body);
    emitter.multiline(true);
    // Writing into a String cannot fail.
    let _ = emitter.dump(&out);
    let mut text = String::from("# Converted from the Syringe-era format by `vialctl lesson convert`.\n");
    for note in &notes {
        text.push_str(&format!("# TODO: {note}\n"));
    }
    text.push_str(&body);
    text.push('\n');
    match Lesson::parse(&text) {
        Ok(_) => Ok(Converted { text, notes }),
        Err(problems) => Err(ConvertFailure::Output { text, problems }),
    }
}

fn string(s: &str) -> Yaml<'static> {
    Yaml::Value(Scalar::String(Cow::Owned(s.to_string())))
}

/// A scalar as written, or the node itself converted unchanged (lists of plain values).
fn copy(node: &MarkedYaml<'_>) -> Yaml<'static> {
    match &node.data {
        saphyr::YamlData::Representation(text, style, _) => {
            if *style == saphyr::ScalarStyle::Plain {
                if let Ok(n) = text.parse::<i64>() {
                    return Yaml::Value(Scalar::Integer(n));
                }
                match text.as_ref() {
                    "true" => return Yaml::Value(Scalar::Boolean(true)),
                    "false" => return Yaml::Value(Scalar::Boolean(false)),
                    _ => {}
                }
            }
            string(text)
        }
        saphyr::YamlData::Sequence(items) => Yaml::Sequence(items.iter().map(copy).collect()),
        saphyr::YamlData::Mapping(map) => {
            let mut out = saphyr::Mapping::new();
            for (k, v) in map {
                out.insert(copy(k), copy(v));
            }
            Yaml::Mapping(out)
        }
        _ => Yaml::Value(Scalar::Null),
    }
}

fn text_of(node: &MarkedYaml<'_>) -> String {
    yaml::scalar_text(node).map(|(t, _)| t.to_string()).unwrap_or_default()
}

fn convert_top(
    doc: &MarkedYaml<'_>,
    slug: &str,
    notes: &mut Vec<String>,
    d: &mut Diagnostics,
) -> Option<Yaml<'static>> {
    let mut top = MapReader::new(doc, "", "a mapping of lesson fields", d)?;
    let mut out = saphyr::Mapping::new();
    let put = |out: &mut saphyr::Mapping<'static>, key: &str, value: Yaml<'static>| {
        out.insert(string(key), value);
    };

    let name = top.optional("lessonName").or_else(|| top.optional("name")).map(text_of);
    if let Some(name) = &name {
        put(&mut out, "name", string(name));
    } else {
        d.push(top.pos(), "the Syringe-era lesson has no `lessonName`: add one before converting");
    }
    put(&mut out, "slug", string(slug));
    if let Some(id) = top.optional("lessonId") {
        notes.push(format!("Syringe lesson id {} was dropped: lessons are known by slug (`{slug}`) now", text_of(id)));
    }
    if let Some(n) = top.optional("category") {
        put(&mut out, "category", copy(n));
    }
    if let Some(n) = top.optional("lessonDiagram").or_else(|| top.optional("diagram")) {
        put(&mut out, "diagram", copy(n));
    }
    if let Some(n) = top.optional("lessonVideo").or_else(|| top.optional("video")) {
        put(&mut out, "video", copy(n));
    }
    if let Some(n) = top.optional("tier") {
        put(&mut out, "tier", copy(n));
    }
    if let Some(n) = top.optional("prereqs") {
        let items = yaml::list(n, "prereqs", "lesson ids or slugs", d);
        let (slugs, ids): (Vec<String>, Vec<String>) =
            items.iter().map(text_of).partition(|t| t.parse::<i64>().is_err());
        if !ids.is_empty() {
            notes.push(format!(
                "prereqs were Syringe lesson ids ({}): add `prereqs:` with those lessons' slugs",
                ids.join(", ")
            ));
        }
        if !slugs.is_empty() {
            put(&mut out, "prereqs", Yaml::Sequence(slugs.iter().map(|s| string(s)).collect()));
        }
    }
    if let Some(n) = top.optional("description") {
        put(&mut out, "description", copy(n));
    }
    // Syringe's `slug` was a short free-text label ("NAPALM"), which is what shortDescription is now.
    let label = top.optional("slug").map(text_of);
    let short = top.optional("shortDescription").map(text_of).or_else(|| label.filter(|l| !is_slug(l))).or(name);
    if let Some(short) = short {
        put(&mut out, "shortDescription", string(&short));
    }
    if let Some(n) = top.optional("tags") {
        put(&mut out, "tags", copy(n));
    }
    if let Some(n) = top.optional("collection") {
        let value = text_of(n);
        if value.parse::<i64>().is_ok() {
            notes.push(format!("collection was Syringe collection id {value}: add `collection:` with its slug"));
        } else {
            put(&mut out, "collection", string(&value));
        }
    }
    for key in ["authors", "readyDelay"] {
        if let Some(n) = top.optional(key) {
            put(&mut out, key, copy(n));
        }
    }
    if let Some(n) = top.optional("endpoints") {
        let items = yaml::list(n, "endpoints", "endpoints", d);
        let endpoints = items.iter().enumerate().filter_map(|(i, e)| convert_endpoint(e, i, notes, d)).collect();
        put(&mut out, "endpoints", Yaml::Sequence(endpoints));
    }
    if let Some(n) = top.optional("connections") {
        put(&mut out, "connections", copy(n));
    }
    if let Some(n) = top.optional("stages") {
        let items = yaml::list(n, "stages", "stages", d);
        put(&mut out, "stages", Yaml::Sequence(convert_stages(items, notes, d)));
    }
    top.finish(|_| Some("the converter does not know this Syringe-era field: remove or rename it first".into()), d);
    Some(Yaml::Mapping(out))
}

fn convert_endpoint(
    node: &MarkedYaml<'_>,
    i: usize,
    notes: &mut Vec<String>,
    d: &mut Diagnostics,
) -> Option<Yaml<'static>> {
    let mut map = MapReader::new(node, &format!("endpoints[{i}]"), "an endpoint mapping", d)?;
    let mut out = saphyr::Mapping::new();
    let name = map.optional("name").map(text_of).unwrap_or_default();
    out.insert(string("name"), string(&name));
    if let Some(n) = map.optional("image") {
        // `antidotelabs/vqfx-snap1:latest` → `vqfx-snap1`: images are known by slug now.
        let reference = text_of(n);
        let last = reference.rsplit('/').next().unwrap_or(&reference);
        let image = last.split(':').next().unwrap_or(last);
        out.insert(string("image"), string(image));
    }
    if let Some(n) = map.optional("configurationType") {
        let kind = text_of(n);
        if let Some(driver) = kind.strip_prefix("napalm-") {
            out.insert(string("configurationType"), string("napalm"));
            notes.push(format!(
                "endpoint `{name}` uses NAPALM driver `{driver}`: name its file stage<i>/configs/{name}-{driver}.txt in every stage"
            ));
        } else {
            out.insert(string("configurationType"), string(&kind));
        }
    }
    for key in ["presentations", "additionalPorts"] {
        if let Some(n) = map.optional(key) {
            out.insert(string(key), copy(n));
        }
    }
    map.finish(|_| Some("the converter does not know this Syringe-era endpoint field: remove it first".into()), d);
    Some(Yaml::Mapping(out))
}

fn convert_stages(items: &[MarkedYaml<'_>], notes: &mut Vec<String>, d: &mut Diagnostics) -> Vec<Yaml<'static>> {
    let mut stages: Vec<(i64, Pos, Yaml<'static>)> = Vec::new();
    let mut dropped = Vec::new();
    for (i, node) in items.iter().enumerate() {
        let Some(mut map) = MapReader::new(node, &format!("stages[{i}]"), "a stage mapping", d) else { continue };
        let id = map.optional("id").and_then(|n| text_of(n).parse::<i64>().ok()).unwrap_or(i as i64 + 1);
        let mut out = saphyr::Mapping::new();
        if let Some(n) = map.optional("description") {
            out.insert(string("description"), copy(n));
        }
        let jupyter = map.optional("jupyterLabGuide").is_some_and(|n| text_of(n) == "true");
        let guide = map.optional("guideType").map(text_of);
        let guide = guide.unwrap_or_else(|| if jupyter { "jupyter".into() } else { "markdown".into() });
        out.insert(string("guideType"), string(&guide));
        if let Some(n) = map.optional("stageVideo") {
            out.insert(string("stageVideo"), copy(n));
        }
        for key in ["verifyCompleteness", "verifyObjective"] {
            if map.optional(key).is_some() {
                dropped.push(format!("{key} (stage id {id})"));
            }
        }
        map.finish(|_| Some("the converter does not know this Syringe-era stage field: remove it first".into()), d);
        stages.push((id, Pos::of(node), Yaml::Mapping(out)));
    }
    stages.sort_by_key(|(id, pos, _)| (*id, *pos));
    if let Some((first, _, _)) = stages.first() {
        if *first != 0 {
            let renames: Vec<String> =
                stages.iter().enumerate().map(|(i, (id, _, _))| format!("stage{id} → stage{i}")).collect();
            notes.push(format!("stages are numbered from 0 now: rename the directories {}", renames.join(", ")));
        }
    }
    if !dropped.is_empty() {
        notes.push(format!("dropped fields antidote v0.6 no longer has: {}", dropped.join(", ")));
    }
    stages.into_iter().map(|(_, _, y)| y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEGACY: &str = "lessonName: Demo\nlessonId: 7\ncategory: tools\ntier: prod\nslug: DEMO\n\
        description: d\nprereqs: [23]\ncollection: 3\nlessonDiagram: https://example.com/d.png\n\
        endpoints:\n- name: vqfx1\n  image: antidotelabs/vqfx-snap1\n  configurationType: napalm-junos\n  \
        presentations:\n  - name: cli\n    port: 22\n    type: ssh\n\
        stages:\n- id: 2\n  description: Second\n- id: 1\n  description: First\n  jupyterLabGuide: true\n";

    #[test]
    fn slug_comes_from_the_directory_name() {
        assert_eq!(slug_from_dir_name("lesson-41-ansible-network"), "ansible-network");
        assert_eq!(slug_from_dir_name("lesson-13-napalm"), "napalm");
        assert_eq!(slug_from_dir_name("My Lesson"), "my-lesson");
        assert_eq!(slug_from_dir_name("lesson-intro"), "lesson-intro");
    }

    #[test]
    fn a_legacy_lesson_converts_to_a_valid_one() {
        assert!(is_legacy(LEGACY));
        let converted = convert(LEGACY, "demo").unwrap();
        let lesson = Lesson::parse(&converted.text).unwrap();
        assert_eq!(lesson.name.value, "Demo");
        assert_eq!(lesson.slug.value, "demo");
        assert_eq!(lesson.short_description, "DEMO");
        assert_eq!(lesson.endpoints[0].image.value, "vqfx-snap1");
        assert_eq!(lesson.diagram.as_deref(), Some("https://example.com/d.png"));
        // Sorted by id: "First" (id 1, jupyter) comes first.
        assert_eq!(lesson.stages[0].description, "First");
        assert_eq!(lesson.stages[0].guide_type.as_str(), "jupyter");
        assert_eq!(lesson.stages[1].guide_type.as_str(), "markdown");
        let notes = converted.notes.join("\n");
        assert!(notes.contains("vqfx1-junos.txt"), "{notes}");
        assert!(notes.contains("stage1 → stage0"), "{notes}");
        assert!(notes.contains("(23)"), "{notes}");
        assert!(converted.text.contains("# TODO: "));
    }

    #[test]
    fn a_current_lesson_is_not_converted() {
        assert_eq!(convert("name: x\nslug: x\n", "x"), Err(ConvertFailure::NotLegacy));
    }

    #[test]
    fn unknown_legacy_fields_are_reported() {
        let text = format!("{LEGACY}blackboxes: []\n");
        let Err(ConvertFailure::Input(problems)) = convert(&text, "demo") else { panic!("converted") };
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("`blackboxes`"));
    }
}
