//! Parity of the tokenizer, the umT5 encoder and the prompt encoder with the PyTorch reference
//! fixtures, for every case directory under the reference dir (`LONGTAKE_REFERENCE_DIR`, by
//! default `shared/reference` beside the repository) and under the repository's `tests/fixtures`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use longtake_worker::model::compare::relative_l2;
use longtake_worker::model::loader::{Checkpoint, SafetensorsWeights};
use longtake_worker::model::reference::test_fixture_dirs;
use longtake_worker::model::text::PromptEncoder;
use longtake_worker::model::tokenizer::PromptTokenizer;
use longtake_worker::model::umt5::{Config, UMT5EncoderModel};

const TOLERANCE: f64 = 1e-4;

fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn u32s(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn load_encoder(dir: &std::path::Path) -> UMT5EncoderModel {
    let ckpt = Checkpoint::open(dir.join("pipeline")).unwrap();
    let component = ckpt.component("text_encoder").unwrap();
    let config: Config = component.config().unwrap();
    UMT5EncoderModel::new(
        &config,
        component.var_builder(DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

#[test]
fn tokenizer_matches_reference_ids_and_masks() {
    for dir in test_fixture_dirs() {
        let tokenizer =
            PromptTokenizer::from_file(dir.join("pipeline/tokenizer/tokenizer.json")).unwrap();
        let fixture = read_json(dir.join("cases/tokenizer.json"));
        let max_length = fixture["max_length"].as_u64().unwrap() as usize;
        let cases = fixture["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let got = tokenizer.encode(text, max_length).unwrap();
            assert_eq!(
                got.ids,
                u32s(&case["input_ids"]),
                "{}: ids of {text:?}",
                dir.display()
            );
            assert_eq!(
                got.attention_mask,
                u32s(&case["attention_mask"]),
                "{}: mask of {text:?}",
                dir.display()
            );
        }
    }
}

#[test]
fn text_encoder_matches_reference() {
    for dir in test_fixture_dirs() {
        let encoder = load_encoder(&dir);
        let case =
            SafetensorsWeights::open_file(dir.join("cases/text_encoder.safetensors")).unwrap();
        let dev = Device::Cpu;
        // The fixture stores i64 ids, as torch does; the model takes u32.
        let ids = case
            .load("input_ids", &dev)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let mask = case.load("attention_mask", &dev).unwrap();
        let reference = case.load("last_hidden_state", &dev).unwrap();
        let ours = encoder.forward(&ids, &mask).unwrap();
        let err = relative_l2(&ours, &reference).unwrap();
        println!("{}: text encoder relative L2 {err:.3e}", dir.display());
        assert!(
            err <= TOLERANCE,
            "{}: text encoder relative L2 {err:.3e}",
            dir.display()
        );

        // Padding must not leak into real positions: a row with padding gives the same
        // embeddings for its real tokens as the same ids with a shorter sequence.
        let (_, len) = ids.dims2().unwrap();
        let mut short_mask = vec![1u32; len];
        for m in short_mask.iter_mut().skip(len / 2) {
            *m = 0;
        }
        let row = ids.narrow(0, 0, 1).unwrap();
        let masked = encoder
            .forward(&row, &Tensor::from_vec(short_mask, (1, len), &dev).unwrap())
            .unwrap()
            .narrow(1, 0, len / 2)
            .unwrap();
        let cut = encoder
            .forward(
                &row.narrow(1, 0, len / 2).unwrap(),
                &Tensor::ones((1, len / 2), DType::U32, &dev).unwrap(),
            )
            .unwrap();
        let diff = relative_l2(&masked, &cut).unwrap();
        assert!(diff <= 1e-6, "masked keys still matter: {diff:.3e}");
    }
}

#[test]
fn prompt_encoder_matches_pipeline_embeddings() {
    for dir in test_fixture_dirs() {
        let settings = read_json(dir.join("cases/pipeline.json"));
        let max_len = settings["max_sequence_length"].as_u64().unwrap() as usize;
        let ckpt = Checkpoint::open(dir.join("pipeline")).unwrap();
        let encoder = PromptEncoder::load(&ckpt, max_len, DType::F32, &Device::Cpu).unwrap();
        let case = SafetensorsWeights::open_file(dir.join("cases/pipeline.safetensors")).unwrap();
        for (key, name) in [
            ("prompt", "prompt_embeds"),
            ("negative_prompt", "negative_prompt_embeds"),
        ] {
            let prompt = settings[key].as_str().unwrap();
            let reference = case.load(name, &Device::Cpu).unwrap();
            let ours = encoder.encode(&[prompt]).unwrap();
            let err = relative_l2(&ours, &reference).unwrap();
            println!("{}: {name} relative L2 {err:.3e}", dir.display());
            assert!(
                err <= TOLERANCE,
                "{}: {name} relative L2 {err:.3e}",
                dir.display()
            );
        }

        // Batched prompts of different lengths: each row equals the prompt encoded alone, and is
        // zero past its real tokens.
        let prompts = ["a", settings["prompt"].as_str().unwrap(), ""];
        let batch = encoder.encode(&prompts).unwrap();
        assert_eq!(
            batch.dims(),
            &[3, max_len, encoder.encoder.config().d_model]
        );
        for (i, prompt) in prompts.iter().enumerate() {
            let alone = encoder.encode(&[prompt]).unwrap();
            let row = batch.narrow(0, i, 1).unwrap();
            assert!(relative_l2(&row, &alone).unwrap() <= 1e-6, "row {i}");
            let n = encoder.tokenizer.encode(prompt, max_len).unwrap().len();
            let tail = row
                .narrow(1, n, max_len - n)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(
                tail.to_scalar::<f32>().unwrap(),
                0.0,
                "row {i} not zero past {n} tokens"
            );
            let head = row
                .narrow(1, 0, n)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert!(head.to_scalar::<f32>().unwrap() > 0.0);
        }
    }
}
