//! The witness's book of grants: for each (pair, resource), which node holds the right to serve
//! alone from which data generation. Pure: no files here, only the text the server writes
//! (see [`Book::to_text`]) and reads back at start.
//!
//! The book keeps the newest [`HISTORY`] grants of each resource. A claim from a generation that
//! has dropped out of it would be granted afresh; a pair goes through that many failovers
//! only over years, and each one moves both nodes to the newer generation at their next resync.

use std::collections::{BTreeMap, VecDeque};

use crate::wire::witness::Verdict;

/// Grants kept per resource.
pub const HISTORY: usize = 1024;

/// First line of the book's file: the format and its version.
const HEADER: &str = "twinblade-witness-book 1";

/// What the book says to a claim or a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Granted (to the asking node), held (by another) or free (a query nobody's claim answered).
    pub verdict: Verdict,
    /// Who holds the grant: the asking node when granted or free.
    pub holder: String,
    /// Whether the book changed (and must be on disk before the answer goes out).
    pub changed: bool,
}

/// A line of the book's file that does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct BookError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

/// The grants, oldest first per resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Book {
    grants: BTreeMap<(String, String), VecDeque<(u64, String)>>,
}

impl Book {
    /// `node` claims `resource` of `pair` from `generation`: the first claim for a generation
    /// is granted, every later one gets the first claimant's name.
    pub fn claim(&mut self, pair: &str, resource: &str, node: &str, generation: u64) -> Outcome {
        let grants = self
            .grants
            .entry((pair.to_string(), resource.to_string()))
            .or_default();
        if let Some((_, holder)) = grants.iter().find(|(g, _)| *g == generation) {
            let verdict = if holder == node {
                Verdict::Granted
            } else {
                Verdict::Held
            };
            return Outcome {
                verdict,
                holder: holder.clone(),
                changed: false,
            };
        }
        grants.push_back((generation, node.to_string()));
        while grants.len() > HISTORY {
            grants.pop_front();
        }
        Outcome {
            verdict: Verdict::Granted,
            holder: node.to_string(),
            changed: true,
        }
    }

    /// Who holds `resource` of `pair` from `generation`, if anybody (`Free` names nobody: the
    /// holder field is empty then).
    pub fn query(&self, pair: &str, resource: &str, generation: u64) -> Outcome {
        let holder = self
            .grants
            .get(&(pair.to_string(), resource.to_string()))
            .and_then(|grants| grants.iter().find(|(g, _)| *g == generation));
        match holder {
            Some((_, node)) => Outcome {
                verdict: Verdict::Held,
                holder: node.clone(),
                changed: false,
            },
            None => Outcome {
                verdict: Verdict::Free,
                holder: String::new(),
                changed: false,
            },
        }
    }

    /// Number of grants held, over every pair and resource.
    pub fn len(&self) -> usize {
        self.grants.values().map(VecDeque::len).sum()
    }

    /// Whether the book holds no grant.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The book as the text the server keeps on disk: a header line, then one line per grant,
    /// `grant PAIR RESOURCE GENERATION NODE`, the generation as 16 hex digits.
    pub fn to_text(&self) -> String {
        let mut text = format!("{HEADER}\n");
        for ((pair, resource), grants) in &self.grants {
            for (generation, node) in grants {
                text.push_str(&format!(
                    "grant {pair} {resource} {generation:016X} {node}\n"
                ));
            }
        }
        text
    }

    /// Reads what [`to_text`](Self::to_text) wrote. Anything else is an error naming the line:
    /// a witness that cannot read its book must not answer from an empty one.
    pub fn from_text(text: &str) -> Result<Book, BookError> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, HEADER)) => {}
            _ => {
                return Err(BookError {
                    line: 1,
                    problem: format!("expected the header {HEADER:?}"),
                })
            }
        }
        let mut book = Book::default();
        for (index, line) in lines {
            let error = |problem: &str| BookError {
                line: index + 1,
                problem: problem.to_string(),
            };
            let words: Vec<&str> = line.split(' ').collect();
            let [word, pair, resource, generation, node] = words[..] else {
                return Err(error("expected `grant PAIR RESOURCE GENERATION NODE`"));
            };
            if word != "grant" || [pair, resource, node].iter().any(|w| w.is_empty()) {
                return Err(error("expected `grant PAIR RESOURCE GENERATION NODE`"));
            }
            let generation = u64::from_str_radix(generation, 16)
                .map_err(|_| error("the generation is not 16 hex digits"))?;
            let outcome = book.claim(pair, resource, node, generation);
            if !outcome.changed {
                return Err(error("a second grant for one generation"));
            }
        }
        Ok(book)
    }
}

/// Whether `name` can stand in the book's file and in a datagram: 1..=64 bytes, no
/// whitespace or control characters.
pub fn is_book_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::wire::witness::MAX_NAME_LEN
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_claim_of_a_generation_wins_and_every_later_one_hears_its_name() {
        let mut book = Book::default();
        let first = book.claim("lab", "r0", "beta", 7);
        assert_eq!(
            (first.verdict, first.holder.as_str(), first.changed),
            (Verdict::Granted, "beta", true)
        );
        let second = book.claim("lab", "r0", "alpha", 7);
        assert_eq!(
            (second.verdict, second.holder.as_str(), second.changed),
            (Verdict::Held, "beta", false)
        );
        let again = book.claim("lab", "r0", "beta", 7);
        assert_eq!((again.verdict, again.changed), (Verdict::Granted, false));
        // The winner's next generation is free for whoever claims it first.
        assert_eq!(
            book.claim("lab", "r0", "alpha", 8).verdict,
            Verdict::Granted
        );
    }

    #[test]
    fn pairs_and_resources_are_apart() {
        let mut book = Book::default();
        assert_eq!(
            book.claim("lab", "r0", "alpha", 1).verdict,
            Verdict::Granted
        );
        assert_eq!(book.claim("lab", "r1", "beta", 1).verdict, Verdict::Granted);
        assert_eq!(
            book.claim("prod", "r0", "beta", 1).verdict,
            Verdict::Granted
        );
        assert_eq!(book.query("lab", "r0", 1).holder, "alpha");
        assert_eq!(book.query("lab", "r0", 2).verdict, Verdict::Free);
    }

    #[test]
    fn a_query_changes_nothing() {
        let mut book = Book::default();
        assert_eq!(book.query("lab", "r0", 1).verdict, Verdict::Free);
        assert!(book.is_empty());
        book.claim("lab", "r0", "alpha", 1);
        assert_eq!(book.query("lab", "r0", 1).verdict, Verdict::Held);
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn the_history_is_bounded() {
        let mut book = Book::default();
        for generation in 0..(HISTORY as u64 + 10) {
            book.claim("lab", "r0", "alpha", generation);
        }
        assert_eq!(book.len(), HISTORY);
        assert_eq!(book.query("lab", "r0", HISTORY as u64 + 9).holder, "alpha");
    }

    #[test]
    fn the_file_reads_back_and_refuses_what_it_never_wrote() {
        let mut book = Book::default();
        book.claim("lab", "r0", "alpha", 0xDEAD_BEEF);
        book.claim("lab", "r1", "beta", 1);
        let text = book.to_text();
        assert_eq!(
            text,
            "twinblade-witness-book 1\ngrant lab r0 00000000DEADBEEF alpha\ngrant lab r1 0000000000000001 beta\n"
        );
        assert_eq!(Book::from_text(&text), Ok(book));
        assert_eq!(Book::from_text("").unwrap_err().line, 1);
        let bad = "twinblade-witness-book 1\ngrant lab r0 xyz alpha\n";
        assert_eq!(Book::from_text(bad).unwrap_err().line, 2);
        let twice = "twinblade-witness-book 1\ngrant lab r0 01 alpha\ngrant lab r0 01 beta\n";
        assert!(Book::from_text(twice)
            .unwrap_err()
            .problem
            .contains("second grant"));
        assert!(Book::from_text("twinblade-witness-book 1\ngrant lab r0 01\n").is_err());
    }

    #[test]
    fn book_names_exclude_what_the_file_cannot_hold() {
        assert!(is_book_name("alpha"));
        assert!(!is_book_name(""));
        assert!(!is_book_name("al pha"));
        assert!(!is_book_name("a\nb"));
        assert!(!is_book_name(&"x".repeat(65)));
    }

    proptest! {
        #[test]
        fn no_generation_ever_has_two_holders(claims in proptest::collection::vec(any::<u8>(), 0..300)) {
            crate::ha::witness::fuzz_book(&claims);
        }
    }
}
