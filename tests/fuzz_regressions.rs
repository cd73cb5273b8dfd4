//! Replays, through the fuzz targets' bodies (`ember::fuzzing`), every input a fuzzing
//! campaign found (`fuzz/regressions/<target>/`, copied there by `scripts/fuzz`), and a
//! seed input of each target; none may panic. The campaigns themselves run in
//! `scripts/fuzz` (a smoke run of every target in `scripts/test`).

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 9] = [
    ("gguf", ember::fuzzing::gguf),
    ("gguf_tokenizer", ember::fuzzing::gguf_tokenizer),
    ("safetensors", ember::fuzzing::safetensors),
    ("tokenizer", ember::fuzzing::tokenizer),
    ("chat_template", ember::fuzzing::chat_template),
    ("c_api", ember::fuzzing::c_api),
    ("session_state", ember::fuzzing::session_state),
    ("constraint", ember::fuzzing::constraint),
    ("conversation", ember::fuzzing::conversation),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_input_a_campaign_found_is_handled() {
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let dir = root().join("fuzz/regressions").join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{} panics", path.display());
            replayed += 1;
        }
    }
    println!("{replayed} regression inputs replayed");
}

#[test]
fn every_target_handles_its_seeds() {
    let fixtures = root().join("tests/fixtures");
    let read = |p: &str| std::fs::read(fixtures.join(p)).unwrap();
    let seeds: [(&str, Vec<u8>); 9] = [
        ("gguf", read("gguf/llama.Q4_0.gguf")),
        ("gguf_tokenizer", read("gguf/gpt2.F32.gguf")),
        (
            "safetensors",
            ember::fuzzing::join(&[&read("llama/config.json"), &read("llama/model.safetensors")]),
        ),
        (
            "tokenizer",
            ember::fuzzing::join(&[
                &read("llama/tokenizer.json"),
                &read("llama/tokenizer_config.json"),
            ]),
        ),
        (
            "chat_template",
            ember::fuzzing::join(&[
                b"{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
                b"user: hi\nassistant: hello",
            ]),
        ),
        ("c_api", (0..=255u8).step_by(3).collect()),
        ("session_state", session_state_seed()),
        (
            "constraint",
            [
                &[1u8][..],
                &ember::fuzzing::join(&[b"[a-z]{2,5}-[0-9]+", &[7; 30]]),
            ]
            .concat(),
        ),
        (
            "conversation",
            ember::fuzzing::join(&[
                br#"{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                    "tools": [{"type": "function", "function": {"name": "go"}}],
                    "chat_template": "{{ messages[0].content }}{% if tools %}<tool_call>{% endif %}"}"#,
                b"<tool_call>\n{\"name\": \"go\", \"arguments\": {}}\n</tool_call>",
            ]),
        ),
    ];
    for ((name, target), (seed_name, seed)) in TARGETS.iter().zip(seeds) {
        assert_eq!(*name, seed_name);
        target(&seed);
        target(&seed[..seed.len() / 2]);
        target(&[]);
    }
}

/// A valid state of the llama fixture (2 layers, kv width 32, 320 tokens) holding 3 tokens,
/// 2 of them computed (all-zero rows), with a zero fingerprint and checksum for the target's
/// first byte (3) to fix: what `scripts/fuzz` writes as the seed.
fn session_state_seed() -> Vec<u8> {
    let mut s = vec![3u8];
    s.extend(b"EMBERSES");
    for v in [1u32, 0] {
        s.extend(v.to_le_bytes());
    }
    s.extend(0u64.to_le_bytes()); // fingerprint
    s.extend(0u64.to_le_bytes()); // rotations
    for v in [2u32, 32, 320] {
        s.extend(v.to_le_bytes());
    }
    s.extend(3u64.to_le_bytes());
    s.extend(2u64.to_le_bytes());
    s.extend(0u32.to_le_bytes());
    for t in [1u32, 5, 9] {
        s.extend(t.to_le_bytes());
    }
    s.extend(vec![0u8; 2 * 2 * 2 * 32 * 4]);
    s.extend(0u64.to_le_bytes());
    s
}

#[test]
fn the_session_state_seed_loads_once_fixed_up() {
    let model =
        std::sync::Arc::new(ember::Model::load(root().join("tests/fixtures/llama")).unwrap());
    let mut s = ember::Session::new(model.clone(), &Default::default()).unwrap();
    let seed = session_state_seed();
    assert!(
        s.load_state(&seed[1..]).is_err(),
        "fingerprint and checksum are zero"
    );
    let fixed = ember::fuzzing::fixed_session_state(&model, &seed).unwrap();
    s.load_state(&fixed).unwrap();
    assert_eq!((s.tokens(), s.n_pending()), (&[1u32, 5, 9][..], 1));
    let script = std::fs::read_to_string(root().join("scripts/fuzz")).unwrap();
    assert!(
        script.contains(
            r#"struct.pack("<8sIIQQIIIQQI", b"EMBERSES", 1, 0, 0, 0, 2, 32, 320, 3, 2, 0)"#
        ),
        "scripts/fuzz seeds the target with this state"
    );
}

#[test]
fn the_fuzz_script_joins_parts_as_the_targets_split_them() {
    let script = std::fs::read_to_string(root().join("scripts/fuzz")).unwrap();
    let literal = String::from_utf8_lossy(ember::fuzzing::SEPARATOR)
        .replace('\n', "\\n")
        .replace('\0', "\\0");
    assert!(
        script.contains(&format!("SEP = b\"{literal}\"")),
        "scripts/fuzz: {literal}"
    );
}
