//! Generates the lillm.v1 messages and services, plus the file descriptor set that the
//! coordinator's reflection service serves (so `grpcurl list/describe` work).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "lillm/v1/coordinator.proto",
        "lillm/v1/status.proto",
        "lillm/v1/dataloader.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("lillm_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
