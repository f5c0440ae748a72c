//! Corpora for training and evaluation: raw bytes (vocabulary 256) or the character-level Penn
//! Treebank format (symbols separated by single spaces, the line end a symbol of its own). In the
//! latter, a `\r\n` line end is a line end like `\n`, and a UTF-8 byte order mark at the start of
//! the file is no symbol, so that a file saved on Windows reads as the same corpus.

use std::collections::BTreeMap;

/// How a corpus file is split into symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Every byte is a token; the vocabulary is 256.
    Bytes,
    /// Character-level PTB: space-separated symbols, newline (`\n` or `\r\n`) a symbol;
    /// vocabulary from the data.
    PtbChar,
}

impl Format {
    /// Parses `bytes` or `ptb-char`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bytes" => Some(Format::Bytes),
            "ptb-char" => Some(Format::PtbChar),
            _ => None,
        }
    }

    /// The name [`Format::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Format::Bytes => "bytes",
            Format::PtbChar => "ptb-char",
        }
    }
}

/// The symbols of a corpus and their token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// Symbol text by token id (empty for byte vocabularies).
    pub symbols: Vec<String>,
    index: BTreeMap<String, u32>,
    /// Vocabulary size.
    pub size: usize,
}

impl Vocab {
    /// The 256 bytes.
    pub fn bytes() -> Self {
        Self { symbols: Vec::new(), index: BTreeMap::new(), size: 256 }
    }

    /// A saved symbol vocabulary (token id = position in `symbols`).
    pub fn from_symbols(symbols: Vec<String>) -> Result<Self, CorpusError> {
        if symbols.is_empty() {
            return Err(CorpusError::BadVocabulary(String::new()));
        }
        let mut index = BTreeMap::new();
        for (i, s) in symbols.iter().enumerate() {
            if index.insert(s.clone(), i as u32).is_some() {
                return Err(CorpusError::BadVocabulary(s.clone()));
            }
        }
        let size = symbols.len();
        Ok(Self { symbols, index, size })
    }
}

/// Why a corpus could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// The corpus has no symbols.
    #[error("the corpus is empty")]
    Empty,
    /// A saved vocabulary lists a symbol twice, or none.
    #[error("a vocabulary needs distinct symbols, at least one; {0:?} is not")]
    BadVocabulary(String),
    /// A symbol of an evaluation file is not in the training vocabulary.
    #[error("symbol {0:?} is not in the model's vocabulary")]
    UnknownSymbol(String),
    /// The file is not UTF-8 (ptb-char only).
    #[error("the corpus is not UTF-8 text: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
}

fn ptb_symbols(text: &str) -> impl Iterator<Item = &str> {
    // Left in, the mark and the `\r`s would become symbols of their own ("c\r" beside "c").
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.split_inclusive('\n').flat_map(|line| {
        let (symbols, newline) = match line.strip_suffix('\n') {
            Some(line) => (line.strip_suffix('\r').unwrap_or(line), Some("\n")),
            None => (line, None),
        };
        symbols.split(' ').filter(|s| !s.is_empty()).chain(newline)
    })
}

/// Tokenizes a training corpus, building its vocabulary.
pub fn tokenize_train(data: &[u8], format: Format) -> Result<(Vec<u32>, Vocab), CorpusError> {
    let (tokens, vocab) = match format {
        Format::Bytes => (data.iter().map(|&b| u32::from(b)).collect(), Vocab::bytes()),
        Format::PtbChar => {
            let text = std::str::from_utf8(data)?;
            let mut index = BTreeMap::new();
            for s in ptb_symbols(text) {
                let next = index.len() as u32;
                index.entry(s.to_string()).or_insert(next);
            }
            // Ids in sorted symbol order, so that the vocabulary does not depend on file order.
            let mut symbols: Vec<String> = index.keys().cloned().collect();
            symbols.sort();
            let index: BTreeMap<String, u32> =
                symbols.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();
            let tokens = ptb_symbols(text).map(|s| index[s]).collect();
            let size = symbols.len();
            (tokens, Vocab { symbols, index, size })
        }
    };
    if Vec::is_empty(&tokens) {
        return Err(CorpusError::Empty);
    }
    Ok((tokens, vocab))
}

/// Tokenizes an evaluation corpus with a training vocabulary.
pub fn tokenize_with(data: &[u8], format: Format, vocab: &Vocab) -> Result<Vec<u32>, CorpusError> {
    let tokens: Vec<u32> = match format {
        Format::Bytes => data.iter().map(|&b| u32::from(b)).collect(),
        Format::PtbChar => {
            let text = std::str::from_utf8(data)?;
            ptb_symbols(text)
                .map(|s| vocab.index.get(s).copied().ok_or_else(|| CorpusError::UnknownSymbol(s.into())))
                .collect::<Result<_, _>>()?
        }
    };
    if tokens.is_empty() {
        return Err(CorpusError::Empty);
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptb_char_splits_on_spaces_and_counts_the_line_end() {
        let data = b"a b _ c\nb a\n";
        let (tokens, vocab) = tokenize_train(data, Format::PtbChar).unwrap();
        assert_eq!(vocab.symbols, vec!["\n", "_", "a", "b", "c"]);
        // a b _ c \n b a \n
        assert_eq!(tokens, vec![2, 3, 1, 4, 0, 3, 2, 0]);
        let eval = tokenize_with(b"c a\n", Format::PtbChar, &vocab).unwrap();
        assert_eq!(eval, vec![4, 2, 0]);
        assert!(
            matches!(tokenize_with(b"z", Format::PtbChar, &vocab), Err(CorpusError::UnknownSymbol(s)) if s == "z")
        );
    }

    /// CRLF line ends and a byte order mark used to make symbols of their own ("c\r", "\u{feff}a").
    #[test]
    fn ptb_char_reads_crlf_line_ends_and_a_bom_as_a_unix_file() {
        let unix = tokenize_train(b"a b _ c\nb a\nc", Format::PtbChar).unwrap();
        let windows = tokenize_train(b"\xef\xbb\xbfa b _ c\r\nb a\r\nc", Format::PtbChar).unwrap();
        assert_eq!(windows, unix);
        assert_eq!(tokenize_with(b"\xef\xbb\xbfc a\r\n", Format::PtbChar, &unix.1).unwrap(), vec![4, 2, 0]);
        // A lone carriage return is text, as before.
        let (_, vocab) = tokenize_train(b"a\rb\n", Format::PtbChar).unwrap();
        assert_eq!(vocab.symbols, vec!["\n", "a\rb"]);
    }

    #[test]
    fn a_saved_vocabulary_tokenizes_as_the_one_it_was_built_as() {
        let (tokens, vocab) = tokenize_train(b"b a _\nc", Format::PtbChar).unwrap();
        let saved = Vocab::from_symbols(vocab.symbols.clone()).unwrap();
        assert_eq!(saved, vocab);
        assert_eq!(tokenize_with(b"b a _\nc", Format::PtbChar, &saved).unwrap(), tokens);
        let twice = vec!["a".to_string(), "b".into(), "a".into()];
        assert!(matches!(Vocab::from_symbols(twice), Err(CorpusError::BadVocabulary(s)) if s == "a"));
        assert!(matches!(Vocab::from_symbols(Vec::new()), Err(CorpusError::BadVocabulary(_))));
    }

    #[test]
    fn format_names_parse_back() {
        for f in [Format::Bytes, Format::PtbChar] {
            assert_eq!(Format::parse(f.name()), Some(f));
        }
    }

    #[test]
    fn bytes_are_tokens() {
        let (t, v) = tokenize_train(b"hi\n", Format::Bytes).unwrap();
        assert_eq!(t, vec![104, 105, 10]);
        assert_eq!(v.size, 256);
        assert!(matches!(tokenize_train(b"", Format::Bytes), Err(CorpusError::Empty)));
    }
}
