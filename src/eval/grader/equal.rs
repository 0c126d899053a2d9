//! Answer equivalence in the harness's order (`math_equal` in Qwen2.5-Math `grader.py`, the
//! version SkyThought's copy of the harness imports): text, multiple choice, numbers (with percent
//! variants), brackets ignored, element-wise lists and matrices, equations, then symbolic equality
//! (here: `expr::equivalent`).
use super::expr;
use regex::Regex;
use std::sync::LazyLock;

static CHOICE_LETTER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(A|B|C|D|E)\b").expect("choice pattern"));
static LIST_FORMAT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[(\[].+[)\]]").expect("list pattern"));
static BRACED_LIST: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{.*,.*\}").expect("braced list pattern"));

const MATRIX_BEGIN: &str = "\\begin{pmatrix}";
const MATRIX_END: &str = "\\end{pmatrix}";

/// Whether the normalised prediction and reference are the same answer.
pub fn math_equal(prediction: &str, reference: &str) -> bool {
    equal_at_depth(prediction, reference, 0)
}

/// Lists and matrices compare their parts with this same test; `((((1))))` nests one level per
/// bracket pair, so the recursion is bounded (the harness hits Python's recursion limit instead).
const MAX_DEPTH: usize = 32;

fn equal_at_depth(prediction: &str, reference: &str, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    if prediction.trim().to_lowercase() == reference.trim().to_lowercase() {
        return true;
    }
    if ["A", "B", "C", "D", "E"].contains(&reference) && clean_choice(prediction) == reference {
        return true;
    }
    if let (Some(number), Some(reference_number)) =
        (parse_number(prediction), parse_number(reference))
    {
        if numerically_equal(number, reference_number) {
            return true;
        }
        // Unequal numbers are unequal answers, unless dropping commas made them numbers: the
        // harness goes on to sympy, which reads `3,99` as the list's first item, 3.
        if !prediction.contains(',') && !reference.contains(',') {
            return false;
        }
    }
    if prediction.is_empty() {
        return false;
    }

    let prediction = prediction.trim();
    let mut reference = reference.trim().to_string();
    if prediction.contains("pmatrix") && !reference.contains("pmatrix") {
        reference = braces_to_pmatrix(&reference);
    }
    let reference = reference.as_str();

    // Brackets do not count: "(1,2)" = "1,2", and an interval's "(" vs "[" is not compared.
    let (mut pred_text, mut ref_text) = (prediction, reference);
    let wrapped = |s: &str, open: char, close: char| s.starts_with(open) && s.ends_with(close);
    if (wrapped(pred_text, '[', ']') && !wrapped(ref_text, '(', ')'))
        || (wrapped(pred_text, '(', ')') && !wrapped(ref_text, '[', ']'))
    {
        let brackets: &[char] = &['[', ']', '(', ')'];
        pred_text = pred_text.trim_matches(brackets);
        ref_text = ref_text.trim_matches(brackets);
    }
    let without_brackets = |s: &str| s.replace(['{', '}', '(', ')'], "").to_lowercase();
    if without_brackets(pred_text) == without_brackets(ref_text) {
        return true;
    }

    // Element-wise lists and matrices; when they differ, the whole answers still get the
    // symbolic comparison below.
    if LIST_FORMAT.is_match(prediction)
        && LIST_FORMAT.is_match(reference)
        && lists_equal(prediction, reference, depth)
    {
        return true;
    }
    if is_matrix(prediction) && is_matrix(reference) && matrices_equal(prediction, reference, depth)
    {
        return true;
    }

    let is_simple_equation = |s: &str| {
        s.matches('=').count() == 1
            && s.split('=')
                .next()
                .unwrap_or_default()
                .trim()
                .chars()
                .count()
                <= 2
    };
    let right_side = |s: &str| s.split('=').nth(1).unwrap_or_default().to_string();
    let equal_as_equations =
        if prediction.matches('=').count() == 1 && reference.matches('=').count() == 1 {
            let (pred, reference) = (
                equation_as_difference(prediction),
                equation_as_difference(reference),
            );
            symbolic_equal(&pred, &reference) || symbolic_equal(&format!("-({pred})"), &reference)
        } else if is_simple_equation(prediction) && !reference.contains('=') {
            equal_at_depth(&right_side(prediction), reference, depth + 1)
        } else if is_simple_equation(reference) && !prediction.contains('=') {
            equal_at_depth(prediction, &right_side(reference), depth + 1)
        } else {
            false
        };
    equal_as_equations || symbolic_equal(prediction, reference)
}

/// The harness's `choice_answer_clean`: the last standalone A-E letter, else the trimmed text.
fn clean_choice(prediction: &str) -> String {
    let trimmed = prediction
        .trim_matches('\n')
        .trim_end_matches('.')
        .trim_end_matches('/')
        .trim_matches(' ')
        .trim_start_matches(':');
    let upper = trimmed.to_uppercase();
    let choice = match CHOICE_LETTER.find_iter(&upper).last() {
        Some(letter) => letter.as_str().to_string(),
        None => trimmed.trim().trim_matches('.').to_string(),
    };
    choice
        .trim_end_matches('.')
        .trim_end_matches('/')
        .to_string()
}

/// Python's `float()` after the harness removed thousands commas; "50%" (and "50\%") is 0.5.
fn parse_number(text: &str) -> Option<f64> {
    let text = text.replace(',', "");
    if let Some(value) = python_float(&text) {
        return Some(value);
    }
    let percent = text.strip_suffix('%')?;
    let percent = percent.strip_suffix('\\').unwrap_or(percent);
    python_float(percent).map(|value| value / 100.0)
}

fn python_float(text: &str) -> Option<f64> {
    let text = text.trim();
    // Python accepts single underscores between digits ("1_000").
    let digits_around = |i: usize| {
        let bytes = text.as_bytes();
        i > 0
            && i + 1 < bytes.len()
            && bytes[i - 1].is_ascii_digit()
            && bytes[i + 1].is_ascii_digit()
    };
    if text
        .char_indices()
        .any(|(i, c)| c == '_' && !digits_around(i))
    {
        return None;
    }
    text.replace('_', "").parse().ok()
}

/// Equal within relative 1e-4, also after scaling the reference by 100 either way (an answer
/// given in percent).
fn numerically_equal(prediction: f64, reference: f64) -> bool {
    [reference / 100.0, reference, reference * 100.0]
        .into_iter()
        .any(|candidate| is_close(candidate, prediction))
}

/// Python's `math.isclose(a, b, rel_tol=1e-4)`.
fn is_close(a: f64, b: f64) -> bool {
    if a == b {
        return true;
    }
    if a.is_infinite() || b.is_infinite() {
        return false;
    }
    (a - b).abs() <= 1e-4 * a.abs().max(b.abs())
}

/// The harness's `str_to_pmatrix`: `{1,2}` becomes a one-column pmatrix (rows separated by a
/// single backslash, as the harness writes them); a reference without such a group becomes "".
fn braces_to_pmatrix(reference: &str) -> String {
    BRACED_LIST
        .find_iter(reference.trim())
        .map(|m| {
            let body = m.as_str().trim_matches(['{', '}']).replace(',', "\\");
            format!("{MATRIX_BEGIN}{body}{MATRIX_END}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_matrix(s: &str) -> bool {
    (s.starts_with(MATRIX_BEGIN) || s.starts_with("\\begin{bmatrix}"))
        && (s.ends_with(MATRIX_END) || s.ends_with("\\end{bmatrix}"))
}

/// Drops the first and last character, whatever they are, then compares comma-separated parts.
fn lists_equal(prediction: &str, reference: &str, depth: usize) -> bool {
    let inner = |s: &str| {
        let chars: Vec<char> = s.chars().collect();
        chars[1..chars.len().saturating_sub(1).max(1)]
            .iter()
            .collect::<String>()
    };
    let (prediction, reference) = (inner(prediction), inner(reference));
    let pred_parts: Vec<&str> = prediction.split(',').collect();
    let ref_parts: Vec<&str> = reference.split(',').collect();
    pred_parts.len() == ref_parts.len()
        && pred_parts
            .iter()
            .zip(&ref_parts)
            .all(|(p, r)| equal_at_depth(p, r, depth + 1))
}

fn matrices_equal(prediction: &str, reference: &str, depth: usize) -> bool {
    let rows = |s: &str| -> Vec<String> {
        let chars: Vec<char> = s.chars().collect();
        let begin = MATRIX_BEGIN.chars().count();
        let end = chars
            .len()
            .saturating_sub(MATRIX_END.chars().count())
            .max(begin);
        let body: String = chars[begin..end].iter().collect();
        body.split("\\\\")
            .map(|row| row.trim().to_string())
            .filter(|row| !row.is_empty())
            .collect()
    };
    let (pred_rows, ref_rows) = (rows(prediction), rows(reference));
    pred_rows.len() == ref_rows.len()
        && pred_rows.iter().zip(&ref_rows).all(|(p, r)| {
            let pred_cells: Vec<&str> = p.split('&').collect();
            let ref_cells: Vec<&str> = r.split('&').collect();
            pred_cells.len() == ref_cells.len()
                && pred_cells
                    .iter()
                    .zip(&ref_cells)
                    .all(|(p, r)| equal_at_depth(p, r, depth + 1))
        })
}

/// `lhs = rhs` → `lhs - (rhs)`.
fn equation_as_difference(equation: &str) -> String {
    let (lhs, rhs) = equation.split_once('=').unwrap_or((equation, ""));
    format!("{} - ({})", lhs.trim(), rhs.trim())
}

/// Symbolic equality: both parse and agree numerically (see `expr`). The harness first tries the
/// text with `\\` read as `\`.
fn symbolic_equal(a: &str, b: &str) -> bool {
    let parse = |s: &str| expr::parse(&s.replace("\\\\", "\\")).or_else(|| expr::parse(s));
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => expr::equivalent(&a, &b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::math_equal;

    #[test]
    fn harness_cases() {
        assert!(math_equal("\\frac{2240}{78125}", "\\frac{448}{15625}"));
        assert!(math_equal("C", "(C)"));
        assert!(math_equal("32348", "32,348"));
        // The harness reads an unbracketed list up to its first comma (a harness error).
        assert!(math_equal("-2,99", "-2,1"));
        assert!(!math_equal("10080", "10,80"));
        assert!(math_equal("[2,\\infty)", "(2,\\infty)"));
        assert!(math_equal("5.5", "\\frac{11}{2}"));
        assert!(math_equal("50", "0.5"));
        assert!(math_equal("x=3", "3"));
        assert!(math_equal("y=2x+1", "y=1+2x"));
        assert!(math_equal(
            "\\begin{pmatrix}-\\frac{1}{3}\\\\\\frac{2}{3}\\end{pmatrix}",
            "\\begin{pmatrix}-1/3\\\\2/3\\end{pmatrix}"
        ));
        assert!(!math_equal("10080", "10,80"));
        assert!(!math_equal("(-9,0)\\cup(9,36)", "(0,9)\\cup(9,36)"));
        assert!(!math_equal("odd", "even"));
        assert!(!math_equal("", "0"));
        let deep = format!("{}1{}", "(".repeat(5_000), ")".repeat(5_000));
        assert!(!math_equal(&deep, &deep.replace('1', "2")));
    }
}
