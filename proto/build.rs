//! Compiles the .proto files with protox (pure Rust), so no system `protoc` is needed.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/khlang/v1/records.proto",
    "proto/khlang/v1/subjects.proto",
    "proto/khlang/v1/admin.proto",
    "proto/khlang/v1/audit.proto",
    "proto/khlang/v1/keys.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS.iter().map(|p| p.trim_start_matches("proto/")))?;

    // `file_descriptor_set_path` has no effect on the `compile_fds` path: write it for reflection.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("khlang_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    let fds = compiler.file_descriptor_set();

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
