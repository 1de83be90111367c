//! Tokenizer ids against transformers on the real vocabularies (golden ids written by
//! `tools/make_fixtures.py`): CLIP BPE built from `vocab.json` + `merges.txt` with both pad tokens
//! (2.1 `!`, 2.2 `<|endoftext|>`), and XLM-R's 250,002 Unigram pieces.

mod common;

use candle_core::Device;
use common::fixtures;
use kandinsky::tokenization::PromptTokenizer;
use std::io::Read;

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("tokenizers/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn check(tok: &PromptTokenizer, case: &serde_json::Value, prompts: &[String]) {
    let ids = rows(&case["input_ids"]);
    let mask = rows(&case["attention_mask"]);
    for (i, p) in prompts.iter().enumerate() {
        let (our_ids, our_mask) = tok.encode_one(p).unwrap();
        assert_eq!(our_ids, ids[i], "ids of {p:?}");
        assert_eq!(our_mask, mask[i], "mask of {p:?}");
    }
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let batch = tok.encode(&refs, &Device::Cpu).unwrap();
    assert_eq!(batch.input_ids.to_vec2::<u32>().unwrap(), ids);
}

fn prompts(g: &serde_json::Value) -> Vec<String> {
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn clip_from_dir_pads_with_exclamation() {
    let g = golden();
    assert_eq!(g["clip_pad_exclamation"]["pad_token"], "!");
    let tok = PromptTokenizer::clip_from_dir(&fixtures().join("tokenizers/clip")).unwrap();
    check(&tok, &g["clip_pad_exclamation"], &prompts(&g));
}

#[test]
fn clip_from_files_pads_with_eos() {
    let g = golden();
    let dir = fixtures().join("tokenizers/clip");
    let tok = PromptTokenizer::clip_from_files(
        &dir.join("vocab.json"),
        &dir.join("merges.txt"),
        "<|endoftext|>",
        77,
    )
    .unwrap();
    check(&tok, &g["clip_pad_eos"], &prompts(&g));
    let (ids, _) = tok.encode_one("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
}

/// Builds the XLM-R tokenizer the way transformers' `XLMRobertaTokenizer(vocab=pieces)` does
/// (Unigram, whitespace split, metaspace with a prefix, no SentencePiece charsmap), saves it as
/// `tokenizer.json` and loads it through the production path.
#[test]
fn xlm_roberta_real_pieces() {
    use tokenizers::models::unigram::Unigram;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    use tokenizers::{AddedToken, Tokenizer};

    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(fixtures().join("tokenizers/xlm_roberta/pieces.tsv.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let vocab: Vec<(String, f64)> = text
        .lines()
        .map(|l| {
            let (p, s) = l.rsplit_once('\t').unwrap();
            (p.to_string(), s.parse().unwrap())
        })
        .collect();
    assert_eq!(vocab.len(), 250_002);
    let mut tok = Tokenizer::new(Unigram::from(vocab, Some(3), false).unwrap());
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    tok.add_special_tokens(
        ["<s>", "<pad>", "</s>", "<unk>", "<mask>"].map(|t| AddedToken::from(t, true)),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path().join("tokenizer.json"), false).unwrap();

    let tok = PromptTokenizer::xlm_roberta_from_dir(dir.path()).unwrap();
    let g = golden();
    check(&tok, &g["xlm_roberta"], &prompts(&g));
}
