//! Prompt tokenization for the umT5 text encoder.
//!
//! [`PromptTokenizer`] wraps a `tokenizers` tokenizer (a checkpoint's `tokenizer/tokenizer.json`, or
//! the code-built one of the built-in `tiny` model) and reproduces what the diffusers pipeline gets
//! from transformers' `tokenizer(p, padding="max_length", max_length=L, truncation=True,
//! add_special_tokens=True)`: the text is tokenized without special tokens, cut so that the
//! special tokens still fit (the trailing `</s>` survives truncation), post-processed, then
//! right-padded with the pad token to exactly `L` ids.

use std::path::{Path, PathBuf};

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Replace, Sequence as NormalizerSequence, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{PaddingDirection, Tokenizer, TruncationDirection};

/// Errors from loading a tokenizer or encoding a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: cannot load tokenizer: {source}", path.display())]
    Load {
        path: PathBuf,
        source: tokenizers::Error,
    },
    #[error("{}: invalid tokenizer_config.json: {source}", path.display())]
    Config {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the tokenizer has no `{token}` token, needed as the {role} token")]
    MissingToken { token: String, role: &'static str },
    #[error("cannot build the built-in tokenizer: {0}")]
    Build(tokenizers::Error),
    #[error("cannot tokenize prompt {text:?}: {source}")]
    Encode {
        text: String,
        source: tokenizers::Error,
    },
    #[error("max_length {max_length} leaves no room for the {special} special token(s) the tokenizer adds")]
    MaxLengthTooSmall { max_length: usize, special: usize },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A prompt's token ids and attention mask, both exactly `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// 1 for real tokens (including `</s>`), 0 for padding.
    pub attention_mask: Vec<u32>,
}

impl TokenizedPrompt {
    /// The number of real (unpadded) tokens.
    pub fn len(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A T5-style tokenizer that pads and truncates like the Wan pipeline's HF tokenizer call.
#[derive(Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    pad_token: String,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// The special tokens of the built-in tokenizer, at the ids T5 uses.
const PAD: &str = "<pad>";
const EOS: &str = "</s>";
const UNK: &str = "<unk>";

impl PromptTokenizer {
    /// Loads `tokenizer.json`. The pad token is the `pad_token` of a `tokenizer_config.json` beside
    /// it when there is one (that is what transformers pads with), `<pad>` otherwise.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let tokenizer = Tokenizer::from_file(path).map_err(|source| TokenizerError::Load {
            path: path.to_path_buf(),
            source,
        })?;
        let pad_token = match path.parent().map(|dir| dir.join("tokenizer_config.json")) {
            Some(config_path) if config_path.is_file() => read_pad_token(&config_path)?,
            _ => None,
        }
        .unwrap_or_else(|| PAD.to_string());
        Self::with_pad_token(tokenizer, pad_token)
    }

    /// The tokenizer of the built-in `tiny` model, built in code so it needs no files: a Unigram
    /// model over single ASCII characters with byte fallback (so any UTF-8 text encodes), T5's
    /// special tokens (`<pad>` = 0, `</s>` = 1, `<unk>` = 2), NFKC and whitespace normalisation,
    /// a Metaspace pre-tokenizer and a `$A </s>` post-processor, like the reference tokenizer.
    pub fn builtin_tiny() -> Result<Self> {
        let mut vocab: Vec<(String, f64)> = [PAD, EOS, UNK]
            .iter()
            .map(|t| (t.to_string(), 0.0))
            .collect();
        // Every piece is a single character, so segmentation is unique and the scores barely
        // matter; byte pieces score lowest so they are only ever used for characters outside it.
        vocab.push(("▁".to_string(), -2.0));
        vocab.extend((0x21u8..=0x7e).map(|c| ((c as char).to_string(), -3.0)));
        vocab.extend((0u16..=255).map(|b| (format!("<0x{b:02X}>"), -10.0)));
        let model = Unigram::from(vocab, Some(2), true).map_err(TokenizerError::Build)?;

        let mut tokenizer = Tokenizer::new(model);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(TokenizerError::Build)?;
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFKC.into(),
                whitespace.into(),
            ])))
            .map_err(TokenizerError::Build)?;
        tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
        let post = TemplateProcessing::builder()
            .try_single(format!("$A {EOS}"))
            .and_then(|b| b.try_pair(format!("$A {EOS} $B {EOS}")))
            .map_err(|e| TokenizerError::Build(e.into()))?
            .special_tokens(vec![(EOS, 1u32)])
            .build()
            .map_err(|e| TokenizerError::Build(e.into()))?;
        tokenizer.with_post_processor(Some(post));
        Self::with_pad_token(tokenizer, PAD.to_string())
    }

    fn with_pad_token(mut tokenizer: Tokenizer, pad_token: String) -> Result<Self> {
        let pad_id =
            tokenizer
                .token_to_id(&pad_token)
                .ok_or_else(|| TokenizerError::MissingToken {
                    token: pad_token.clone(),
                    role: "padding",
                })?;
        // transformers overrides whatever truncation/padding a tokenizer.json carries with the
        // call's own; `encode` does both itself, so the file's settings must not interfere.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(TokenizerError::Build)?;
        Ok(Self {
            tokenizer,
            pad_id,
            pad_token,
        })
    }

    /// The number of ids the tokenizer can produce (its vocabulary plus added tokens): the text
    /// encoder's `vocab_size` must be at least this.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes `text` with the special tokens, truncated and padded to exactly `max_length`.
    /// How many special tokens (`</s>`) the post-processor adds to a single text.
    fn special_tokens(&self) -> usize {
        self.tokenizer.get_post_processor().map_or(0, |p| {
            use tokenizers::PostProcessor;
            p.added_tokens(false)
        })
    }

    /// The number of tokens of `text` with its special tokens, before any truncation.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|source| TokenizerError::Encode {
                    text: text.to_string(),
                    source,
                })?;
        Ok(encoding.len() + self.special_tokens())
    }

    pub fn encode(&self, text: &str, max_length: usize) -> Result<TokenizedPrompt> {
        let encode_err = |source| TokenizerError::Encode {
            text: text.to_string(),
            source,
        };
        let special = self.special_tokens();
        if max_length < special {
            return Err(TokenizerError::MaxLengthTooSmall {
                max_length,
                special,
            });
        }
        let mut encoding = self.tokenizer.encode(text, false).map_err(encode_err)?;
        // Truncate before the special tokens are added, so that `</s>` is always kept.
        encoding.truncate(max_length - special, 0, TruncationDirection::Right);
        let mut encoding = self
            .tokenizer
            .post_process(encoding, None, true)
            .map_err(encode_err)?;
        encoding.pad(
            max_length,
            self.pad_id,
            0,
            &self.pad_token,
            PaddingDirection::Right,
        );
        Ok(TokenizedPrompt {
            ids: encoding.get_ids().to_vec(),
            attention_mask: encoding.get_attention_mask().to_vec(),
        })
    }
}

fn read_pad_token(path: &Path) -> Result<Option<String>> {
    let config_err = |source| TokenizerError::Config {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Load {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(config_err)?;
    // `pad_token` is either a plain string or an AddedToken object with a `content` field.
    Ok(match config.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_tokens_is_the_untruncated_length() {
        let tok = PromptTokenizer::builtin_tiny().unwrap();
        let text = "a wolf howling at the moon";
        let n = tok.count_tokens(text).unwrap();
        let fitted = tok.encode(text, n + 5).unwrap();
        assert_eq!(fitted.len(), n, "real tokens when nothing is cut");
        assert_eq!(tok.encode(text, n - 3).unwrap().len(), n - 3);
        assert_eq!(
            tok.count_tokens("").unwrap(),
            1,
            "the empty prompt is just </s>"
        );
    }

    #[test]
    fn builtin_tiny_encodes_any_text_deterministically() {
        let tok = PromptTokenizer::builtin_tiny().unwrap();
        assert_eq!(tok.vocab_size(), 3 + 1 + 94 + 256);
        assert_eq!(tok.pad_id(), 0);
        for text in [
            "A cat on a skateboard, 4K.",
            "与中国龙一起庆祝中国农历新年的视频。",
            "",
            "  tabs\tand\nnewlines  ",
        ] {
            let a = tok.encode(text, 24).unwrap();
            let b = PromptTokenizer::builtin_tiny()
                .unwrap()
                .encode(text, 24)
                .unwrap();
            assert_eq!(a, b, "{text:?}");
            assert_eq!(a.ids.len(), 24);
            assert_eq!(a.attention_mask.len(), 24);
            let n = a.len();
            assert!(n >= 1, "{text:?}");
            // `</s>` closes the real tokens, then only padding follows.
            assert_eq!(a.ids[n - 1], 1, "{text:?}: {:?}", a.ids);
            assert!(a.ids[n..].iter().all(|&id| id == 0));
            assert!(a.attention_mask[..n].iter().all(|&m| m == 1));
            assert!(
                a.ids[..n - 1]
                    .iter()
                    .all(|&id| id >= 3 && (id as usize) < tok.vocab_size()),
                "{text:?}: {:?}",
                a.ids
            );
        }
        // Unknown characters fall back to their UTF-8 bytes instead of `<unk>`.
        let cjk = tok.encode("龙", 8).unwrap();
        // ▁, the bytes E9 BE 99, </s>
        assert_eq!(
            cjk.ids,
            vec![3, 98 + 0xE9, 98 + 0xBE, 98 + 0x99, 1, 0, 0, 0]
        );
        assert_eq!(
            tok.encode("A", 4).unwrap().ids,
            vec![3, 4 + 0x41 - 0x21, 1, 0]
        );
        assert_ne!(tok.encode("a", 8).unwrap(), tok.encode("b", 8).unwrap());
        // The empty prompt is just `</s>`, as with the reference tokenizer.
        assert_eq!(tok.encode("", 4).unwrap().ids, vec![1, 0, 0, 0]);
    }

    #[test]
    fn truncation_keeps_the_end_of_sequence_token() {
        let tok = PromptTokenizer::builtin_tiny().unwrap();
        let long = "a very long prompt that does not fit";
        let cut = tok.encode(long, 6).unwrap();
        assert_eq!(cut.ids.len(), 6);
        assert_eq!(cut.attention_mask, vec![1; 6]);
        assert_eq!(cut.ids[5], 1);
        let full = tok.encode(long, 64).unwrap();
        assert_eq!(cut.ids[..5], full.ids[..5]);
        assert!(matches!(
            tok.encode(long, 0),
            Err(TokenizerError::MaxLengthTooSmall { .. })
        ));
    }

    #[test]
    fn missing_file_is_named() {
        let err = PromptTokenizer::from_file("/nonexistent/tokenizer/tokenizer.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/tokenizer/tokenizer.json"),
            "{err}"
        );
    }
}
