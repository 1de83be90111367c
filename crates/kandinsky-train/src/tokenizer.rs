//! The small model's XLM-R tokenizer: the real XLM-R Unigram pieces reduced to those the
//! synthetic world's captions use (plus every character in them), so the M-CLIP embedding table
//! is a few hundred rows instead of 250,002. Viterbi over a subset that still contains the full
//! vocabulary's best segmentation returns that segmentation, so captions tokenize exactly as with
//! the real vocabulary (the test checks it).

use kandinsky::error::{Error, Result};
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::models::unigram::Unigram;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Tokenizer};

const SPECIALS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("tokenizer: {e}"))
}

/// Reads a SentencePiece vocabulary as `piece<TAB>score` lines, gzip-compressed (how the repo
/// ships the real XLM-R pieces).
pub fn read_pieces_tsv_gz(path: &Path) -> Result<Vec<(String, f64)>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    text.lines()
        .map(|l| {
            let (p, s) = l
                .rsplit_once('\t')
                .ok_or_else(|| tok_err(format!("{}: bad line '{l}'", path.display())))?;
            let score = s
                .parse()
                .map_err(|_| tok_err(format!("{}: bad score in '{l}'", path.display())))?;
            Ok((p.to_string(), score))
        })
        .collect()
}

/// An XLM-R tokenizer over `vocab` (specials `<s> <pad> </s> <unk>` first, `<mask>` last), as
/// transformers builds `XLMRobertaTokenizerFast`: whitespace split, metaspace with a prefix,
/// `<s> … </s>` added by the post-processor.
pub fn xlm_roberta_tokenizer(vocab: Vec<(String, f64)>) -> Result<Tokenizer> {
    let n = vocab.len();
    let mut tok = Tokenizer::new(Unigram::from(vocab, Some(3), false).map_err(tok_err)?);
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    tok.with_post_processor(Some(RobertaProcessing::new(
        ("</s>".to_string(), 2),
        ("<s>".to_string(), 0),
    )));
    tok.add_special_tokens(
        ["<s>", "<pad>", "</s>", "<unk>", "<mask>"].map(|t| AddedToken::from(t, true)),
    )
    .map_err(tok_err)?;
    debug_assert_eq!(tok.get_vocab_size(true), n);
    Ok(tok)
}

/// The pieces of `full` (the real XLM-R vocabulary, specials first, `<mask>` last) that the
/// full tokenizer uses for `texts`, plus every single character (as `▁c` and `c`) appearing in
/// them, in their original order.
pub fn reduce_vocabulary(full: &[(String, f64)], texts: &[String]) -> Result<Vec<(String, f64)>> {
    let tok = xlm_roberta_tokenizer(full.to_vec())?;
    let mut keep: BTreeSet<u32> = (0..SPECIALS.len() as u32).collect();
    let mut chars = BTreeSet::new();
    for t in texts {
        let enc = tok.encode(t.as_str(), false).map_err(tok_err)?;
        keep.extend(enc.get_ids());
        chars.extend(t.chars().filter(|c| !c.is_whitespace()));
    }
    for c in chars {
        for piece in [c.to_string(), format!("▁{c}")] {
            if let Some(id) = tok.token_to_id(&piece) {
                keep.insert(id);
            }
        }
    }
    let mask = full.len() as u32 - 1;
    keep.remove(&mask);
    let mut out: Vec<(String, f64)> = keep
        .into_iter()
        .map(|id| full[id as usize].clone())
        .collect();
    out.push(full[mask as usize].clone());
    Ok(out)
}

/// Writes `tokenizer.json` and transformers' `tokenizer_config.json` / `special_tokens_map.json`
/// for an XLM-R tokenizer to `dir`.
pub fn save_xlm_roberta(tok: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tok.save(dir.join("tokenizer.json"), true)
        .map_err(tok_err)?;
    let config = serde_json::json!({
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": 512,
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"
    });
    let specials = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"
    });
    for (name, v) in [
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", specials),
    ] {
        let p = dir.join(name);
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
        .map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// The CLIP BPE vocabulary of `full_dir` (`vocab.json`, `merges.txt`: the real CLIP's) reduced to
/// what `texts` need, written to `out_dir` (`vocab.json`, `merges.txt`, `tokenizer_config.json`):
/// the 512 byte-level base tokens, every token the full tokenizer gives for `texts` and the
/// tokens of the merges that build them, then `<|startoftext|>` and `<|endoftext|>` last (as in
/// the real vocabulary, so the end token keeps the highest id). Only the merges building kept
/// tokens are kept, in their order: for each of `texts` BPE then applies the same merges as with
/// the full vocabulary (a kept merge it did not apply there would have had to be applicable and
/// ranked first there too), so the captions tokenize to the same tokens (the test checks it),
/// and any other text still tokenizes (down to bytes). Returns the vocabulary's size.
///
/// The full vocabulary is 49,408 tokens, whose embedding table is most of a small CLIP text
/// tower; the synthetic world's captions use a few hundred.
pub fn reduce_clip_vocabulary(full_dir: &Path, texts: &[String], out_dir: &Path) -> Result<usize> {
    use std::collections::{BTreeMap, HashMap};
    let read = |name: &str| {
        let p = full_dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
    };
    let vocab: BTreeMap<String, u32> = serde_json::from_str(&read("vocab.json")?)
        .map_err(|e| tok_err(format!("{}: {e}", full_dir.join("vocab.json").display())))?;
    let merges: Vec<(String, String)> = read("merges.txt")?
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| tok_err(format!("merges.txt: bad line '{l}'")))
        })
        .collect::<Result<_>>()?;
    let names: HashMap<u32, &str> = vocab.iter().map(|(t, &i)| (i, t.as_str())).collect();
    // The merge that builds each token (the first, as BPE ranks them).
    // The argument above needs one merge per token, as CLIP's vocabulary has.
    let mut built_by: HashMap<String, usize> = HashMap::new();
    for (rank, (a, b)) in merges.iter().enumerate() {
        if built_by.insert(format!("{a}{b}"), rank).is_some() {
            return Err(tok_err(format!(
                "merges.txt builds '{a}{b}' twice: not a vocabulary this reduction handles"
            )));
        }
    }
    let specials = ["<|startoftext|>", "<|endoftext|>"];
    let full = kandinsky::tokenization::PromptTokenizer::clip_from_files(
        &full_dir.join("vocab.json"),
        &full_dir.join("merges.txt"),
        "<|endoftext|>",
        77,
    )?;
    let mut keep: BTreeSet<String> = vocab
        .iter()
        .filter(|(_, &i)| i < 512)
        .map(|(t, _)| t.clone())
        .collect();
    let mut todo: Vec<String> = Vec::new();
    for t in texts {
        let (ids, _) = full.encode_one(t)?;
        for id in ids {
            let name = names
                .get(&id)
                .ok_or_else(|| tok_err(format!("token id {id} is not in the vocabulary")))?;
            if !specials.contains(name) {
                todo.push(name.to_string());
            }
        }
    }
    let mut kept_merges = BTreeSet::new();
    while let Some(t) = todo.pop() {
        if !keep.insert(t.clone()) {
            continue;
        }
        if let Some(&rank) = built_by.get(&t) {
            if kept_merges.insert(rank) {
                let (a, b) = &merges[rank];
                todo.push(a.clone());
                todo.push(b.clone());
            }
        }
    }
    let mut tokens: Vec<(&str, u32)> = keep
        .iter()
        .map(|t| {
            vocab
                .get(t)
                .map(|&i| (t.as_str(), i))
                .ok_or_else(|| tok_err(format!("'{t}' is not in the vocabulary")))
        })
        .collect::<Result<_>>()?;
    tokens.sort_by_key(|&(_, i)| i);
    let mut out: BTreeMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(new, &(t, _))| (t, new))
        .collect();
    for s in specials {
        out.insert(s, out.len());
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let write = |name: &str, text: String| {
        let p = out_dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write(
        "vocab.json",
        serde_json::to_string(&out).map_err(tok_err)? + "\n",
    )?;
    let mut m = String::from("#version: 0.2\n");
    for rank in &kept_merges {
        let (a, b) = &merges[*rank];
        m.push_str(&format!("{a} {b}\n"));
    }
    write("merges.txt", m)?;
    let config = serde_json::json!({
        "tokenizer_class": "CLIPTokenizer", "do_lower_case": true, "model_max_length": 77,
        "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&config).map_err(tok_err)? + "\n",
    )?;
    Ok(out.len())
}
