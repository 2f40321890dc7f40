//! The lesson model: every field of `lesson.meta.yaml` (antidote-core v0.6+), and building it from
//! positioned YAML while collecting every problem with its line and column.
//!
//! The model is not serde-derived: saphyr has no serde support that keeps positions, and a
//! message without a line is no help to a lesson author. [`MapReader`] refuses unknown keys the
//! way `deny_unknown_fields` would. Building never touches the lesson directory; the checks that
//! need the directory live in `validate`.

use ipnetwork::IpNetwork;
use saphyr::MarkedYaml;

use super::yaml::{self, Diagnostic, Diagnostics, MapReader, Pos, Spanned};

/// A lesson, as `lesson.meta.yaml` describes it. Only handed out once it is valid.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lesson {
    /// Human-readable title (`name`).
    pub name: Spanned<String>,
    /// Unique identifier, lowercase words joined by single hyphens (`slug`); also the lesson's
    /// directory name by convention.
    pub slug: Spanned<String>,
    /// Where the lesson sits in the catalogue (`category`).
    pub category: Spanned<Category>,
    /// Which deployments show the lesson (`tier`).
    pub tier: Spanned<Tier>,
    /// Long description (`description`).
    pub description: String,
    /// Short label for cards and menus (`shortDescription`).
    pub short_description: String,
    /// URL of the topology diagram (`diagram`).
    pub diagram: Option<String>,
    /// URL of an introduction video (`video`).
    pub video: Option<String>,
    /// Slug of the collection the lesson belongs to (`collection`).
    pub collection: Option<String>,
    /// Slugs of lessons to take first (`prereqs`).
    pub prereqs: Vec<Spanned<String>>,
    /// Search tags (`tags`).
    pub tags: Vec<String>,
    /// Who wrote the lesson (`authors`).
    pub authors: Vec<Author>,
    /// Seconds to wait after the endpoints are up before the lesson counts as ready (`readyDelay`).
    pub ready_delay: Option<u32>,
    /// The containers and VMs of the lesson (`endpoints`), at least one.
    pub endpoints: Vec<Endpoint>,
    /// Point-to-point links between endpoints (`connections`).
    pub connections: Vec<Connection>,
    /// The lesson's chapters (`stages`), at least one; stage `i` lives in directory `stage<i>`.
    pub stages: Vec<Stage>,
}

/// One author of a lesson.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Author {
    /// The author's name (`name`).
    pub name: String,
    /// A web page of the author (`link`).
    pub link: Option<String>,
}

/// A container or VM of a lesson.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Endpoint {
    /// Where the endpoint's entry starts.
    pub pos: Pos,
    /// Unique name, a DNS label: it becomes a host name (`name`).
    pub name: Spanned<String>,
    /// Slug of the image (`image.meta.yaml`) the endpoint runs (`image`).
    pub image: Spanned<String>,
    /// How the endpoint is configured at each stage (`configurationType`); none means it is not.
    pub configuration_type: Option<Spanned<ConfigurationType>>,
    /// How the learner reaches the endpoint (`presentations`).
    pub presentations: Vec<Presentation>,
    /// Ports to open that no presentation uses (`additionalPorts`).
    pub additional_ports: Vec<u16>,
}

/// One way into an endpoint, shown as a tab to the learner.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Presentation {
    /// Name, unique within the endpoint (`name`).
    pub name: Spanned<String>,
    /// TCP port on the endpoint (`port`).
    pub port: u16,
    /// Terminal or web page (`type`).
    pub kind: PresentationType,
}

/// A point-to-point link between two endpoints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connection {
    /// Where the connection's entry starts.
    pub pos: Pos,
    /// One end, an endpoint name (`a`).
    pub a: Spanned<String>,
    /// The other end, an endpoint name (`b`).
    pub b: Spanned<String>,
    /// Addresses for the link's two ends (`subnet`), a network in CIDR form.
    pub subnet: Option<Spanned<IpNetwork>>,
}

/// A chapter of a lesson.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stage {
    /// Title of the stage (`description`).
    pub description: String,
    /// Format of `stage<i>/guide.*` (`guideType`).
    pub guide_type: GuideType,
    /// URL of a video for the stage (`stageVideo`).
    pub stage_video: Option<String>,
}

macro_rules! yaml_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            #[default]
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value with its spelling in the file.
            pub const CHOICES: &'static [(&'static str, $name)] = &[$(($text, $name::$variant)),+];

            /// The spelling in the file.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

yaml_enum!(
    /// The catalogue section of a lesson.
    Category {
        /// Basic skills: Linux, Git, YAML, protocols.
        Fundamentals = "fundamentals",
        /// One tool in depth: Ansible, NAPALM, JSNAPy.
        Tools = "tools",
        /// Tools combined into an automation workflow.
        Workflows = "workflows",
    }
);

yaml_enum!(
    /// Which deployments show a lesson.
    Tier {
        /// Only a local (self-medicate) deployment.
        Local = "local",
        /// Public preview ("prod-to-be").
        Ptr = "ptr",
        /// Production.
        Prod = "prod",
    }
);

yaml_enum!(
    /// How an endpoint is configured at each stage, from `stage<i>/configs/`.
    ConfigurationType {
        /// `<endpoint>.py` runs against the endpoint.
        Python = "python",
        /// `<endpoint>.yml`, an Ansible playbook, runs against the endpoint.
        Ansible = "ansible",
        /// `<endpoint>-<driver>.txt` is loaded with NAPALM; the file name picks the driver.
        Napalm = "napalm",
    }
);

yaml_enum!(
    /// How a presentation is shown.
    PresentationType {
        /// An interactive terminal over SSH.
        Ssh = "ssh",
        /// A web page in a frame.
        Http = "http",
    }
);

yaml_enum!(
    /// The format of a stage's guide.
    GuideType {
        /// `stage<i>/guide.md`.
        Markdown = "markdown",
        /// `stage<i>/guide.ipynb`, a Jupyter notebook.
        Jupyter = "jupyter",
    }
);

/// NAPALM drivers that a napalm configuration file may name (`<endpoint>-<driver>.txt`), as
/// antidote-core's configurator accepts them.
pub const NAPALM_DRIVERS: &[&str] = &["junos", "eos", "iosxr", "nxos", "nxos_ssh", "ios"];

/// The command named in the Syringe-era message, with `DIR` for the lesson directory.
pub(crate) const CONVERT_COMMAND: &str = "vialctl lesson convert DIR";

/// Top-level keys of the Syringe-era format that mark a whole file as legacy.
pub(crate) const LEGACY_MARKERS: &[&str] = &["lessonName", "lessonId"];

impl Lesson {
    /// Parses and validates the text of a `lesson.meta.yaml`: every field, its type and value,
    /// and the rules between fields (see `validate`). Files in the lesson directory are not
    /// looked at. Returns every problem at once, in file order.
    pub fn parse(text: &str) -> Result<Lesson, Vec<Diagnostic>> {
        let doc = yaml::parse_document(text).map_err(|d| vec![d])?;
        let mut d = Diagnostics::default();
        let lesson = build(&doc, &mut d);
        if d.0.is_empty() && lesson.is_none() {
            // build only gives up after reporting; keep the invariant visible.
            d.push(Pos::START, "the lesson could not be read");
        }
        if let Some(lesson) = &lesson {
            d.0.extend(lesson.check_rules());
        }
        match lesson {
            Some(lesson) if d.0.is_empty() => Ok(lesson),
            _ => {
                d.0.sort_by_key(|p| p.pos);
                Err(d.0)
            }
        }
    }
}

/// Whether a document is a Syringe-era lesson, and where its marker key is.
pub(crate) fn legacy_marker(doc: &MarkedYaml<'_>) -> Option<Pos> {
    let mut scratch = Diagnostics::default();
    let map = MapReader::new(doc, "", "a mapping", &mut scratch)?;
    LEGACY_MARKERS.iter().find_map(|k| map.key_node(k)).map(Pos::of)
}

/// Builds the lesson, reporting every structural problem. Returns `None` only when the document
/// is not a mapping or is a Syringe-era file; otherwise a lesson with placeholders where values
/// were bad, so that the rules between fields can still be checked.
fn build(doc: &MarkedYaml<'_>, d: &mut Diagnostics) -> Option<Lesson> {
    if let Some(pos) = legacy_marker(doc) {
        d.push(
            pos,
            format!(
                "this is a Syringe-era lesson (`lessonName`/`lessonId`, antidote before v0.6), not the current format: \
                 run `{CONVERT_COMMAND}` to rewrite it"
            ),
        );
        return None;
    }
    let mut top = MapReader::new(doc, "", "a mapping of lesson fields", d)?;
    let mut lesson = Lesson::default();

    if let Some(n) = top.required("name", "<title of the lesson>", d) {
        lesson.name = yaml::string(n, "name", d).unwrap_or_default();
    }
    if let Some(n) = top.required("slug", "<lowercase-words-with-hyphens>", d) {
        lesson.slug = slug(n, "slug", d).unwrap_or_default();
    }
    if let Some(n) = top.required("category", Category::Fundamentals.as_str(), d) {
        lesson.category = yaml::one_of(n, "category", Category::CHOICES, |_| None, d).unwrap_or_default();
    }
    if let Some(n) = top.required("tier", Tier::Prod.as_str(), d) {
        lesson.tier = yaml::one_of(n, "tier", Tier::CHOICES, |_| None, d).unwrap_or_default();
    }
    if let Some(n) = top.required("description", "<what the lesson teaches>", d) {
        lesson.description = yaml::string(n, "description", d).map(|s| s.value).unwrap_or_default();
    }
    if let Some(n) = top.required("shortDescription", "<a word or two>", d) {
        lesson.short_description = yaml::string(n, "shortDescription", d).map(|s| s.value).unwrap_or_default();
    }
    lesson.diagram = top.optional("diagram").and_then(|n| url(n, "diagram", d));
    lesson.video = top.optional("video").and_then(|n| url(n, "video", d));
    if let Some(n) = top.optional("collection") {
        let legacy = matches!(yaml::scalar_text(n), Some((t, saphyr::ScalarStyle::Plain)) if t.parse::<i64>().is_ok());
        if legacy {
            d.push(
                Pos::of(n),
                format!(
                    "`collection` is {}, a Syringe-era collection id: use the collection's slug (e.g. `red-hat`)",
                    yaml::describe(n)
                ),
            );
        } else {
            lesson.collection = slug(n, "collection", d).map(|s| s.value);
        }
    }
    if let Some(n) = top.optional("prereqs") {
        for (i, item) in yaml::list(n, "prereqs", "lesson slugs", d).iter().enumerate() {
            let path = format!("prereqs[{i}]");
            let legacy =
                matches!(yaml::scalar_text(item), Some((t, saphyr::ScalarStyle::Plain)) if t.parse::<i64>().is_ok());
            if legacy {
                d.push(
                    Pos::of(item),
                    format!("`{path}` is {}, a Syringe-era lesson id: use the lesson's slug", yaml::describe(item)),
                );
            } else if let Some(s) = slug(item, &path, d) {
                lesson.prereqs.push(s);
            }
        }
    }
    if let Some(n) = top.optional("tags") {
        for (i, item) in yaml::list(n, "tags", "strings", d).iter().enumerate() {
            if let Some(s) = yaml::string(item, &format!("tags[{i}]"), d) {
                lesson.tags.push(s.value);
            }
        }
    }
    if let Some(n) = top.optional("authors") {
        for (i, item) in yaml::list(n, "authors", "authors (`name`, `link`)", d).iter().enumerate() {
            if let Some(a) = author(item, &format!("authors[{i}]"), d) {
                lesson.authors.push(a);
            }
        }
    }
    if let Some(n) = top.optional("readyDelay") {
        lesson.ready_delay = yaml::integer(n, "readyDelay", 0..=3600, d).map(|s| s.value as u32);
    }
    if let Some(n) = top.required("endpoints", "[{name: ..., image: ..., presentations: [...]}]", d) {
        let items = yaml::list(n, "endpoints", "endpoints", d);
        if items.is_empty() && matches!(n.data, saphyr::YamlData::Sequence(_)) {
            d.push(Pos::of(n), "`endpoints` is empty: a lesson needs at least one endpoint");
        }
        lesson.endpoints = items.iter().enumerate().filter_map(|(i, e)| endpoint(e, i, d)).collect();
    }
    if let Some(n) = top.optional("connections") {
        let items = yaml::list(n, "connections", "connections (`a`, `b`, `subnet`)", d);
        lesson.connections = items.iter().enumerate().filter_map(|(i, c)| connection(c, i, d)).collect();
    }
    if let Some(n) = top.required("stages", "[{description: ..., guideType: markdown}]", d) {
        let items = yaml::list(n, "stages", "stages", d);
        if items.is_empty() && matches!(n.data, saphyr::YamlData::Sequence(_)) {
            d.push(Pos::of(n), "`stages` is empty: a lesson needs at least one stage");
        }
        lesson.stages = items.iter().enumerate().filter_map(|(i, s)| stage(s, i, d)).collect();
    }
    top.finish(top_level_hint, d);
    Some(lesson)
}

/// Fixes for top-level keys of the Syringe-era format met in an otherwise current file.
fn top_level_hint(key: &str) -> Option<String> {
    match key {
        "lessonDiagram" => Some("a Syringe-era field: rename it `diagram`".into()),
        "lessonVideo" => Some("a Syringe-era field: rename it `video`".into()),
        _ => None,
    }
}

fn endpoint(node: &MarkedYaml<'_>, i: usize, d: &mut Diagnostics) -> Option<Endpoint> {
    let path = format!("endpoints[{i}]");
    let mut map = MapReader::new(node, &path, "an endpoint mapping (`name`, `image`, ...)", d)?;
    let mut ep = Endpoint { pos: map.pos(), ..Endpoint::default() };
    if let Some(n) = map.required("name", "<endpoint name>", d) {
        ep.name = dns_label(n, &map.path_of("name"), d).unwrap_or_default();
    }
    if let Some(n) = map.required("image", "<image slug, e.g. utility>", d) {
        ep.image = image_slug(n, &map.path_of("image"), d).unwrap_or_default();
    }
    if let Some(n) = map.optional("configurationType") {
        ep.configuration_type = yaml::one_of(
            n,
            &map.path_of("configurationType"),
            ConfigurationType::CHOICES,
            |v| {
                v.strip_prefix("napalm-").map(|driver| {
                    format!(
                        "`napalm-<driver>` is the Syringe-era form: write `napalm` and name each stage's file \
                         `<endpoint>-{driver}.txt`"
                    )
                })
            },
            d,
        );
    }
    if let Some(n) = map.optional("presentations") {
        let presentations_path = map.path_of("presentations");
        for (j, p) in yaml::list(n, &presentations_path, "presentations", d).iter().enumerate() {
            if let Some(p) = presentation(p, &format!("{presentations_path}[{j}]"), d) {
                ep.presentations.push(p);
            }
        }
    }
    if let Some(n) = map.optional("additionalPorts") {
        let ports_path = map.path_of("additionalPorts");
        for (j, p) in yaml::list(n, &ports_path, "port numbers", d).iter().enumerate() {
            if let Some(port) = yaml::integer(p, &format!("{ports_path}[{j}]"), 1..=65535, d) {
                ep.additional_ports.push(port.value as u16);
            }
        }
    }
    map.finish(|_| None, d);
    Some(ep)
}

fn presentation(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<Presentation> {
    let mut map = MapReader::new(node, path, "a presentation mapping (`name`, `port`, `type`)", d)?;
    let mut p = Presentation::default();
    if let Some(n) = map.required("name", "cli", d) {
        p.name = yaml::string(n, &map.path_of("name"), d).unwrap_or_default();
    }
    if let Some(n) = map.required("port", "22", d) {
        p.port = yaml::integer(n, &map.path_of("port"), 1..=65535, d).map_or(0, |s| s.value as u16);
    }
    if let Some(n) = map.required("type", "ssh", d) {
        p.kind =
            yaml::one_of(n, &map.path_of("type"), PresentationType::CHOICES, |_| None, d).unwrap_or_default().value;
    }
    map.finish(|_| None, d);
    Some(p)
}

fn connection(node: &MarkedYaml<'_>, i: usize, d: &mut Diagnostics) -> Option<Connection> {
    let path = format!("connections[{i}]");
    let mut map = MapReader::new(node, &path, "a connection mapping (`a`, `b`, `subnet`)", d)?;
    let mut c = Connection { pos: map.pos(), ..Connection::default() };
    if let Some(n) = map.required("a", "<endpoint name>", d) {
        c.a = yaml::string(n, &map.path_of("a"), d).unwrap_or_default();
    }
    if let Some(n) = map.required("b", "<endpoint name>", d) {
        c.b = yaml::string(n, &map.path_of("b"), d).unwrap_or_default();
    }
    if let Some(n) = map.optional("subnet") {
        c.subnet = subnet(n, &map.path_of("subnet"), d);
    }
    map.finish(|_| None, d);
    Some(c)
}

fn stage(node: &MarkedYaml<'_>, i: usize, d: &mut Diagnostics) -> Option<Stage> {
    let path = format!("stages[{i}]");
    let mut map = MapReader::new(node, &path, "a stage mapping (`description`, `guideType`)", d)?;
    let mut s = Stage::default();
    if let Some(n) = map.required("description", "<title of the stage>", d) {
        s.description = yaml::string(n, &map.path_of("description"), d).map(|s| s.value).unwrap_or_default();
    }
    if let Some(n) = map.required("guideType", GuideType::Markdown.as_str(), d) {
        s.guide_type =
            yaml::one_of(n, &map.path_of("guideType"), GuideType::CHOICES, |_| None, d).unwrap_or_default().value;
    }
    s.stage_video = map.optional("stageVideo").and_then(|n| url(n, &map.path_of("stageVideo"), d));
    map.finish(
        |key| match key {
            "id" => Some(format!(
                "Syringe-era stage number: stages are numbered by their place in the list since antidote v0.6 \
                 (this one is stage{i}), remove it"
            )),
            "jupyterLabGuide" => Some("a Syringe-era field: write `guideType: jupyter` instead".into()),
            _ => None,
        },
        d,
    );
    Some(s)
}

fn author(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<Author> {
    let mut map = MapReader::new(node, path, "an author mapping (`name`, `link`)", d)?;
    let mut a = Author::default();
    if let Some(n) = map.required("name", "<author's name>", d) {
        a.name = yaml::string(n, &map.path_of("name"), d).map(|s| s.value).unwrap_or_default();
    }
    a.link = map.optional("link").and_then(|n| url(n, &map.path_of("link"), d));
    map.finish(|_| None, d);
    Some(a)
}

/// Whether `s` is a slug: lowercase letters and digits in words joined by single hyphens.
pub fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.split('-').all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

/// The slug nearest to `s`: lowercase, every run of other characters made one hyphen.
pub fn slugify(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

fn slug(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<Spanned<String>> {
    let s = yaml::string(node, path, d)?;
    if is_slug(&s) {
        return Some(s);
    }
    let suggestion = slugify(&s);
    let example = if suggestion.is_empty() { String::new() } else { format!(", e.g. `{suggestion}`") };
    d.push(
        s.pos,
        format!(
            "`{path}` is `{}`, not a slug: use lowercase letters and digits joined by single hyphens{example}",
            s.value
        ),
    );
    None
}

/// Endpoint names become host names (DNS labels, RFC 1123).
fn dns_label(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<Spanned<String>> {
    let s = yaml::string(node, path, d)?;
    let ok = s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        return Some(s);
    }
    d.push(
        s.pos,
        format!(
            "`{path}` is `{}`, not a valid endpoint name (it becomes a host name): use at most 63 lowercase letters, \
             digits and hyphens, not starting or ending with a hyphen, e.g. `{}`",
            s.value,
            slugify(&s).chars().take(63).collect::<String>()
        ),
    );
    None
}

/// Image slugs as antidote-core's schema has them: letters, digits and hyphens.
fn image_slug(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<Spanned<String>> {
    let s = yaml::string(node, path, d)?;
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Some(s);
    }
    let fix = if s.contains('/') || s.contains(':') {
        let last = s.rsplit('/').next().unwrap_or(&s).split(':').next().unwrap_or_default().to_string();
        format!("a container image reference is the Syringe-era form: name the image's slug, e.g. `{last}`")
    } else {
        "use the slug of an image (`image.meta.yaml`): letters, digits and hyphens".into()
    };
    d.push(s.pos, format!("`{path}` is `{}`: {fix}", s.value));
    None
}

fn url(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<String> {
    let s = yaml::string(node, path, d)?;
    if s.starts_with("https://") || s.starts_with("http://") {
        return Some(s.value);
    }
    d.push(s.pos, format!("`{path}` is `{}`, not a URL: write a full `https://...` address", s.value));
    None
}

/// A subnet is a network address in CIDR form: `198.18.0.0/24`, not `198.18.0.1/24`.
fn subnet(node: &MarkedYaml<'_>, path: &str, d: &mut Diagnostics) -> Option<Spanned<IpNetwork>> {
    let s = yaml::string(node, path, d)?;
    match s.parse::<IpNetwork>() {
        Ok(net) if net.ip() == net.network() => {
            let too_small = match net {
                IpNetwork::V4(n) => n.prefix() > 31,
                IpNetwork::V6(n) => n.prefix() > 127,
            };
            if too_small {
                d.push(
                    s.pos,
                    format!("`{path}` is `{}`: a link needs two addresses, use a /31 or larger network", s.value),
                );
                return None;
            }
            Some(Spanned { value: net, pos: s.pos })
        }
        Ok(net) => {
            d.push(
                s.pos,
                format!(
                    "`{path}` is `{}`, which has host bits set: write the network address `{}/{}`",
                    s.value,
                    net.network(),
                    net.prefix()
                ),
            );
            None
        }
        Err(e) => {
            d.push(
                s.pos,
                format!("`{path}` is `{}`, not a subnet in CIDR form ({e}): write e.g. `198.18.0.0/24`", s.value),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert!(is_slug("linux-basics"));
        assert!(is_slug("a1"));
        assert!(!is_slug("NAPALM"));
        assert!(!is_slug("a--b"));
        assert!(!is_slug("-a"));
        assert!(!is_slug(""));
        assert_eq!(slugify("NAPALM"), "napalm");
        assert_eq!(slugify("Linux Basics!"), "linux-basics");
    }

    #[test]
    fn enums_spell_as_in_the_file() {
        for (text, value) in ConfigurationType::CHOICES {
            assert_eq!(value.as_str(), *text);
        }
        assert_eq!(Tier::CHOICES.len(), 3);
        assert_eq!(GuideType::Jupyter.to_string(), "jupyter");
    }

    #[test]
    fn the_smallest_lesson_parses_into_the_model() {
        let text = "name: Small\nslug: small\ncategory: tools\ntier: local\ndescription: d\nshortDescription: s\n\
                    readyDelay: 5\nendpoints:\n- name: r1\n  image: utility\n  configurationType: napalm\n  \
                    additionalPorts: [830]\nconnections: []\nstages:\n- description: one\n  guideType: jupyter\n";
        let lesson = Lesson::parse(text).unwrap();
        assert_eq!(lesson.slug.value, "small");
        assert_eq!(lesson.tier.value, Tier::Local);
        assert_eq!(lesson.ready_delay, Some(5));
        assert_eq!(lesson.endpoints[0].additional_ports, vec![830]);
        assert_eq!(lesson.endpoints[0].configuration_type.as_ref().unwrap().value, ConfigurationType::Napalm);
        assert_eq!(lesson.stages[0].guide_type, GuideType::Jupyter);
    }
}
