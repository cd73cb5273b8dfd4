"""docs/embedding.md: its C# P/Invoke declarations and examples, compiled with Mono's C#
compiler and run against the library, give what the Python binding gives. Skipped where
Mono is not installed (`apt-get install mono-mcs mono-runtime`)."""

import os
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
    declarations, usage, callback = re.findall(r"```csharp\n(.*?)```", DOC, re.S)
    source = declarations + HARNESS % {"callback": callback, "usage": usage}
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
