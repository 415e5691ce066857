//! Arbitrary bytes through the configuration loader: no panic, every diagnostic points into
//! the input (line 1 or later, column 1 or later), and a rejected load names at least one error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::config::{ConfigError, Severity, load_str};

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    // YAML line breaks: LF, CRLF, and a lone CR.
    let lines =
        1 + yaml.matches('\n').count() + yaml.matches('\r').count() - yaml.matches("\r\n").count();
    let diagnostics = match load_str("fuzz.yaml", yaml) {
        Ok(loaded) => {
            assert!(
                loaded
                    .diagnostics
                    .iter()
                    .all(|d| d.severity == Severity::Warning)
            );
            loaded.diagnostics
        }
        Err(ConfigError::Invalid { diagnostics }) => {
            assert!(diagnostics.iter().any(|d| d.severity == Severity::Error));
            diagnostics
        }
        Err(ConfigError::Io { .. }) => panic!("load_str reads no files"),
    };
    for d in &diagnostics {
        assert!(d.line >= 1 && d.col >= 1, "{d}");
        // One past the last line is where an unterminated construct is reported.
        assert!(d.line <= lines + 1, "{d} is past the end of {lines} lines");
        assert!(!d.message.is_empty());
    }
});
