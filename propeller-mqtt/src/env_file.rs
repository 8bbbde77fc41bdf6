//! Reading a docker-style `.env` file, for `--env-file` and a `.env` in the
//! working directory.
//!
//! Precedence: a variable set to a non-empty value in the process environment
//! wins over the file; an empty one (what compose passes for a commented-out
//! line) does not, just as empty counts as unset everywhere else.

use std::path::Path;

use crate::ConfigError;

/// Variables as name/value pairs, in the order found.
pub type Vars = Vec<(String, String)>;

/// The `NAME=value` pairs of a `.env` file: `#` comments, blank lines,
/// `export NAME=value`, and values in single or double quotes.
///
/// # Errors
///
/// The file cannot be read, or a line is not `NAME=value`.
pub fn read(path: &Path) -> Result<Vars, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        var: "--env-file".into(),
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|(line, problem)| ConfigError::Material {
        var: "--env-file".into(),
        path: path.to_owned(),
        problem: format!("line {line}: {problem}"),
    })
}

fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, &'static str)> {
    let mut vars = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return Err((index + 1, "expected NAME=value"));
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((index + 1, "a variable name is letters, digits and _"));
        }
        let value = value.trim();
        let value = match value.chars().next() {
            Some(quote @ ('"' | '\'')) => match value[1..].find(quote) {
                Some(end) => &value[1..=end],
                None => return Err((index + 1, "unclosed quote")),
            },
            // An unquoted value ends at a ` #` comment.
            _ => value.split(" #").next().unwrap_or_default().trim(),
        };
        vars.push((name.to_owned(), value.to_owned()));
    }
    Ok(vars)
}

/// The process environment over `file`: non-empty process values win.
pub fn merge(
    file: Vec<(String, String)>,
    process: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let process: Vec<(String, String)> = process
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect();
    let mut merged: Vec<(String, String)> = file
        .into_iter()
        .filter(|(name, _)| !process.iter().any(|(p, _)| p == name))
        .collect();
    merged.extend(process);
    merged
}

/// The process environment as strings (lossy: `std::env::vars` panics on non-UTF-8).
pub fn process() -> Vars {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// What a service reads: the process environment over `--env-file PATH`, or
/// over `./.env` when no file is named and one exists. Returns the variables
/// and the file used, if any.
///
/// # Errors
///
/// The named file (or `./.env`) cannot be read or parsed.
pub fn service_vars(
    env_file: Option<&Path>,
) -> Result<(Vars, Option<std::path::PathBuf>), ConfigError> {
    let file = match env_file {
        Some(path) => Some(path.to_owned()),
        None => Some(std::path::PathBuf::from(".env")).filter(|path| path.is_file()),
    };
    let from_file = match &file {
        Some(path) => read(path)?,
        None => Vec::new(),
    };
    Ok((merge(from_file, process()), file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_env_syntax() {
        let vars = parse(
            "# comment\n\nA=1\nexport B = two words \nC=\"quoted # not a comment\"\nD='x'\nE=value # comment\nF=\n",
        )
        .unwrap();
        let get = |name: &str| {
            vars.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("two words"));
        assert_eq!(get("C"), Some("quoted # not a comment"));
        assert_eq!(get("D"), Some("x"));
        assert_eq!(get("E"), Some("value"));
        assert_eq!(get("F"), Some(""));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(parse("A=1\nnot a pair\n"), Err((2, "expected NAME=value")));
        assert_eq!(parse("A=\"open\n"), Err((1, "unclosed quote")));
        assert_eq!(
            parse("A B=1\n"),
            Err((1, "a variable name is letters, digits and _"))
        );
    }

    #[test]
    fn non_empty_process_values_win() {
        let file = vec![("A".into(), "file".into()), ("B".into(), "file".into())];
        let merged = merge(
            file,
            [
                ("A".to_owned(), "env".to_owned()),
                ("B".to_owned(), "".to_owned()),
            ],
        );
        assert!(merged.contains(&("A".into(), "env".into())));
        assert!(merged.contains(&("B".into(), "file".into())));
        assert_eq!(merged.len(), 2);
    }
}
