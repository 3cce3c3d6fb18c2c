//! Embeds the built-in toy model: lists every file under `toy/model` as an `include_bytes!`
//! entry of `$OUT_DIR/toy_model_files.rs` (read by `src/model/builtin.rs`), so a retrained model
//! swapped into that directory, with new files or without old ones, is what the next build serves.

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let model = manifest.join("toy/model");
    // A directory here is scanned whole: any file added, removed or changed rebuilds.
    println!("cargo:rerun-if-changed=toy/model");
    let mut files = Vec::new();
    collect(&model, &model, &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f == "model_index.json"),
        "{}: no model_index.json; the built-in toy model must be a checkpoint in the diffusers layout",
        model.display()
    );
    let mut out = String::from("&[\n");
    for relative in &files {
        let absolute = model.join(relative);
        out.push_str(&format!(
            "    ({relative:?}, include_bytes!({:?}) as &[u8]),\n",
            absolute.display().to_string()
        ));
    }
    out.push_str("]\n");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    std::fs::write(out_dir.join("toy_model_files.rs"), out).expect("write toy_model_files.rs");
}

/// Every file under `dir`, as `/`-separated paths relative to `root`.
fn collect(root: &Path, dir: &Path, files: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect(root, &path, files);
        } else {
            let relative = path.strip_prefix(root).expect("under the root");
            let parts: Vec<_> = relative
                .components()
                .map(|c| c.as_os_str().to_str().expect("a UTF-8 file name"))
                .collect();
            files.push(parts.join("/"));
        }
    }
}
