//! The paper's perturbations of reasoning traces (Table 2): only the thought block of assistant
//! turns (between `<|begin_of_thought|>` and `<|end_of_thought|>`) changes; the system prompt, the
//! user turns and the solution block stay byte for byte. The one exception is digit corruption with
//! [`Scope::Response`] (the default of the authors' released number corruption), which changes the
//! whole assistant turn.
//!
//! Steps are the thought block's paragraphs (Sky-T1 separates them with blank lines), and the
//! separators between them are kept as they were. Every row draws from its own random stream
//! (ChaCha8, stream = row index), so a row's result depends only on the seed and its index.
use super::dataset::{Dataset, Role};
use anyhow::{bail, Context, Result};
use rand::seq::index::sample;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use regex::Regex;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::LazyLock;

pub const BEGIN_THOUGHT: &str = "<|begin_of_thought|>";
pub const END_THOUGHT: &str = "<|end_of_thought|>";

/// Blank lines (possibly holding spaces) between paragraphs.
pub const DEFAULT_STEP_SEPARATOR: &str = r"\n(?:[ \t]*\n)+";

/// Reflection keywords whose sentences the `keywords` perturbation removes.
pub const DEFAULT_KEYWORDS: &[&str] = &[
    "wait",
    "alternatively",
    "hmm",
    "let me think again",
    "but",
    "however",
    "actually",
    "hold on",
    "on second thought",
    "let me check",
    "let me verify",
    "double-check",
    "double check",
    "let me recheck",
    "let me re-examine",
    "let me reconsider",
];

/// What to do to the steps of each thought block.
#[derive(Clone, Debug)]
pub enum Perturbation {
    /// Permute round(F × n) randomly chosen steps among their positions (a derangement).
    Shuffle,
    /// Remove round(F × n) randomly chosen steps; the rest keep their order.
    Delete,
    /// Replace round(F × n) randomly chosen steps by steps drawn from the pool.
    Insert(StepPool),
    /// Corrupt each digit (or each whole number) with probability F, in the thought block or the
    /// whole assistant turn.
    Digits { mode: DigitsMode, scope: Scope },
    /// Remove round(F × k) of the k sentences that contain a reflection keyword.
    Keywords(KeywordMatcher),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigitsMode {
    /// Each digit becomes a different random digit (the paper's description).
    Digit,
    /// Each number the released `corrupt_data.py` finds ([`numbers`]) becomes a random integer
    /// 0..=10, as that script does.
    Number,
}

impl DigitsMode {
    /// Where each mode corrupts unless told otherwise: the paper's text says thought block, the
    /// released script (number mode) corrupts the whole assistant turn, boxed answer included.
    pub fn default_scope(self) -> Scope {
        match self {
            DigitsMode::Digit => Scope::Thought,
            DigitsMode::Number => Scope::Response,
        }
    }
}

/// The part of each assistant turn a perturbation changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The text between the thought tags; turns without a thought block are left alone.
    Thought,
    /// The whole assistant turn (thought and solution blocks, tags included).
    Response,
}

impl Scope {
    /// The byte range of `content` (an assistant turn) this scope changes.
    fn range(self, content: &str) -> Option<Range<usize>> {
        match self {
            Scope::Thought => thought_range(content),
            Scope::Response => Some(0..content.len()),
        }
    }
}

impl Perturbation {
    /// Which part of the assistant turns this perturbation changes.
    pub fn scope(&self) -> Scope {
        match self {
            Perturbation::Digits { scope, .. } => *scope,
            _ => Scope::Thought,
        }
    }
}

/// Splits a thought block into steps at a separator pattern.
#[derive(Clone, Debug)]
pub struct StepSplitter {
    separator: Regex,
}

impl StepSplitter {
    pub fn new(separator: &str) -> Result<Self> {
        let separator = Regex::new(separator)
            .with_context(|| format!("invalid step separator {separator:?}"))?;
        if separator.is_match("") {
            bail!(
                "the step separator {:?} matches the empty string",
                separator.as_str()
            );
        }
        Ok(StepSplitter { separator })
    }

    /// Steps are the pieces with some non-space text; whitespace-only pieces join the separators
    /// around them.
    fn split<'a>(&self, text: &'a str) -> Steps<'a> {
        let mut pieces: Vec<Range<usize>> = Vec::new();
        let mut start = 0;
        for separator in self.separator.find_iter(text) {
            pieces.push(start..separator.start());
            start = separator.end();
        }
        pieces.push(start..text.len());
        let steps: Vec<Range<usize>> = pieces
            .into_iter()
            .filter(|piece| !text[piece.clone()].trim().is_empty())
            .collect();
        let Some((first, last)) = steps.first().zip(steps.last()) else {
            return Steps {
                prefix: text,
                steps: Vec::new(),
                separators: Vec::new(),
                suffix: "",
            };
        };
        Steps {
            prefix: &text[..first.start],
            separators: steps
                .windows(2)
                .map(|pair| &text[pair[0].end..pair[1].start])
                .collect(),
            suffix: &text[last.end..],
            steps: steps.iter().map(|step| &text[step.clone()]).collect(),
        }
    }
}

impl Default for StepSplitter {
    fn default() -> Self {
        StepSplitter::new(DEFAULT_STEP_SEPARATOR).expect("default step separator")
    }
}

/// A thought block cut into steps; `separators[i]` follows `steps[i]`.
struct Steps<'a> {
    prefix: &'a str,
    steps: Vec<&'a str>,
    separators: Vec<&'a str>,
    suffix: &'a str,
}

impl Steps<'_> {
    /// Re-joins the slots of the steps listed in `kept` (increasing; all of them unless steps were
    /// removed), each slot's text given by `content(slot, step)`. A slot is followed by the
    /// separator that followed its step, so the original separators stay in place.
    fn join(&self, kept: &[usize], content: impl Fn(usize, usize) -> String) -> String {
        let mut text = self.prefix.to_string();
        for (slot, &step) in kept.iter().enumerate() {
            text.push_str(&content(slot, step));
            if slot + 1 < kept.len() {
                text.push_str(self.separators[step]);
            }
        }
        text.push_str(self.suffix);
        text
    }
}

/// Steps to insert, with the row each came from so that a row never receives its own steps.
#[derive(Clone, Debug, Default)]
pub struct StepPool {
    steps: Vec<String>,
    /// For a pool built from the dataset being perturbed: the range of `steps` taken from each
    /// row, by row index.
    own_steps: HashMap<usize, Range<usize>>,
}

impl StepPool {
    /// The thought-block steps of every row of `dataset`; `exclude_own_row` for the dataset
    /// being perturbed itself.
    pub fn from_dataset(dataset: &Dataset, splitter: &StepSplitter, exclude_own_row: bool) -> Self {
        let mut pool = StepPool::default();
        for row in dataset.rows() {
            let start = pool.steps.len();
            for turn in &row.conversation().turns {
                if let (Role::Assistant, Some(range)) = (turn.role, thought_range(&turn.content)) {
                    let steps = splitter.split(&turn.content[range]);
                    pool.steps.extend(steps.steps.iter().map(|s| s.to_string()));
                }
            }
            if exclude_own_row {
                pool.own_steps.insert(row.index(), start..pool.steps.len());
            }
        }
        pool
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// A uniformly random step not taken from `row`.
    fn draw(&self, rng: &mut ChaCha8Rng, row: usize) -> Option<&str> {
        let own = self.own_steps.get(&row).cloned().unwrap_or(0..0);
        let eligible = self.steps.len() - own.len();
        if eligible == 0 {
            return None;
        }
        let mut k = rng.gen_range(0..eligible);
        if k >= own.start {
            k += own.len();
        }
        Some(&self.steps[k])
    }
}

/// Finds sentences holding a reflection keyword (case-insensitive, whole words).
#[derive(Clone, Debug)]
pub struct KeywordMatcher {
    pattern: Regex,
}

impl KeywordMatcher {
    pub fn new<S: AsRef<str>>(keywords: &[S]) -> Result<Self> {
        let alternatives: Vec<String> = keywords
            .iter()
            .map(|k| k.as_ref().trim())
            .filter(|k| !k.is_empty())
            .map(|k| {
                k.split_whitespace()
                    .map(regex::escape)
                    .collect::<Vec<_>>()
                    .join(r"\s+")
            })
            .collect();
        if alternatives.is_empty() {
            bail!("no keywords given");
        }
        let pattern = Regex::new(&format!(r"(?i)\b(?:{})\b", alternatives.join("|")))?;
        Ok(KeywordMatcher { pattern })
    }

    /// One keyword per line; blank lines are ignored.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let keywords: Vec<&str> = text.lines().collect();
        KeywordMatcher::new(&keywords)
            .with_context(|| format!("in keyword file {}", path.display()))
    }

    pub fn matches(&self, sentence: &str) -> bool {
        self.pattern.is_match(sentence)
    }
}

impl Default for KeywordMatcher {
    fn default() -> Self {
        KeywordMatcher::new(DEFAULT_KEYWORDS).expect("default keywords")
    }
}

/// Byte range of the text between the thought tags, when the turn has a thought block.
pub fn thought_range(content: &str) -> Option<Range<usize>> {
    let start = content.find(BEGIN_THOUGHT)? + BEGIN_THOUGHT.len();
    let end = start + content[start..].find(END_THOUGHT)?;
    Some(start..end)
}

/// A perturbation with its strength and seed.
#[derive(Clone, Debug)]
pub struct Perturber {
    pub perturbation: Perturbation,
    /// F: the fraction of steps (or keyword sentences) changed, or the per-digit probability.
    pub fraction: f64,
    pub seed: u64,
    pub splitter: StepSplitter,
}

/// What a perturbation run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerturbSummary {
    pub rows: usize,
    /// Rows whose text changed.
    pub perturbed: usize,
    /// Rows with text in scope that came out unchanged (e.g. round(F × n) = 0).
    pub unchanged: usize,
    /// Rows with nothing in scope (no thought block, or no assistant turn), written as they were.
    pub passed_through: usize,
    /// Steps (paragraphs) of the text in scope over all rows, before and after.
    pub steps_before: usize,
    pub steps_after: usize,
}

impl PerturbSummary {
    /// Mean steps per row with text in scope (before, after).
    pub fn mean_steps(&self) -> (f64, f64) {
        let rows = (self.perturbed + self.unchanged).max(1) as f64;
        (
            self.steps_before as f64 / rows,
            self.steps_after as f64 / rows,
        )
    }
}

impl Perturber {
    /// Perturbs every row of `dataset` in place.
    pub fn apply(&self, dataset: &mut Dataset) -> Result<PerturbSummary> {
        if !(0.0..=1.0).contains(&self.fraction) {
            bail!(
                "the fraction must be between 0 and 1, not {}",
                self.fraction
            );
        }
        let mut summary = PerturbSummary {
            rows: dataset.len(),
            ..PerturbSummary::default()
        };
        let path = dataset.path().display().to_string();
        let scope = self.perturbation.scope();
        for row in dataset.rows_mut() {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(row.index() as u64);
            let (mut in_scope, mut changed) = (false, false);
            for turn in 0..row.conversation().turns.len() {
                let message = &row.conversation().turns[turn];
                let range = match (message.role, scope.range(&message.content)) {
                    (Role::Assistant, Some(range)) => range,
                    _ => continue,
                };
                in_scope = true;
                let content = &message.content;
                let (thought, before, after) = self
                    .perturb_text(&content[range.clone()], row.index(), &mut rng)
                    .with_context(|| format!("{path}:{}: row {}", row.line(), row.index()))?;
                summary.steps_before += before;
                summary.steps_after += after;
                if thought != content[range.clone()] {
                    let new_content = format!(
                        "{}{thought}{}",
                        &content[..range.start],
                        &content[range.end..]
                    );
                    row.set_turn_content(turn, new_content);
                    changed = true;
                }
            }
            match (in_scope, changed) {
                (false, _) => summary.passed_through += 1,
                (true, true) => summary.perturbed += 1,
                (true, false) => summary.unchanged += 1,
            }
        }
        Ok(summary)
    }

    /// The perturbed text (the part of a turn in scope) and its step count before and after.
    fn perturb_text(
        &self,
        text: &str,
        row: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<(String, usize, usize)> {
        let steps = self.splitter.split(text);
        let n = steps.steps.len();
        let all: Vec<usize> = (0..n).collect();
        let perturbed = match &self.perturbation {
            Perturbation::Shuffle => {
                let positions = choose(n, self.fraction, rng);
                let order = derangement(positions.len(), rng);
                let mut source = all.clone();
                for (slot, &from) in order.iter().enumerate() {
                    source[positions[slot]] = positions[from];
                }
                steps.join(&all, |slot, _| steps.steps[source[slot]].to_string())
            }
            Perturbation::Delete => {
                let deleted = choose(n, self.fraction, rng);
                let kept: Vec<usize> = all
                    .iter()
                    .copied()
                    .filter(|i| deleted.binary_search(i).is_err())
                    .collect();
                steps.join(&kept, |_, original| steps.steps[original].to_string())
            }
            Perturbation::Insert(pool) => {
                let replaced = choose(n, self.fraction, rng);
                let mut contents: Vec<String> = steps.steps.iter().map(|s| s.to_string()).collect();
                for &position in &replaced {
                    let Some(step) = pool.draw(rng, row) else {
                        bail!("the insert pool has no steps from other rows");
                    };
                    contents[position] = step.to_string();
                }
                steps.join(&all, |slot, _| contents[slot].clone())
            }
            Perturbation::Digits { mode, .. } => corrupt_digits(text, *mode, self.fraction, rng),
            Perturbation::Keywords(matcher) => {
                remove_keyword_sentences(&steps, matcher, self.fraction, rng)
            }
        };
        let after = self.splitter.split(&perturbed).steps.len();
        Ok((perturbed, n, after))
    }
}

/// round(F × n) distinct positions out of n, in increasing order.
fn choose(n: usize, fraction: f64, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let count = ((fraction * n as f64).round() as usize).min(n);
    let mut positions = sample(rng, n, count).into_vec();
    positions.sort_unstable();
    positions
}

/// A random permutation of 0..k with no fixed point (k ≥ 2), by rejection: each try succeeds
/// with probability about 1/e.
fn derangement(k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..k).collect();
    if k < 2 {
        return order;
    }
    loop {
        order.shuffle(rng);
        if order.iter().enumerate().all(|(i, &j)| i != j) {
            return order;
        }
    }
}

fn corrupt_digits(text: &str, mode: DigitsMode, probability: f64, rng: &mut ChaCha8Rng) -> String {
    match mode {
        DigitsMode::Digit => text
            .chars()
            .map(|c| match c.to_digit(10) {
                Some(digit) if rng.gen_bool(probability) => {
                    // A different digit: one of the other nine.
                    let other = (digit + rng.gen_range(1..10)) % 10;
                    char::from_digit(other, 10).expect("digit")
                }
                _ => c,
            })
            .collect(),
        DigitsMode::Number => {
            let mut out = String::with_capacity(text.len());
            let mut end = 0;
            for number in numbers(text) {
                out.push_str(&text[end..number.start]);
                if rng.gen_bool(probability) {
                    // str(random.randint(0, 10)): both ends included.
                    out.push_str(&rng.gen_range(0..=10).to_string());
                } else {
                    out.push_str(&text[number.clone()]);
                }
                end = number.end;
            }
            out.push_str(&text[end..]);
            out
        }
    }
}

/// The released `corrupt_data.py`'s pattern `\b\d+(\.\d+)?\b`, run by Python's `regex` module.
/// Both engines read `\d` as any Unicode decimal digit (Nd) and `\b` as a boundary between a word
/// character (letter, mark, Nd digit, connector punctuation, joiner) and anything else, and both
/// try the decimal part before doing without it, so a decimal is one number and `3.14a` is `3`
/// (tests/fixtures/number_pattern.json holds the `regex` module's own matches).
static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d+(?:\.\d+)?\b").expect("number pattern"));

/// The byte ranges of the numbers in `text` that `--digits-mode number` corrupts.
pub fn numbers(text: &str) -> impl Iterator<Item = Range<usize>> + '_ {
    NUMBER.find_iter(text).map(|m| m.range())
}

/// A sentence ends at `.`, `!` or `?` (with closing quotes or brackets) before spaces, or at a
/// line break; the gap after it belongs to neither sentence.
static SENTENCE_GAP: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"[.!?]+["')\]]*([ \t]+)|(\n[ \t\n]*)"#).expect("sentence pattern")
});

/// Sentences of `text` as (sentence, gap after it) byte ranges.
fn sentences(text: &str) -> Vec<(Range<usize>, Range<usize>)> {
    let mut sentences = Vec::new();
    let mut start = 0;
    for caps in SENTENCE_GAP.captures_iter(text) {
        let gap = caps
            .get(1)
            .or_else(|| caps.get(2))
            .expect("one gap group matches");
        if gap.start() > start {
            sentences.push((start..gap.start(), gap.range()));
        }
        start = gap.end();
    }
    if start < text.len() {
        sentences.push((start..text.len(), text.len()..text.len()));
    }
    sentences
}

fn remove_keyword_sentences(
    steps: &Steps,
    matcher: &KeywordMatcher,
    fraction: f64,
    rng: &mut ChaCha8Rng,
) -> String {
    let split: Vec<Vec<(Range<usize>, Range<usize>)>> =
        steps.steps.iter().map(|step| sentences(step)).collect();
    // Every keyword sentence as (step, sentence index).
    let candidates: Vec<(usize, usize)> = split
        .iter()
        .enumerate()
        .flat_map(|(step, sentences)| {
            sentences
                .iter()
                .enumerate()
                .filter(move |(_, (range, _))| matcher.matches(&steps.steps[step][range.clone()]))
                .map(move |(i, _)| (step, i))
        })
        .collect();
    let count = ((fraction * candidates.len() as f64).round() as usize).min(candidates.len());
    let mut removed: Vec<(usize, usize)> = sample(rng, candidates.len(), count)
        .into_iter()
        .map(|i| candidates[i])
        .collect();
    removed.sort_unstable();

    let new_steps: Vec<String> = split
        .iter()
        .enumerate()
        .map(|(step, sentences)| {
            let text = steps.steps[step];
            let kept: Vec<&(Range<usize>, Range<usize>)> = sentences
                .iter()
                .enumerate()
                .filter(|(i, _)| removed.binary_search(&(step, *i)).is_err())
                .map(|(_, sentence)| sentence)
                .collect();
            if kept.len() == sentences.len() {
                return text.to_string();
            }
            // Each kept sentence keeps the gap that followed it, except the last one kept.
            let mut out = String::new();
            for (k, (sentence, gap)) in kept.iter().enumerate() {
                out.push_str(&text[sentence.clone()]);
                if k + 1 < kept.len() {
                    out.push_str(&text[gap.clone()]);
                }
            }
            out
        })
        .collect();
    // A step whose every sentence went is removed with its separator.
    let kept: Vec<usize> = (0..new_steps.len())
        .filter(|&i| !new_steps[i].trim().is_empty())
        .collect();
    steps.join(&kept, |_, original| new_steps[original].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_keeping_separators() {
        let splitter = StepSplitter::default();
        let text = "\n\nfirst\n\nsecond\n \n\nthird\n\n";
        let steps = splitter.split(text);
        assert_eq!(steps.steps, vec!["first", "second", "third"]);
        assert_eq!(steps.separators, vec!["\n\n", "\n \n\n"]);
        assert_eq!((steps.prefix, steps.suffix), ("\n\n", "\n\n"));
        assert_eq!(
            steps.join(&[0, 1, 2], |_, i| steps.steps[i].to_string()),
            text
        );
        assert_eq!(
            steps.join(&[0, 2], |_, i| steps.steps[i].to_string()),
            "\n\nfirst\n\nthird\n\n"
        );
        assert_eq!(
            steps.join(&[], |_, i| steps.steps[i].to_string()),
            "\n\n\n\n"
        );
    }

    #[test]
    fn sentences_and_gaps() {
        let text = "One. Wait, two? Three\nFour.";
        let found: Vec<&str> = sentences(text).into_iter().map(|(s, _)| &text[s]).collect();
        assert_eq!(found, vec!["One.", "Wait, two?", "Three", "Four."]);
    }

    #[test]
    fn keyword_words_are_whole_and_case_insensitive() {
        let matcher = KeywordMatcher::default();
        assert!(matcher.matches("WAIT, that is wrong."));
        assert!(matcher.matches("Let me  double-check this."));
        assert!(!matcher.matches("The butter is awaiting."));
    }
}
