//! JSON checks shared by every endpoint that reads JSON.

/// What a request holding such an integer is told (`bad_json`).
pub const WIDE_INTEGER: &str = "integers must fit in 64 bits (send larger ones as strings)";

/// Whether valid JSON `text` holds an integer literal (no fraction, no exponent) outside
/// `i64::MIN..=u64::MAX`.
pub fn has_wide_integer(text: &[u8]) -> bool {
    let mut i = 0;
    let mut in_string = false;
    while i < text.len() {
        let b = text[i];
        i += 1;
        match b {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'-' | b'0'..=b'9' if !in_string => {
                let start = i - 1;
                while text
                    .get(i)
                    .is_some_and(|c| matches!(c, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'))
                {
                    i += 1;
                }
                let number = std::str::from_utf8(&text[start..i]).unwrap_or_default();
                let integer = !number.contains(['.', 'e', 'E']);
                if integer && number.parse::<u64>().is_err() && number.parse::<i64>().is_err() {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}
