//! Generates the tonic/prost bindings of `longtake.proto`. Needs `protoc` (Debian's
//! protobuf-compiler, installed by tests/setup.sh) or `PROTOC` naming one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=longtake.proto");
    // Records that are also stored in etcd as JSON (jobs, worker registrations) derive serde, so
    // one type is both the wire message and the stored record.
    let serde = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";
    tonic_prost_build::configure()
        .type_attribute("longtake.v1.RenderSpec", serde)
        .type_attribute("longtake.v1.PromptCue", serde)
        .type_attribute("longtake.v1.Input", serde)
        .field_attribute(
            "longtake.v1.RenderSpec.input",
            "#[serde(skip_serializing_if = \"Option::is_none\")]",
        )
        .type_attribute("longtake.v1.Job", serde)
        .type_attribute("longtake.v1.TimeSplit", serde)
        .type_attribute("longtake.v1.Worker", serde)
        .type_attribute("longtake.v1.DeviceInfo", serde)
        .type_attribute("longtake.v1.ModelInfo", serde)
        // a job's input goes to each of its ranks: shared, not copied
        .bytes(".longtake.v1.TaskRequest.input")
        .compile_protos(&["longtake.proto"], &["."])?;
    Ok(())
}
