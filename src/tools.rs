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
    /// The format a template's source asks for; `None` when it is neither (a template that
    /// does not read `tools`, or one of another format: Mistral's `[TOOL_CALLS]`, ...).
    pub fn of_template(source: &str) -> Option<ToolFormat> {
        if !source.contains("tools") {
            return None;
        }
        if source.contains("<tool_call>") {
            Some(ToolFormat::Tagged)
        } else if source.contains("\"parameters\"") {
            Some(ToolFormat::JsonObject)
        } else {
            None
        }
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
    /// The prompt ends inside a `<think>` block the template opened: the reply starts with
    /// the reasoning and must close it.
    pub think_open: bool,
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
    let think = if shape.think_open { "think" } else { "think?" };
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
            format!("start: TEXT | {call}\nTEXT: /(?s:\\s*([^\\s{{].*)?)/\n")
        }
        (ToolFormat::JsonObject, _) => format!("start: {call}\n"),
        (ToolFormat::Tagged, ToolChoice::None) => format!("start: {think} TEXT\n"),
        (ToolFormat::Tagged, ToolChoice::Auto) => format!(
            "start: {think} (TEXT | calls | text_then_call call_rest more_calls)\n\
             text_then_call[lazy]: /(?s:.*<tool_call>)/\n\
             calls: \"<tool_call>\" call_rest more_calls\n\
             call_rest: \"\\n\" {call} \"\\n</tool_call>\"\n\
             {more_calls}"
        ),
        (ToolFormat::Tagged, ToolChoice::Required) => format!(
            "start: {think} calls\n\
             calls: \"<tool_call>\" call_rest more_calls\n\
             call_rest: \"\\n\" {call} \"\\n</tool_call>\"\n\
             {more_calls}"
        ),
        (ToolFormat::Tagged, ToolChoice::Function(_)) => {
            format!("start: {think} \"<tool_call>\\n\" {call} \"\\n</tool_call>\"\n")
        }
    };
    let mut grammar = grammar;
    if format == ToolFormat::Tagged {
        grammar.push_str("TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/\n");
        if shape.think_open {
            // The template opened the block: the reply starts inside it.
            grammar.push_str("think: think_body /\\n*/\nthink_body[lazy]: /(?s:.*<\\/think>)/\n");
        } else if shape.thinking {
            grammar.push_str(
                "think: think_body /\\n*/\nthink_body[lazy]: /(?s:<think>.*<\\/think>)/\n",
            );
        } else {
            grammar.push_str("think: \"\"\n");
        }
    }
    Ok(Some(grammar))
}

/// How a reply is read back ([`parse_reply`]).
#[derive(Debug, Clone, Default)]
pub struct ReplyFormat {
    /// The calls' format; `None`: the reply holds no calls (a template without a known
    /// format, or `tool_choice` `"none"`).
    pub calls: Option<ToolFormat>,
    /// The template knows `<think>` blocks: a reply that closes one it did not open (the
    /// template opened it in the prompt) starts with reasoning.
    pub thinks: bool,
    /// The tools' names: a [`ToolFormat::JsonObject`] reply is a call only when it names
    /// one of them (empty: any name).
    pub tools: Vec<String>,
}

impl ReplyFormat {
    /// The format of replies to a conversation of `tools` and `choice` under a template
    /// of `format` that `thinks` or not.
    pub fn new(
        format: Option<ToolFormat>,
        thinks: bool,
        tools: &[Value],
        choice: Option<&ToolChoice>,
    ) -> ReplyFormat {
        ReplyFormat {
            calls: format.filter(|_| choice != Some(&ToolChoice::None)),
            thinks,
            tools: tools
                .iter()
                .filter_map(|t| tool_signature(t).ok())
                .map(|(name, _)| name.to_string())
                .collect(),
        }
    }
}

/// A reply split into the message a conversation appends: `{"role": "assistant", "content":
/// TEXT, "reasoning_content": THOUGHTS (when it reasoned in a `<think>` block), "tool_calls":
/// [{"type": "function", "function": {"name": ..., "arguments": {...}}}, ...] (when it called
/// tools)}`. A call that is not valid JSON with a name is an error naming it (a reply cut off
/// inside a call, say); a reply cut off inside its `<think>` block is all reasoning.
pub fn parse_reply(format: &ReplyFormat, text: &str) -> Result<Value> {
    let mut rest = text;
    let mut reasoning = None;
    let opened = rest.trim_start().strip_prefix("<think>");
    if let Some(after_open) = opened {
        match after_open.find("</think>") {
            Some(end) => {
                reasoning = Some(after_open[..end].trim_matches('\n').to_string());
                rest = after_open[end + "</think>".len()..].trim_start_matches('\n');
            }
            None => {
                reasoning = Some(after_open.trim_matches('\n').to_string());
                rest = "";
            }
        }
    } else if let Some(end) = rest.find("</think>").filter(|_| format.thinks) {
        reasoning = Some(rest[..end].trim_matches('\n').to_string());
        rest = rest[end + "</think>".len()..].trim_start_matches('\n');
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    match format.calls {
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
            let names_a_tool = |v: &Value| {
                v.get("name").and_then(Value::as_str).is_some_and(|name| {
                    format.tools.is_empty() || format.tools.iter().any(|t| t == name)
                })
            };
            match serde_json::from_str::<Value>(trimmed) {
                Ok(v) if names_a_tool(&v) => {
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
        think_open: false,
        parallel: true,
    };

    fn tagged() -> ReplyFormat {
        ReplyFormat {
            calls: Some(ToolFormat::Tagged),
            ..ReplyFormat::default()
        }
    }

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
        let mistral = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
        assert_eq!(ToolFormat::of_template(mistral), None);
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
        let message = parse_reply(&tagged(), text).unwrap();
        assert_eq!(message["content"], "Let me check.");
        assert_eq!(message["reasoning_content"], "It rains often there.");
        let calls = message["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1]["function"]["name"], "get_weather");
        assert_eq!(calls[1]["function"]["arguments"]["city"], "Rome");
        let plain = parse_reply(&tagged(), " Sunny. ").unwrap();
        assert_eq!(plain, json!({"role": "assistant", "content": "Sunny."}));
        let broken = parse_reply(&tagged(), "<tool_call>\n{\"name\": \n</tool_call>");
        assert!(broken.unwrap_err().to_string().contains("tool call 1"));
        // Cut off while reasoning: a call it mentions is not a call.
        let cut = parse_reply(&tagged(), "<think>\nmaybe <tool_call>\n{\"na").unwrap();
        assert_eq!(cut["reasoning_content"], "maybe <tool_call>\n{\"na");
        assert!(cut.get("tool_calls").is_none());
        // The template opened the block in the prompt.
        let format = ReplyFormat {
            thinks: true,
            ..tagged()
        };
        let opened = parse_reply(&format, "hm\n</think>\n\nHello.").unwrap();
        assert_eq!(opened["reasoning_content"], "hm");
        assert_eq!(opened["content"], "Hello.");
        // tool_choice "none": no calls, whatever the text.
        let none = ReplyFormat::new(
            Some(ToolFormat::Tagged),
            false,
            &[],
            Some(&ToolChoice::None),
        );
        let text = "<tool_call>\n{\"name\": \"f\"}\n</tool_call>";
        assert!(parse_reply(&none, text)
            .unwrap()
            .get("tool_calls")
            .is_none());
    }

    #[test]
    fn json_object_replies_parse_into_messages() {
        let format = ReplyFormat::new(Some(ToolFormat::JsonObject), false, &[weather()], None);
        let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        let message = parse_reply(&format, text).unwrap();
        assert_eq!(message["content"], "");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"]["city"],
            "Oslo"
        );
        for text in ["{\"answer\": 4}", "{\"name\": \"not a tool\"}"] {
            let message = parse_reply(&format, text).unwrap();
            assert_eq!(message["content"], text);
            assert!(message.get("tool_calls").is_none());
        }
    }
}
