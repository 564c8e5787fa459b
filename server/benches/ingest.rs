//! Ingest throughput benchmark (placeholder while the release build warms up).
fn main() {
    println!("placeholder");
}
