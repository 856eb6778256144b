//! The Python client's tests (`clients/python/tests`, pytest), run against
//! the `deadbolt` binary this build made.
//!
//! They run in a virtual environment under cargo's target directory,
//! made on first use with `python3 -m venv` and the client's test
//! dependencies from PyPI (`pip install clients/python[test]`), and made
//! again when `clients/python/pyproject.toml` changes. The tests import the
//! client from its source tree. No Python 3 (or no `venv` module, Debian's
//! `python3-venv`) is a failure that says so, never a silent pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Python to make the environment with: `$DEADBOLT_PYTHON`, or
/// `python3`.
fn python() -> String {
    std::env::var("DEADBOLT_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn run(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: cannot run {command:?}: {error}"));
    if !output.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// The virtual environment with the client's test dependencies, made if
/// it is missing or was made for another `pyproject.toml`.
fn environment(client: &Path) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
    let interpreter = venv.join("bin").join("python");
    let stamp = venv.join("deadbolt-pyproject.toml");
    let pyproject = std::fs::read(client.join("pyproject.toml")).expect("pyproject.toml");
    if interpreter.exists() && std::fs::read(&stamp).ok().as_ref() == Some(&pyproject) {
        return interpreter;
    }
    let python = python();
    let version = Command::new(&python).arg("--version").output();
    if !version.is_ok_and(|v| v.status.success()) {
        panic!(
            "the Python client's tests need Python 3.9 or later as `{python}` \
             (or set DEADBOLT_PYTHON), with its venv module (Debian: apt-get install python3-venv)"
        );
    }
    // A half-made environment from an interrupted run is made again.
    let _ = std::fs::remove_dir_all(&venv);
    run(
        Command::new(&python).args(["-m", "venv"]).arg(&venv),
        "making a virtual environment (Debian: apt-get install python3-venv)",
    );
    run(
        Command::new(&interpreter)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!("{}[test]", client.display())),
        "installing the Python client's test dependencies from PyPI",
    );
    std::fs::write(&stamp, pyproject).expect("stamp the environment");
    interpreter
}

#[test]
fn the_python_client_passes_its_tests_against_the_real_server() {
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/python");
    let client = client.canonicalize().expect("clients/python");
    let interpreter = environment(&client);
    let output = run(
        Command::new(&interpreter)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(&client)
            .env("DEADBOLT_BIN", env!("CARGO_BIN_EXE_deadbolt"))
            .env("PYTHONPATH", client.join("src"))
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "the Python client's tests",
    );
    println!("{}", String::from_utf8_lossy(&output.stdout));
}
