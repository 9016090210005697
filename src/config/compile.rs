//! Compiles a pipeline file's YAML tree into a [`Pipeline`], collecting every problem with its
//! file position and field path instead of stopping at the first.

use std::collections::BTreeMap;

use super::duration::{format_duration_ms, parse_duration_ms};

/// With `emit: on_window_close`, the most windows one event may fall in (size / step): each
/// of them is written as a record when it closes.
const MAX_WINDOWS_PER_EVENT: i64 = 100_000;

/// The finest round step that divides `size_ms` and keeps within [`MAX_WINDOWS_PER_EVENT`].
fn coarser_step(size_ms: i64) -> i64 {
    let least = (size_ms + MAX_WINDOWS_PER_EVENT - 1) / MAX_WINDOWS_PER_EVENT;
    const ROUND: [i64; 16] = [
        1_000, 5_000, 10_000, 15_000, 30_000, 60_000, 300_000, 600_000, 900_000, 1_800_000,
        3_600_000, 7_200_000, 10_800_000, 21_600_000, 43_200_000, 86_400_000,
    ];
    ROUND
        .into_iter()
        .find(|&step| step >= least && size_ms % step == 0)
        .unwrap_or_else(|| smallest_divisor_from(size_ms, least))
}

/// The smallest divisor of `n` that is at least `least` (`n` itself at worst): a step the size
/// is a whole multiple of. Trial division up to √n, under two million steps for any duration.
fn smallest_divisor_from(n: i64, least: i64) -> i64 {
    let mut best = n;
    let mut d = 1;
    while d * d <= n {
        if n % d == 0 {
            for divisor in [d, n / d] {
                if divisor >= least && divisor < best {
                    best = divisor;
                }
            }
        }
        d += 1;
    }
    best
}
use super::expr::Expr;
use super::yaml::{self, Node, NodeKind, Pos};
use super::*;

const DEFAULT_MAX_EVENT_BYTES: usize = 1_000_000;
const DEFAULT_IDLE_TIMEOUT_MS: i64 = 30_000;
/// Clocks of producers drift by seconds; an event an hour or more ahead is a bad stamp.
const DEFAULT_MAX_FUTURE_MS: i64 = 3_600_000;
const DEFAULT_ENTITY_TTL_MS: i64 = 7 * 86_400_000;
const DEFAULT_STATE_DIR: &str = "data/state";
const DEFAULT_CHECKPOINT_EVERY_MS: i64 = 5_000;

/// The longest checkpoint interval exactly-once allows: three of them fit in the brokers'
/// default `transaction.max.timeout.ms` (15 minutes).
const MAX_EXACTLY_ONCE_CHECKPOINT_MS: i64 = 5 * 60 * 1000;

/// The `state:` section.
struct StateSection {
    entity_ttl_ms: Option<i64>,
    dir: String,
    checkpoint_every_ms: i64,
    topic: Option<String>,
}

impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            entity_ttl_ms: Some(DEFAULT_ENTITY_TTL_MS),
            dir: DEFAULT_STATE_DIR.to_string(),
            checkpoint_every_ms: DEFAULT_CHECKPOINT_EVERY_MS,
            topic: None,
        }
    }
}

/// Returns ` (did you mean `x`?)` when a candidate is close to `word`, else an empty string.
pub fn suggestion(word: &str, candidates: &[&str]) -> String {
    let best = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((distance, candidate)) if distance <= 2.max(word.len() / 3) => {
            format!(" (did you mean `{candidate}`?)")
        }
        // `card` for `card_id`: a prefix of a longer name.
        _ => match candidates
            .iter()
            .find(|c| word.len() >= 3 && c.starts_with(word))
        {
            Some(candidate) => format!(" (did you mean `{candidate}`?)"),
            None => String::new(),
        },
    }
}

/// Compiles the text of a pipeline file; `file` names it in error messages.
pub fn compile_source(file: &str, text: &str) -> Result<Pipeline, ConfigErrors> {
    let root = yaml::parse(text).map_err(|e| ConfigErrors {
        file: file.to_string(),
        errors: vec![ConfigError {
            pos: e.pos,
            path: String::new(),
            message: format!("invalid YAML: {}", e.message),
        }],
    })?;
    let mut compiler = Compiler::default();
    let pipeline = compiler.pipeline(&root);
    match pipeline {
        Some(p) if compiler.errors.is_empty() => Ok(p),
        _ => {
            let mut errors = compiler.errors;
            errors.sort_by_key(|e| (e.pos.line, e.pos.col));
            Err(ConfigErrors {
                file: file.to_string(),
                errors,
            })
        }
    }
}

/// A mapping's entries after the unknown-key check.
struct Entries<'n> {
    pos: Pos,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Entries<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_null())
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[derive(Default)]
struct Compiler {
    errors: Vec<ConfigError>,
    /// Schema fields declared with a type that is not one: reported once where they are
    /// declared, and not again wherever they are used.
    broken_fields: Vec<String>,
}

/// The sinks section, each sink `None` when it is in error and `Some(None)` when absent.
struct SinkParts {
    kafka: Option<Option<KafkaSink>>,
    parquet: Option<Option<ParquetSink>>,
}

/// What the checks across sections need to know of the source, each part known on its own, so
/// that an error elsewhere in the source does not hide them.
#[derive(Default)]
struct SourceFacts {
    format: Option<Format>,
    schema_registry: bool,
    avro_schema: bool,
    /// `on_late` as written, if it was.
    on_late: Option<OnLate>,
}

impl Compiler {
    fn error(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            pos,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Checks that `node` is a mapping whose keys are all in `allowed`.
    fn mapping<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Entries<'n>> {
        let NodeKind::Map(pairs) = &node.kind else {
            self.error(
                node.pos,
                path,
                format!("expected a mapping, found {}", node.kind_name()),
            );
            return None;
        };
        let mut entries: Vec<(&'n str, &'n Node)> = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            let Some(name) = key.as_scalar() else {
                self.error(key.pos, path, "keys must be plain names");
                continue;
            };
            if !allowed.contains(&name) {
                let hint = suggestion(name, allowed);
                let message = if hint.is_empty() {
                    format!("unknown key `{name}`; allowed here: {}", allowed.join(", "))
                } else {
                    format!("unknown key `{name}`{hint}")
                };
                self.error(key.pos, &join(path, name), message);
                continue;
            }
            if entries.iter().any(|(k, _)| *k == name) {
                self.error(
                    key.pos,
                    &join(path, name),
                    format!("`{name}` is given twice"),
                );
                continue;
            }
            entries.push((name, value));
        }
        Some(Entries {
            pos: node.pos,
            entries,
        })
    }

    fn required<'n>(&mut self, entries: &Entries<'n>, key: &str, path: &str) -> Option<&'n Node> {
        let node = entries.get(key);
        if node.is_none() {
            self.error(
                entries.pos,
                &join(path, key),
                format!("`{key}` is required"),
            );
        }
        node
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match node.as_scalar() {
            Some(text) if !node.is_null() && !text.trim().is_empty() => Some(text.to_string()),
            _ => {
                self.error(
                    node.pos,
                    path,
                    format!("expected a non-empty string, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<i64> {
        let text = self.string(node, path)?;
        match parse_duration_ms(&text) {
            Ok(ms) => Some(ms),
            Err(message) => {
                self.error(node.pos, path, message);
                None
            }
        }
    }

    fn positive_duration(&mut self, node: &Node, path: &str) -> Option<i64> {
        let ms = self.duration(node, path)?;
        if ms <= 0 {
            self.error(node.pos, path, "must be longer than zero");
            return None;
        }
        Some(ms)
    }

    fn choice<'c>(&mut self, node: &Node, path: &str, options: &[&'c str]) -> Option<&'c str> {
        let text = self.string(node, path)?;
        match options.iter().find(|o| **o == text) {
            Some(found) => Some(found),
            None => {
                let hint = suggestion(&text, options);
                self.error(
                    node.pos,
                    path,
                    format!("`{text}` is not one of: {}{hint}", options.join(", ")),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.as_scalar() {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => {
                self.error(node.pos, path, "expected true or false");
                None
            }
        }
    }

    fn pipeline(&mut self, root: &Node) -> Option<Pipeline> {
        let top = self.mapping(
            root,
            "",
            &[
                "name",
                "description",
                "source",
                "features",
                "sinks",
                "dead_letter",
                "state",
                "guarantee",
            ],
        )?;
        let name = self
            .required(&top, "name", "")
            .and_then(|n| self.string(n, "name"));
        if let (Some(name), Some(node)) = (&name, top.get("name"))
            && !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            self.error(
                node.pos,
                "name",
                "use only letters, digits, `_` and `-` (it names folders and metrics)",
            );
        }
        let (source, schema, facts) = match self.required(&top, "source", "") {
            Some(n) => self.source(n),
            None => (None, None, SourceFacts::default()),
        };
        let dead_letter_topic = top.get("dead_letter").and_then(|n| {
            let entries = self.mapping(n, "dead_letter", &["topic"])?;
            let topic = self.required(&entries, "topic", "dead_letter")?;
            self.string(topic, "dead_letter.topic")
        });
        let sinks = match top.get("sinks") {
            None => SinkParts {
                kafka: Some(None),
                parquet: Some(None),
            },
            Some(n) => self.sinks(n),
        };
        // Without a usable schema, features are still checked for all that does not depend on
        // it, and without a usable Kafka sink for all that does not depend on the emit mode, so
        // that one run reports every problem.
        let emit = sinks
            .kafka
            .as_ref()
            .map(|k| k.as_ref().map_or(Emit::OnUpdate, |k| k.emit));
        let features = self
            .required(&top, "features", "")
            .and_then(|node| self.features(node, schema.as_ref(), emit));
        let state = match top.get("state") {
            None => Some(StateSection::default()),
            Some(node) => self.state(node),
        };
        let guarantee = match top.get("guarantee") {
            None => Some(Guarantee::AtLeastOnce),
            Some(node) => {
                match self.choice(node, "guarantee", &["at_least_once", "exactly_once"]) {
                    Some("exactly_once") => {
                        if state.as_ref().is_some_and(|s| s.topic.is_none()) {
                            self.error(
                                node.pos,
                                "guarantee",
                                "`exactly_once` keeps the state in the state topic, inside each \
                                 transaction: set `state.topic`",
                            );
                        }
                        if state
                            .as_ref()
                            .is_some_and(|s| s.checkpoint_every_ms > MAX_EXACTLY_ONCE_CHECKPOINT_MS)
                        {
                            self.error(
                                node.pos,
                                "guarantee",
                                "with `exactly_once`, `state.checkpoint_every` is at most 5m: a \
                                 transaction spans one interval, and brokers abort transactions \
                                 open for 15 minutes by default",
                            );
                        }
                        Some(Guarantee::ExactlyOnce)
                    }
                    Some(_) => Some(Guarantee::AtLeastOnce),
                    None => None,
                }
            }
        };
        self.cross_checks(&top, &facts, dead_letter_topic.is_some(), &sinks);
        let sinks = Sinks {
            kafka: sinks.kafka?,
            parquet: sinks.parquet?,
        };
        let (name, source, features, state, guarantee) =
            (name?, source?, features?, state?, guarantee?);
        let pipeline = Pipeline {
            name,
            source,
            features,
            sinks,
            dead_letter_topic,
            entity_ttl_ms: state.entity_ttl_ms,
            state_dir: state.dir,
            checkpoint_every_ms: state.checkpoint_every_ms,
            state_topic: state.topic,
            guarantee,
        };
        Some(pipeline)
    }

    /// The source, and its schema on its own so that features can be checked against it even
    /// when another part of the source is wrong.
    fn source(&mut self, node: &Node) -> (Option<Source>, Option<Schema>, SourceFacts) {
        let path = "source";
        let Some(entries) = self.mapping(
            node,
            path,
            &[
                "kafka",
                "format",
                "schema_registry",
                "avro_schema",
                "schema",
                "entity",
                "event_time",
                "watermark",
                "allowed_lateness",
                "on_late",
                "max_event_bytes",
            ],
        ) else {
            return (None, None, SourceFacts::default());
        };
        let kafka = self
            .required(&entries, "kafka", path)
            .and_then(|n| self.kafka_source(n));
        let format = match entries.get("format") {
            None => Some(Format::Json),
            Some(n) => self.format(n, "source.format", &["json", "avro", "avro_confluent"]),
        };
        let schema_registry = entries
            .get("schema_registry")
            .and_then(|n| self.string(n, "source.schema_registry"));
        let avro_schema = entries
            .get("avro_schema")
            .and_then(|n| self.string(n, "source.avro_schema"));
        let schema = self
            .required(&entries, "schema", path)
            .and_then(|n| self.schema(n));
        let schema_copy = schema.clone();
        if let (Some(node), Some(text)) = (entries.get("avro_schema"), &avro_schema) {
            if format.is_some_and(|f| f != Format::Avro) {
                self.error(
                    node.pos,
                    "source.avro_schema",
                    "`avro_schema` is read only with `format: avro` (with `avro_confluent` each event names its schema in the registry): remove it or set `format: avro`",
                );
            } else if let Some(schema) = &schema {
                for problem in crate::decode::avro::writer_schema_problems(text, schema) {
                    self.error(node.pos, "source.avro_schema", problem);
                }
            }
        }
        let entity = self.declared_field(&entries, "entity", schema.as_ref());
        let event_time = self.declared_field(&entries, "event_time", schema.as_ref());
        if let (Some(schema), Some(i), Some(n)) = (&schema, entity, entries.get("entity")) {
            let def = &schema.fields[i];
            if !matches!(def.ty, FieldType::String | FieldType::Int) {
                self.error(
                    n.pos,
                    "source.entity",
                    format!(
                        "the entity field `{}` must be a string or int, not {}",
                        def.name,
                        def.ty.name()
                    ),
                );
            } else if !def.required {
                self.error(
                    n.pos,
                    "source.entity",
                    format!("the entity field `{}` cannot be optional", def.name),
                );
            }
        }
        if let (Some(schema), Some(i), Some(n)) = (&schema, event_time, entries.get("event_time")) {
            let def = &schema.fields[i];
            if def.ty != FieldType::Timestamp {
                self.error(
                    n.pos,
                    "source.event_time",
                    format!(
                        "the event time field `{}` must be declared as timestamp, not {}",
                        def.name,
                        def.ty.name()
                    ),
                );
            } else if !def.required {
                self.error(
                    n.pos,
                    "source.event_time",
                    format!("the event time field `{}` cannot be optional", def.name),
                );
            }
        }
        let (max_out_of_order_ms, idle_timeout_ms, max_future_ms) = match entries.get("watermark") {
            None => (
                Some(0),
                Some(DEFAULT_IDLE_TIMEOUT_MS),
                Some(Some(DEFAULT_MAX_FUTURE_MS)),
            ),
            Some(n) => match self.mapping(
                n,
                "source.watermark",
                &["max_out_of_order", "idle_timeout", "max_future"],
            ) {
                None => (None, None, None),
                Some(w) => (
                    w.get("max_out_of_order").map_or(Some(0), |n| {
                        self.duration(n, "source.watermark.max_out_of_order")
                    }),
                    w.get("idle_timeout")
                        .map_or(Some(DEFAULT_IDLE_TIMEOUT_MS), |n| {
                            self.positive_duration(n, "source.watermark.idle_timeout")
                        }),
                    match w.get("max_future") {
                        None => Some(Some(DEFAULT_MAX_FUTURE_MS)),
                        Some(n) if n.as_scalar() == Some("never") => Some(None),
                        Some(n) => self.duration(n, "source.watermark.max_future").map(Some),
                    },
                ),
            },
        };
        let allowed_lateness_ms = entries
            .get("allowed_lateness")
            .map_or(Some(0), |n| self.duration(n, "source.allowed_lateness"));
        let on_late = match entries.get("on_late") {
            None => Some(None),
            Some(n) => self.choice(n, "source.on_late", &["drop", "dlq"]).map(|c| {
                Some(if c == "dlq" {
                    OnLate::Dlq
                } else {
                    OnLate::Drop
                })
            }),
        };
        let max_event_bytes = match entries.get("max_event_bytes") {
            None => Some(DEFAULT_MAX_EVENT_BYTES),
            Some(n) => match n.as_scalar().and_then(|t| t.parse::<usize>().ok()) {
                Some(v) if v > 0 => Some(v),
                _ => {
                    self.error(
                        n.pos,
                        "source.max_event_bytes",
                        "expected a positive number of bytes",
                    );
                    None
                }
            },
        };
        let facts = SourceFacts {
            format,
            schema_registry: schema_registry.is_some(),
            avro_schema: avro_schema.is_some(),
            on_late: on_late.flatten(),
        };
        let source = (|| {
            Some(Source {
                kafka: kafka?,
                format: format?,
                schema_registry,
                avro_schema,
                schema: schema?,
                entity: entity?,
                event_time: event_time?,
                max_out_of_order_ms: max_out_of_order_ms?,
                idle_timeout_ms: idle_timeout_ms?,
                max_future_ms: max_future_ms?,
                allowed_lateness_ms: allowed_lateness_ms?,
                // Resolved against `dead_letter` in `cross_checks`.
                on_late: on_late?.unwrap_or(OnLate::Drop),
                max_event_bytes: max_event_bytes?,
            })
        })();
        (source, schema_copy, facts)
    }

    fn format(&mut self, node: &Node, path: &str, options: &[&str]) -> Option<Format> {
        Some(match self.choice(node, path, options)? {
            "avro" => Format::Avro,
            "avro_confluent" => Format::AvroConfluent,
            _ => Format::Json,
        })
    }

    fn declared_field(
        &mut self,
        entries: &Entries<'_>,
        key: &str,
        schema: Option<&Schema>,
    ) -> Option<usize> {
        let path = join("source", key);
        let node = self.required(entries, key, "source")?;
        let name = self.string(node, &path)?;
        let schema = schema?;
        match schema.index_of(&name) {
            Some(i) => Some(i),
            None if self.broken_fields.contains(&name) => None,
            None => {
                let names: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
                let hint = suggestion(&name, &names);
                self.error(
                    node.pos,
                    &path,
                    format!("`{name}` is not declared in source.schema{hint}"),
                );
                None
            }
        }
    }

    fn kafka_source(&mut self, node: &Node) -> Option<KafkaSource> {
        let path = "source.kafka";
        let entries = self.mapping(
            node,
            path,
            &["brokers", "topic", "group_id", "start", "options"],
        )?;
        let brokers = self
            .required(&entries, "brokers", path)
            .and_then(|n| self.string(n, "source.kafka.brokers"));
        let topic = self
            .required(&entries, "topic", path)
            .and_then(|n| self.string(n, "source.kafka.topic"));
        let group_id = self
            .required(&entries, "group_id", path)
            .and_then(|n| self.string(n, "source.kafka.group_id"));
        let start = match entries.get("start") {
            None => Some(StartOffset::Earliest),
            Some(n) => self
                .choice(n, "source.kafka.start", &["earliest", "latest"])
                .map(|c| {
                    if c == "latest" {
                        StartOffset::Latest
                    } else {
                        StartOffset::Earliest
                    }
                }),
        };
        let options = self.options(entries.get("options"), "source.kafka.options");
        Some(KafkaSource {
            brokers: brokers?,
            topic: topic?,
            group_id: group_id?,
            start: start?,
            options: options?,
        })
    }

    fn options(&mut self, node: Option<&Node>, path: &str) -> Option<KafkaOptions> {
        let Some(node) = node else {
            return Some(KafkaOptions::default());
        };
        let NodeKind::Map(pairs) = &node.kind else {
            self.error(
                node.pos,
                path,
                format!(
                    "expected a mapping of librdkafka settings, found {}",
                    node.kind_name()
                ),
            );
            return None;
        };
        let mut options = BTreeMap::new();
        for (key, value) in pairs {
            match (key.as_scalar(), value.as_scalar()) {
                (Some(k), Some(v)) => {
                    options.insert(k.to_string(), Secret(v.to_string()));
                }
                _ => self.error(
                    value.pos,
                    &join(path, key.as_scalar().unwrap_or("?")),
                    "librdkafka settings are plain strings",
                ),
            }
        }
        Some(KafkaOptions(options))
    }

    fn schema(&mut self, node: &Node) -> Option<Schema> {
        let path = "source.schema";
        let NodeKind::Map(pairs) = &node.kind else {
            self.error(
                node.pos,
                path,
                format!(
                    "expected a mapping of field names to types, found {}",
                    node.kind_name()
                ),
            );
            return None;
        };
        if pairs.is_empty() {
            self.error(
                node.pos,
                path,
                "declare at least the entity and event time fields",
            );
            return None;
        }
        // A field in error is left out and the rest stays usable, so that what refers to the
        // others is checked in the same run; what refers to it is not reported again.
        let mut fields: Vec<FieldDef> = Vec::new();
        let types = ["string", "int", "float", "bool", "timestamp"];
        for (key, value) in pairs {
            let Some(name) = key.as_scalar() else {
                self.error(key.pos, path, "field names must be plain names");
                continue;
            };
            let field_path = join(path, name);
            if fields.iter().any(|f| f.name == name) || self.broken_fields.iter().any(|f| f == name)
            {
                self.error(
                    key.pos,
                    &field_path,
                    format!("field `{name}` is declared twice"),
                );
                continue;
            }
            let Some(text) = value.as_scalar().filter(|_| !value.is_null()) else {
                self.error(
                    value.pos,
                    &field_path,
                    format!(
                        "expected a type ({}), optionally ending in `?`",
                        types.join(", ")
                    ),
                );
                self.broken_fields.push(name.to_string());
                continue;
            };
            let (type_name, required) = match text.strip_suffix('?') {
                Some(base) => (base.trim(), false),
                None => (text.trim(), true),
            };
            let ty = match type_name {
                "string" => FieldType::String,
                "int" => FieldType::Int,
                "float" => FieldType::Float,
                "bool" => FieldType::Bool,
                "timestamp" => FieldType::Timestamp,
                other => {
                    let hint = suggestion(other, &types);
                    self.error(
                        value.pos,
                        &field_path,
                        format!(
                            "`{other}` is not a type; use one of {}{hint}",
                            types.join(", ")
                        ),
                    );
                    self.broken_fields.push(name.to_string());
                    continue;
                }
            };
            fields.push(FieldDef {
                name: name.to_string(),
                ty,
                required,
            });
        }
        Some(Schema { fields })
    }

    /// The features; `emit` is the sinks' emit mode when the sinks are valid.
    fn features(
        &mut self,
        node: &Node,
        schema: Option<&Schema>,
        emit: Option<Emit>,
    ) -> Option<Vec<Feature>> {
        let NodeKind::Seq(items) = &node.kind else {
            self.error(
                node.pos,
                "features",
                format!("expected a list of features, found {}", node.kind_name()),
            );
            return None;
        };
        if items.is_empty() {
            self.error(node.pos, "features", "declare at least one feature");
            return None;
        }
        let mut features = Vec::new();
        let mut ok = true;
        let mut seen: Vec<(String, Pos)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("features[{i}]");
            // Names are checked for duplicates even when the rest of a feature is wrong.
            let name = match &item.kind {
                NodeKind::Map(pairs) => pairs
                    .iter()
                    .find(|(k, _)| k.as_scalar() == Some("name"))
                    .and_then(|(_, v)| v.as_scalar().map(str::to_string)),
                _ => None,
            };
            if let Some(name) = name {
                if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                    let message = format!(
                        "feature name `{name}` is already used at line {}",
                        first.line
                    );
                    self.error(item.pos, &join(&path, "name"), message);
                    ok = false;
                }
                seen.push((name, item.pos));
            }
            match self.feature(item, &path, schema, emit) {
                Some(feature) => features.push(feature),
                None => ok = false,
            }
        }
        ok.then_some(features)
    }

    /// One feature; with no `schema` (the source has errors of its own) only what does not
    /// depend on the fields is checked, and no feature results. Its window is checked against
    /// `emit` when that is known.
    fn feature(
        &mut self,
        node: &Node,
        path: &str,
        schema: Option<&Schema>,
        emit: Option<Emit>,
    ) -> Option<Feature> {
        let entries = self.mapping(
            node,
            path,
            &["name", "agg", "field", "where", "window", "description"],
        )?;
        let name = self
            .required(&entries, "name", path)
            .and_then(|n| self.string(n, &join(path, "name")));
        if let (Some(name), Some(n)) = (&name, entries.get("name"))
            && !(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_'))
        {
            self.error(
                n.pos,
                &join(path, "name"),
                "feature names are identifiers: letters, digits and `_`, not starting with a digit",
            );
        }
        if let (Some(name), Some(n)) = (&name, entries.get("name"))
            && ["entity", "as_of", "snapshot_time", "date", "hour"].contains(&name.as_str())
        {
            self.error(
                n.pos,
                &join(path, "name"),
                format!(
                    "`{name}` is a reserved column name (Parquet outputs have `entity`, `as_of` and `snapshot_time` columns and `date=`/`hour=` partitions)"
                ),
            );
        }
        let agg = self
            .required(&entries, "agg", path)
            .and_then(|n| self.agg(n, &join(path, "agg")));
        let window = self
            .required(&entries, "window", path)
            .and_then(|n| self.window(n, &join(path, "window")));
        if emit == Some(Emit::OnWindowClose)
            && let Some(problem) = window.as_ref().and_then(window_close_problem)
        {
            self.error(node.pos, &join(path, "window"), problem);
        }
        let Some(schema) = schema else {
            if let Some(n) = entries.get("field") {
                self.string(n, &join(path, "field"));
            }
            if let Some(n) = entries.get("where") {
                self.string(n, &join(path, "where"));
            }
            return None;
        };
        let field = match entries.get("field") {
            None => Some(None),
            Some(n) => {
                let field_path = join(path, "field");
                self.string(n, &field_path)
                    .and_then(|fname| match schema.index_of(&fname) {
                        Some(i) => Some(Some(i)),
                        None if self.broken_fields.contains(&fname) => None,
                        None => {
                            let names: Vec<&str> =
                                schema.fields.iter().map(|f| f.name.as_str()).collect();
                            let hint = suggestion(&fname, &names);
                            self.error(
                                n.pos,
                                &field_path,
                                format!("`{fname}` is not declared in source.schema{hint}"),
                            );
                            None
                        }
                    })
            }
        };
        let filter = match entries.get("where") {
            None => Some(None),
            Some(n) => {
                let text = self.string(n, &join(path, "where"))?;
                match Expr::parse(&text, schema) {
                    Ok(expr) => Some(Some(expr)),
                    // A field whose declaration is in error: reported there already.
                    Err(e) if names_any(&e.message, &self.broken_fields) => None,
                    Err(e) => {
                        let quoted = matches!(&n.kind, NodeKind::Scalar { quoted: true, .. });
                        let pos = Pos {
                            line: n.pos.line,
                            col: n.pos.col + e.offset + usize::from(quoted),
                        };
                        self.error(pos, &join(path, "where"), e.message);
                        None
                    }
                }
            }
        };
        let (name, agg, field, filter, window) = (name?, agg?, field?, filter?, window?);
        let value_type = self.check_agg_field(&entries, path, agg, field, schema)?;
        Some(Feature {
            name,
            agg,
            field,
            filter,
            window,
            value_type,
        })
    }

    fn agg(&mut self, node: &Node, path: &str) -> Option<Agg> {
        if let NodeKind::Map(_) = &node.kind {
            let entries = self.mapping(node, path, &["percentile"])?;
            let q_node = self.required(&entries, "percentile", path)?;
            let q = q_node.as_scalar().and_then(|t| t.parse::<f64>().ok());
            return match q {
                Some(q) if (0.0..=1.0).contains(&q) => Some(Agg::Percentile(q)),
                _ => {
                    self.error(
                        q_node.pos,
                        &join(path, "percentile"),
                        "expected a quantile between 0 and 1, like 0.9",
                    );
                    None
                }
            };
        }
        let name = self.string(node, path)?;
        let agg = match name.as_str() {
            "count" => Agg::Count,
            "sum" => Agg::Sum,
            "mean" | "avg" => Agg::Mean,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "stddev" => Agg::Stddev,
            "variance" => Agg::Variance,
            "stddev_pop" => Agg::StddevPop,
            "variance_pop" => Agg::VariancePop,
            "distinct_count" => Agg::DistinctCount,
            "first" => Agg::First,
            "last" => Agg::Last,
            "percentile" => {
                self.error(
                    node.pos,
                    path,
                    "write a percentile as `{ percentile: 0.9 }`",
                );
                return None;
            }
            other => {
                let hint = suggestion(other, &Agg::NAMES);
                self.error(
                    node.pos,
                    path,
                    format!(
                        "unknown aggregation `{other}`{hint}; known: {}",
                        Agg::NAMES.join(", ")
                    ),
                );
                return None;
            }
        };
        Some(agg)
    }

    fn window(&mut self, node: &Node, path: &str) -> Option<Window> {
        if let Some(text) = node.as_scalar() {
            if text == "lifetime" {
                return Some(Window::Lifetime);
            }
            let hint = suggestion(text, &["lifetime"]);
            self.error(
                node.pos,
                path,
                format!("expected `lifetime` or a mapping like `{{ sliding: 10m }}`{hint}"),
            );
            return None;
        }
        let entries = self.mapping(
            node,
            path,
            &["sliding", "hopping", "tumbling", "session", "step"],
        )?;
        let kinds: Vec<&str> = ["sliding", "hopping", "tumbling", "session"]
            .into_iter()
            .filter(|k| entries.get(k).is_some())
            .collect();
        let kind = match kinds.as_slice() {
            [one] => *one,
            [] => {
                self.error(
                    entries.pos,
                    path,
                    "give one of sliding, hopping, tumbling or session",
                );
                return None;
            }
            _ => {
                self.error(
                    entries.pos,
                    path,
                    format!("give only one window kind, not {}", kinds.join(" and ")),
                );
                return None;
            }
        };
        let size_node = entries.get(kind)?;
        let size = self.positive_duration(size_node, &join(path, kind))?;
        let step_node = entries.get("step");
        let step = match step_node {
            None => None,
            Some(n) => Some(self.positive_duration(n, &join(path, "step"))?),
        };
        let hopping = |size_ms, step_ms, written| Window::Hopping {
            size_ms,
            step_ms,
            written,
        };
        let window = match (kind, step) {
            ("session", None) => Window::Session { gap_ms: size },
            ("tumbling", None) => hopping(size, size, WindowWritten::Tumbling),
            ("sliding", None) => hopping(size, 1, WindowWritten::Sliding),
            ("sliding", Some(step)) => hopping(size, step, WindowWritten::Sliding),
            ("hopping", Some(step)) => hopping(size, step, WindowWritten::Hopping),
            ("hopping", None) => {
                self.error(entries.pos, path, "a hopping window needs a `step`");
                return None;
            }
            (_, Some(_)) => {
                let pos = step_node.map_or(entries.pos, |n| n.pos);
                self.error(
                    pos,
                    &join(path, "step"),
                    format!("a {kind} window takes no `step`"),
                );
                return None;
            }
            _ => return None,
        };
        if let Window::Hopping {
            size_ms, step_ms, ..
        } = window
        {
            let pos = step_node.map_or(entries.pos, |n| n.pos);
            if step_ms > size_ms {
                self.error(
                    pos,
                    &join(path, "step"),
                    "the step cannot be longer than the window",
                );
                return None;
            }
            if size_ms % step_ms != 0 {
                self.error(
                    pos,
                    &join(path, "step"),
                    "the window size must be a whole multiple of the step",
                );
                return None;
            }
        }
        Some(window)
    }

    /// Checks the aggregation against its field and returns the feature's value type.
    fn check_agg_field(
        &mut self,
        entries: &Entries<'_>,
        path: &str,
        agg: Agg,
        field: Option<usize>,
        schema: &Schema,
    ) -> Option<ValueType> {
        let field_def = field.map(|i| &schema.fields[i]);
        let pos = entries
            .get("field")
            .or(entries.get("agg"))
            .map_or(entries.pos, |n| n.pos);
        let field_path = join(path, "field");
        let Some(def) = field_def else {
            if agg == Agg::Count {
                return Some(ValueType::Int);
            }
            self.error(
                entries.pos,
                &field_path,
                format!("`{}` needs a `field` to aggregate", agg.name()),
            );
            return None;
        };
        let value_type = match def.ty {
            FieldType::String => ValueType::String,
            FieldType::Int => ValueType::Int,
            FieldType::Float => ValueType::Float,
            FieldType::Bool => ValueType::Bool,
            FieldType::Timestamp => ValueType::Timestamp,
        };
        let ok = match agg {
            Agg::Count | Agg::DistinctCount => return Some(ValueType::Int),
            Agg::First | Agg::Last => return Some(value_type),
            Agg::Sum => {
                return if def.ty.is_numeric() {
                    Some(if def.ty == FieldType::Int {
                        ValueType::Int
                    } else {
                        ValueType::Float
                    })
                } else {
                    self.error(
                        pos,
                        &field_path,
                        format!(
                            "`sum` needs an int or float field; `{}` is {}",
                            def.name,
                            def.ty.name()
                        ),
                    );
                    None
                };
            }
            Agg::Min | Agg::Max => def.ty.is_numeric() || def.ty == FieldType::Timestamp,
            Agg::Mean
            | Agg::Stddev
            | Agg::Variance
            | Agg::StddevPop
            | Agg::VariancePop
            | Agg::Percentile(_) => def.ty.is_numeric(),
        };
        if !ok {
            self.error(
                pos,
                &field_path,
                format!(
                    "`{}` needs a numeric field; `{}` is {}",
                    agg.name(),
                    def.name,
                    def.ty.name()
                ),
            );
            return None;
        }
        Some(match agg {
            Agg::Min | Agg::Max => value_type,
            _ => ValueType::Float,
        })
    }

    /// Each sink on its own (`None`: in error), so that one in error does not hide the checks
    /// that involve the other.
    fn sinks(&mut self, node: &Node) -> SinkParts {
        let Some(entries) = self.mapping(node, "sinks", &["kafka", "parquet"]) else {
            return SinkParts {
                kafka: None,
                parquet: None,
            };
        };
        SinkParts {
            kafka: match entries.get("kafka") {
                None => Some(None),
                Some(n) => self.kafka_sink(n).map(Some),
            },
            parquet: match entries.get("parquet") {
                None => Some(None),
                Some(n) => self.parquet_sink(n).map(Some),
            },
        }
    }

    fn kafka_sink(&mut self, node: &Node) -> Option<KafkaSink> {
        let path = "sinks.kafka";
        let entries = self.mapping(node, path, &["topic", "format", "emit", "options"])?;
        let topic = self
            .required(&entries, "topic", path)
            .and_then(|n| self.string(n, "sinks.kafka.topic"));
        let format = match entries.get("format") {
            None => Some(Format::Json),
            Some(n) => self.format(n, "sinks.kafka.format", &["json", "avro"]),
        };
        let emit = match entries.get("emit") {
            None => Some(Emit::OnUpdate),
            Some(n) => self
                .choice(n, "sinks.kafka.emit", &["on_update", "on_window_close"])
                .map(|c| {
                    if c == "on_window_close" {
                        Emit::OnWindowClose
                    } else {
                        Emit::OnUpdate
                    }
                }),
        };
        let options = self.options(entries.get("options"), "sinks.kafka.options");
        Some(KafkaSink {
            topic: topic?,
            format: format?,
            emit: emit?,
            options: options?,
        })
    }

    fn parquet_sink(&mut self, node: &Node) -> Option<ParquetSink> {
        let path = "sinks.parquet";
        let entries = self.mapping(node, path, &["path", "snapshot_every", "feature_log"])?;
        let dir = self
            .required(&entries, "path", path)
            .and_then(|n| self.string(n, "sinks.parquet.path"));
        let snapshot_every_ms = match entries.get("snapshot_every") {
            None => Some(300_000),
            Some(n) => self.positive_duration(n, "sinks.parquet.snapshot_every"),
        };
        let feature_log = match entries.get("feature_log") {
            None => Some(false),
            Some(n) => self.boolean(n, "sinks.parquet.feature_log"),
        };
        Some(ParquetSink {
            path: dir?,
            snapshot_every_ms: snapshot_every_ms?,
            feature_log: feature_log?,
        })
    }

    fn state(&mut self, node: &Node) -> Option<StateSection> {
        let entries = self.mapping(
            node,
            "state",
            &["entity_ttl", "dir", "checkpoint_every", "topic"],
        )?;
        let defaults = StateSection::default();
        let entity_ttl_ms = match entries.get("entity_ttl") {
            None => Some(defaults.entity_ttl_ms),
            Some(n) if n.as_scalar() == Some("never") => Some(None),
            Some(n) => self.positive_duration(n, "state.entity_ttl").map(Some),
        };
        let dir = match entries.get("dir") {
            None => Some(defaults.dir),
            Some(n) => self.string(n, "state.dir"),
        };
        let checkpoint_every_ms = match entries.get("checkpoint_every") {
            None => Some(defaults.checkpoint_every_ms),
            Some(n) => self.positive_duration(n, "state.checkpoint_every"),
        };
        let topic = match entries.get("topic") {
            None => Some(None),
            Some(n) => self.string(n, "state.topic").map(Some),
        };
        Some(StateSection {
            entity_ttl_ms: entity_ttl_ms?,
            dir: dir?,
            checkpoint_every_ms: checkpoint_every_ms?,
            topic: topic?,
        })
    }

    /// Rules that involve more than one section of the file.
    /// Checks that span sections, on whatever parts of them are valid.
    fn cross_checks(
        &mut self,
        top: &Entries<'_>,
        source: &SourceFacts,
        dead_letter: bool,
        sinks: &SinkParts,
    ) {
        let source_node = top.get("source");
        let source_entries = source_node.and_then(|n| match &n.kind {
            NodeKind::Map(pairs) => Some(pairs),
            _ => None,
        });
        let pos_of = |key: &str| -> Pos {
            source_entries
                .and_then(|pairs| pairs.iter().find(|(k, _)| k.as_scalar() == Some(key)))
                .map_or(source_node.map_or(Pos::default(), |n| n.pos), |(k, _)| {
                    k.pos
                })
        };
        if source.format == Some(Format::AvroConfluent) && !source.schema_registry {
            self.error(
                pos_of("format"),
                "source.schema_registry",
                "`format: avro_confluent` needs `schema_registry`",
            );
        }
        if source.format == Some(Format::Avro) && !source.avro_schema {
            self.error(
                pos_of("format"),
                "source.avro_schema",
                "`format: avro` needs the writer schema in `avro_schema`",
            );
        }
        let kafka_sink = sinks.kafka.as_ref().and_then(Option::as_ref);
        if kafka_sink.is_some_and(|k| k.format == Format::Avro) && !source.schema_registry {
            self.error(pos_of("format"), "source.schema_registry", "`sinks.kafka.format: avro` registers its schema in `source.schema_registry`; set it");
        }
        if source.on_late == Some(OnLate::Dlq) && !dead_letter {
            self.error(
                pos_of("on_late"),
                "source.on_late",
                "`on_late: dlq` needs `dead_letter: { topic: ... }`",
            );
        }
        // Read as written, so that another error in the Parquet sink does not hide it.
        let feature_log = sink_entry(top, "parquet", "feature_log")
            .filter(|(_, value)| value.as_scalar() == Some("true"));
        if let Some((key, _)) = feature_log
            && kafka_sink.is_some_and(|k| k.emit == Emit::OnWindowClose)
        {
            self.error(
                key.pos,
                "sinks.parquet.feature_log",
                "the feature log holds every update of `emit: on_update`; with `emit: on_window_close` there are none (closed windows go to the output topic): remove it or emit on_update",
            );
        }
    }
}

/// Why a window cannot be used with `emit: on_window_close`, if it cannot.
fn window_close_problem(window: &Window) -> Option<String> {
    match *window {
        Window::Hopping {
            step_ms: 1,
            written: WindowWritten::Sliding,
            ..
        } => Some(
            "a sliding window with a 1 ms step (exact, the default) closes every millisecond; give it a coarser `step` to use `emit: on_window_close`"
                .to_string(),
        ),
        Window::Lifetime => Some(
            "a lifetime window never closes, so `emit: on_window_close` would never emit it"
                .to_string(),
        ),
        Window::Hopping {
            size_ms, step_ms, ..
        } if size_ms / step_ms > MAX_WINDOWS_PER_EVENT => Some(format!(
            "each event falls in {} windows of this feature and `emit: on_window_close` writes a record for every one; use a step of at least {} or `emit: on_update`",
            size_ms / step_ms,
            format_duration_ms(coarser_step(size_ms))
        )),
        _ => None,
    }
}

/// The key and value of `sinks.<sink>.<key>` as written, if present.
fn sink_entry<'n>(top: &Entries<'n>, sink: &str, key: &str) -> Option<(&'n Node, &'n Node)> {
    fn entry<'n>(node: &'n Node, key: &str) -> Option<(&'n Node, &'n Node)> {
        match &node.kind {
            NodeKind::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.as_scalar() == Some(key))
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }
    let (_, sink) = entry(top.get("sinks")?, sink)?;
    entry(sink, key)
}

/// Whether a message names (in backquotes) any of `names`.
fn names_any(message: &str, names: &[String]) -> bool {
    names.iter().any(|n| message.contains(&format!("`{n}`")))
}
