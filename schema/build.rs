//! Generates the envd protobuf types (prost) and their canonical proto3 JSON
//! (pbjson) from `proto/envd/*.proto`. protoc comes vendored in a crate, so
//! building needs no system package.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/envd/process.proto", "proto/envd/filesystem.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("envd_descriptors.bin");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let mut config = prost_build::Config::new();
    config
        .protoc_executable(protoc)
        .file_descriptor_set_path(&descriptors)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .bytes(["."]);
    config.compile_protos(&protos, &[PathBuf::from("proto/envd"), include])?;
    let descriptor_set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_set)?
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
