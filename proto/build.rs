//! Compiles the contract (every .proto under filterdb/v1) with protox (no protoc binary) and
//! keeps the descriptor set for reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=filterdb");
    let mut files: Vec<String> = std::fs::read_dir("filterdb/v1")?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .filter_map(|p| p.file_name().map(|n| format!("filterdb/v1/{}", n.to_string_lossy())))
        .collect();
    files.sort();
    let fds = protox::compile(&files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("filterdb_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
