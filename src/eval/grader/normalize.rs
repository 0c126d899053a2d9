//! Answer normalisation, step for step the harness's `strip_string`: Qwen2.5-Math's `parser.py` as
//! SkyThought ships it (skythought/Qwen2.5-Math/evaluation), which adds five steps to upstream's:
//! number words in `\text{}`, `cm}^2`, backslashes before integers, "thgrade", sorted integer lists.
//!
//! The order of the steps matters and some of them are odd (unit words are removed from anywhere in
//! the answer, so `\pm` loses its `pm`); they are kept because agreeing with the harness's verdicts is
//! the point. See docs/eval.md.
use regex::Regex;
use std::sync::LazyLock;

/// Unit words the harness removes (mainly from MathQA). They are regex fragments, not literals:
/// `"q ."` matches `q` + space + any character, exactly as in the harness.
const UNIT_TEXTS: &[&str] = &[
    "east",
    "degree",
    "mph",
    "kmph",
    "ft",
    "m sqaure",
    " m east",
    "sq m",
    "deg",
    "mile",
    "q .",
    "monkey",
    "prime",
    "ratio",
    "profit of rs",
    "rd",
    "o",
    "gm",
    "p . m",
    "lb",
    "tile",
    "per",
    "dm",
    "lt",
    "gain",
    "ab",
    "way",
    "west",
    "a .",
    "b .",
    "c .",
    "d .",
    "e .",
    "f .",
    "g .",
    "h .",
    "t",
    "a",
    "h",
    "no change",
    "men",
    "soldier",
    "pie",
    "bc",
    "excess",
    "st",
    "inches",
    "noon",
    "percent",
    "by",
    "gal",
    "kmh",
    "c",
    "acre",
    "rise",
    "a . m",
    "th",
    "π r 2",
    "sq",
    "mark",
    "l",
    "toy",
    "coin",
    "sq . m",
    "gallon",
    "° f",
    "profit",
    "minw",
    "yr",
    "women",
    "feet",
    "am",
    "pm",
    "hr",
    "cu cm",
    "square",
    "v â € ™",
    "are",
    "rupee",
    "rounds",
    "cubic",
    "cc",
    "mtr",
    "s",
    "ohm",
    "number",
    "kmph",
    "day",
    "hour",
    "minute",
    "min",
    "second",
    "man",
    "woman",
    "sec",
    "cube",
    "mt",
    "sq inch",
    "mp",
    "∏ cm ³",
    "hectare",
    "more",
    "sec",
    "unit",
    "cu . m",
    "cm 2",
    "rs .",
    "rs",
    "kg",
    "g",
    "month",
    "km",
    "m",
    "cm",
    "mm",
    "apple",
    "liter",
    "loss",
    "yard",
    "pure",
    "year",
    "increase",
    "decrease",
    "d",
    "less",
    "Surface",
    "litre",
    "pi sq m",
    "s .",
    "metre",
    "meter",
    "inch",
];

/// One regex per unit word, then per plural (`word + "s"`), in the harness's order.
static UNIT_PATTERNS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    let singular = UNIT_TEXTS.iter().map(|unit| unit.to_string());
    let plural = UNIT_TEXTS.iter().map(|unit| format!("{unit}s"));
    singular
        .chain(plural)
        .map(|unit| Regex::new(&format!(r"(^|\W){unit}($|\W)")).expect("unit pattern"))
        .collect()
});

macro_rules! regex {
    ($name:ident, $pattern:expr) => {
        static $name: LazyLock<Regex> = LazyLock::new(|| Regex::new($pattern).expect($pattern));
    };
}

regex!(ARRAY_BEGIN, r"\\begin\{array\}\{.*?\}");
regex!(ARRAY_END, r"\\end\{array\}");
regex!(TEXT_WORD, r"\\text\{([a-zA-Z]+)\}");
regex!(SQUARED_UNIT, r"(cm|inches)\}\^2");
regex!(TRAILING_TEXT, r"\\text\{.*?\}$");
regex!(TEXT_COMMAND, r"\\text\{(.*?)\}");
regex!(MBOX, r"\\mbox\{.*?\}");
regex!(ZERO_DECIMALS_INSIDE, r"(\d+)\.0*([^\d])");
regex!(ZERO_DECIMALS_END, r"(\d+)\.0*$");
regex!(SQRT_WITHOUT_BRACES, r"\\sqrt(\w+)");
regex!(INTEGER_AFTER_BACKSLASH, r"^-?\d+(?:\\|\)|,|\]|$)");
regex!(INTEGER_LIST, r"^(?:-?[0-9]+,)*-?[0-9]+$");

/// The harness's `strip_string`. `skip_unit` keeps the MathQA unit words (the harness skips their
/// removal for `minerva_math` and `carp_en`, whose answers hold variables such as `s` and `t`).
pub fn strip_string(answer: &str, skip_unit: bool) -> String {
    let mut s = answer.trim().replace('\n', "");
    s = s.trim_end_matches('.').replace("\\!", "");

    s = ARRAY_BEGIN.replace_all(&s, r"\begin{pmatrix}").into_owned();
    s = ARRAY_END.replace_all(&s, r"\end{pmatrix}").into_owned();
    s = s.replace("bmatrix", "pmatrix");

    s = s.replace("tfrac", "frac").replace("dfrac", "frac");
    s = s
        .replace("\\neq", "\\ne")
        .replace("\\leq", "\\le")
        .replace("\\geq", "\\ge");
    s = s.replace("\\left", "").replace("\\right", "");
    s = s.replace("\\{", "{").replace("\\}", "}");

    // `\text{five}` → `5`; other words stay.
    s = TEXT_WORD
        .replace_all(&s, |caps: &regex::Captures| {
            let word = caps[1].to_lowercase();
            let converted = convert_word_number(&word);
            if converted == word {
                caps[0].to_string()
            } else {
                converted
            }
        })
        .into_owned();
    // A squared unit is still a unit.
    s = SQUARED_UNIT.replace_all(&s, "${1}}").into_owned();

    // A trailing \text{...} is taken to be a unit, unless it is the whole answer.
    let without_unit = TRAILING_TEXT.replace_all(&s, "").trim().to_string();
    if !without_unit.is_empty() && without_unit != s {
        s = without_unit;
    }
    if !skip_unit {
        for _ in 0..2 {
            for pattern in UNIT_PATTERNS.iter() {
                let removed = pattern.replace_all(&s, "${1}${2}");
                if !removed.is_empty() {
                    s = removed.into_owned();
                }
            }
        }
    }

    s = s.replace("^{\\circ}", "").replace("^\\circ", "");
    s = s.replace("\\$", "").replace('$', "");
    s = s.replace("\\(", "").replace("\\)", "");

    s = convert_word_number(&s);

    s = TEXT_COMMAND.replace_all(&s, "${1}").into_owned();
    for key in [
        "x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to",
    ] {
        s = s.replace(key, "");
    }
    s = s.replace("\\emptyset", "{}");
    s = s.replace("(-\\infty,\\infty)", "\\mathbb{R}");

    s = s.replace("\\%", "").replace('%', "");

    s = s.replace(" .", " 0.").replace("{.", "{0.");

    s = s.replace("infinity", "\\infty");
    if !s.contains("\\infty") {
        s = s.replace("inf", "\\infty");
    }
    s = s.replace("+\\inity", "\\infty");

    s = s.replace("and", "").replace("\\mathbf", "");
    s = MBOX.replace_all(&s, "").into_owned();

    if s.contains('j') && !s.contains('i') {
        s = s.replace('j', "i");
    }

    s = ZERO_DECIMALS_INSIDE
        .replace_all(&s, "${1}${2}")
        .into_owned();
    s = ZERO_DECIMALS_END.replace_all(&s, "${1}").into_owned();

    if s.is_empty() {
        return s;
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    }

    // A short left-hand side ("k=", "q=") is dropped.
    let sides: Vec<&str> = s.split('=').collect();
    if sides.len() == 2 && sides[0].chars().count() <= 2 {
        s = sides[1].to_string();
    }

    s = SQRT_WITHOUT_BRACES
        .replace_all(&s, r"\sqrt{${1}}")
        .into_owned();
    s = s.replace(' ', "");
    s = fix_fracs(&s);
    s = fix_a_slash_b(&s);

    s = remove_backslash_before_integers(&s);
    if let Some(rest) = s.strip_suffix("thgrade") {
        s = rest.to_string();
    }
    if INTEGER_LIST.is_match(&s) {
        s = sort_integer_list(&s);
    }
    s
}

/// Drops a backslash directly before an integer that ends at `\`, `)`, `,`, `]` or the end (so a
/// one-column pmatrix `-2\\-14` loses its row breaks, exactly as in the harness).
fn remove_backslash_before_integers(s: &str) -> String {
    let mut kept = String::with_capacity(s.len());
    for (i, c) in s.char_indices() {
        if c == '\\' && INTEGER_AFTER_BACKSLASH.is_match(&s[i + 1..]) {
            continue;
        }
        kept.push(c);
    }
    kept
}

/// "3,-1,2" → "-1,2,3": an unbracketed list of integers is a set of solutions.
fn sort_integer_list(s: &str) -> String {
    let mut integers: Vec<(bool, String)> = s
        .split(',')
        .map(|item| {
            let negative = item.starts_with('-');
            let digits = item.trim_start_matches('-').trim_start_matches('0');
            let digits = if digits.is_empty() { "0" } else { digits };
            (negative && digits != "0", digits.to_string())
        })
        .collect();
    // Arbitrary-size integers, compared as sign, then length, then digits.
    integers.sort_by(|(a_negative, a), (b_negative, b)| {
        let magnitude = a.len().cmp(&b.len()).then_with(|| a.cmp(b));
        match (a_negative, b_negative) {
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            (true, true) => magnitude.reverse(),
            (false, false) => magnitude,
        }
    });
    integers
        .iter()
        .map(|(negative, digits)| {
            if *negative {
                format!("-{digits}")
            } else {
                digits.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `\frac12` → `\frac{1}{2}`, `\frac1{72}` → `\frac{1}{72}`; anything the harness cannot fix is
/// returned unchanged as a whole.
fn fix_fracs(s: &str) -> String {
    let mut pieces = s.split("\\frac");
    let mut fixed = pieces.next().unwrap_or_default().to_string();
    for piece in pieces {
        fixed.push_str("\\frac");
        if piece.starts_with('{') {
            fixed.push_str(piece);
            continue;
        }
        let mut chars = piece.chars();
        let (Some(numerator), Some(next)) = (chars.next(), chars.next()) else {
            return s.to_string();
        };
        let rest = chars.as_str();
        if next == '{' {
            fixed.push_str(&format!("{{{numerator}}}{{{rest}"));
        } else {
            fixed.push_str(&format!("{{{numerator}}}{{{next}}}{rest}"));
        }
    }
    fixed
}

/// `3/4` → `\frac{3}{4}` when both sides are plain integers (or contain a square root).
fn fix_a_slash_b(s: &str) -> String {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() != 2 {
        return s.to_string();
    }
    // Python's int() followed by the round-trip check accepts exactly the canonical integers.
    let canonical_int = |part: &str| {
        let digits = part.strip_prefix('-').unwrap_or(part);
        !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'))
            && part != "-0"
    };
    let ok = |part: &str| part.contains("sqrt") || canonical_int(part);
    if ok(parts[0]) && ok(parts[1]) {
        format!("\\frac{{{}}}{{{}}}", parts[0], parts[1])
    } else {
        s.to_string()
    }
}

/// The `word2number` package's `word_to_num` as the harness calls it: any answer with a number
/// word among its whitespace-separated words becomes that number ("one" → "1"); otherwise the
/// answer is returned unchanged. An all-digit answer loses its leading zeros.
fn convert_word_number(s: &str) -> String {
    word_to_num(s).unwrap_or_else(|| s.to_string())
}

fn number_word_value(word: &str) -> Option<u64> {
    const SMALL: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 8] = [
        "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    if let Some(i) = SMALL.iter().position(|w| *w == word) {
        return Some(i as u64);
    }
    if let Some(i) = TENS.iter().position(|w| *w == word) {
        return Some(20 + 10 * i as u64);
    }
    match word {
        "hundred" => Some(100),
        "thousand" => Some(1_000),
        "million" => Some(1_000_000),
        "billion" => Some(1_000_000_000),
        _ => None,
    }
}

/// word2number's `number_formation`: at most four words like "two hundred thirty four".
fn number_formation(words: &[&str]) -> Option<u64> {
    let n: Vec<u64> = words
        .iter()
        .map(|w| number_word_value(w))
        .collect::<Option<_>>()?;
    match n.len() {
        0 => None,
        4 => Some(n[0] * n[1] + n[2] + n[3]),
        3 => Some(n[0] * n[1] + n[2]),
        2 if n.contains(&100) => Some(n[0] * n[1]),
        2 => Some(n[0] + n[1]),
        _ => Some(n[0]),
    }
}

fn word_to_num(text: &str) -> Option<String> {
    let sentence = text.replace('-', " ").to_lowercase();
    if !sentence.is_empty() && sentence.chars().all(|c| c.is_ascii_digit()) {
        let trimmed = sentence.trim_start_matches('0');
        return Some(if trimmed.is_empty() { "0" } else { trimmed }.to_string());
    }
    let mut words: Vec<&str> = sentence
        .split_whitespace()
        .filter(|w| *w == "point" || number_word_value(w).is_some())
        .collect();
    if words.is_empty() {
        return None;
    }
    let count = |words: &[&str], word: &str| words.iter().filter(|w| **w == word).count();
    if ["thousand", "million", "billion", "point"]
        .iter()
        .any(|word| count(&words, word) > 1)
    {
        return None;
    }
    let mut decimals: Vec<&str> = Vec::new();
    if let Some(point) = words.iter().position(|w| *w == "point") {
        decimals = words.split_off(point + 1);
        words.pop();
    }
    let index = |word: &str| words.iter().position(|w| *w == word);
    let (billion, million, thousand) = (index("billion"), index("million"), index("thousand"));
    let before = |a: Option<usize>, b: Option<usize>| matches!((a, b), (Some(a), Some(b)) if a < b);
    if before(thousand, million) || before(thousand, billion) || before(million, billion) {
        return None;
    }

    let mut total = 0u64;
    if words.len() == 1 {
        total = number_word_value(words[0])?;
    } else if words.len() > 1 {
        if let Some(b) = billion {
            total += number_formation(&words[..b])? * 1_000_000_000;
        }
        if let Some(m) = million {
            let start = billion.map_or(0, |b| b + 1);
            total += number_formation(&words[start..m])? * 1_000_000;
        }
        if let Some(t) = thousand {
            let start = million.or(billion).map_or(0, |i| i + 1);
            total += number_formation(&words[start..t])? * 1_000;
        }
        // The first scale word that is not the last word starts the "hundreds" (word2number's
        // own rule, even when that re-counts a later scale word).
        let last = words.len() - 1;
        let hundreds_start = [thousand, million, billion]
            .into_iter()
            .flatten()
            .find(|&i| i != last)
            .map(|i| i + 1);
        total += match hundreds_start {
            Some(start) => number_formation(&words[start..])?,
            None if thousand.is_none() && million.is_none() && billion.is_none() => {
                number_formation(&words)?
            }
            None => 0,
        };
    }
    if decimals.is_empty() {
        return Some(total.to_string());
    }
    // Python adds a float, so the result prints as a float ("2.5", "3.0").
    let digits: Option<String> = decimals
        .iter()
        .map(|w| {
            number_word_value(w)
                .filter(|v| *v < 10)
                .map(|v| v.to_string())
        })
        .collect();
    let fraction = digits.map_or(0.0, |d| format!("0.{d}").parse().unwrap_or(0.0));
    Some(python_float_repr(total as f64 + fraction))
}

/// Python's `str(float)` for the values word numbers produce: always a decimal point.
fn python_float_repr(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::strip_string;

    fn strip(answer: &str) -> String {
        strip_string(answer, false)
    }

    #[test]
    fn skip_unit_keeps_single_letter_variables() {
        // minerva_math and carp_en: `s`, `t`, `c`, `d`, `m` are variables, not units.
        assert_eq!(strip_string("\\frac{1}{s}", true), "\\frac{1}{s}");
        assert_eq!(strip("\\frac{1}{s}"), "\\frac{1}{}");
        assert_eq!(strip_string("e^{t}", true), "e^{t}");
        assert_eq!(strip("e^{t}"), "e^{}");
        assert_eq!(strip_string("3 c d", true), "3cd");
        // The trailing `\text{...}` unit goes either way.
        assert_eq!(strip_string("5 \\text{ s}", true), "5");
    }

    #[test]
    fn harness_examples() {
        assert_eq!(strip("\\dfrac12"), "\\frac{1}{2}");
        assert_eq!(strip("\\frac1{72}"), "\\frac{1}{72}");
        assert_eq!(strip("3/4"), "\\frac{3}{4}");
        assert_eq!(strip("x = 5."), "5");
        assert_eq!(strip("10\\text{ cm}"), "10");
        assert_eq!(strip("90^\\circ"), "90");
        assert_eq!(
            strip("\\left( 3, \\frac{\\pi}{2} \\right)"),
            "(3,\\frac{\\pi}{2})"
        );
        assert_eq!(strip("1 \\pm \\sqrt{19}"), "1\\\\sqrt{19}");
        assert_eq!(strip("(a+5)(b+2)"), "(+5)(b+2)");
        assert_eq!(strip("(a + 5)(b + 2)"), "(5)(2)");
        // One backslash per pass; extraction strips twice.
        assert_eq!(
            strip("\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}"),
            "\\begin{pmatrix}-2\\-14\\end{pmatrix}"
        );
        assert_eq!(strip("1, -2, 10"), "-2,1,10");
        assert_eq!(strip("12\\text{th grade}"), "12");
        assert_eq!(strip("\\text{five}"), "5");
        assert_eq!(strip("2.50"), "2.50");
        assert_eq!(strip("2.00"), "2");
        assert_eq!(strip("\\sqrt2"), "\\sqrt{2}");
        assert_eq!(strip("five"), "5");
        assert_eq!(strip("007"), "7");
        assert_eq!(strip("\\text{Evelyn}"), "Evelyn");
        assert_eq!(strip("50\\%"), "50");
    }
}
