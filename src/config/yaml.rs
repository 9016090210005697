//! A YAML document as a tree of nodes that remember where they came from.
//!
//! Validation reports every problem with `file:line:column`, so the pipeline file is parsed into
//! this position-carrying tree first and compiled into typed config afterwards.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in the pipeline file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn from_marker(m: Marker) -> Self {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    /// A scalar; `quoted` distinguishes `"null"` (a string) from `null`.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    pub pos: Pos,
}

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { text, quoted: false } if text.is_empty() || text == "~" || text == "null")
    }

    pub fn as_scalar(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "nothing",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Seq(Pos, Vec<Node>),
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Frame>,
    documents: Vec<Node>,
    alias_seen: Option<Pos>,
}

impl TreeBuilder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.documents.push(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending_key)) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        match event {
            Event::Scalar(text, style, _, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push_node(Node {
                    kind: NodeKind::Scalar { text, quoted },
                    pos,
                });
            }
            Event::SequenceStart(..) => self.stack.push(Frame::Seq(pos, Vec::new())),
            Event::MappingStart(..) => self.stack.push(Frame::Map(pos, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(pos, items)) => Node {
                        kind: NodeKind::Seq(items),
                        pos,
                    },
                    Some(Frame::Map(pos, entries, _)) => Node {
                        kind: NodeKind::Map(entries),
                        pos,
                    },
                    None => return,
                };
                self.push_node(node);
            }
            Event::Alias(_) => {
                self.alias_seen.get_or_insert(pos);
                self.push_node(Node {
                    kind: NodeKind::Scalar {
                        text: String::new(),
                        quoted: false,
                    },
                    pos,
                });
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Parses one YAML document into a positioned tree.
pub fn parse(source: &str) -> Result<Node, SyntaxError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(source);
    parser.load(&mut builder, true).map_err(|e| SyntaxError {
        pos: Pos::from_marker(*e.marker()),
        message: e.info().to_string(),
    })?;
    if let Some(pos) = builder.alias_seen {
        return Err(SyntaxError {
            pos,
            message: "YAML aliases (*name) are not supported in pipeline files".into(),
        });
    }
    match builder.documents.len() {
        0 => Err(SyntaxError {
            pos: Pos { line: 1, col: 1 },
            message: "the file is empty".into(),
        }),
        1 => Ok(builder.documents.remove(0)),
        _ => Err(SyntaxError {
            pos: builder.documents[1].pos,
            message: "a pipeline file holds exactly one YAML document".into(),
        }),
    }
}
