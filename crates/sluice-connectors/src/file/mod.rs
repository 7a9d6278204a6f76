//! Local files: the `file` source (a watched directory, claim-then-process, never losing a file
//! on a crash) and the `file` sink (append to one file, or one file per message written
//! atomically).

mod appender;
pub mod sink;
pub mod source;

/// Matches `name` against a glob of `*` (any run of characters) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and what it had matched up to: backtracking point.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn star_and_question_mark() {
        assert!(glob_match("*", "a.csv"));
        assert!(glob_match("*.csv", "orders.csv"));
        assert!(!glob_match("*.csv", "orders.csv.bak"));
        assert!(glob_match("order-??.json", "order-01.json"));
        assert!(!glob_match("order-??.json", "order-1.json"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("*.*", "x.y"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(glob_match("ü?", "üx"));
    }
}
