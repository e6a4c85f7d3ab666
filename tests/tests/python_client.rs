//! Clients in other languages: every .proto compiles with standard protoc (PyPI's grpcio-tools),
//! and a Python client generated from them talks to a `khlangd dev` vault (tests/python/smoke.py).
//! Needs a Python with grpcio-tools, grpcio-health-checking and grpcio-reflection: `KHLANG_PYTHON`
//! or `target/pyvenv/bin/python` (`.ci/run` makes it). Without one the test skips loudly;
//! with `KHLANG_REQUIRE_PYTHON=1` (set by `.ci/run`) a missing one fails.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use khlang_tests::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("KHLANG_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/pyvenv/bin/python"));
    let usable = Command::new(&candidate)
        .args(["-c", "import grpc_tools, grpc_health, grpc_reflection"])
        .output()
        .is_ok_and(|o| o.status.success());
    if usable {
        return Some(candidate);
    }
    if std::env::var("KHLANG_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("KHLANG_REQUIRE_PYTHON=1 but {} has no grpcio-tools", candidate.display());
    }
    eprintln!(
        "SKIPPED: no Python with grpcio-tools at {} (set KHLANG_PYTHON or run .ci/run); the \
         protoc and Python client check did not run",
        candidate.display()
    );
    None
}

#[test]
fn standard_protoc_compiles_every_proto_and_a_python_client_works() {
    let Some(python) = python() else { return };
    let out = tempfile::tempdir().unwrap();
    let protos: Vec<PathBuf> = std::fs::read_dir(workspace().join("proto/proto/khlang/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    assert!(protos.len() >= 5, "{protos:?}");
    let gen_dir = out.path().join("gen");
    std::fs::create_dir_all(&gen_dir).unwrap();
    let protoc = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(workspace().join("proto/proto"))
        .arg(format!("--python_out={}", gen_dir.display()))
        .arg(format!("--grpc_python_out={}", gen_dir.display()))
        .args(&protos)
        .output()
        .unwrap();
    assert!(
        protoc.status.success(),
        "protoc refused the protos: {}",
        String::from_utf8_lossy(&protoc.stderr)
    );

    let data = out.path().join("dev");
    let (mut daemon, url) =
        spawn_khlangd(&["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    let address = url.unwrap().trim_start_matches("http://").to_owned();
    let run = Command::new(&python)
        .arg(workspace().join("tests/python/smoke.py"))
        .arg(&address)
        .arg(data.join("dev-credentials.json"))
        .arg(&gen_dir)
        .output()
        .unwrap();
    daemon.0.kill().ok();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "python client: {stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    for line in ["reflection:", "health: SERVING", "put and get:", "refused: PERMISSION_DENIED"] {
        assert!(stdout.contains(line), "{line} missing from: {stdout}");
    }
}
