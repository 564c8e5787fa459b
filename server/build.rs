//! Compiles the vendored ONNX subset (`onnx/onnx.proto`) into prost types for the ONNX reader.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=onnx/onnx.proto");
    let fds = protox::compile(["onnx.proto"], ["onnx"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
