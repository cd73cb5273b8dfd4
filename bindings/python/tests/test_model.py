"""Model: loading, properties, tokenizer, chat template, errors, closing."""

import shutil

import pytest

import ember
from conftest import GPT2, LLAMA


def test_library_functions():
    assert ember.version() and ember.version()[0].isdigit()
    assert ember.abi_version() == ember.ABI_VERSION
    assert ember.status_name(ember.Status.CONTEXT_FULL) == "EMBER_ERR_CONTEXT_FULL"
    assert ember.status_name(12345) == "EMBER_UNKNOWN_STATUS"
    assert ember.LIBRARY_PATH


def test_properties(llama, gpt2):
    assert llama.n_vocab == 320 and llama.n_ctx_train == 128
    assert (llama.bos_token, llama.eos_token, llama.eot_token) == (1, 2, 2)
    assert llama.is_end_token(2) and not llama.is_end_token(5)
    assert llama.architecture == "llama" and gpt2.architecture == "gpt2"
    assert llama.has_chat_template
    assert llama.threads == 1 and llama.path == str(LLAMA)
    assert "llama" in repr(llama)


def test_context_manager_and_close():
    with ember.Model(GPT2) as model:
        assert not model.closed
        assert model.n_vocab == 320
    assert model.closed and "closed" in repr(model)
    with pytest.raises(ember.InvalidArgumentError, match="closed"):
        model.tokenize("hi")
    with pytest.raises(ember.InvalidArgumentError):
        _ = model.n_vocab
    model.close()  # twice is fine


def test_sessions_outlive_their_model():
    model = ember.Model(LLAMA)
    session = model.session(n_ctx=16)
    detokenizer = model.detokenizer()
    [a] = model.tokenize("A", add_special=False)
    model.close()
    assert session.step([1, 2, 3]).shape == (320,)
    assert detokenizer.push(a) == "A"
    session.close()


def test_tokenize_round_trip(llama):
    text = "Hello wörld, héllo ✓ 😀 日本"
    ids = llama.tokenize(text, add_special=False)
    assert all(isinstance(i, int) for i in ids) and 0 < len(ids) < 40
    assert llama.detokenize(ids) == text
    assert llama.tokenize(text.encode()) == llama.tokenize(text)  # bytes in UTF-8 too
    assert llama.tokenize("") == []
    # Longer than any first guess of a buffer.
    long_text = " ".join(f"café number {i}." for i in range(300))
    assert llama.detokenize(llama.tokenize(long_text)) == long_text


def test_special_tokens_only_when_asked(llama):
    assert llama.tokenize("<|im_start|>", add_special=False, parse_special=True) == [1]
    plain = llama.tokenize("<|im_start|>", add_special=False)
    assert len(plain) > 1 and 1 not in plain


def test_tokens_are_the_same_on_both_fixtures(llama, gpt2):
    # The fixtures share their byte-level tokenizer.
    assert llama.tokenize("Once upon a time") == gpt2.tokenize("Once upon a time")


def test_bad_tokens(llama):
    for ids in ([5, 320], [-1], [2 ** 31], [2 ** 40]):
        with pytest.raises(ember.InvalidArgumentError) as info:
            llama.detokenize(ids)
        assert info.value.status == ember.Status.INVALID_ARGUMENT
    with pytest.raises(ember.InvalidArgumentError):
        llama.is_end_token(2 ** 33)


def test_invalid_utf8_is_refused_by_the_library(llama):
    with pytest.raises(ember.InvalidArgumentError, match="UTF-8"):
        llama.tokenize(b"a\xc3")
    with pytest.raises(ember.InvalidArgumentError, match="UTF-8"):
        llama.tokenize("lone \ud800 surrogate")


def test_chat_template(llama):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert llama.apply_chat_template(messages) == expected
    assert llama.apply_chat_template([("system", "Be brief."), ("user", "Hi!")]) == expected
    assert llama.apply_chat_template(messages[1:], add_generation_prompt=False) == \
        "<|im_start|>user\nHi!<|im_end|>\n"
    # Conversations go to the library as JSON, where a NUL in a message is just a character.
    assert "user\na\0b<|im_end|>" in llama.apply_chat_template([("user", "a\0b")])
    with pytest.raises(ember.InvalidArgumentError, match="not JSON"):
        llama.apply_chat_template([{"role": "user", "content": object()}])
    assert llama.apply_chat_template([(b"user", b"Hi!")]) == llama.apply_chat_template(
        [("user", "Hi!")])
    with pytest.raises(ember.InvalidArgumentError, match="UTF-8"):
        llama.apply_chat_template([("user", b"\xff")])
    with pytest.raises(ember.InvalidArgumentError):
        llama.apply_chat_template([("user", "\ud800")])


def test_bad_path_is_an_io_error():
    with pytest.raises(ember.IoError) as info:
        ember.Model("/nonexistent/model")
    error = info.value
    assert isinstance(error, ember.EmberError)
    assert error.status == ember.Status.IO and "/nonexistent/model" in error.message
    assert "[IO]" in str(error)
    with pytest.raises(ember.InvalidArgumentError):
        ember.Model(str(LLAMA) + "\0x")


def test_corrupt_model_is_a_format_error(tmp_path):
    shutil.copy(LLAMA / "config.json", tmp_path)
    weights = (LLAMA / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ember.BadFormatError) as info:
        ember.Model(tmp_path)
    assert info.value.status == ember.Status.BAD_FORMAT and info.value.message


def test_probe_describes_a_file_without_loading_it(tmp_path):
    info = ember.probe(LLAMA)
    assert info.supported and info.reason == "" and info.architecture == "LlamaForCausalLM"
    assert (info.n_layers, info.n_vocab, info.n_ctx_train) == (2, 320, 128)
    assert info.has_tokenizer and info.has_chat_template and info.tensor_types["F32"] > 0
    assert info.n_params > 0 and info.bytes_per_token > 0 and "supported" in repr(info)
    shutil.copy(LLAMA / "model.safetensors", tmp_path)
    config = (LLAMA / "config.json").read_text().replace("LlamaForCausalLM", "MambaForCausalLM")
    (tmp_path / "config.json").write_text(config.replace('"llama"', '"mamba"'))
    info = ember.probe(tmp_path)
    assert not info.supported and info.architecture == "MambaForCausalLM"
    assert "Mamba" in info.reason and info.n_params > 0
    with pytest.raises(ember.IoError):
        ember.probe("/nonexistent/model")


def test_model_without_tokenizer():
    with ember.Model(LLAMA, load_tokenizer=False) as model:
        assert model.n_vocab == 320
        with pytest.raises(ember.UnsupportedError):
            model.tokenize("hi")
        with pytest.raises(ember.UnsupportedError):
            model.detokenizer()


def test_error_classes():
    error = ember.errors.error_for(5, "full")
    assert type(error) is ember.ContextFullError and error.status == ember.Status.CONTEXT_FULL
    unknown = ember.errors.error_for(99, "odd")
    assert type(unknown) is ember.EmberError and unknown.status == 99
    assert issubclass(ember.InvalidArgumentError, ValueError)
    assert issubclass(ember.OutOfMemoryError, MemoryError)


def test_log_callback():
    messages = []
    ember.set_log_callback(lambda level, message: messages.append((level, message)))
    try:
        ember.Model(GPT2).close()
    finally:
        ember.set_log_callback(None)
    assert messages and all(isinstance(level, ember.LogLevel) and text for level, text in messages)
    count = len(messages)
    ember.Model(GPT2).close()
    assert len(messages) == count  # removed


def test_log_callback_exceptions_are_contained():
    def broken(level, message):
        raise RuntimeError("in a log callback")

    ember.set_log_callback(broken)
    try:
        ember.Model(GPT2).close()  # neither raises nor crashes
    finally:
        ember.set_log_callback(None)
