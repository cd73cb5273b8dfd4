//! The fuzz targets' bodies: one function per parser of untrusted input, each taking any
//! bytes. `fuzz/` (cargo-fuzz) calls them under libFuzzer; `tests/fuzz_regressions.rs`
//! replays the committed seeds and every input a campaign found through them, so a finding
//! stays fixed. Whatever the bytes, none of them may panic, hang, or allocate beyond what
//! the input size allows.
//!
//! Inputs of several parts (a `config.json` and a safetensors file, ...) are the parts
//! joined by [`SEPARATOR`].

use std::ffi::{c_char, c_void};
use std::sync::{Arc, OnceLock};

use crate::constraint::{ConstraintKind, ConstraintState};
use crate::ffi::*;
use crate::loader::gguf::GgufFile;
use crate::model::{LoadOptions, Model};
use crate::sampler::{Sampler, SamplerOptions};
use crate::session::{Session, SessionOptions};
use crate::tensor::Storage;
use crate::tokenizer::{
    ChatMessage, ChatTemplate, Conversation, StreamDecoder, Tokenizer, TokenizerSettings,
};
use crate::tools::{reply_grammar, ReplyShape, ToolChoice};

/// Separates the parts of a multi-part input.
pub const SEPARATOR: &[u8] = b"\n\0--ember--\0\n";

/// The first `n` parts of `data` (missing parts are empty).
fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

/// Joins parts into one input (for making seeds).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEPARATOR)
}

/// Texts a tokenizer is tried on: plain, special-token markers, bytes of every kind.
const TEXTS: [&str; 4] = [
    "Hello, wörld! 123 ",
    "<|im_start|>user\nhi<|im_end|><s></s>[INST]",
    "\u{0}\t\n\r 😀 日本",
    "",
];

/// Uses a tokenizer the way a host does: encode, decode, stream, chat.
fn exercise_tokenizer(tok: &Tokenizer) {
    for text in TEXTS {
        for (add, parse) in [(false, false), (true, true)] {
            if let Ok(ids) = tok.encode(text, add, parse) {
                let _ = tok.decode(&ids);
                let mut stream = StreamDecoder::new();
                for &id in &ids {
                    let _ = stream.push(tok, id);
                }
                let _ = stream.finish(tok);
            }
        }
    }
    let _ = tok.decode(&[0, 1, u32::MAX]);
    let messages = [
        ChatMessage::new("system", TEXTS[1]),
        ChatMessage::new("user", TEXTS[0]),
    ];
    let _ = tok.encode_chat(&messages, true, false);
    let _ = tok.encode_chat(&messages, false, true);
}

/// Steps a couple of tokens through a model in a small session.
fn exercise_model(model: Model) {
    let model = Arc::new(model);
    if let Ok(tok) = model.tokenizer() {
        exercise_tokenizer(tok);
    }
    let options = SessionOptions {
        n_ctx: 8,
        n_threads: 1,
        ubatch: 2,
        ..Default::default()
    };
    if let Ok(mut session) = Session::new(model.clone(), &options) {
        let vocab = model.n_vocab() as u32;
        let _ = session.step(&[0, vocab.saturating_sub(1), vocab / 2]);
        let _ = session.step(&[vocab]);
    }
}

/// GGUF bytes: the model (config, tensors), its tokenizer and one step.
pub fn gguf(data: &[u8]) {
    if let Ok(model) = Model::load_gguf_bytes(data, "fuzz.gguf", &LoadOptions::default()) {
        exercise_model(model);
    }
}

/// GGUF bytes through the tokenizer builder alone (`tokenizer.ggml.*` metadata).
pub fn gguf_tokenizer(data: &[u8]) {
    let Ok(storage) = Storage::owned(data) else {
        return;
    };
    if let Ok(file) = GgufFile::parse(Arc::new(storage)) {
        if let Ok(Some(tok)) = Tokenizer::from_gguf(&file.metadata) {
            exercise_tokenizer(&tok);
        }
    }
}

/// `config.json`, then safetensors bytes: a Hugging Face model, and one step.
pub fn safetensors(data: &[u8]) {
    let p = parts(data, 2);
    let Ok(text) = std::str::from_utf8(p[0]) else {
        return;
    };
    let Ok(json) = crate::loader::parse_config(text.as_bytes()) else {
        return;
    };
    let Ok(storage) = Storage::owned(p[1]) else {
        return;
    };
    let mut tensors = crate::loader::TensorMap::new();
    if crate::loader::safetensors::read_storage(Arc::new(storage), "fuzz", &mut tensors, None)
        .is_err()
    {
        return;
    }
    if let Ok(model) = Model::from_hf(&json, tensors) {
        exercise_model(model);
    }
}

/// `tokenizer.json`, then `tokenizer_config.json`: a Hugging Face tokenizer.
pub fn tokenizer(data: &[u8]) {
    let p = parts(data, 2);
    let config: serde_json::Value = serde_json::from_slice(p[1]).unwrap_or_default();
    let settings = TokenizerSettings::from_configs(&config, &serde_json::Value::Null);
    if let Ok(tok) = Tokenizer::from_json_bytes(p[0], settings) {
        exercise_tokenizer(&tok);
        // Constraints read the same vocabulary (llguidance's token bytes and trie): an
        // error is fine, a panic is a bug.
        if let Ok(factory) = crate::constraint::ConstraintFactory::new(&tok, tok.n_vocab()) {
            let _ = factory.constraint(ConstraintKind::Regex, "[a-z]{1,8}");
        }
    }
}

/// A chat template, then messages (one per line, `role: content`), rendered.
pub fn chat_template(data: &[u8]) {
    let p = parts(data, 2);
    let (Ok(source), Ok(messages)) = (std::str::from_utf8(p[0]), std::str::from_utf8(p[1])) else {
        return;
    };
    let Ok(template) = ChatTemplate::from_source(source, "fuzz") else {
        return;
    };
    let messages: Vec<ChatMessage> = messages
        .lines()
        .map(|line| {
            let (role, content) = line.split_once(": ").unwrap_or(("user", line));
            ChatMessage::new(role, content)
        })
        .collect();
    for add_generation_prompt in [false, true] {
        let _ = template.render(&messages, add_generation_prompt, "<s>", "</s>");
    }
}

/// A conversation as JSON (messages, tools, tool_choice, chat_template, variables), then an
/// assistant's reply: the conversation read, rendered and tokenized (caller text as plain
/// text, and trusted) with the tiny Llama fixture's tokenizer, the constraint of its tool
/// calls built, and the reply parsed. Each step succeeds or fails with an error.
pub fn conversation(data: &[u8]) {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama");
        Arc::new(Model::load(path).expect("the fuzz fixture must load"))
    });
    let p = parts(data, 2);
    let (Ok(json), Ok(reply)) = (std::str::from_utf8(p[0]), std::str::from_utf8(p[1])) else {
        return;
    };
    let Ok(conversation) = Conversation::from_json(json) else {
        return;
    };
    let tokenizer = model.tokenizer().expect("the fixture has a tokenizer");
    let _ = tokenizer.render_conversation(&conversation, true);
    for parse_special in [false, true] {
        if let Ok(ids) = tokenizer.encode_conversation(&conversation, false, parse_special) {
            assert!(ids.iter().all(|&t| (t as usize) < model.n_vocab()));
        }
    }
    if let Ok(template) = tokenizer.conversation_template(&conversation) {
        if let Some(format) = template.tool_format() {
            let choice = conversation.tool_choice.clone().unwrap_or(ToolChoice::Auto);
            let shape = ReplyShape {
                thinking: true,
                think_open: reply.starts_with('1'),
                parallel: conversation.parallel_tool_calls.unwrap_or(true),
            };
            if let Ok(Some(grammar)) = reply_grammar(format, conversation.tools(), &choice, shape) {
                let _ = model.constraint(ConstraintKind::Lark, &grammar);
            }
        }
    }
    let _ = tokenizer.parse_reply(&conversation, reply);
}

/// Reads the bytes of an input as a sequence of small numbers.
struct Cursor<'a> {
    data: &'a [u8],
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn small(&mut self, max: usize) -> usize {
        self.byte().map_or(0, |b| b as usize % (max + 1))
    }

    fn token(&mut self) -> i32 {
        match self.byte().unwrap_or(0) {
            250 => -1,
            251 => i32::MAX,
            252 => 320,
            b => b as i32,
        }
    }

    fn tokens(&mut self, max: usize) -> Vec<i32> {
        (0..self.small(max)).map(|_| self.token()).collect()
    }

    fn text(&mut self) -> Vec<u8> {
        let n = self.small(24);
        (0..n).map(|_| self.byte().unwrap_or(b'a')).collect()
    }

    fn flag(&mut self) -> bool {
        self.byte().unwrap_or(0) & 1 == 1
    }
}

/// A saved session state loaded into a session of the tiny Llama fixture. The first byte of
/// the input may fix up the rest so that the fuzzer gets past the outer checks: bit 0 writes
/// the model's fingerprint and rotations, bit 1 recomputes the checksum, bit 2 loads into a
/// session with an f16 cache (else f32). Whatever the bytes, a failed load
/// leaves the session as it was, and a successful one leaves it usable (it steps, and saves
/// a state that loads again).
pub fn session_state(data: &[u8]) {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama");
        Arc::new(Model::load(path).expect("the fuzz fixture must load"))
    });
    let Some(bytes) = fixed_session_state(model, data) else {
        return;
    };
    let kv_type = if data[0] & 4 == 4 {
        crate::KvType::F16
    } else {
        crate::KvType::F32
    };
    let options = SessionOptions {
        n_ctx: 32,
        n_threads: 1,
        ubatch: 8,
        kv_type,
    };
    let mut session = Session::new(model.clone(), &options).expect("a session");
    session.step(&[1, 2, 3]).expect("a step");
    match session.load_state(&bytes) {
        Ok(()) => {
            let saved = session.save_state_to_vec().expect("a loaded state saves");
            if session.position() < session.n_ctx() {
                session.step(&[4]).expect("a loaded session steps");
            }
            session.load_state(&saved).expect("a saved state loads");
        }
        Err(_) => {
            assert_eq!(
                session.tokens(),
                &[1, 2, 3],
                "a failed load changed the session"
            );
            session.step(&[4]).expect("the session is still usable");
        }
    }
}

/// The state [`session_state`] loads for `data`: its first byte says what to fix up in the
/// rest (bit 0: the fingerprint of `model` and its rotations at 32 positions, bit 1: the
/// checksum). `None` for empty input.
pub fn fixed_session_state(model: &Model, data: &[u8]) -> Option<Vec<u8>> {
    let (&fix, rest) = data.split_first()?;
    let mut bytes = rest.to_vec();
    if fix & 1 == 1 && bytes.len() >= 32 {
        bytes[16..24].copy_from_slice(&model.fingerprint().to_le_bytes());
        let rope = crate::model::rope_signature(&model.config, 32);
        bytes[24..32].copy_from_slice(&rope.to_le_bytes());
    }
    if fix & 2 == 2 && bytes.len() >= 8 {
        let body = bytes.len() - 8;
        let mut hash = crate::checksum::Hash64::default();
        hash.update(&bytes[..body]);
        bytes[body..].copy_from_slice(&hash.finish().to_le_bytes());
    }
    Some(bytes)
}

/// The tiny Llama fixture, loaded once through the C API.
fn fixture_model() -> *mut ember_model {
    struct Handle(*mut ember_model);
    // SAFETY: an ember_model is immutable and shared across threads by design.
    unsafe impl Send for Handle {}
    // SAFETY: as above.
    unsafe impl Sync for Handle {}
    static MODEL: OnceLock<Handle> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama\0");
            let mut model = std::ptr::null_mut();
            // SAFETY: a NUL-terminated path and a valid output pointer.
            let status =
                unsafe { ember_model_load(path.as_ptr().cast(), std::ptr::null(), &mut model) };
            assert_eq!(status, ember_status::EMBER_OK, "the fuzz fixture must load");
            Handle(model)
        })
        .0
}

/// A text callback that continues or stops as the byte at `user` says, and counts calls.
unsafe extern "C" fn on_text(piece: *const c_char, len: usize, user: *mut c_void) -> bool {
    // SAFETY: the library passes `len` readable bytes and a NUL after them; `user` is the
    // `u32` counter this module passes.
    unsafe {
        assert_eq!(*piece.add(len), 0, "pieces are NUL-terminated");
        let calls = &mut *user.cast::<u32>();
        *calls += 1;
        *calls % 3 != 0
    }
}

/// A sequence of C API calls with arguments from the input, on the tiny fixture model:
/// NULL handles and outputs, out-of-range tokens, small buffers, and rewind/step/cancel/
/// generate interleavings. Checks the API's promises along the way (failed steps leave the
/// position unchanged, outputs are untouched on failure).
pub fn c_api(data: &[u8]) {
    let model = fixture_model();
    // The C boundary turns panics into EMBER_ERR_INTERNAL; each one is still a bug.
    let panics = crate::error::CAUGHT_PANICS.load(std::sync::atomic::Ordering::Relaxed);
    let mut c = Cursor { data };
    let mut session: *mut ember_session = std::ptr::null_mut();
    let mut sampler: *mut ember_sampler = std::ptr::null_mut();
    let mut detok: *mut ember_detokenizer = std::ptr::null_mut();
    // SAFETY: (the whole body) every pointer passed is NULL, a live handle made here, or a
    // local buffer whose stated capacity is its length.
    unsafe {
        assert_eq!(
            ember_session_new(model, std::ptr::null(), &mut session),
            ember_status::EMBER_OK
        );
        assert_eq!(
            ember_sampler_new(std::ptr::null(), &mut sampler),
            ember_status::EMBER_OK
        );
        assert_eq!(
            ember_detokenizer_new(model, &mut detok),
            ember_status::EMBER_OK
        );
        let mut logits = vec![0.0f32; 320 * 9];
        let mut ids = [0i32; 64];
        let mut text = [0 as c_char; 256];
        let mut n = 0usize;
        for _ in 0..48 {
            let Some(op) = c.byte() else { break };
            let before = ember_session_position(session);
            match op % 22 {
                0 => {
                    let t = c.text();
                    let cap = c.small(64);
                    let (add, parse) = (c.flag(), c.flag());
                    let _ = ember_tokenize(
                        model,
                        t.as_ptr().cast(),
                        t.len(),
                        add,
                        parse,
                        ids.as_mut_ptr(),
                        cap,
                        &mut n,
                    );
                }
                1 => {
                    let tokens = c.tokens(8);
                    let out = if c.flag() {
                        logits.as_mut_ptr()
                    } else {
                        std::ptr::null_mut()
                    };
                    let status = ember_step(session, tokens.as_ptr(), tokens.len(), out);
                    let after = ember_session_position(session);
                    if status == ember_status::EMBER_OK {
                        assert!(after >= before + tokens.len(), "a step appended nothing");
                    } else {
                        assert_eq!(after, before, "a failed step moved the session");
                    }
                }
                2 => {
                    let tokens = c.tokens(8);
                    let cap = c.small(9) * 320;
                    let status = ember_step_all(
                        session,
                        tokens.as_ptr(),
                        tokens.len(),
                        logits.as_mut_ptr(),
                        cap,
                    );
                    if status != ember_status::EMBER_OK {
                        assert_eq!(ember_session_position(session), before);
                    }
                }
                3 => {
                    let to = c.small(140);
                    let status = ember_session_rewind(session, to);
                    assert_eq!(status == ember_status::EMBER_OK, to <= before);
                }
                4 => assert_eq!(ember_session_reset(session), ember_status::EMBER_OK),
                5 => {
                    let _ = ember_session_cancel(session);
                }
                6 | 7 => {
                    let mut params = std::mem::zeroed::<ember_generate_params>();
                    ember_generate_params_default(
                        std::mem::size_of::<ember_generate_params>(),
                        &mut params,
                    );
                    params.max_tokens = c.small(5) as u32;
                    params.ignore_end_tokens = c.flag() as u32;
                    params.parse_special = c.flag() as u32;
                    params.add_special = c.flag() as u32;
                    let stop = c.text();
                    let mut stop_c = stop
                        .iter()
                        .map(|&b| if b == 0 { b'x' } else { b })
                        .collect::<Vec<u8>>();
                    stop_c.push(0);
                    let stops = [stop_c.as_ptr().cast::<c_char>()];
                    if c.flag() {
                        params.stop_strings = stops.as_ptr();
                        params.n_stop_strings = 1;
                    }
                    let mut calls = 0u32;
                    let mut reason = ember_stop_reason::EMBER_STOP_REASON_END_TOKEN;
                    let mut n_tokens = usize::MAX;
                    let status = if op % 21 == 6 {
                        let prompt = c.text();
                        ember_generate(
                            session,
                            sampler,
                            prompt.as_ptr().cast(),
                            prompt.len(),
                            &params,
                            Some(on_text),
                            (&mut calls as *mut u32).cast(),
                            &mut reason,
                            &mut n_tokens,
                        )
                    } else {
                        let mut role = c.text();
                        role.retain(|&b| b != 0);
                        role.push(0);
                        let mut content = c.text();
                        content.retain(|&b| b != 0);
                        content.push(0);
                        let msg = ember_chat_message {
                            role: role.as_ptr().cast(),
                            content: content.as_ptr().cast(),
                        };
                        ember_chat(
                            session,
                            sampler,
                            &msg,
                            1,
                            &params,
                            Some(on_text),
                            (&mut calls as *mut u32).cast(),
                            &mut reason,
                            &mut n_tokens,
                        )
                    };
                    if status == ember_status::EMBER_OK {
                        assert!(n_tokens != usize::MAX, "no token count on success");
                    } else if status != ember_status::EMBER_ERR_CANCELLED {
                        assert_eq!(n_tokens, usize::MAX, "outputs written on failure");
                    }
                }
                8 => {
                    let cap = c.small(64);
                    let _ = ember_session_tokens(session, ids.as_mut_ptr(), cap, &mut n);
                }
                9 => {
                    let cap = c.small(32);
                    let _ =
                        ember_detokenizer_push(detok, c.token(), text.as_mut_ptr(), cap, &mut n);
                }
                10 => {
                    let cap = c.small(32);
                    let _ = ember_detokenizer_flush(detok, text.as_mut_ptr(), cap, &mut n);
                    let _ = ember_detokenizer_reset(detok);
                }
                11 => {
                    let count = c.small(320);
                    for v in logits.iter_mut().take(count) {
                        *v = match c.byte() {
                            Some(255) => f32::NAN,
                            Some(254) => f32::NEG_INFINITY,
                            b => b.unwrap_or(0) as f32 / 16.0,
                        };
                    }
                    let mut token = 0;
                    let _ = ember_sample(sampler, logits.as_ptr(), count, &mut token);
                    let _ = ember_sampler_accept(sampler, c.token());
                }
                12 => {
                    // NULL handles and outputs.
                    let _ = ember_step(std::ptr::null_mut(), ids.as_ptr(), 1, std::ptr::null_mut());
                    let _ = ember_tokenize(
                        model,
                        std::ptr::null(),
                        3,
                        false,
                        false,
                        ids.as_mut_ptr(),
                        64,
                        &mut n,
                    );
                    let _ = ember_tokenize(
                        std::ptr::null(),
                        b"hi".as_ptr().cast(),
                        2,
                        false,
                        false,
                        ids.as_mut_ptr(),
                        64,
                        std::ptr::null_mut(),
                    );
                    let _ = ember_session_tokens(
                        session,
                        std::ptr::null_mut(),
                        0,
                        std::ptr::null_mut(),
                    );
                    let _ = ember_generate(
                        session,
                        std::ptr::null_mut(),
                        b"x".as_ptr().cast(),
                        1,
                        std::ptr::null(),
                        None,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    );
                    let _ =
                        ember_detokenize(model, ids.as_ptr(), 0, std::ptr::null_mut(), 0, &mut n);
                    assert_eq!(ember_session_position(std::ptr::null()), 0);
                }
                13 => {
                    let cap = c.small(256);
                    let mut content = c.text();
                    content.retain(|&b| b != 0);
                    content.push(0);
                    let msg = ember_chat_message {
                        role: c"user".as_ptr(),
                        content: content.as_ptr().cast(),
                    };
                    let _ =
                        ember_chat_apply(model, &msg, 1, c.flag(), text.as_mut_ptr(), cap, &mut n);
                }
                14 => {
                    let tokens = c.tokens(16);
                    let cap = c.small(256);
                    let _ = ember_detokenize(
                        model,
                        tokens.as_ptr(),
                        tokens.len(),
                        text.as_mut_ptr(),
                        cap,
                        &mut n,
                    );
                }
                15 => {
                    let mut params = std::mem::zeroed::<ember_session_params>();
                    ember_session_params_default(
                        std::mem::size_of::<ember_session_params>(),
                        &mut params,
                    );
                    params.n_ctx = c.small(200) as u32;
                    params.n_threads = c.small(4) as u32;
                    params.n_ubatch = c.small(70) as u32;
                    params.kv_type = c.small(3) as u32; // f32, f16 or invalid
                    let mut fresh = std::ptr::null_mut();
                    if ember_session_new(model, &params, &mut fresh) == ember_status::EMBER_OK {
                        ember_session_free(session);
                        session = fresh;
                    } else {
                        assert!(fresh.is_null(), "output written on failure");
                    }
                }
                16 => {
                    assert!(ember_session_position(session) <= ember_session_n_ctx(session));
                }
                18 => {
                    // Save into a buffer of some capacity, damage it maybe, load it back.
                    let mut size = 0usize;
                    assert_eq!(
                        ember_session_state_size(session, &mut size),
                        ember_status::EMBER_OK
                    );
                    let cap = if c.flag() { size } else { c.small(size + 1) };
                    let mut state = vec![0u8; cap];
                    let mut written = 0usize;
                    let saved =
                        ember_session_state_save(session, state.as_mut_ptr(), cap, &mut written);
                    if saved == ember_status::EMBER_OK {
                        let len = if c.flag() { written } else { c.small(written) };
                        if let (Some(at), true) = (c.byte(), len > 0) {
                            state[at as usize % len] ^= c.byte().unwrap_or(1);
                        }
                        let status = ember_session_state_load(session, state.as_ptr(), len);
                        if status != ember_status::EMBER_OK {
                            assert_eq!(ember_session_position(session), before);
                        }
                    } else {
                        assert_eq!(saved, ember_status::EMBER_ERR_BUFFER_TOO_SMALL);
                        assert_eq!(written, size);
                    }
                }
                20 => {
                    // A background generation: polled, maybe cancelled, finished.
                    let tokens = c.tokens(6);
                    let mut prompt = std::mem::zeroed::<ember_generation_prompt>();
                    prompt.struct_size = std::mem::size_of::<ember_generation_prompt>() as u32;
                    prompt.tokens = tokens.as_ptr();
                    prompt.n_tokens = tokens.len();
                    let mut params = std::mem::zeroed::<ember_generate_params>();
                    ember_generate_params_default(
                        std::mem::size_of::<ember_generate_params>(),
                        &mut params,
                    );
                    params.max_tokens = c.small(8) as u32;
                    params.max_ahead = c.small(2) as u32;
                    params.logprobs = c.flag() as u32;
                    params.top_logprobs = c.small(3) as u32 * 11; // 0, 11 or 22 (invalid)
                    let mut g = std::ptr::null_mut();
                    if ember_generation_start(session, sampler, &prompt, &params, &mut g)
                        == ember_status::EMBER_OK
                    {
                        for _ in 0..c.small(4) {
                            let mut state = ember_generation_state::EMBER_GENERATION_RUNNING;
                            let cap = c.small(8);
                            let _ = ember_generation_poll(
                                g,
                                text.as_mut_ptr(),
                                cap,
                                &mut n,
                                &mut state,
                            );
                            assert!(n < cap.max(1));
                            let (cap, top_cap) = (c.small(4), c.small(50));
                            let mut infos = vec![
                                ember_token_info {
                                    token: 0,
                                    logprob: 0.0
                                };
                                cap.max(1)
                            ];
                            let mut top = infos.repeat(top_cap.max(1));
                            let mut got = usize::MAX;
                            let status = ember_generation_poll_tokens_top(
                                g,
                                infos.as_mut_ptr(),
                                cap,
                                top.as_mut_ptr(),
                                top_cap,
                                &mut got,
                            );
                            if status == ember_status::EMBER_OK {
                                assert!(got <= cap, "more tokens than room");
                                let k = params.top_logprobs as usize;
                                assert!(
                                    k == 0 || got * k <= top_cap,
                                    "more alternatives than room"
                                );
                            }
                        }
                        if c.flag() {
                            ember_generation_cancel(g);
                        }
                        let mut reason = ember_stop_reason::EMBER_STOP_REASON_END_TOKEN;
                        let mut count = 0usize;
                        let status = ember_generation_finish(g, &mut reason, &mut count);
                        if status == ember_status::EMBER_OK {
                            assert!(ember_session_position(session) >= before + count);
                        }
                    } else {
                        assert_eq!(ember_session_position(session), before);
                    }
                }
                19 => {
                    // Fork, continue the fork, copy part of it back.
                    let mut fork = std::ptr::null_mut();
                    if ember_session_fork(session, std::ptr::null(), &mut fork)
                        == ember_status::EMBER_OK
                    {
                        assert_eq!(ember_session_position(fork), before);
                        let tokens = c.tokens(4);
                        let _ =
                            ember_step(fork, tokens.as_ptr(), tokens.len(), logits.as_mut_ptr());
                        let n = c.small(ember_session_position(fork) + 2);
                        let status = ember_session_copy_prefix(session, fork, n);
                        if status != ember_status::EMBER_OK {
                            assert_eq!(ember_session_position(session), before);
                        }
                        let _ = ember_session_logits(session, logits.as_mut_ptr(), 320);
                        ember_session_free(fork);
                    }
                }
                21 => {
                    // An embedding: any pooling value, any capacity.
                    let tokens = c.tokens(6);
                    let pooling = c.small(3) as i32;
                    let normalize = c.flag();
                    let cap = c.small(ember_model_n_embd(model) + 2);
                    let mut n_out = usize::MAX;
                    let status = ember_session_embed(
                        session,
                        tokens.as_ptr(),
                        tokens.len(),
                        pooling,
                        normalize,
                        logits.as_mut_ptr(),
                        cap,
                        &mut n_out,
                    );
                    let after = ember_session_position(session);
                    if status == ember_status::EMBER_OK {
                        assert!(
                            after >= before + tokens.len(),
                            "an embedding appended nothing"
                        );
                        assert_eq!(n_out, ember_model_n_embd(model));
                        assert!(logits[..n_out].iter().all(|v| v.is_finite()));
                    } else {
                        assert_eq!(after, before, "a failed embedding moved the session");
                    }
                }
                _ => {
                    let mut params = std::mem::zeroed::<ember_sampler_params>();
                    ember_sampler_params_default(
                        std::mem::size_of::<ember_sampler_params>(),
                        &mut params,
                    );
                    params.temperature = match c.byte() {
                        Some(255) => f32::NAN,
                        b => b.unwrap_or(0) as f32 / 64.0,
                    };
                    params.top_k = c.small(400) as u32;
                    params.top_p = c.small(10) as f32 / 10.0;
                    params.min_p = c.small(10) as f32 / 10.0;
                    params.repetition_penalty = 1.0 + c.small(4) as f32 / 4.0;
                    params.seed = c.byte().unwrap_or(0) as u64;
                    let bias = [ember_logit_bias {
                        token: c.small(330) as i32 - 2,
                        bias: c.small(4) as f32 - 2.0,
                    }];
                    if c.flag() {
                        params.logit_bias = bias.as_ptr();
                        params.n_logit_bias = 1;
                    }
                    let mut fresh = std::ptr::null_mut();
                    if ember_sampler_new(&params, &mut fresh) == ember_status::EMBER_OK {
                        ember_sampler_free(sampler);
                        sampler = fresh;
                    }
                }
            }
        }
        ember_detokenizer_free(detok);
        ember_sampler_free(sampler);
        ember_session_free(session);
    }
    assert_eq!(
        crate::error::CAUGHT_PANICS.load(std::sync::atomic::Ordering::Relaxed),
        panics,
        "a call panicked inside the library"
    );
}

/// A constraint over the tiny Llama fixture's vocabulary, then tokens sampled under it. The
/// first byte picks the kind (JSON schema, regex, Lark grammar, GBNF), the first part of the rest
/// is the constraint's text and the second drives sampling (one draw per byte, from logits
/// made of it). A constraint is made or refused with an error; sampling under it gives
/// allowed tokens until it finishes, without panics or hangs.
pub fn constraint(data: &[u8]) {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama");
        Arc::new(Model::load(path).expect("the fuzz fixture must load"))
    });
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let kind = [
        ConstraintKind::JsonSchema,
        ConstraintKind::Regex,
        ConstraintKind::Lark,
        ConstraintKind::Gbnf,
    ][kind as usize % 4];
    let [text, drive] = parts(rest, 2)[..] else {
        return;
    };
    let constraint = match model.constraint(kind, &String::from_utf8_lossy(text)) {
        Ok(c) => c,
        Err(e) => {
            assert!(
                matches!(e, crate::Error::InvalidArgument(_)),
                "a bad constraint is an invalid argument: {e}"
            );
            return;
        }
    };
    let mut sampler = Sampler::new(SamplerOptions {
        temperature: 1.0,
        ..Default::default()
    })
    .expect("a sampler");
    sampler.set_constraint(Some(constraint));
    let n_vocab = model.n_vocab();
    let mut logits = vec![0.0f32; n_vocab];
    for (i, &b) in drive.iter().take(48).enumerate() {
        for (t, l) in logits.iter_mut().enumerate() {
            let h = (t as u32).wrapping_mul(2_654_435_761) ^ (b as u32) << 8 ^ i as u32;
            *l = (h % 1000) as f32 / 100.0;
        }
        match sampler.sample(&logits) {
            Ok(token) => assert!((token as usize) < n_vocab),
            Err(_) => return,
        }
        if sampler.constraint_state().ok().flatten() == Some(ConstraintState::Finished) {
            return;
        }
    }
}
