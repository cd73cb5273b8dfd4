"""docs/embedding.md: its C# P/Invoke declarations and examples, compiled with Mono's C#
compiler and run against the library, give what the Python binding gives. Skipped where
Mono is not installed (`apt-get install mono-mcs mono-runtime`)."""

import os
import sys
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import ember
from conftest import LLAMA, ROOT

DOC = (ROOT / "docs" / "embedding.md").read_text()

HARNESS = """
namespace AOT {
    public class MonoPInvokeCallbackAttribute : Attribute {
        public MonoPInvokeCallbackAttribute(Type t) {}
    }
}

public static class Program
{
%(callback)s
    public static int Main(string[] args)
    {
        string modelPath = args[0];
%(usage)s
        Console.WriteLine("reason=" + reason);
        Console.WriteLine("n=" + n);
        Console.WriteLine("text=" + string.Concat(Pieces.ToArray()));
        byte[] hello = Encoding.UTF8.GetBytes("Hello");
        var ids = new int[64];
        Ember.Check(Ember.ember_tokenize(model, hello, (UIntPtr)hello.Length, false, false, ids,
                                         (UIntPtr)ids.Length, out UIntPtr count));
        var logits = new float[(int)Ember.ember_model_n_vocab(model)];
        Ember.Check(Ember.ember_session_reset(session));
        Ember.Check(Ember.ember_step(session, ids, count, logits));
        var tokens = new string[(int)count];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = ids[i].ToString();
        Console.WriteLine("tokens=" + string.Join(",", tokens));
        Console.WriteLine("ends=" + Ember.ember_model_token_is_end(model, 2) + "," +
                          Ember.ember_model_token_is_end(model, 5));
        var status = Ember.ember_step(session, new int[] { 320 }, (UIntPtr)1, logits);
        Console.WriteLine("bad=" + status + ": " + Ember.LastError());
        // The polled reply, greedy, frame after frame; then saved and loaded back.
        var greedyParams = new Ember.SamplerParams();
        Ember.ember_sampler_params_default((UIntPtr)Marshal.SizeOf<Ember.SamplerParams>(), ref greedyParams);
        Ember.Check(Ember.ember_sampler_new(ref greedyParams, out IntPtr greedy));
        Ember.Check(Ember.ember_session_reset(session));
        var npc = new NpcReply();
        npc.Ask(session, greedy, "The innkeeper says:", 64);
        int frames = 0;
        while (npc.Busy) { npc.Update(); frames++; System.Threading.Thread.Sleep(1); }
        Console.WriteLine("polled=" + npc.Reply);
        Console.WriteLine("polled_reason=" + npc.StopReason);
        byte[] saved = NpcReply.Save(session);
        Ember.Check(Ember.ember_session_fork(session, IntPtr.Zero, out IntPtr fork));
        Ember.Check(Ember.ember_session_reset(session));
        NpcReply.Load(session, saved);
        Console.WriteLine("state=" + (NpcReply.Save(session).Length == saved.Length) + "," +
                          (NpcReply.Save(fork).Length == saved.Length));
        npc.Ask(session, greedy, " And", 8);
        npc.OnDisable();
        Console.WriteLine("stopped=" + npc.Busy);
        Ember.ember_session_free(fork);
        Ember.ember_sampler_free(greedy);
        Ember.ember_sampler_free(sampler);
        Ember.ember_session_free(session);
        Ember.ember_model_free(model);
        return 0;
    }
}
"""


@pytest.mark.skipif(not (shutil.which("mcs") and shutil.which("mono")),
                    reason="no Mono (mcs, mono)")
def test_csharp_declarations_work(tmp_path):
    declarations, usage, callback, polling = re.findall(r"```csharp\n(.*?)```", DOC, re.S)
    source = declarations + polling + HARNESS % {"callback": callback, "usage": usage}
    (tmp_path / "doc.cs").write_text(source)
    subprocess.run(["mcs", "-nologo", f"-out:{tmp_path / 'doc.exe'}", str(tmp_path / "doc.cs")],
                   check=True, capture_output=True)
    library = Path(ember.LIBRARY_PATH).resolve()
    env = dict(os.environ, LD_LIBRARY_PATH=str(library.parent))
    if library.name != "libember.so":
        pytest.skip("the doc's DllImport name resolves to libember.so here")
    result = subprocess.run(["mono", str(tmp_path / "doc.exe"), str(LLAMA)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = dict(line.split("=", 1) for line in result.stdout.splitlines())
    # The doc's options: n_threads 2, temperature 0.7, top_p 0.9, max_tokens 64. The same
    # text from the Python binding means every struct field reached the library as meant.
    with ember.Model(LLAMA) as model:
        stream = model.generate("The innkeeper says:", max_tokens=64, threads=2,
                                sampler=ember.Sampler(temperature=0.7, top_p=0.9))
        text = stream.read()
        assert out["text"] == text
        names = {0: "EndToken", 1: "MaxTokens", 4: "ContextFull"}
        assert out["reason"] == names[stream.stop_reason]
        assert int(out["n"]) == stream.n_tokens
        assert out["tokens"] == ",".join(map(str, model.tokenize("Hello", add_special=False)))
    assert out["ends"] == "True,False"
    assert out["bad"].startswith("InvalidArgument: ") and "320" in out["bad"]
    with ember.Model(LLAMA) as model:
        greedy = model.generate("The innkeeper says:", max_tokens=64, threads=2)
        assert out["polled"] == greedy.read()
        names = {0: "EndToken", 1: "MaxTokens", 4: "ContextFull"}
        assert out["polled_reason"] == names[greedy.stop_reason]
    assert out["state"] == "True,True"
    assert out["stopped"] == "False"



# ---- every code block of README.md and docs/ is compiled, and run where it can be ----

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"sh", "c", "cpp", "python", "rust", "csharp"}
MODEL_PATH = re.compile(r'"(models/[^"]+)"')


def code_blocks(language=None):
    """``(file, line, language, code)`` of every fenced block of the docs."""
    blocks = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```") and lines[i] != "```":
                lang = lines[i][3:].split(",")[0].strip()
                start = i + 1
                i += 1
                while lines[i] != "```":
                    i += 1
                if language is None or lang == language:
                    blocks.append((path.name, start, lang, "\n".join(lines[start:i]) + "\n"))
            i += 1
    return blocks


def runnable(code):
    """Whether the models a block names exist here (CI fetches the default model)."""
    models = MODEL_PATH.findall(code)
    present = all((ROOT / m).exists() for m in models)
    if not present and os.environ.get("EMBER_REQUIRE_MODEL") == "1":
        pytest.fail(f"the model a doc block needs is missing: {models}")
    return present


def library_flags():
    library = Path(ember.LIBRARY_PATH).resolve()
    return [f"-I{ROOT / 'include'}", f"-I{ROOT / 'bindings' / 'cpp'}", f"-L{library.parent}",
            "-lember", f"-Wl,-rpath,{library.parent}", "-pthread"]


def test_every_code_block_is_of_a_tested_language():
    blocks = code_blocks()
    assert len(blocks) >= 10
    for name, line, lang, _ in blocks:
        assert lang in LANGUAGES, f"{name}:{line}: a ```{lang} block no test compiles"


def test_sh_blocks_name_commands_and_scripts_that_exist():
    commands = {"bash", "cargo", "pip", "python3", "g++", "cc", "target/release/ember", "ember"}
    for name, line, _, code in code_blocks("sh"):
        for text in code.splitlines():
            words = text.split("#")[0].split()
            if not words or text[0].isspace():  # empty, or the continuation of a usage line
                continue
            word = words[0]
            assert word in commands or (ROOT / word).exists() or word.startswith("./") \
                or "=" in word, f"{name}:{line}: unknown command {word!r} in {text!r}"
            for w in words:
                if w.startswith(("scripts/", "examples/", "bindings/")):
                    assert (ROOT / w.rstrip(")")).exists(), f"{name}:{line}: {w} does not exist"


C_PRELUDE = """#include <stdio.h>
static bool print_piece(const char *text, size_t len, void *user) {
  (void)user;
  fwrite(text, 1, len, stdout);
  return true;
}
"""


def test_c_blocks_compile_and_run(tmp_path):
    blocks = code_blocks("c")
    assert blocks
    for name, line, _, code in blocks:
        includes = [x for x in code.splitlines() if x.startswith("#include")]
        body = [x for x in code.splitlines() if not x.startswith("#include")]
        source = "\n".join(includes) + "\n" + C_PRELUDE + "int main(void) {\n" + \
            "  (void)print_piece;\n" + "\n".join(body) + "\n  return 0;\n}\n"
        (tmp_path / "doc.c").write_text(source)
        built = subprocess.run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-o",
                                str(tmp_path / "doc"), str(tmp_path / "doc.c"), *library_flags()],
                               capture_output=True, text=True)
        assert built.returncode == 0, f"{name}:{line}:\n{built.stderr}"
        if runnable(code):
            result = subprocess.run([str(tmp_path / "doc")], cwd=ROOT, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0 and result.stdout.strip(), \
                f"{name}:{line}: {result.stdout}{result.stderr}"


def test_python_blocks_run():
    blocks = code_blocks("python")
    assert blocks
    for name, line, _, code in blocks:
        compile(code, f"{name}:{line}", "exec")
        if runnable(code):
            env = dict(os.environ, PYTHONPATH=str(ROOT / "bindings" / "python"))
            result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0 and result.stdout.strip(), \
                f"{name}:{line}: {result.stdout}{result.stderr}"


# Just enough of Unreal's types for the doc's snippet: AsyncTask runs the task at once.
UNREAL_SHIM = r"""
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>
#include "ember.hpp"
using TCHAR = char;
struct FString {
  std::string s;
  FString() = default;
  explicit FString(const TCHAR *t) : s(t) {}
  const TCHAR *operator*() const { return s.c_str(); }
};
#define TCHAR_TO_UTF8(x) (x)
#define UTF8_TO_TCHAR(x) (x)
#define TEXT(x) x
#define UE_LOG(category, level, format, ...) std::fprintf(stderr, format "\n", __VA_ARGS__)
enum class ENamedThreads { AnyBackgroundThreadNormalTask, GameThread };
template <class F> void AsyncTask(ENamedThreads, F &&f) { f(); }
template <class T> using TSharedPtr = std::shared_ptr<T>;
template <class T, class... A> std::shared_ptr<T> MakeShared(A &&...a) {
  return std::make_shared<T>(std::forward<A>(a)...);
}
struct AActorSnippet {
  TSharedPtr<ember::Model> Model;
  TSharedPtr<ember::Session> Session;
  std::vector<ember::ChatMessage> Messages{{"user", "Hello"}};
  std::string Reply;
  void OnReplyPiece(const FString &Text) { Reply += Text.s; }
  void Run(const FString &ModelDir) {
%s
  }
};
int main(int argc, char **argv) {
  AActorSnippet actor;
  actor.Run(FString(argv[1]));
  std::printf("%%s|%%d\n", actor.Reply.c_str(), argc);
  return 0;
}
"""


def test_cpp_blocks_compile_without_exceptions_and_never_abort(tmp_path):
    blocks = code_blocks("cpp")
    assert blocks
    for name, line, _, code in blocks:
        body = "\n".join(x for x in code.splitlines() if not x.startswith("#include"))
        (tmp_path / "doc.cpp").write_text(UNREAL_SHIM % body)
        for flags in ([], ["-fno-exceptions"]):
            built = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", *flags,
                                    "-o", str(tmp_path / "doc"), str(tmp_path / "doc.cpp"),
                                    *library_flags()], capture_output=True, text=True)
            assert built.returncode == 0, f"{name}:{line} {flags}:\n{built.stderr}"
            # A model that loads gives a reply; one that does not is reported, not an abort.
            for model, replies in ((LLAMA, True), (ROOT / "no-such-model", False)):
                result = subprocess.run([str(tmp_path / "doc"), str(model)], capture_output=True,
                                        text=True, timeout=120)
                assert result.returncode == 0, f"{name}:{line} {flags} {model}: {result.stderr}"
                assert (result.stdout.split("|")[0] != "") == replies, result.stdout


def test_cpp_blocks_take_values_only_of_tested_results():
    # Without exceptions, value() on a failed result aborts: every value() must take the
    # value of a result the block tested before (`if (!Result) ...`).
    for name, line, _, code in code_blocks("cpp"):
        for match in re.finditer(r"\.value\(\)", code):
            before = code[: match.start()]
            moved = re.search(r"std::move\((\w+)\)$", before)
            plain = re.search(r"(\w+)$", before)
            variable = moved.group(1) if moved else plain.group(1) if plain else None
            assert variable and re.search(rf"if \(!{variable}\)", before), \
                f"{name}:{line}: value() of an untested result: ...{before[-60:]}"
