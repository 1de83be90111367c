//! Prompt tokenizers, as transformers' `CLIPTokenizer` (byte-level BPE, built from `vocab.json` +
//! `merges.txt` when the model ships no `tokenizer.json`, as the real Kandinsky prior repos do) and
//! `XLMRobertaTokenizerFast` (from `tokenizer.json`), called the way the Kandinsky pipelines call
//! them: `padding="max_length", max_length=77, truncation=True`.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The CLIP pre-tokenisation pattern of transformers' `CLIPTokenizer`.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Token ids and attention masks of a batch, each `(B, max_length)` (`u32` ids, `f32` mask).
#[derive(Debug, Clone)]
pub struct TokenizedBatch {
    /// `input_ids`.
    pub input_ids: Tensor,
    /// `attention_mask` (1 for tokens, 0 for padding).
    pub attention_mask: Tensor,
}

/// A tokenizer with the special tokens and length of a Kandinsky text encoder.
pub struct PromptTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidWeights {
        path: path.to_path_buf(),
        message: format!("tokenizer: {e}"),
    }
}

/// `Tokenizer::from_file`, with the `tokenizers` crate's panics on some malformed files (found by
/// fuzzing: a bad `decoder` entry panics inside its deserializer) turned into errors.
fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > MAX_TOKENIZER_BYTES {
        return Err(tok_err(
            path,
            format!("{size} bytes (a tokenizer.json has at most {MAX_TOKENIZER_BYTES})"),
        ));
    }
    // Invalid JSON is refused here; some valid JSON still makes the crate panic, hence the catch.
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice::<serde_json::Value>(&text)
        .map_err(|e| tok_err(path, format!("not valid JSON: {e}")))?;
    std::panic::catch_unwind(|| Tokenizer::from_bytes(&text))
        .map_err(|_| {
            tok_err(
                path,
                "malformed tokenizer.json (the tokenizers crate panicked on it)",
            )
        })?
        .map_err(|e| tok_err(path, e))
}

/// The largest `tokenizer.json` read (XLM-R's full one is 17 MB).
const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// A special-token setting of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_setting(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v.get("content")?.as_str().map(String::from),
    }
}

impl PromptTokenizer {
    /// transformers' `CLIPTokenizer` from a `tokenizer/` directory: `tokenizer.json` if present,
    /// else `vocab.json` + `merges.txt`; the pad token and length from `tokenizer_config.json`
    /// (defaults `<|endoftext|>`, 77).
    pub fn clip_from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.is_file() {
            crate::loading::read_json(&cfg_path)?
        } else {
            serde_json::Value::Null
        };
        let pad = token_setting(&cfg, "pad_token").unwrap_or_else(|| "<|endoftext|>".into());
        let max_length = cfg
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .unwrap_or(77) as usize;
        let json = dir.join("tokenizer.json");
        let inner = if json.is_file() {
            tokenizer_from_file(&json)?
        } else {
            Self::clip_bpe(&dir.join("vocab.json"), &dir.join("merges.txt"), &pad)?
        };
        Self::with_specials(
            inner,
            "<|startoftext|>",
            "<|endoftext|>",
            &pad,
            max_length,
            dir,
        )
    }

    /// transformers' `CLIPTokenizer(vocab, merges, pad_token)` built from the two files.
    pub fn clip_from_files(
        vocab: &Path,
        merges: &Path,
        pad_token: &str,
        max_length: usize,
    ) -> Result<Self> {
        let inner = Self::clip_bpe(vocab, merges, pad_token)?;
        Self::with_specials(
            inner,
            "<|startoftext|>",
            "<|endoftext|>",
            pad_token,
            max_length,
            vocab,
        )
    }

    /// The tokenizer transformers' `CLIPTokenizer.__init__` builds. Its special tokens include
    /// the pad token: with the 2.1 prior's pad `!`, every `!` in a prompt becomes the special
    /// token (id 0) instead of joining BPE merges such as `!!` — a transformers quirk we follow.
    fn clip_bpe(vocab: &Path, merges: &Path, pad: &str) -> Result<Tokenizer> {
        for p in [vocab, merges] {
            if !p.is_file() {
                return Err(Error::NotFound {
                    what: "tokenizer file".into(),
                    path: p.to_path_buf(),
                });
            }
        }
        let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
        let bpe = BPE::from_file(&v, &m)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token("<|endoftext|>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut tok = Tokenizer::new(bpe);
        let replace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| tok_err(vocab, e))?;
        tok.with_normalizer(Some(NormSeq::new(vec![
            NFC.into(),
            replace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| tok_err(vocab, e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err(vocab, e))?;
        tok.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tok.add_special_tokens([
            AddedToken::from("<|startoftext|>", true),
            AddedToken::from("<|endoftext|>", true),
            AddedToken::from(pad, true),
        ])
        .map_err(|e| tok_err(vocab, e))?;
        Ok(tok)
    }

    /// `XLMRobertaTokenizerFast` from a `tokenizer/` directory holding `tokenizer.json`.
    pub fn xlm_roberta_from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(Error::NotFound {
                what: "tokenizer file".into(),
                path: json,
            });
        }
        let inner = tokenizer_from_file(&json)?;
        Self::with_specials(inner, "<s>", "</s>", "<pad>", 77, dir)
    }

    fn with_specials(
        inner: Tokenizer,
        bos: &str,
        eos: &str,
        pad: &str,
        max_length: usize,
        origin: &Path,
    ) -> Result<Self> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| tok_err(origin, format!("the vocabulary has no '{t}' token")))
        };
        if max_length < 2 {
            return Err(Error::unsupported("model_max_length", max_length));
        }
        Ok(Self {
            bos: id(bos)?,
            eos: id(eos)?,
            pad: id(pad)?,
            inner,
            max_length,
        })
    }

    /// The padded length (77 for Kandinsky).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Ids and mask of one prompt: `[bos] + tokens[..max_length-2] + [eos]`, padded.
    pub fn encode_one(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenize prompt: {e}")))?;
        let body = enc.get_ids();
        let body = &body[..body.len().min(self.max_length - 2)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        let mut mask = vec![1u32; ids.len()];
        mask.resize(self.max_length, 0);
        ids.resize(self.max_length, self.pad);
        Ok((ids, mask))
    }

    /// Tokenizes a batch into `(B, max_length)` tensors.
    pub fn encode(&self, prompts: &[&str], device: &Device) -> Result<TokenizedBatch> {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for p in prompts {
            let (i, m) = self.encode_one(p)?;
            ids.extend(i);
            mask.extend(m);
        }
        let shape = (prompts.len(), self.max_length);
        Ok(TokenizedBatch {
            input_ids: Tensor::from_vec(ids, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?.to_dtype(DType::F32)?,
        })
    }
}
