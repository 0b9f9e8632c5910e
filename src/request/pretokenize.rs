//! TEMPORARY STUB (branch `bpe`): HF's own Split pre-tokenizer behind the interface the `pretok`
//! branch implements; deleted when that branch is merged.

use std::sync::OnceLock;

use tokenizers::{
    pre_tokenizers::split::{Split, SplitPattern as HfPattern},
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPattern {
    Qwen2,
    Llama3,
}

const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl SplitPattern {
    pub fn from_regex(regex: &str) -> Option<SplitPattern> {
        match regex {
            QWEN2 => Some(SplitPattern::Qwen2),
            LLAMA3 => Some(SplitPattern::Llama3),
            _ => None,
        }
    }
}

pub fn split(pattern: SplitPattern, text: &str, mut piece: impl FnMut(&str)) {
    static SPLITS: OnceLock<[Split; 2]> = OnceLock::new();
    let splits = SPLITS.get_or_init(|| {
        [QWEN2, LLAMA3].map(|r| Split::new(HfPattern::Regex(r.into()), SplitDelimiterBehavior::Isolated, false).unwrap())
    });
    let mut pre = PreTokenizedString::from(text);
    splits[pattern as usize].pre_tokenize(&mut pre).unwrap();
    for (s, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        piece(s);
    }
}
