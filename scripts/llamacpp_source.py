"""The llama.cpp sources that llama-cpp-python vendors, for fixture and benchmark scripts.

`llama_cpp_dir()` returns `vendor/llama.cpp` of the llama-cpp-python source distribution
(pinned version), downloading it with pip into `build/llamacpp-src/` on first use, and puts
its `gguf-py` first on `sys.path`, so `import gguf` is llama.cpp's own (the version its
converter and quantizer go with). Nothing is built.
"""

import pathlib
import subprocess
import sys
import tarfile

VERSION = "0.3.36"
ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "llamacpp-src"


def llama_cpp_dir() -> pathlib.Path:
    source = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.exists():
            # --no-build-isolation keeps pip from building the sdist's build requirements.
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--no-binary", "llama-cpp-python", "--no-build-isolation",
                            f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    gguf_py = str(source / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    return source
