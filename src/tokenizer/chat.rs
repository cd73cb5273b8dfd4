//! Chat templates: the model's Jinja template rendered as transformers'
//! `apply_chat_template(..., tokenize=False)` renders it.
//!
//! Like transformers, the environment trims block newlines and leading block whitespace,
//! offers `raise_exception` and `strftime_now`, a `tojson` that writes JSON as Python's
//! `json.dumps` does, and Python's string and dict methods (via minijinja-contrib).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::tools::{ToolChoice, ToolFormat};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The largest conversation accepted as JSON text, in bytes.
pub const MAX_CONVERSATION_BYTES: usize = 16 << 20;

/// A conversation as transformers' `apply_chat_template(messages, tools=..., chat_template=...,
/// **variables)` takes it, with OpenAI's `tool_choice` for the reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation {
    /// The messages: objects with `role`, `content` (text, or a list of typed parts) and
    /// whatever else templates read (`tool_calls`, `name`, `reasoning_content`, ...).
    pub messages: Vec<serde_json::Value>,
    /// The template's other inputs: `tools` (a list of tool definitions), `documents`,
    /// `enable_thinking`, `date_string`, ...
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// A template to use instead of the model's (Jinja source).
    pub chat_template: Option<String>,
    /// What the reply may do with the tools (`None`: [`ToolChoice::Auto`] when tools are
    /// given).
    pub tool_choice: Option<ToolChoice>,
    /// A reply may call more than one tool (OpenAI's `parallel_tool_calls`; `None`: yes).
    pub parallel_tool_calls: Option<bool>,
}

impl Conversation {
    /// A conversation of plain messages.
    pub fn from_messages(messages: &[ChatMessage]) -> Conversation {
        Conversation {
            messages: messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect(),
            ..Conversation::default()
        }
    }

    /// Reads a conversation from JSON text: an object with `messages` (a list of objects,
    /// each with a string `role`), optionally `tools`, `tool_choice`, `parallel_tool_calls`,
    /// `chat_template`, and any other key as a template variable (`enable_thinking`, ...).
    pub fn from_json(text: &str) -> Result<Conversation> {
        if text.len() > MAX_CONVERSATION_BYTES {
            return Err(Error::InvalidArgument(format!(
                "conversation of {} bytes (at most {MAX_CONVERSATION_BYTES})",
                text.len()
            )));
        }
        let bad = |why: String| Error::InvalidArgument(format!("conversation: {why}"));
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let serde_json::Value::Object(mut variables) = value else {
            return Err(bad("expected an object with \"messages\"".into()));
        };
        let messages = match variables.remove("messages") {
            Some(serde_json::Value::Array(messages)) => messages,
            _ => return Err(bad("\"messages\" must be a list of messages".into())),
        };
        for (i, m) in messages.iter().enumerate() {
            if !m.get("role").is_some_and(serde_json::Value::is_string) {
                return Err(bad(format!("message {} has no string \"role\"", i + 1)));
            }
        }
        let chat_template = match variables.remove("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(source)) => Some(source),
            Some(_) => return Err(bad("\"chat_template\" must be a string".into())),
        };
        let tool_choice = match variables.remove("tool_choice") {
            None | Some(serde_json::Value::Null) => None,
            Some(choice) => Some(ToolChoice::from_json(&choice)?),
        };
        let parallel_tool_calls = match variables.remove("parallel_tool_calls") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Bool(b)) => Some(b),
            Some(_) => return Err(bad("\"parallel_tool_calls\" must be true or false".into())),
        };
        match variables.get("tools") {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Array(_)) => {}
            Some(_) => return Err(bad("\"tools\" must be a list".into())),
        }
        Ok(Conversation {
            messages,
            variables,
            chat_template,
            tool_choice,
            parallel_tool_calls,
        })
    }

    /// The tool definitions (`tools`), if any.
    pub fn tools(&self) -> &[serde_json::Value] {
        match self.variables.get("tools") {
            Some(serde_json::Value::Array(tools)) => tools,
            _ => &[],
        }
    }
}

/// Instructions a rendering may execute (minijinja's fuel). Real templates need a few
/// thousand per conversation; a hostile loop stops here after well under a second.
const FUEL: u64 = 5_000_000;

/// Deepest nesting of macro calls and includes.
const RECURSION_LIMIT: usize = 32;

/// Bytes of output a rendering may write beyond four times the bytes of its input.
const OUTPUT_ALLOWANCE: usize = 1 << 20;

/// Longest template source accepted (real templates are a few kilobytes).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// A compiled chat template.
///
/// Templates come from model files and may be hostile: compiling one is linear in its size
/// (at most [`MAX_TEMPLATE_BYTES`]), and rendering one is bounded in instructions (fuel),
/// recursion depth and output size; exceeding a bound is an error naming the template. What
/// minijinja does not account for is the memory of strings a template builds without
/// writing them out.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for messages.
    origin: String,
    /// It reads `tools`.
    reads_tools: bool,
    /// How its model writes tool calls (`None`: not in a format Ember knows).
    tool_format: Option<ToolFormat>,
    /// It writes or reads `<think>` blocks (its model may open a reply with one).
    thinks: bool,
}

/// Collects the rendered text, failing once it passes `cap` bytes.
struct CappedWriter {
    text: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.cap {
            return Err(std::io::Error::other("output limit"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

/// `raise_exception(message)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: Llama 3.1 templates print today's date. Only the formats those
/// templates use are supported (`%d %b %Y` and the like), in UTC.
fn strftime_now(format: String) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

/// JSON as Python's `json.dumps(value, ensure_ascii=False)` writes it: `", "` and `": "`
/// separators, or `indent` spaces per level.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template.
    pub fn new(source: &str) -> Result<ChatTemplate> {
        ChatTemplate::from_source(source, "chat template")
    }

    /// Compiles a Jinja chat template; `origin` names it in errors (e.g. "the chat template
    /// of tokenizer_config.json").
    pub fn from_source(source: &str, origin: &str) -> Result<ChatTemplate> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(Error::format(format!(
                "{origin}: {} bytes, more than the {MAX_TEMPLATE_BYTES} a template may have",
                source.len()
            )));
        }
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::format(format!("{origin} does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            origin: origin.to_string(),
            reads_tools: source.contains("tools"),
            tool_format: ToolFormat::of_template(source),
            thinks: source.contains("<think>"),
        })
    }

    /// True when the template reads `tools` (it tells the model of them).
    pub fn reads_tools(&self) -> bool {
        self.reads_tools
    }

    /// How the template's model writes tool calls; `None` when the template does not read
    /// `tools` or asks for a format Ember does not know.
    pub fn tool_format(&self) -> Option<ToolFormat> {
        self.tool_format
    }

    /// True when the template's model may open a reply with a `<think>` block.
    pub fn thinks(&self) -> bool {
        self.thinks
    }

    /// Where the template came from (for messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders a conversation. `bos_token` and `eos_token` are the texts templates insert.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let messages = Conversation::from_messages(messages).messages;
        let no_variables = serde_json::Map::new();
        self.render_json(
            &messages,
            &no_variables,
            add_generation_prompt,
            bos_token,
            eos_token,
        )
    }

    /// Renders a conversation given as JSON, as transformers'
    /// `apply_chat_template(messages, tools=..., **variables)` does: each message an object with
    /// `role`, `content` (text, or a list of typed parts) and whatever else the template reads
    /// (`tool_calls`, `name`, ...); `variables` the template's other inputs (`tools`,
    /// `enable_thinking`, `date_string`, ...). `tools` and `documents` are none unless given.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        variables: &serde_json::Map<String, serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Internal(format!("chat template missing: {e}")))?;
        let json_len = |v: &serde_json::Value| serde_json::to_string(v).map_or(0, |s| s.len());
        let input: usize = messages.iter().map(json_len).sum::<usize>()
            + variables.values().map(json_len).sum::<usize>()
            + bos_token.len()
            + eos_token.len();
        let mut out = CappedWriter {
            text: Vec::new(),
            cap: input.saturating_mul(4).saturating_add(OUTPUT_ALLOWANCE),
        };
        let mut context: std::collections::BTreeMap<&str, Value> =
            [("tools", Value::from(())), ("documents", Value::from(()))]
                .into_iter()
                .collect();
        for (name, value) in variables {
            context.insert(name, Value::from_serialize(value));
        }
        context.insert("messages", Value::from_serialize(messages));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        context.insert("bos_token", Value::from(bos_token));
        context.insert("eos_token", Value::from(eos_token));
        let origin = &self.origin;
        // minijinja 2.24 panics (index out of bounds in value/ops.rs) on a negative-step slice
        // of an empty sequence, `[][::-1]`, which Qwen3's template does to an empty
        // `messages`: that panic becomes an error naming the template.
        crate::error::catch_dependency_panic(|| {
            template.render_captured_to(Value::from_serialize(&context), &mut out)
        })
        .map_err(|panic| {
            Error::InvalidArgument(format!(
                "{origin}: the template engine failed on this template ({panic})"
            ))
        })?
        .map(drop)
        .map_err(|e| {
            let detail = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                ErrorKind::OutOfFuel => {
                    format!("stopped after {FUEL} instructions (a template may not run longer)")
                }
                ErrorKind::WriteFailure => format!(
                    "its output passed {} bytes (a template may not write more)",
                    out.cap
                ),
                _ => e.to_string(),
            };
            Error::InvalidArgument(format!("{origin}: {detail}"))
        })?;
        String::from_utf8(out.text)
            .map_err(|_| Error::InvalidArgument(format!("{origin}: the output is not UTF-8")))
    }
}
