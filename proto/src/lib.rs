//! The gRPC protocol between the CLI, the coordinator and the workers.
//!
//! Empty until the render-farm service issue lands `longtake.proto` and its tonic bindings.
