//! `where:` filter expressions: parsing, type checking against the schema, and evaluation.
//!
//! Grammar (lowest precedence first):
//! `or := and ("or" and)*`, `and := not ("and" not)*`, `not := "not" not | cmp`,
//! `cmp := operand (("=="|"!="|"<"|"<="|">"|">=") operand)?`, `operand := field | literal | "(" or ")"`.
//! `&&`, `||` and `!` are accepted as spellings of `and`, `or` and `not`.
//! A comparison with a null (absent optional) value is false.

use std::cmp::Ordering;

use super::{FieldType, Schema};
use crate::decode::Value;
use crate::decode::time::parse_rfc3339_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// A string literal compared with a timestamp field, parsed once at compile time.
    Ts(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Field(usize),
    Lit(Literal),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Cmp {
        left: Operand,
        op: CmpOp,
        right: Operand,
    },
    /// A bool field used on its own: true when the field is true.
    Truthy(usize),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

/// A parse or type error and the byte offset in the expression where it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

impl Expr {
    /// Parses and type-checks `text` against the schema.
    pub fn parse(text: &str, schema: &Schema) -> Result<Expr, ExprError> {
        let tokens = tokenize(text)?;
        let mut parser = ExprParser {
            tokens,
            at: 0,
            schema,
            end: text.len(),
        };
        let expr = parser.or()?;
        if let Some(tok) = parser.tokens.get(parser.at) {
            return Err(ExprError {
                offset: tok.offset,
                message: format!("unexpected `{}` after a complete expression", tok.text()),
            });
        }
        Ok(expr)
    }

    pub fn eval(&self, fields: &[Value<'_>]) -> bool {
        match self {
            Expr::Cmp { left, op, right } => {
                compare(operand(left, fields), *op, operand(right, fields))
            }
            Expr::Truthy(index) => matches!(fields[*index], Value::Bool(true)),
            Expr::And(a, b) => a.eval(fields) && b.eval(fields),
            Expr::Or(a, b) => a.eval(fields) || b.eval(fields),
            Expr::Not(a) => !a.eval(fields),
        }
    }
}

enum Resolved<'v> {
    Null,
    Str(&'v str),
    Num(f64),
    Int(i64),
    Bool(bool),
}

fn operand<'v>(op: &'v Operand, fields: &'v [Value<'_>]) -> Resolved<'v> {
    match op {
        Operand::Field(i) => match &fields[*i] {
            Value::Null => Resolved::Null,
            Value::Str(s) => Resolved::Str(s),
            Value::Int(v) | Value::Ts(v) => Resolved::Int(*v),
            Value::Float(f) => Resolved::Num(*f),
            Value::Bool(b) => Resolved::Bool(*b),
        },
        Operand::Lit(Literal::Str(s)) => Resolved::Str(s),
        Operand::Lit(Literal::Int(v) | Literal::Ts(v)) => Resolved::Int(*v),
        Operand::Lit(Literal::Float(f)) => Resolved::Num(*f),
        Operand::Lit(Literal::Bool(b)) => Resolved::Bool(*b),
    }
}

fn compare(a: Resolved<'_>, op: CmpOp, b: Resolved<'_>) -> bool {
    let ordering = match (a, b) {
        (Resolved::Str(x), Resolved::Str(y)) => Some(x.cmp(y)),
        (Resolved::Int(x), Resolved::Int(y)) => Some(x.cmp(&y)),
        (Resolved::Int(x), Resolved::Num(y)) => (x as f64).partial_cmp(&y),
        (Resolved::Num(x), Resolved::Int(y)) => x.partial_cmp(&(y as f64)),
        (Resolved::Num(x), Resolved::Num(y)) => x.partial_cmp(&y),
        (Resolved::Bool(x), Resolved::Bool(y)) => Some(x.cmp(&y)),
        _ => None,
    };
    let Some(ordering) = ordering else {
        return false;
    };
    match op {
        CmpOp::Eq => ordering == Ordering::Equal,
        CmpOp::Ne => ordering != Ordering::Equal,
        CmpOp::Lt => ordering == Ordering::Less,
        CmpOp::Le => ordering != Ordering::Greater,
        CmpOp::Gt => ordering == Ordering::Greater,
        CmpOp::Ge => ordering != Ordering::Less,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Op(CmpOp),
    And,
    Or,
    Not,
    True,
    False,
    Open,
    Close,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    offset: usize,
}

impl Token {
    fn text(&self) -> String {
        match &self.tok {
            Tok::Ident(s) | Tok::Num(s) => s.clone(),
            Tok::Str(s) => format!("{s:?}"),
            Tok::Op(op) => op_text(*op).to_string(),
            Tok::And => "and".into(),
            Tok::Or => "or".into(),
            Tok::Not => "not".into(),
            Tok::True => "true".into(),
            Tok::False => "false".into(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
        }
    }
}

fn op_text(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Eq => "==",
        CmpOp::Ne => "!=",
        CmpOp::Lt => "<",
        CmpOp::Le => "<=",
        CmpOp::Gt => ">",
        CmpOp::Ge => ">=",
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, ExprError> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let err = |offset, message: String| Err(ExprError { offset, message });
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let two = bytes.get(i..i + 2);
        let tok = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                Tok::Open
            }
            b')' => {
                i += 1;
                Tok::Close
            }
            _ if two == Some(b"==") => {
                i += 2;
                Tok::Op(CmpOp::Eq)
            }
            _ if two == Some(b"!=") => {
                i += 2;
                Tok::Op(CmpOp::Ne)
            }
            _ if two == Some(b"<=") => {
                i += 2;
                Tok::Op(CmpOp::Le)
            }
            _ if two == Some(b">=") => {
                i += 2;
                Tok::Op(CmpOp::Ge)
            }
            _ if two == Some(b"&&") => {
                i += 2;
                Tok::And
            }
            _ if two == Some(b"||") => {
                i += 2;
                Tok::Or
            }
            b'<' => {
                i += 1;
                Tok::Op(CmpOp::Lt)
            }
            b'>' => {
                i += 1;
                Tok::Op(CmpOp::Gt)
            }
            b'!' => {
                i += 1;
                Tok::Not
            }
            b'=' => return err(i, "`=` is not an operator here; compare with `==`".into()),
            b'"' | b'\'' => {
                let quote = c;
                i += 1;
                let mut value = String::new();
                loop {
                    let Some(&b) = bytes.get(i) else {
                        return err(start, "this string literal is not closed".into());
                    };
                    if b == quote {
                        i += 1;
                        break;
                    }
                    if b == b'\\' {
                        match bytes.get(i + 1) {
                            Some(b'\\') => value.push('\\'),
                            Some(b'"') => value.push('"'),
                            Some(b'\'') => value.push('\''),
                            Some(b'n') => value.push('\n'),
                            Some(b't') => value.push('\t'),
                            _ => return err(i, "unknown escape in a string literal".into()),
                        }
                        i += 2;
                        continue;
                    }
                    let ch_len = text[i..].chars().next().map_or(1, char::len_utf8);
                    value.push_str(&text[i..i + ch_len]);
                    i += ch_len;
                }
                Tok::Str(value)
            }
            b'0'..=b'9' | b'-' | b'.' => {
                i += 1;
                while i < bytes.len()
                    && (bytes[i].is_ascii_digit()
                        || matches!(bytes[i], b'.' | b'e' | b'E')
                        || (matches!(bytes[i], b'+' | b'-') && matches!(bytes[i - 1], b'e' | b'E')))
                {
                    i += 1;
                }
                Tok::Num(text[start..i].to_string())
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                match &text[start..i] {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    "true" => Tok::True,
                    "false" => Tok::False,
                    word => Tok::Ident(word.to_string()),
                }
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or('?');
                return err(i, format!("unexpected character `{ch}`"));
            }
        };
        tokens.push(Token { tok, offset: start });
    }
    Ok(tokens)
}

/// The type of one side of a comparison, for checking before the pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SideType {
    Field(FieldType),
    Str,
    Num,
    Bool,
}

struct ExprParser<'s> {
    tokens: Vec<Token>,
    at: usize,
    schema: &'s Schema,
    end: usize,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at).map(|t| &t.tok)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |t| t.offset)
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.at += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.not()?;
        while self.peek() == Some(&Tok::And) {
            self.at += 1;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ExprError> {
        if self.peek() == Some(&Tok::Not) {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, ExprError> {
        if self.peek() == Some(&Tok::Open) {
            let open = self.offset();
            self.at += 1;
            let inner = self.or()?;
            if self.peek() != Some(&Tok::Close) {
                return Err(ExprError {
                    offset: open,
                    message: "this `(` is not closed".into(),
                });
            }
            self.at += 1;
            return Ok(inner);
        }
        let left_at = self.offset();
        let (left, left_ty) = self.operand()?;
        let Some(Tok::Op(op)) = self.peek().cloned() else {
            return match (left, left_ty) {
                (Operand::Field(i), SideType::Field(FieldType::Bool)) => Ok(Expr::Truthy(i)),
                (Operand::Field(i), _) => Err(ExprError {
                    offset: left_at,
                    message: format!(
                        "`{}` is not a bool field; compare it with ==, !=, <, <=, > or >=",
                        self.schema.fields[i].name
                    ),
                }),
                _ => Err(ExprError {
                    offset: left_at,
                    message: "a literal on its own is not a condition".into(),
                }),
            };
        };
        self.at += 1;
        let right_at = self.offset();
        let (right, right_ty) = self.operand()?;
        let (left, right) = self.check_types(left, left_ty, op, right, right_ty, right_at)?;
        Ok(Expr::Cmp { left, op, right })
    }

    fn operand(&mut self) -> Result<(Operand, SideType), ExprError> {
        let offset = self.offset();
        let Some(tok) = self.peek().cloned() else {
            return Err(ExprError {
                offset,
                message: "the expression ends too early".into(),
            });
        };
        self.at += 1;
        let fail = |message: String| Err(ExprError { offset, message });
        match tok {
            Tok::Ident(name) => match self.schema.index_of(&name) {
                Some(i) => Ok((Operand::Field(i), SideType::Field(self.schema.fields[i].ty))),
                None => {
                    let names: Vec<&str> =
                        self.schema.fields.iter().map(|f| f.name.as_str()).collect();
                    let hint = super::compile::suggestion(&name, &names);
                    fail(format!(
                        "`{name}` is not a field declared in source.schema{hint}"
                    ))
                }
            },
            Tok::Str(s) => Ok((Operand::Lit(Literal::Str(s)), SideType::Str)),
            Tok::Num(text) => {
                if let Ok(i) = text.parse::<i64>() {
                    Ok((Operand::Lit(Literal::Int(i)), SideType::Num))
                } else if let Ok(f) = text.parse::<f64>() {
                    Ok((Operand::Lit(Literal::Float(f)), SideType::Num))
                } else {
                    fail(format!("`{text}` is not a number"))
                }
            }
            Tok::True => Ok((Operand::Lit(Literal::Bool(true)), SideType::Bool)),
            Tok::False => Ok((Operand::Lit(Literal::Bool(false)), SideType::Bool)),
            other => {
                let text = Token { tok: other, offset }.text();
                fail(format!(
                    "expected a field name or a literal, found `{text}`"
                ))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_types(
        &self,
        left: Operand,
        left_ty: SideType,
        op: CmpOp,
        right: Operand,
        right_ty: SideType,
        right_at: usize,
    ) -> Result<(Operand, Operand), ExprError> {
        use SideType as S;
        let numeric = |t: S| matches!(t, S::Num | S::Field(FieldType::Int | FieldType::Float));
        let stringy = |t: S| matches!(t, S::Str | S::Field(FieldType::String));
        let booly = |t: S| matches!(t, S::Bool | S::Field(FieldType::Bool));
        let timey = |t: S| matches!(t, S::Field(FieldType::Timestamp));
        let describe = |t: S| match t {
            S::Field(ft) => format!("a {} field", ft.name()),
            S::Str => "a string".into(),
            S::Num => "a number".into(),
            S::Bool => "a bool".into(),
        };
        let fail = |message: String| {
            Err(ExprError {
                offset: right_at,
                message,
            })
        };
        if booly(left_ty) && booly(right_ty) {
            if !matches!(op, CmpOp::Eq | CmpOp::Ne) {
                return fail(format!(
                    "bools can only be compared with == or !=, not {}",
                    op_text(op)
                ));
            }
            return Ok((left, right));
        }
        if (numeric(left_ty) && numeric(right_ty)) || (stringy(left_ty) && stringy(right_ty)) {
            return Ok((left, right));
        }
        // A timestamp compares with a timestamp field, an RFC 3339 string or epoch milliseconds.
        if timey(left_ty) || timey(right_ty) {
            let as_time = |operand: Operand, ty: S| -> Result<Operand, ExprError> {
                match (operand, ty) {
                    (op @ Operand::Field(_), S::Field(FieldType::Timestamp)) => Ok(op),
                    (Operand::Lit(Literal::Str(s)), _) => match parse_rfc3339_ms(&s) {
                        Some(ms) => Ok(Operand::Lit(Literal::Ts(ms))),
                        None => Err(ExprError {
                            offset: right_at,
                            message: format!("{s:?} is not an RFC 3339 time"),
                        }),
                    },
                    (op @ Operand::Lit(Literal::Int(_)), _) => Ok(op),
                    (_, ty) => Err(ExprError {
                        offset: right_at,
                        message: format!("a timestamp cannot be compared with {}", describe(ty)),
                    }),
                }
            };
            return Ok((as_time(left, left_ty)?, as_time(right, right_ty)?));
        }
        fail(format!(
            "cannot compare {} with {}",
            describe(left_ty),
            describe(right_ty)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FieldDef;
    use std::borrow::Cow;

    fn schema() -> Schema {
        let field = |name: &str, ty| FieldDef {
            name: name.into(),
            ty,
            required: false,
        };
        Schema {
            fields: vec![
                field("status", FieldType::String),
                field("amount", FieldType::Float),
                field("n", FieldType::Int),
                field("online", FieldType::Bool),
                field("ts", FieldType::Timestamp),
            ],
        }
    }

    fn eval(text: &str, fields: &[Value<'_>]) -> bool {
        Expr::parse(text, &schema()).unwrap().eval(fields)
    }

    #[test]
    fn evaluates_comparisons_and_logic() {
        let row = [
            Value::Str(Cow::Borrowed("declined")),
            Value::Float(12.5),
            Value::Int(3),
            Value::Bool(true),
            Value::Ts(1_000),
        ];
        assert!(eval(r#"status == "declined""#, &row));
        assert!(!eval(r#"status != 'declined'"#, &row));
        assert!(eval("amount > 12 and n <= 3", &row));
        assert!(eval("amount > 100 or not (n < 3)", &row));
        assert!(eval("online", &row));
        assert!(eval("online == true && !(amount >= 13)", &row));
        assert!(eval(r#"ts < "1970-01-01T00:00:02Z" and ts >= 1000"#, &row));
        assert!(eval("n == 3.0", &row));
    }

    #[test]
    fn null_compares_false() {
        let row = [
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ];
        assert!(!eval(r#"status == "x""#, &row));
        assert!(!eval(r#"status != "x""#, &row));
        assert!(eval(r#"not status == "x""#, &row));
    }

    #[test]
    fn reports_errors_with_offsets() {
        let err = |text: &str| Expr::parse(text, &schema()).unwrap_err();
        assert_eq!(err("statuss == \"x\"").offset, 0);
        assert!(
            err("statuss == \"x\"")
                .message
                .contains("did you mean `status`")
        );
        assert!(err("status = \"x\"").message.contains("=="));
        assert!(err("amount > \"x\"").message.contains("cannot compare"));
        assert!(err("(amount > 1").message.contains("not closed"));
        assert!(err("amount > 1 amount").message.contains("unexpected"));
        assert!(err("status").message.contains("not a bool field"));
        assert!(err("online < true").message.contains("=="));
        assert!(err("ts > \"soon\"").message.contains("RFC 3339"));
        assert_eq!(err("amount >").message, "the expression ends too early");
    }
}
