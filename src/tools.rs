//! Tool calls: the format a chat template asks its model to call tools in, the Lark grammar
//! that keeps a reply to that format and to the tools' argument schemas (a constraint, see
//! [`crate::constraint`]), and a reply parsed back into the message a conversation appends.
//!
//! Two formats cover the tool-calling families of 2024–26:
//! - [`ToolFormat::Tagged`]: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
//!   blocks, one per call, separated by newlines (Qwen2.5, Qwen3, SmolLM3, Hermes), after an
//!   optional `<think>...</think>` block;
//! - [`ToolFormat::JsonObject`]: the whole reply one `{"name": ..., "parameters": {...}}`
//!   object (Llama 3.1–3.3).
//!
//! Tools and messages are JSON as transformers' `apply_chat_template(messages, tools=...)`
//! takes them: a tool is `{"type": "function", "function": {"name", "description",
//! "parameters"}}` (or the inner object alone), a call in a message is `{"type": "function",
//! "function": {"name", "arguments"}}`.

use serde_json::{json, Map, Value};

use crate::constraint::json_layout;
use crate::error::{Error, Result};

/// How a chat template's model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>` blocks holding `{"name": ..., "arguments": ...}` (Qwen, Hermes style).
    Tagged,
    /// One `{"name": ..., "parameters": ...}` object as the whole reply (Llama 3 style).
    JsonObject,
}

impl ToolFormat {
    /// The format a template's source asks for; `None` when the template never reads
    /// `tools` (it cannot tell the model about them).
    pub fn of_template(source: &str) -> Option<ToolFormat> {
        if !source.contains("tools") {
            return None;
        }
        if !source.contains("<tool_call>") && source.contains("\"parameters\"") {
            return Some(ToolFormat::JsonObject);
        }
        Some(ToolFormat::Tagged)
    }

    /// The key under which a call's arguments are written.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Tagged => "arguments",
            ToolFormat::JsonObject => "parameters",
        }
    }
}

/// What the reply may do with the tools (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text or calls tools; a call it starts is kept valid.
    Auto,
    /// The model answers in text (with [`ToolFormat::Tagged`], no call can start).
    None,
    /// The reply is one or more tool calls.
    Required,
    /// The reply is one call of the named tool.
    Function(String),
}

impl ToolChoice {
    /// From OpenAI's JSON form: `"auto"`, `"none"`, `"required"` or
    /// `{"type": "function", "function": {"name": NAME}}`.
    pub fn from_json(value: &Value) -> Result<ToolChoice> {
        let bad = || {
            Error::InvalidArgument(format!(
                "tool_choice {value}: expected \"auto\", \"none\", \"required\" or \
                 {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
            ))
        };
        match value {
            Value::String(s) => match s.as_str() {
                "auto" => Ok(ToolChoice::Auto),
                "none" => Ok(ToolChoice::None),
                "required" => Ok(ToolChoice::Required),
                _ => Err(bad()),
            },
            Value::Object(o) => o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(|name| ToolChoice::Function(name.to_string()))
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

/// A tool's name and argument schema, from a transformers-style tool definition.
fn tool_signature(tool: &Value) -> Result<(&str, Value)> {
    let function = tool.get("function").unwrap_or(tool);
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::InvalidArgument(format!("tool without a name: {tool}")))?;
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object"}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "tool {name}: parameters must be a JSON schema object, not {other}"
            )))
        }
    };
    Ok((name, parameters))
}

/// The JSON schema of one call of any of `tools` (or of the one named) in `format`.
fn call_schema(format: ToolFormat, tools: &[Value], only: Option<&str>) -> Result<Value> {
    let mut options = Vec::new();
    for tool in tools {
        let (name, parameters) = tool_signature(tool)?;
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let mut properties = Map::new();
        properties.insert("name".into(), json!({ "const": name }));
        properties.insert(format.arguments_key().into(), parameters);
        options.push(json!({
            "type": "object",
            "properties": properties,
            "required": ["name", format.arguments_key()],
            "additionalProperties": false,
        }));
    }
    if options.is_empty() {
        return Err(Error::InvalidArgument(match only {
            Some(name) => format!("tool_choice names {name}, which is not among the tools"),
            None => "tool_choice asks for a tool call, but no tools are given".into(),
        }));
    }
    let mut schema = json!({ "anyOf": options });
    schema["x-guidance"] = json_layout();
    Ok(schema)
}

/// What a reply may hold besides the calls' format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyShape {
    /// The model may open with a `<think>` block.
    pub thinking: bool,
    /// More than one call per reply (OpenAI's `parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// The Lark grammar (llguidance's syntax) a reply in `format` follows for `choice`, or `None`
/// when the reply is free text.
pub fn reply_grammar(
    format: ToolFormat,
    tools: &[Value],
    choice: &ToolChoice,
    shape: ReplyShape,
) -> Result<Option<String>> {
    let only = match choice {
        ToolChoice::Function(name) => Some(name.as_str()),
        _ => None,
    };
    if tools.is_empty() && *choice == ToolChoice::Auto {
        return Ok(None);
    }
    let call = match choice {
        ToolChoice::None => String::new(),
        _ => format!("%json {}", call_schema(format, tools, only)?),
    };
    let more_calls = if shape.parallel {
        "more_calls: (\"\\n<tool_call>\" call_rest)*\n"
    } else {
        "more_calls: \"\"\n"
    };
    // Lexemes that end where a longer one could go on are lazy (they end at the first
    // point their text matches); free text excludes the start of a call, so that a call,
    // once started, can only be a valid one.
    let grammar = match (format, choice) {
        (ToolFormat::JsonObject, ToolChoice::None) => return Ok(None),
        (ToolFormat::JsonObject, ToolChoice::Auto) => {
            format!("start: TEXT | {call}\nTEXT: /(?s:([^{{].*)?)/\n")
        }
        (ToolFormat::JsonObject, _) => format!("start: {call}\n"),
        (ToolFormat::Tagged, ToolChoice::None) => "start: think? TEXT\n".to_string(),
        (ToolFormat::Tagged, ToolChoice::Auto) => format!(
            "start: think? (TEXT | calls | text_then_call call_rest more_calls)\n\
             text_then_call[lazy]: /(?s:.*<tool_call>)/\n\
             calls: \"<tool_call>\" call_rest more_calls\n\
             call_rest: \"\\n\" {call} \"\\n</tool_call>\"\n\
             {more_calls}"
        ),
        (ToolFormat::Tagged, ToolChoice::Required) => format!(
            "start: think? calls\n\
             calls: \"<tool_call>\" call_rest more_calls\n\
             call_rest: \"\\n\" {call} \"\\n</tool_call>\"\n\
             {more_calls}"
        ),
        (ToolFormat::Tagged, ToolChoice::Function(_)) => {
            format!("start: think? \"<tool_call>\\n\" {call} \"\\n</tool_call>\"\n")
        }
    };
    let mut grammar = grammar;
    if format == ToolFormat::Tagged {
        grammar.push_str("TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/\n");
        if shape.thinking {
            grammar.push_str(
                "think: think_body /\\n*/\nthink_body[lazy]: /(?s:<think>.*<\\/think>)/\n",
            );
        } else {
            grammar.push_str("think: \"\"\n");
        }
    }
    Ok(Some(grammar))
}

/// A reply split into the message a conversation appends: `{"role": "assistant", "content":
/// TEXT, "reasoning_content": THOUGHTS (when a `<think>` block opened it), "tool_calls":
/// [{"type": "function", "function": {"name": ..., "arguments": {...}}}, ...] (when it called
/// tools)}`. A call that is not valid JSON with a name is an error naming it. Without a
/// format (a template that does not read tools), the reply is text.
pub fn parse_reply(format: Option<ToolFormat>, text: &str) -> Result<Value> {
    let mut rest = text;
    let mut reasoning = None;
    if let Some(after_open) = rest.trim_start().strip_prefix("<think>") {
        if let Some(end) = after_open.find("</think>") {
            reasoning = Some(after_open[..end].trim_matches('\n').to_string());
            rest = after_open[end + "</think>".len()..].trim_start_matches('\n');
        }
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    match format {
        None => content.push_str(rest),
        Some(ToolFormat::Tagged) => {
            while let Some(open) = rest.find("<tool_call>") {
                content.push_str(&rest[..open]);
                let body = &rest[open + "<tool_call>".len()..];
                let (inner, after) = match body.find("</tool_call>") {
                    Some(close) => (&body[..close], &body[close + "</tool_call>".len()..]),
                    None => (body, ""),
                };
                calls.push(parse_call(inner, ToolFormat::Tagged, calls.len())?);
                rest = after;
            }
            content.push_str(rest);
        }
        Some(ToolFormat::JsonObject) => {
            let trimmed = rest.trim();
            match serde_json::from_str::<Value>(trimmed) {
                Ok(v) if v.get("name").is_some_and(Value::is_string) => {
                    calls.push(parse_call(trimmed, ToolFormat::JsonObject, 0)?)
                }
                _ => content.push_str(rest),
            }
        }
    }
    let mut message = Map::new();
    message.insert("role".into(), "assistant".into());
    message.insert("content".into(), content.trim().into());
    if let Some(r) = reasoning {
        message.insert("reasoning_content".into(), r.into());
    }
    if !calls.is_empty() {
        message.insert("tool_calls".into(), calls.into());
    }
    Ok(Value::Object(message))
}

/// One call (the JSON text of the `index`th) as a message's `tool_calls` entry.
fn parse_call(text: &str, format: ToolFormat, index: usize) -> Result<Value> {
    let bad = |why: String| Error::InvalidArgument(format!("tool call {}: {why}", index + 1));
    let call: Value = serde_json::from_str(text.trim()).map_err(|e| bad(format!("{e}")))?;
    let name = call
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no \"name\"".into()))?;
    let arguments = call
        .get(format.arguments_key())
        .or_else(|| call.get("arguments"))
        .or_else(|| call.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    Ok(json!({"type": "function", "function": {"name": name, "arguments": arguments}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: ReplyShape = ReplyShape {
        thinking: false,
        parallel: true,
    };

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    #[test]
    fn formats_are_read_off_templates() {
        let qwen = "{% if tools %}<tools>{% endif %}{{ '<tool_call>\\n' }}";
        assert_eq!(ToolFormat::of_template(qwen), Some(ToolFormat::Tagged));
        let llama = "{% if tools %}{{ '{\"name\": \"' + n + '\", \"parameters\": ' }}{% endif %}";
        assert_eq!(ToolFormat::of_template(llama), Some(ToolFormat::JsonObject));
        assert_eq!(ToolFormat::of_template("{{ messages }}"), None);
    }

    #[test]
    fn tool_choices_parse_as_openai_writes_them() {
        assert_eq!(
            ToolChoice::from_json(&json!("required")).unwrap(),
            ToolChoice::Required
        );
        let named = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(
            ToolChoice::from_json(&named).unwrap(),
            ToolChoice::Function("f".into())
        );
        assert!(ToolChoice::from_json(&json!("sometimes")).is_err());
        assert!(ToolChoice::from_json(&json!(3)).is_err());
    }

    #[test]
    fn a_named_tool_must_exist_and_required_needs_tools() {
        let tools = [weather()];
        let missing = ToolChoice::Function("fly".into());
        let err = reply_grammar(ToolFormat::Tagged, &tools, &missing, SHAPE).unwrap_err();
        assert!(err.to_string().contains("fly"), "{err}");
        let err = reply_grammar(ToolFormat::Tagged, &[], &ToolChoice::Required, SHAPE);
        assert!(err.is_err());
        assert_eq!(
            reply_grammar(ToolFormat::Tagged, &[], &ToolChoice::Auto, SHAPE).unwrap(),
            None
        );
        let bad_tool = [json!({"function": {"description": "no name"}})];
        assert!(reply_grammar(ToolFormat::Tagged, &bad_tool, &ToolChoice::Auto, SHAPE).is_err());
    }

    #[test]
    fn tagged_replies_parse_into_messages() {
        let text = "<think>\nIt rains often there.\n</think>\n\nLet me check.\n<tool_call>\n\
                    {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
                    <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        let message = parse_reply(Some(ToolFormat::Tagged), text).unwrap();
        assert_eq!(message["content"], "Let me check.");
        assert_eq!(message["reasoning_content"], "It rains often there.");
        let calls = message["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1]["function"]["name"], "get_weather");
        assert_eq!(calls[1]["function"]["arguments"]["city"], "Rome");
        let plain = parse_reply(Some(ToolFormat::Tagged), " Sunny. ").unwrap();
        assert_eq!(plain, json!({"role": "assistant", "content": "Sunny."}));
        let broken = parse_reply(
            Some(ToolFormat::Tagged),
            "<tool_call>\n{\"name\": \n</tool_call>",
        );
        assert!(broken.unwrap_err().to_string().contains("tool call 1"));
    }

    #[test]
    fn json_object_replies_parse_into_messages() {
        let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        let message = parse_reply(Some(ToolFormat::JsonObject), text).unwrap();
        assert_eq!(message["content"], "");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"]["city"],
            "Oslo"
        );
        let text = "{\"answer\": 4}";
        let message = parse_reply(Some(ToolFormat::JsonObject), text).unwrap();
        assert_eq!(message["content"], text);
        assert!(message.get("tool_calls").is_none());
    }
}
