//! Builds and runs the C programs of `tests/c/` and `examples/c/` against `include/ember.h`
//! and both library kinds (`libember.so`, `libember.a`) that `cargo test` has just built,
//! and runs the API tests and the example under valgrind when it is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`, where cargo puts libember.so and libember.a for this profile. `cargo
/// test` builds the library only as an rlib, so the first call builds the C libraries.
fn lib_dir() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    BUILD.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--lib", "--manifest-path"])
            .arg(root().join("Cargo.toml"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo");
        assert!(
            status.success(),
            "building libember.so and libember.a failed"
        );
    });
    dir
}

fn fixture() -> String {
    root()
        .join("tests/fixtures/llama")
        .to_string_lossy()
        .into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-c-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[derive(Clone, Copy)]
enum Link {
    Shared,
    Static,
}

/// Compiles C (or C++ with `cxx`) sources into `out` with warnings as errors.
fn compile(sources: &[&str], out: &Path, link: Link, cxx: bool) {
    let libs = lib_dir();
    let mut cmd = Command::new(if cxx { "c++" } else { "cc" });
    if cxx {
        cmd.args(["-std=c++17", "-x", "c++"]);
    } else {
        cmd.arg("-std=c11");
    }
    cmd.args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-g", "-O1"]);
    cmd.arg("-I").arg(root().join("include"));
    for s in sources {
        cmd.arg(root().join(s));
    }
    cmd.arg("-o").arg(out);
    if cxx {
        cmd.args(["-x", "none"]);
    }
    match link {
        Link::Shared => {
            cmd.arg(format!("-L{}", libs.display()))
                .arg("-lember")
                .arg(format!("-Wl,-rpath,{}", libs.display()));
        }
        Link::Static => {
            // The system libraries a Rust static library needs (`--print native-static-libs`).
            cmd.arg(libs.join("libember.a")).args([
                "-lgcc_s",
                "-lutil",
                "-lrt",
                "-lpthread",
                "-lm",
                "-ldl",
                "-lc",
            ]);
        }
    }
    cmd.arg("-lpthread");
    let output = cmd.output().expect("a C compiler (cc / c++) is needed");
    assert!(
        output.status.success(),
        "compiling {sources:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a program, optionally under valgrind; returns its stdout, failing on a non-zero exit.
fn run(program: &Path, args: &[&str], valgrind: bool) -> String {
    let mut cmd = if valgrind {
        let mut c = Command::new("valgrind");
        c.args([
            "--quiet",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
        ]);
        c.arg(program);
        c
    } else {
        Command::new(program)
    };
    let output = cmd.args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn valgrind_available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_header_compiles_twice_as_c11_and_as_cpp17() {
    let dir = scratch("header");
    for (cxx, name) in [(false, "c"), (true, "cpp")] {
        let out = dir.join(name);
        compile(&["tests/c/header_twice.c"], &out, Link::Shared, cxx);
        run(&out, &[], false);
    }
}

#[test]
fn the_c_api_tests_pass_with_both_library_kinds() {
    let dir = scratch("api");
    for (link, name) in [(Link::Shared, "shared"), (Link::Static, "static")] {
        let out = dir.join(format!("test_api_{name}"));
        compile(&["tests/c/test_api.c"], &out, link, false);
        let stdout = run(&out, &[&fixture(), dir.to_str().unwrap()], false);
        assert!(stdout.contains(" 0 failed"), "{stdout}");
        eprintln!("C API tests ({name}): {}", stdout.trim());
    }
}

#[test]
fn the_c_example_streams_text_with_both_library_kinds() {
    let dir = scratch("example");
    for (link, name) in [(Link::Shared, "shared"), (Link::Static, "static")] {
        let out = dir.join(format!("generate_{name}"));
        compile(&["examples/c/generate.c"], &out, link, false);
        let stdout = run(&out, &[&fixture(), "Once upon a time", "16", "2"], false);
        assert!(
            stdout.starts_with("Once upon a time") && stdout.len() > 17,
            "{stdout:?}"
        );
    }
}

#[test]
fn load_generate_free_a_hundred_times_leaves_nothing_behind() {
    let dir = scratch("lifecycle");
    let out = dir.join("lifecycle");
    compile(&["tests/c/lifecycle.c"], &out, Link::Shared, false);
    let stdout = run(&out, &[&fixture()], false);
    eprintln!("life cycle: {}", stdout.trim());
}

#[test]
fn the_c_tests_and_example_are_clean_under_valgrind() {
    if !valgrind_available() {
        eprintln!("SKIPPED: valgrind is not installed");
        return;
    }
    let dir = scratch("valgrind");
    let api = dir.join("test_api");
    compile(&["tests/c/test_api.c"], &api, Link::Shared, false);
    let stdout = run(&api, &[&fixture(), dir.to_str().unwrap()], true);
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    let example = dir.join("generate");
    compile(&["examples/c/generate.c"], &example, Link::Shared, false);
    run(&example, &[&fixture(), "Hello", "8", "2"], true);
}

#[test]
fn pkg_config_finds_the_installed_library() {
    if Command::new("pkg-config")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: pkg-config is not installed");
        return;
    }
    let prefix = scratch("install");
    let status = Command::new("bash")
        .arg(root().join("scripts/install-c"))
        .arg(&prefix)
        .arg(lib_dir())
        .status()
        .unwrap();
    assert!(status.success());
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "ember"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap();
    assert!(
        flags.status.success(),
        "{}",
        String::from_utf8_lossy(&flags.stderr)
    );
    let flags = String::from_utf8(flags.stdout).unwrap();
    let out = prefix.join("generate");
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror"])
        .arg(root().join("examples/c/generate.c"))
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "compiling with `pkg-config --cflags --libs ember` failed"
    );
    run(&out, &[&fixture(), "Hi", "4", "1"], false);
    assert!(prefix.join("lib/cmake/ember/emberConfig.cmake").is_file());
}
