//! Prompts → text embeddings, as diffusers' `WanPipeline._get_t5_prompt_embeds` makes them.
//!
//! [`PromptEncoder`] cleans each prompt (the pipeline's `prompt_clean`), tokenizes it to
//! `max_sequence_length` ids, runs the umT5 encoder on the batch, then keeps each prompt's
//! embeddings only for its real tokens and zero-pads them back to `max_sequence_length`: the
//! transformer's cross-attention sees zeros, not the encoder's outputs at padding positions.

use candle_core::{DType, Device, Tensor};

use super::loader::{Checkpoint, LoadError};
use super::tokenizer::{PromptTokenizer, TokenizerError};
use super::umt5::{Config, UMT5EncoderModel};

/// Wan's default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("text encoder: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("no prompts to encode")]
    NoPrompts,
    #[error("the tokenizer produced id {id}, beyond the text encoder's vocab_size {vocab_size}: tokenizer and text encoder do not match")]
    VocabMismatch { id: u32, vocab_size: usize },
}

pub type Result<T> = std::result::Result<T, TextError>;

/// Tokenizer plus umT5 encoder: prompts in, `(B, max_sequence_length, d_model)` embeddings out.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    pub tokenizer: PromptTokenizer,
    pub encoder: UMT5EncoderModel,
    pub max_sequence_length: usize,
}

impl PromptEncoder {
    pub fn new(
        tokenizer: PromptTokenizer,
        encoder: UMT5EncoderModel,
        max_sequence_length: usize,
    ) -> Self {
        Self {
            tokenizer,
            encoder,
            max_sequence_length,
        }
    }

    /// Loads `tokenizer/tokenizer.json` and `text_encoder/` from a checkpoint directory.
    pub fn load(
        checkpoint: &Checkpoint,
        max_sequence_length: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = PromptTokenizer::from_file(
            checkpoint
                .component("tokenizer")?
                .dir()
                .join("tokenizer.json"),
        )?;
        let component = checkpoint.component("text_encoder")?;
        let config: Config = component.config()?;
        let encoder = UMT5EncoderModel::new(&config, component.var_builder(dtype, device)?)?;
        Ok(Self::new(tokenizer, encoder, max_sequence_length))
    }

    /// Embeds a batch of prompts: `(B, max_sequence_length, d_model)` in the encoder's dtype, on
    /// the encoder's device, zero beyond each prompt's real tokens.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        if prompts.is_empty() {
            return Err(TextError::NoPrompts);
        }
        let len = self.max_sequence_length;
        let mut ids = Vec::with_capacity(prompts.len() * len);
        let mut mask = Vec::with_capacity(prompts.len() * len);
        let mut lengths = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let tokens = self.tokenizer.encode(&prompt_clean(prompt), len)?;
            lengths.push(tokens.len());
            ids.extend_from_slice(&tokens.ids);
            mask.extend_from_slice(&tokens.attention_mask);
        }
        // Real checkpoints pad the embedding table beyond the tokenizer (256384 rows for 256300
        // ids); an id past the table means a tokenizer and an encoder that do not belong together.
        let vocab = self.encoder.config().vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TextError::VocabMismatch {
                id,
                vocab_size: vocab,
            });
        }
        let device = self.encoder.device();
        let batch = prompts.len();
        let ids = Tensor::from_vec(ids, (batch, len), device)?;
        let mask = Tensor::from_vec(mask, (batch, len), device)?;
        let hidden = self.encoder.forward(&ids, &mask)?;

        // Zero everything past each prompt's real tokens with one multiply rather than per-prompt
        // slicing and concatenation.
        let keep: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..len).map(move |i| if i < n { 1.0 } else { 0.0 }))
            .collect();
        let keep = Tensor::from_vec(keep, (batch, len, 1), device)?.to_dtype(hidden.dtype())?;
        Ok(hidden.broadcast_mul(&keep)?)
    }
}

/// diffusers' `prompt_clean`: `ftfy.fix_text`, HTML unescaping (twice), whitespace runs collapsed
/// to one space, ends stripped.
///
/// Of `ftfy.fix_text` this does what can change a well-formed prompt's tokens: curly quotes
/// become straight ones and control characters are dropped; width, ligature and NFC fixes are
/// left to the tokenizer's own NFKC normalisation. Mojibake repair is not reproduced, and only
/// the common named HTML entities (plus all numeric ones) are decoded.
pub fn prompt_clean(text: &str) -> String {
    let fixed: String = text
        .chars()
        .filter_map(|c| match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => Some('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => Some('"'),
            // whitespace controls survive until whitespace_clean below
            c if c.is_control() && !c.is_whitespace() => None,
            c => Some(c),
        })
        .collect();
    let unescaped = html_unescape(&html_unescape(fixed.trim()));
    unescaped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Decodes `&name;`, `&#NNN;` and `&#xHHH;` references; anything else is left as it is.
fn html_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let decoded = rest[1..]
            .find(';')
            .filter(|&end| end <= 32)
            .and_then(|end| {
                let name = &rest[1..1 + end];
                let c = match name {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    "nbsp" => Some('\u{a0}'),
                    _ => {
                        let code = if let Some(hex) =
                            name.strip_prefix("#x").or_else(|| name.strip_prefix("#X"))
                        {
                            u32::from_str_radix(hex, 16).ok()
                        } else {
                            name.strip_prefix('#')
                                .and_then(|dec| dec.parse::<u32>().ok())
                        };
                        code.and_then(char::from_u32)
                    }
                }?;
                Some((c, end + 2))
            });
        match decoded {
            Some((c, consumed)) => {
                out.push(c);
                rest = &rest[consumed..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loader::seeded_var_builder;

    fn tiny_config(vocab_size: usize) -> Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": vocab_size, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_heads": 4,
        }))
        .unwrap()
    }

    #[test]
    fn builtin_tiny_prompt_encoder_runs_on_seeded_weights() {
        let tokenizer = PromptTokenizer::builtin_tiny().unwrap();
        let dev = Device::Cpu;
        let cfg = tiny_config(tokenizer.vocab_size());
        let encoder = UMT5EncoderModel::new(&cfg, seeded_var_builder(7, DType::F32, &dev)).unwrap();
        let prompts = [
            "A red fox in the snow",
            "与中国龙一起庆祝中国农历新年的视频。",
            "",
        ];
        let pe = PromptEncoder::new(tokenizer.clone(), encoder.clone(), 32);
        let a = pe.encode(&prompts).unwrap();
        assert_eq!(a.dims(), &[3, 32, 16]);
        let b = pe.encode(&prompts).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // The empty prompt keeps exactly one real token (`</s>`).
        let empty = a.get(2).unwrap();
        assert!(
            empty
                .get(0)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        assert_eq!(
            empty
                .narrow(0, 1, 31)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );

        let small =
            UMT5EncoderModel::new(&tiny_config(10), seeded_var_builder(7, DType::F32, &dev))
                .unwrap();
        let mismatched = PromptEncoder::new(tokenizer, small, 32);
        assert!(matches!(
            mismatched.encode(&["hello"]),
            Err(TextError::VocabMismatch { .. })
        ));
        assert!(matches!(pe.encode(&[]), Err(TextError::NoPrompts)));
    }

    #[test]
    fn prompt_clean_matches_the_pipeline() {
        assert_eq!(
            prompt_clean("  a  cat\n\ton\u{3000}a mat  "),
            "a cat on a mat"
        );
        assert_eq!(
            prompt_clean("Tom &amp;amp; Jerry &#39;s &lt;3"),
            "Tom & Jerry 's <3"
        );
        assert_eq!(
            prompt_clean("\u{201C}hi\u{201D} it\u{2019}s"),
            "\"hi\" it's"
        );
        assert_eq!(prompt_clean("a & b &unknown; &#x41;"), "a & b &unknown; A");
        assert_eq!(prompt_clean("bell\u{7}"), "bell");
        assert_eq!(prompt_clean(""), "");
    }
}
