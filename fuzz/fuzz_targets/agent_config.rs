//! The agent's TOML configuration, parsed and checked exactly as
//! `Config::load` does: errors are fine, panics are not.
#![no_main]

use mesh_agent_formats::config::Config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Config::parse(text) {
        let _ = c.check();
    }
});
