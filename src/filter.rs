//! [`BroadcastFilter`]: which broadcasts a subscriber sees, by subject and sender. Filters run
//! in the client, on the communicator's own broadcast queue (as kiwiPy does).

use regex::Regex;

use crate::error::{Error, Result};

/// Selects broadcasts by subject and/or sender.
///
/// A pattern is either a glob — `*` matches any run of characters and every other character,
/// `.` included, is literal — or a regular expression ([`BroadcastFilter::subject_regex`]).
/// A broadcast that lacks the filtered field passes, as in kiwiPy.
///
/// ```
/// use kiwimq::BroadcastFilter;
/// let filter = BroadcastFilter::new().subject("state.*").sender("worker-1");
/// assert!(filter.matches(Some("state.done"), Some("worker-1")));
/// assert!(!filter.matches(Some("statex"), Some("worker-1")));
/// assert!(filter.matches(None, None));
/// ```
#[derive(Debug, Clone, Default)]
pub struct BroadcastFilter {
    subject: Option<Regex>,
    sender: Option<Regex>,
}

impl BroadcastFilter {
    /// A filter that lets every broadcast through.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only broadcasts whose subject matches the glob `pattern`.
    #[must_use]
    pub fn subject(mut self, pattern: &str) -> Self {
        self.subject = Some(glob(pattern));
        self
    }

    /// Only broadcasts whose sender matches the glob `pattern`.
    #[must_use]
    pub fn sender(mut self, pattern: &str) -> Self {
        self.sender = Some(glob(pattern));
        self
    }

    /// Only broadcasts whose subject matches the regular expression `pattern` (searched
    /// anywhere in the subject unless anchored with `^…$`).
    pub fn subject_regex(mut self, pattern: &str) -> Result<Self> {
        self.subject = Some(regex(pattern)?);
        Ok(self)
    }

    /// Only broadcasts whose sender matches the regular expression `pattern`.
    pub fn sender_regex(mut self, pattern: &str) -> Result<Self> {
        self.sender = Some(regex(pattern)?);
        Ok(self)
    }

    /// Whether a broadcast with this subject and sender passes.
    pub fn matches(&self, subject: Option<&str>, sender: Option<&str>) -> bool {
        passes(self.subject.as_ref(), subject) && passes(self.sender.as_ref(), sender)
    }
}

/// `subject ~ ^state_changed\..*$, sender ~ ^47$`, as the expressions match; `*` for a
/// filter that lets everything through.
impl std::fmt::Display for BroadcastFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [("subject", &self.subject), ("sender", &self.sender)]
            .into_iter()
            .filter_map(|(field, pattern)| {
                pattern
                    .as_ref()
                    .map(|pattern| format!("{field} ~ {}", pattern.as_str()))
            })
            .collect();
        match parts.is_empty() {
            true => f.write_str("*"),
            false => f.write_str(&parts.join(", ")),
        }
    }
}

fn passes(pattern: Option<&Regex>, field: Option<&str>) -> bool {
    match (pattern, field) {
        (Some(pattern), Some(field)) => pattern.is_match(field),
        _ => true,
    }
}

fn glob(pattern: &str) -> Regex {
    let body = pattern
        .split('*')
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join(".*");
    // Every piece is escaped, so the expression is always valid.
    Regex::new(&format!("^{body}$")).expect("an escaped glob is a valid regex")
}

fn regex(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| Error::config(format!("bad filter regex '{pattern}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_any_run_and_dot_is_literal() {
        let f = BroadcastFilter::new().subject("process.*.state");
        assert!(f.matches(Some("process.12.state"), None));
        assert!(f.matches(Some("process..state"), None));
        assert!(!f.matches(Some("processX12Xstate"), None));
        assert!(!f.matches(Some("process.12.state.old"), None));
    }

    #[test]
    fn a_pattern_without_star_is_exact() {
        let f = BroadcastFilter::new().sender("bob");
        assert!(f.matches(None, Some("bob")));
        assert!(!f.matches(None, Some("bobby")));
    }

    #[test]
    fn missing_fields_pass() {
        let f = BroadcastFilter::new().subject("a").sender("b");
        assert!(f.matches(None, None));
        assert!(!f.matches(Some("x"), None));
        assert!(!f.matches(None, Some("x")));
    }

    #[test]
    fn both_fields_must_match() {
        let f = BroadcastFilter::new().subject("a*").sender("b*");
        assert!(f.matches(Some("ax"), Some("bx")));
        assert!(!f.matches(Some("ax"), Some("cx")));
    }

    #[test]
    fn regex_filters_and_bad_regexes() {
        let f = BroadcastFilter::new()
            .subject_regex("^job-[0-9]+$")
            .unwrap();
        assert!(f.matches(Some("job-42"), None));
        assert!(!f.matches(Some("job-x"), None));
        assert!(BroadcastFilter::new().sender_regex("(").is_err());
    }

    #[test]
    fn regex_metacharacters_in_globs_are_literal() {
        let f = BroadcastFilter::new().subject("a+b(c)*");
        assert!(f.matches(Some("a+b(c)zz"), None));
        assert!(!f.matches(Some("aab(c)"), None));
    }
}
